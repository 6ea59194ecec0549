"""GPU benchmark (one H100/H200-class GPU): `bash scripts/gpu_bench.sh` (section `gpu`).

LLaVA-1.5-7B shapes (Vicuna-7B: d=4096, ffn 11008, 32 layers, 32 heads, vocab 32064; CLIP-L/336:
576 image tokens), random bf16 weights initialised directly on the device, the official γ-MoD
placement (28 MoD layers: 3..30) at routing ratio 0.5 with the capacity rule. 35 system + 576
image + 39 question tokens = 650, the prompt length of the reference FLOP analysis. Prefill at
batch 1 (latency-bound) and 8 (closer to FLOP-bound), decode of 32 tokens at batch 1 and 8, MFU
against the bf16 dense peak of the device kind. No XLA counts (an unrolled 32-layer 7B compile
per program would eat the time budget) and no PyTorch baseline (it runs float32 on CPU).
Attention is the model's `attention_impl` "auto": cuDNN flash attention on a GPU with these bf16
inputs, whose causal tiles the analytic FLOP count follows ("causal"); `scripts/gpu_bench.sh`
adds prefill sections for the other implementations (`--set model.attention_impl=...`).
"""

from gmod_jax import config as C
from bench import BenchConfig, Case


def get_config() -> BenchConfig:
    model = C.llava_v15_7b().replace(dtype="bfloat16", param_dtype="bfloat16")
    return BenchConfig(
        section="gpu",
        title="GPU: dense vs γ-MoD, LLaVA-1.5-7B shapes, bf16, 650 tokens (`configs/bench_gpu.py`)",
        model=model,
        placement="arank_mod",
        routing_ratio=0.5,
        inference_routing="capacity",
        system_tokens=35, question_tokens=39, answer_tokens=16,
        cases=(
            Case("prefill", 1, repeats=20),
            Case("prefill", 8, repeats=10),
            Case("decode", 1, repeats=5, new_tokens=32),
            Case("decode", 8, repeats=5, new_tokens=32),
        ),
        warmup=2,
        xla_flops=False,
        attention_flops="causal",
        torch_baseline=False,
        require_platform="gpu",
    )
