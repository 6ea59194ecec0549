"""GPU benchmark at Mini-Gemini-HD-7B shapes (one H100/H200-class GPU): `bash scripts/gpu_bench.sh`
(section `gpu_mgm`).

Vicuna-7B with MGM-HD's vision stack (CLIP-L/336 on 2x2 tiles + a global view, ConvNeXt-L aux
tower at 1536 px, patch info mining: 2880 image tokens), random bf16 weights, the official
placement (28 MoD layers: 3..30) at routing ratio 0.5 with the capacity rule over system + image
(the project's default span). 35 system + 2880 image + 1085 question tokens = 4000, the sequence
length of the paper's TFLOPs formula (`gmod_jax.flops.paper_model_tflops("mgm-hd-7b")`: 60.2
dense), inside the preset's `tokenizer_model_max_length` 4096. Prefill at batch 1 and 4, decode
of 32 tokens at batch 1 and 4: each image's aux feature map alone is 2880 x 384 x 384 values
(0.85 GB in bf16), and a batch-4 prefill already runs 4x the tokens of LLaVA-HR's batch 4; no XLA
counts, no PyTorch baseline.
"""

from gmod_jax import config as C
from bench import BenchConfig, Case


def get_config() -> BenchConfig:
    model = C.mgm_hd_7b().replace(dtype="bfloat16", param_dtype="bfloat16")
    return BenchConfig(
        section="gpu_mgm",
        title="GPU: dense vs γ-MoD, MGM-HD-7B shapes, bf16, 4000 tokens (`configs/bench_gpu_mgm.py`)",
        model=model,
        placement="arank_mod",
        routing_ratio=0.5,
        inference_routing="capacity",
        system_tokens=35, question_tokens=1085, answer_tokens=16,
        cases=(
            Case("prefill", 1, repeats=10),
            Case("prefill", 4, repeats=5),
            Case("decode", 1, repeats=5, new_tokens=32),
            Case("decode", 4, repeats=5, new_tokens=32),
        ),
        warmup=2,
        xla_flops=False,
        attention_flops="causal",
        torch_baseline=False,
        require_platform="gpu",
    )
