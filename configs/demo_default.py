"""`make demo`: the γ-MoD pipeline on the embedded synthetic task, sized for a 2-core CPU, on
scenes whose objects cover several image tokens on a mostly empty background, where the paper's
Fig. 4 finding (γ-MoD skips the redundant background patches) can show up and be measured.

    python -m demo --workdir runs/demo [--set key=value ...]

Everything not listed here is configs/demo_cells.py's (the 16-token scenes, the default until
2026-12-07; its docstring says why each of those choices). What changes, and why:
- Scenes: 112x112 px on the same 4x4 grid of 28 px cells, seen through 14 px patches: 8x8 = 64
  image tokens, each shape under a 2x2 block of patches. With 1-4 shapes about 85% of the
  patches are pure background (one uniform colour per image), as most of a real photo's patches
  are redundant; 16 patches (one per cell) left the image a third of the routable span, and the
  33 system-prompt tokens were what the router skipped.
- `patch_grid=8`: every scene records which of its 64 patches hold object pixels
  (`patch_objects`), so the routing stage reports the share of background and of object
  patches each MoD layer skips (the report's patch table and outlined overlays).
- Sequences: 33 system + 64 image + 5 turns (<= 201 tokens, bucket 208); captions 64 + <= 44 (112).
- Vision tower: 600 steps at 6e-3 with the shape / colour / size read-outs. Each patch sees a
  quarter of a shape; at the cell scenes' 400 steps and 3e-3 the tower named 72% of the object
  tokens (95.5% of all tokens: the background is easy) and the LLM answered shape questions at
  chance (dense 69.2%); 600 at 6e-3: 97.3% of object tokens, dense 87.6%; with the attribute
  read-outs (a shape direction shared by all colours, which counts and look-ups by shape want)
  92.5% of object tokens and dense 91.2%.
- Captions start with a tally of the shapes, worded as the count answers ("Squares: zero,
  circles: two, triangles: one. A red ...", `caption_shape_tally`), its order drawn per scene
  (`caption_tally_order="random"`), and every image has five question turns (`min_turns` =
  `max_turns` = 5). Shape look-ups were the weak ones and the dense model's accuracy hung on the
  seed: 91.2 / 81.7 / 91.3% on seeds 0 / 1 / 2 with neither; with a fixed-order tally and three
  turns 92.8 / 81.5 / 97.1% (seed 1 named the shape the fixed order put first, "How many
  triangles" -> "squares: one"); a random order, three turns: 92.3 / 93.7 / 86.1% (seed 2's
  colour and side look-ups unfinished: its last 100 steps' loss 0.058 against 0.036 / 0.025).
  Five turns (4.7 per image on average against 2.9: a turn whose kind has no question left is
  dropped) give each step 1.6x the answers for 18% longer rows: 94.7 / 96.8 / 96.0% (seeds
  3 / 4: 81.4 / 87.5%, their loss as high at the end as the three-turn misses').
- Routing ratio 0.5, the official code's, with `router_start="redundancy"` (a documented
  deviation; `random` is the official start): the shared router starts from the direction away
  from the mean image token (demo/router_probes.py), so it skips background first and keeps the
  object patches and the system prompt. With the official random start the router skipped
  background and object patches alike, by position (31.8% / 28.0%): its order comes from the
  start and no loss revisits it. A start that also placed the system prompt (the mean over all
  routable tokens, at ratio 0.68) left its order against the objects to the seed, and the
  fine-tune raises the system prompt: on one seed it took every object patch's slot.
Measured on 2 CPU cores: docs/demo.md ("Background and object patches").
"""

import dataclasses
from pathlib import Path

from gmod_jax.config_files import load_config_file
from demo import DemoConfig

IMAGE_SIZE, PATCH = 112, 14


def get_config() -> DemoConfig:
    base = load_config_file(Path(__file__).with_name("demo_cells.py"), DemoConfig)
    synthetic = dataclasses.replace(base.synthetic, image_size=IMAGE_SIZE, patch_grid=IMAGE_SIZE // PATCH,
                                    caption_shape_tally=True, caption_tally_order="random",
                                    min_turns=5, max_turns=5)
    model = base.model.replace(vision=dataclasses.replace(base.model.vision, image_size=IMAGE_SIZE, patch_size=PATCH))

    def sized(train, max_length: int):
        return train.replace(model=model, data=dataclasses.replace(train.data, max_length=max_length,
                                                                   buckets=(max_length,)))

    return dataclasses.replace(
        base, model=model, synthetic=synthetic,
        vision_pretrain=dataclasses.replace(base.vision_pretrain, steps=600, lr=6e-3, attribute_labels=True),
        pretrain=sized(base.pretrain, 112),  # plain captions: 64 image + tally and caption (<= 44) + end
        dense_train=sized(base.dense_train, 208),  # vicuna_v1: 33 system + 64 image + 5 turns (<= 201)
        finetune=sized(base.finetune, 208),
        routing_ratio=0.5, router_start="redundancy")
