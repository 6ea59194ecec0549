"""The demo's stand-in for CLIP pretraining: a vision tower that already sees the synthetic scenes.

LLaVA starts from a pretrained CLIP and keeps it frozen; the demo has no CLIP to download. A
ViT trained from scratch through the LLM's next-token loss does not get there: in our runs its
image features collapsed within ~60 caption steps to one large vector shared by every patch
(std across images 0.03 against 3.7 overall), and the model captioned every image alike. So,
as CLIP is pretrained before LLaVA ever sees it, the tower is first trained on its own with a
cheap supervised task: every patch token of its LLaVA features (the same `feature_layer`, CLS
dropped) predicts, through one shared linear read-out, what occupies the grid cell the patch
lies in (empty, or shape x colour x size). The labels are per token on purpose: the LLM finds
an object by attending to the image tokens that show it, so each token has to carry its own
cell's content. With `position_labels` two more read-outs name the token's grid row and column:
trained on content alone, the features kept no trace of where a patch lies (a linear probe told
left from right for 59% of object patches), which CLIP's features do keep and position questions
need. With `attribute_labels` three more name the cell's shape, colour and size on their own, so
the features give each shape one direction whatever its colour (CLIP's features are linear in
such attributes), which look-ups and counts by shape want. The read-outs are thrown away; the
tower's weights go on into the LLaVA stages, which keep it frozen as LLaVA keeps CLIP frozen.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gmod_jax.config import ModelConfig
from gmod_jax.data.synthetic import SIZES, SyntheticConfig


@dataclasses.dataclass(frozen=True)
class VisionPretrainConfig:
    steps: int = 300
    batch: int = 128
    lr: float = 3e-3  # AdamW peak, linear warmup then cosine to 0
    warmup_steps: int = 20
    seed: int = 0
    position_labels: bool = False  # every patch also names its grid row and column (two more read-outs)
    # Every patch also names its cell's shape, colour and size on their own (three more read-outs,
    # each with "empty"): the joint class alone need not give "circle" one direction shared by
    # all colours, which a look-up or count by shape wants.
    attribute_labels: bool = False

    def __post_init__(self):
        if self.steps < 1 or self.batch < 1 or self.lr <= 0:
            raise ValueError("vision pretraining needs steps >= 1, batch >= 1 and lr > 0")


def num_cell_classes(synthetic: SyntheticConfig) -> int:
    """Empty, or one (shape, colour, size) combination."""
    return 1 + len(synthetic.shapes) * len(synthetic.colors) * len(SIZES)


def cell_labels(scene: dict[str, Any], synthetic: SyntheticConfig) -> np.ndarray:
    """[grid * grid] class per cell in reading order: 0 empty, else 1 + (shape, colour, size) index."""
    labels = np.zeros(synthetic.grid * synthetic.grid, np.int32)
    n_col, n_size = len(synthetic.colors), len(SIZES)
    for o in scene["objects"]:
        cls = (synthetic.shapes.index(o["shape"]) * n_col + synthetic.colors.index(o["color"])) * n_size \
            + SIZES.index(o["size"])
        labels[o["row"] * synthetic.grid + o["col"]] = 1 + cls
    return labels


def attribute_labels(labels, synthetic: SyntheticConfig) -> dict[str, Any]:
    """Split `cell_labels` classes into shape, colour and size labels (0 empty, else 1 + index;
    negative labels stay negative). Works on NumPy and JAX arrays alike."""
    n_col, n_size = len(synthetic.colors), len(SIZES)
    cls = labels - 1
    split = {"shape": cls // (n_col * n_size), "colour": cls // n_size % n_col, "size": cls % n_size}
    return {name: (labels > 0) * (part + 1) + (labels < 0) * labels for name, part in split.items()}


def token_cells(config: ModelConfig, synthetic: SyntheticConfig) -> np.ndarray:
    """[image tokens] grid cell (reading order) of each patch token, by the patch's centre pixel."""
    v = config.vision
    side = v.image_size // v.patch_size
    centre = (np.arange(side) + 0.5) * v.patch_size * (synthetic.image_size / v.image_size)
    cell = np.minimum((centre // (synthetic.image_size / synthetic.grid)).astype(int), synthetic.grid - 1)
    cells = (cell[:, None] * synthetic.grid + cell[None, :]).reshape(-1)
    if v.feature_strategy == "full":  # the CLS token sees the whole image: it gets no cell label
        cells = np.concatenate([[-1], cells])
    return cells


def load_split(records: list[dict], data_dir: Path, config: ModelConfig,
               synthetic: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed images [N, H, W, C] (as the LLaVA pipeline feeds them) and per-token labels
    [N, image tokens] (the label of the cell under each patch; -1 for a CLS token: no loss)."""
    from gmod_jax.data.images import ImageConfig, preprocess_image

    image_cfg = ImageConfig(image_size=config.vision.image_size)
    records = [r for r in records if r.get("image") and r.get("scene")]
    if not records:
        raise ValueError("vision pretraining needs records with an image and a scene")
    pixels = np.stack([preprocess_image(data_dir / r["image"], image_cfg) for r in records])  # [N, H, W, C]
    cells = token_cells(config, synthetic)
    labels = np.stack([cell_labels(r["scene"], synthetic) for r in records])[:, np.maximum(cells, 0)]
    return pixels, np.where(cells[None] >= 0, labels, -1).astype(np.int32)


def content_accuracy(right: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """Held-out accuracies of the content read-out. right: bool [N, tokens], the prediction
    matched; labels: [N, tokens] `load_split` labels (-1: no label, 0: empty, > 0: a shape).
    The object-token accuracy is reported on its own because most tokens are empty background,
    which is easy: on 64-patch scenes 95.5% of all tokens but only 72% of the object tokens were
    named right, and the LLM answered shape questions at chance (docs/demo.md)."""
    labelled, objects = labels >= 0, labels > 0
    return {"heldout_token_accuracy": float(right[labelled].mean()),
            "heldout_image_accuracy": float((right | ~labelled).all(axis=1).mean()),
            "heldout_object_token_accuracy": float(right[objects].mean()) if objects.any() else None}


def pretrain_vision(config: ModelConfig, vision_params: dict, train: tuple[np.ndarray, np.ndarray],
                    heldout: tuple[np.ndarray, np.ndarray], cfg: VisionPretrainConfig, synthetic: SyntheticConfig,
                    echo: Callable[[str], None] = print) -> tuple[dict, dict]:
    """Train `vision_params` (the model's `vision` subtree) with a per-token linear read-out of the
    cell content (`load_split`'s labels); with `cfg.position_labels` two more of the grid row
    and column the token lies in, with `cfg.attribute_labels` three more of the content's shape,
    colour and size.
    Returns (trained vision params, {"loss": [...], "heldout_token_accuracy": float, ...})."""
    import jax
    import jax.numpy as jnp
    import optax

    from gmod_jax.models.clip_vit import vision_features
    from train.config import OptimConfig
    from train.optimizer import make_optimizer

    x_train, y_train = train
    width = config.vision.hidden_size * len(config.vision.feature_layers)
    key = jax.random.key(cfg.seed, impl="rbg")

    def read_out(k, n):
        return {"kernel": jax.random.normal(k, (width, n), jnp.float32) * width ** -0.5,
                "bias": jnp.zeros((n,), jnp.float32)}

    params = {"vision": vision_params, "head": read_out(key, num_cell_classes(synthetic))}
    # Labels that depend on the token's place only: its grid row and column (-1 for a CLS token).
    place_labels: dict[str, np.ndarray] = {}
    if cfg.position_labels:
        cells, grid = token_cells(config, synthetic), synthetic.grid
        place_labels = {"row": np.where(cells >= 0, cells // grid, -1), "col": np.where(cells >= 0, cells % grid, -1)}
        for name, k in zip(place_labels, jax.random.split(jax.random.fold_in(key, 1))):
            params[name] = read_out(k, grid)
    # Labels that follow from the content label: its shape, colour and size.
    attribute_classes = {"shape": 1 + len(synthetic.shapes), "colour": 1 + len(synthetic.colors),
                         "size": 1 + len(SIZES)} if cfg.attribute_labels else {}
    for name, k in zip(attribute_classes, jax.random.split(jax.random.fold_in(key, 2), 3)):
        params[name] = read_out(k, attribute_classes[name])

    def masked_ce(z, y):
        per = optax.softmax_cross_entropy_with_integer_labels(z, jnp.maximum(y, 0))
        return jnp.sum(jnp.where(y >= 0, per, 0.0)) / jnp.maximum(jnp.sum(y >= 0), 1)

    def logits(p, x):
        feats = vision_features(config, p["vision"], x).astype(jnp.float32)
        return {name: feats @ p[name]["kernel"] + p[name]["bias"]
                for name in ("head", *place_labels, *attribute_classes)}

    def all_labels(y):
        return {"head": y, **{name: jnp.broadcast_to(lab, y.shape) for name, lab in place_labels.items()},
                **(attribute_labels(y, synthetic) if attribute_classes else {})}

    def loss_fn(p, x, y):
        z = logits(p, x)
        return sum(masked_ce(z[name], lab) for name, lab in all_labels(y).items())

    # The LLaVA stages' optimizer (AdamW, linear warmup then cosine to 0, clipping at 1).
    tx = make_optimizer(OptimConfig(lr=cfg.lr, schedule="cosine", warmup_steps=cfg.warmup_steps, weight_decay=0.0,
                                    grad_clip=1.0), cfg.steps)
    opt_state = tx.init(params)

    @jax.jit
    def step(p, s, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    predict = jax.jit(lambda p, x: {name: jnp.argmax(z, -1) for name, z in logits(p, x).items()})
    rng = np.random.default_rng(cfg.seed)
    losses, t0 = [], time.perf_counter()
    for i in range(cfg.steps):
        idx = rng.integers(0, len(x_train), cfg.batch)
        params, opt_state, loss = step(params, opt_state, x_train[idx], y_train[idx])
        if (i + 1) % max(1, cfg.steps // 10) == 0 or i + 1 == cfg.steps:
            losses.append((i + 1, float(loss)))
            echo(f"  vision step {i + 1}/{cfg.steps}: token loss {losses[-1][1]:.4f}")
    x_eval, y_eval = heldout
    chunks = [jax.device_get(predict(params, x_eval[s:s + 256])) for s in range(0, len(x_eval), 256)]
    pred = {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}
    labelled = y_eval >= 0
    truth = {name: np.asarray(lab) for name, lab in all_labels(y_eval).items()}  # the training targets

    def all_right(names):  # per token: every read-out in `names` right
        return np.all([pred[name] == truth[name] for name in names], axis=0)

    stats = {"loss": losses, **content_accuracy(all_right(["head"]), y_eval),
             "seconds": time.perf_counter() - t0, "steps": cfg.steps, "batch": cfg.batch}
    if place_labels:  # both the row and the column named right
        stats["heldout_position_accuracy"] = float(all_right(place_labels)[labelled].mean())
    if attribute_classes:  # shape, colour and size all named right
        stats["heldout_attribute_accuracy"] = float(all_right(attribute_classes)[labelled].mean())
    return jax.device_get(params["vision"]), stats


def vision_stage(config: ModelConfig, cfg: VisionPretrainConfig, synthetic: SyntheticConfig, train_json: Path,
                 eval_json: Path, data_dir: Path, out_dir: Path, tokenizer_dir: Path, seed: int,
                 echo: Callable[[str], None] = print) -> dict:
    """Random LLaVA init with a pretrained vision tower, saved as a checkpoint at `out_dir`."""
    from gmod_jax.checkpoint import save_checkpoint
    from gmod_jax.api import init_random

    train = load_split(json.loads(Path(train_json).read_text()), data_dir, config, synthetic)
    heldout = load_split(json.loads(Path(eval_json).read_text()), data_dir, config, synthetic)
    model = init_random(config, seed)
    vision, stats = pretrain_vision(config, model.params["vision"], train, heldout, cfg, synthetic, echo)
    save_checkpoint(out_dir, {**model.params, "vision": vision}, config, tokenizer_src_dir=tokenizer_dir,
                    overwrite=True)
    objects = stats["heldout_object_token_accuracy"]
    echo(f"  vision tower: held-out token accuracy {stats['heldout_token_accuracy']:.1%}"
         + (f" (object tokens {objects:.1%})" if objects is not None else "") + ", "
         f"every token of an image right {stats['heldout_image_accuracy']:.1%}"
         + (f", row and column right {stats['heldout_position_accuracy']:.1%}"
            if "heldout_position_accuracy" in stats else ""))
    return stats
