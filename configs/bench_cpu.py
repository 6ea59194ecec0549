"""CPU benchmark: `python -m bench --config configs/bench_cpu.py --json runs/bench_cpu.json
--markdown BENCHMARKS.md` (section `cpu`).

Sized so matrix multiplies dominate on a 2-core CPU while the whole run (compiles, XLA counts,
PyTorch baseline) stays within minutes:

* LLaMA d=1024, ffn 2816, 16 heads, vocab 32000: a d≥1024 layer spends >90% of its FLOPs in
  matmuls, so the dense/MoD ratio reflects work skipped, not Python or dispatch overhead.
* 12 layers with the official γ-MoD placement (all but layers 0, 1, 2 and L-1) gives 8 MoD layers
  of 12. With 8 layers the same rule leaves only 4 of 8 MoD and a prefill FLOP bound of 1.32×,
  too close to 1 to separate routing overhead from noise; 12 layers gives 1.48× (7B: 28 of 32).
* A small CLIP (d=256, 4 layers) at the real 336 px / patch 14 resolution keeps LLaVA-1.5's
  576 image tokens, so the token layout (35 system + 576 image + 29 question = 640) and hence
  the skip ratio match the real model while the tower stays a small, MoD-untouched cost.
* Routing: capacity rule at ratio 0.5 over system+image tokens (official masking): 305 of 640
  tokens skipped per MoD layer (skip 0.477), exactly, even with random weights.
* Official-rule rows: the router is fitted (routing loss only, 10 Adam steps on the 5 prefill
  prompts), then its kernel scale is calibrated on the official walk itself so that the
  threshold skips the capacity rule's share (±0.02); those rows run the threshold rule with
  capacity buckets in sixteenths of T (eighths waste up to T/8 slots per layer: at a realised
  skip of 0.49 the smallest holding bucket is 5/8 of T, a bound of 1.33× instead of 1.46×).
* `image_token_index` 31999 sits inside the 32000-token vocabulary, as HF LLaVA requires for
  the PyTorch baseline (random weights make the choice of id irrelevant otherwise).
"""

from gmod_jax import config as C
from bench import BenchConfig, Case


def get_config() -> BenchConfig:
    model = C.ModelConfig(
        vision=C.VisionConfig(hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4,
                              image_size=336, patch_size=14, feature_layer=-2),
        projector=C.ProjectorConfig(type="mlp2x_gelu"),
        text=C.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=12,
                           num_heads=16, num_kv_heads=16, max_position_embeddings=4096),
        image_token_index=31999, pad_token_id=0, dtype="float32", param_dtype="float32")
    return BenchConfig(
        section="cpu",
        title="CPU: dense vs γ-MoD, d=1024 × 12 layers (8 MoD), 640 tokens (`configs/bench_cpu.py`)",
        model=model,
        placement="arank_mod",
        routing_ratio=0.5,
        inference_routing="capacity",
        system_tokens=35, question_tokens=29, answer_tokens=16,
        cases=(
            Case("prefill", 1, repeats=5),
            Case("prefill", 4, repeats=3),
            Case("decode", 1, repeats=3, new_tokens=32),
            Case("decode", 4, repeats=3, new_tokens=32),
            Case("train_step", 2, repeats=3),
        ),
        warmup=1,
        official_rule_rows=True,
        router_fit_steps=10,
        threshold_buckets=16,
        xla_flops=True,
        torch_baseline=True,
        torch_attention="sdpa",
    )
