"""CPU benchmark with LLaVA-HR's token layout: `python -m bench --config
configs/bench_cpu_hr.py --json runs/bench_cpu_hr.json --markdown BENCHMARKS.md` (section `cpu_hr`).

The layout of γ-MoD's main model at reduced widths, sized like `configs/bench_cpu.py` so matrix
multiplies dominate on a 2-core CPU:

* Vision: LLaVA-HR's multi-path tower at its real geometry, S = 1024 px: a small CLIP (d=256,
  4 layers, native 336 px / patch 14) on the 448-px fast input and a small 4-stage ConvNeXt
  (dims 32/64/128/256, stride 32) on the 1024-px image, with the MR-adapters and the final
  fusion: 1024 image tokens, the multi-path code of the 7B model.
* LLaMA d=1024, ffn 2816, 16 heads, vocab 32000 (bench_cpu's: >90% of a layer's FLOPs in matmuls).
* Token layout: 35 system + 1024 image + 29 question = 1088 tokens.
* MoD proportion: the official 28 of 32 layers is 7/8; with 8 layers that is 7 MoD layers, and
  layer 0 (the highest ARank in the paper's analysis) stays dense: placement "explicit",
  layers 1..7. The official rule (all but 0, 1, 2, L-1) would leave 4 of 8 at this depth.
* Routing: capacity rule at ratio 0.5 over system + image (official masking): 529 of 1088 tokens
  skipped per MoD layer (skip 0.486), exactly, even with random weights.
* `train_step` trains projector + LLM with the tower frozen, the benchmark's rule for every
  config (γ-MoD-LLaVA-HR's SFT also trains the towers: configs/gamma_mod_llava_hr_7b.py).
* No PyTorch baseline: transformers has no LLaVA-HR model. `image_token_index` -200 is
  LLaVA-HR's placeholder.
"""

from gmod_jax import config as C
from bench import BenchConfig, Case


def get_config() -> BenchConfig:
    model = C.ModelConfig(
        vision=C.VisionConfig(hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4,
                              image_size=336, patch_size=14, tower="multipath", input_image_size=1024,
                              slow=C.ConvNeXtConfig(depths=(1, 1, 2, 1), dims=(32, 64, 128, 256))),
        projector=C.ProjectorConfig(type="mlp2x_gelu"),
        text=C.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=8,
                           num_heads=16, num_kv_heads=16, max_position_embeddings=4096),
        image_token_index=C.LLAVA_HR_IMAGE_TOKEN_INDEX, pad_token_id=0, dtype="float32", param_dtype="float32")
    return BenchConfig(
        section="cpu_hr",
        title="CPU: dense vs γ-MoD, LLaVA-HR layout, d=1024 × 8 layers (7 MoD), 1088 tokens "
              "(`configs/bench_cpu_hr.py`)",
        model=model,
        placement="explicit",
        mod_layers=tuple(range(1, 8)),
        routing_ratio=0.5,
        inference_routing="capacity",
        system_tokens=35, question_tokens=29, answer_tokens=16,
        cases=(
            Case("prefill", 1, repeats=3),
            Case("prefill", 2, repeats=3),
            Case("decode", 1, repeats=3, new_tokens=32),
            Case("train_step", 1, repeats=3),
        ),
        warmup=1,
        xla_flops=True,
        torch_baseline=False,
    )
