"""GPU benchmark at LLaVA-HR-7B shapes (one H100/H200-class GPU): `bash scripts/gpu_bench.sh`
(section `gpu_hr`).

γ-MoD's main model: Vicuna-7B (d=4096, ffn 11008, 32 layers, vocab 32000) with the multi-path
tower at S = 1024 (CLIP-L/336 fast path at 448 px, ConvNeXt-L slow path, MR-adapters, fusion:
1024 image tokens), random bf16 weights, the official placement (28 MoD layers: 3..30) at
routing ratio 0.5 with the capacity rule. 35 system + 1024 image + 341 question tokens = 1400,
the sequence length of the paper's TFLOPs formula (`gmod_jax.flops.paper_model_tflops
("llava-hr-7b")`: 19.2 dense), so the analytic LLM counts here sit next to the paper's numbers.
Prefill at batch 1 and 8, decode of 32 tokens at batch 1 and 8, MFU; no XLA counts and no PyTorch
baseline (as `configs/bench_gpu.py`, whose notes on attention apply).
"""

from gmod_jax import config as C
from bench import BenchConfig, Case


def get_config() -> BenchConfig:
    model = C.llava_hr_7b(input_image_size=1024).replace(dtype="bfloat16", param_dtype="bfloat16")
    return BenchConfig(
        section="gpu_hr",
        title="GPU: dense vs γ-MoD, LLaVA-HR-7B shapes, bf16, 1400 tokens (`configs/bench_gpu_hr.py`)",
        model=model,
        placement="arank_mod",
        routing_ratio=0.5,
        inference_routing="capacity",
        system_tokens=35, question_tokens=341, answer_tokens=16,
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
