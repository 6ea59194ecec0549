"""`make demo`: the γ-MoD pipeline on the embedded synthetic task, sized for a 2-core CPU.

    python -m gmod_jax.demo --workdir runs/demo [--set key=value ...]

Why these sizes:
- Scenes: 56x56 px on a 2x2 grid, 1-3 shapes, small or large. Patches of 8 px give 49 image tokens: in
  these runs a model trained from scratch learnt to use the image far sooner with many small
  patches (49) than with a few large ones (16 or 9 tokens), and γ-MoD has background patches
  to skip. Every question family of the generator is kept (colour, count, presence, position).
- Stage 1 is LLaVA's: captions with the `plain` template (the caption right after the image;
  short sequences, every token needs the image), which is what teaches the vision tower from
  scratch; then instruction tuning on the questions with vicuna_v1.
- The LLM is LLaMA-shaped, 6 layers; 2 of them (the top-ARank ones) stay dense.
- One sequence-length bucket per stage (all batches pad to it): one compiled train step each.

Measured on 2 CPU cores: 14.1 minutes for all stages, but the dense model reaches only ~54%
held-out accuracy (targets: 90%); see README "The embedded demo" for what was tried.
"""

from gmod_jax import config as C
from gmod_jax.data.synthetic import SyntheticConfig
from gmod_jax.demo import DemoConfig
from train.config import DataConfig, OptimConfig, TrainConfig


def get_config() -> DemoConfig:
    synthetic = SyntheticConfig(image_size=56, grid=2, min_objects=1, max_objects=3,
                                shapes=("circle", "square", "triangle"), colors=("red", "green", "blue", "yellow"),
                                max_turns=3, text_only_fraction=0.0)
    model = C.ModelConfig(
        vision=C.VisionConfig(hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4, image_size=56,
                              patch_size=8, feature_layer=-1),  # 49 image tokens; last layer (no CLIP to reuse)
        projector=C.ProjectorConfig(type="mlp2x_gelu"),
        text=C.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=6, num_heads=4,
                           num_kv_heads=4, max_position_embeddings=256),
    )

    def recipe(steps: int, lr: float, max_length: int, trainable=(r".*",)) -> TrainConfig:
        return TrainConfig(
            model=model, data=DataConfig(max_length=max_length, buckets=(max_length,)),
            optim=OptimConfig(lr=lr, schedule="cosine", warmup_ratio=0.05, weight_decay=0.0, grad_clip=1.0,
                              trainable=trainable),
            global_batch=32, num_steps=steps, log_every=5, checkpoint_every=100, keep_checkpoints=1)

    return DemoConfig(
        model=model,
        pretrain=recipe(400, 3e-3, 80),  # plain captions: 1 + 49 + caption
        dense_train=recipe(500, 2e-3, 136),  # vicuna_v1 questions: 33 system + 49 image + 1-3 turns
        finetune=recipe(150, 1e-3, 136, trainable=(r"^projector/", r"^llm/")),  # stage 2: vision tower frozen
        synthetic=synthetic, num_train=10000, num_eval=300, vocab_size=512, tokenizer_texts=2000,
        arank_samples=50, num_dense=2, routing_ratio=0.5, masking="official",
        # Inference routes with the training top-k rule: a router fine-tuned for 150 steps never
        # gets a keep-prob below the official prefill threshold 0.005 (0% skipped), and a 0.5
        # threshold, unmasked at inference as officially, skips question tokens (11% accuracy).
        mod_options=(("inference_routing", "capacity"),),
        eval_batch=64, speed_batch=16, speed_repeats=5, routing_samples=64, num_overlays=3,
    )
