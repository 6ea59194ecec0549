"""Tiny dense LLaVA on synthetic batches: CPU smoke runs and tests (seconds per run).

    python -m train --config configs/tiny_dense.py --workdir /tmp/tiny_dense
"""

from gmod_jax import config as C
from train.config import DataConfig, OptimConfig, TrainConfig


def get_config() -> TrainConfig:
    model = C.tiny(vision=C.VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                         image_size=56, patch_size=14))  # 16 image tokens
    return TrainConfig(
        model=model,
        data=DataConfig(source="synthetic", seq_len=48, num_examples=320),
        optim=OptimConfig(lr=1e-3, schedule="cosine", warmup_ratio=0.1, weight_decay=0.0, grad_clip=1.0,
                          trainable=(r"^projector/", r"^llm/")),
        global_batch=8,
        num_epochs=1.0,  # 320 / 8 = 40 steps
        log_every=5,
        eval_every=20,
        eval_steps=2,
        checkpoint_every=20,
        keep_checkpoints=2,
        seed=0,
    )
