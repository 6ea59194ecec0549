"""The demo on scenes whose objects cover several image tokens on a mostly empty background
(issue 26): where the paper's Fig. 4 finding, γ-MoD skipping the redundant background patches,
can show up and be measured.

    python -m demo --workdir runs/demo_patches --config configs/demo_patches.py

What changes from configs/demo_default.py, and why:
- Scenes: 112x112 px on the same 4x4 grid of 28 px cells, seen through 14 px patches: 8x8 = 64
  image tokens, each shape under a 2x2 block of patches. With 1-4 shapes about 85% of the
  patches are pure background (one uniform colour per image), as most of a real photo's patches
  are redundant; the default's 16 patches (one per cell) left the image only a sixth of the
  routable span, where the 33 system-prompt tokens were the obvious thing to skip.
- `patch_grid=8`: every scene records which of its 64 patches hold object pixels
  (`patch_objects`), so the routing stage reports the share of background and of object
  patches each MoD layer skips (the report's patch table and outlined overlays).
- Sequences: 33 system + 64 image + 1-3 turns (<= 176 tokens); captions 64 + <= 40 (112).
- Routing ratio 0.5 (the official code's default): 97 routable tokens, 48 skipped per MoD layer,
  so a router that keeps the system prompt skips three quarters of the image; at 0.34 (33
  skipped) skipping the whole system prompt would already fill the budget.
Everything else (tower pretraining, caption and question stages, learning rates, the routing
loss weight and inference options) is the default demo's. Measured on 2 CPU cores (seed 0,
docs/demo.md, "Background and object patches"): dense 69.2% (target 90% missed), 37 minutes;
with the official random router start γ-MoD skips background and object patches alike (31.8% /
28.0%, by position); with `--set router_start=redundancy` (a probe, not the paper's method) it
skips 74.9% of the background and 6.0% of the objects, 0.5 points above the dense fine-tune.
"""

import dataclasses
from pathlib import Path

from gmod_jax.config_files import load_config_file
from demo import DemoConfig

IMAGE_SIZE, PATCH = 112, 14


def get_config() -> DemoConfig:
    base = load_config_file(Path(__file__).with_name("demo_default.py"), DemoConfig)
    synthetic = dataclasses.replace(base.synthetic, image_size=IMAGE_SIZE, patch_grid=IMAGE_SIZE // PATCH)
    model = base.model.replace(vision=dataclasses.replace(base.model.vision, image_size=IMAGE_SIZE, patch_size=PATCH))

    def sized(train, max_length: int):
        return train.replace(model=model, data=dataclasses.replace(train.data, max_length=max_length,
                                                                   buckets=(max_length,)))

    return dataclasses.replace(
        base, model=model, synthetic=synthetic,
        pretrain=sized(base.pretrain, 112),  # plain captions: 64 image + caption (<= 40) + end
        dense_train=sized(base.dense_train, 176),  # vicuna_v1: 33 system + 64 image + 1-3 turns
        finetune=sized(base.finetune, 176),
        routing_ratio=0.5)
