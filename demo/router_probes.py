"""Router probes for issue 26 (demo options, not the official method): why γ-MoD's router may
not tell background patches from object patches, and a label-free router start that tries to.

Why the official router can miss the background (docs/demo.md, "Background and object
patches"): its score is a linear map of the MoD layer's normalised input, z = N(x) W. The
background patches of one image are near copies of each other (one colour, differing only in
position), so their scores form one tight cluster that lies either above or below the object
scores: whether the background is skipped is decided by the initialisation (measured: a random
direction mostly reads patch position, docs/demo.md). Training does not revisit that order. The routing loss's target is the top-k of the router's own
scores, so it only widens the margin of whatever split it starts from; the LM loss reaches the
router only through the keep-probability that scales a *kept* token's MLP output, so a skipped
object patch gets no gradient saying it was needed, and a kept background patch (whose MLP output
little depends on) gets almost none saying it was not.

`router_start="redundancy"` replaces the random start with the direction that separates redundant
image tokens from the rest without any labels: minus the mean of the first MoD layer's
normalised *image-token* inputs on training prompts. Image tokens close to that mean, the many
near-identical background patches, score low and are skipped first; the distinct ones (object
patches) score high. The loss, the routing rule and everything after the start are the official
ones.

Why the image tokens alone (2026-12-07): the mean over all routable tokens (system prompt and
image) also placed the 33 system-prompt tokens, and where it put them varied by seed (36-88% of
them skipped at the start). The fine-tune then raised them: every run kept more of the system
prompt at its end than at its start (seed 0: 88% -> 60% skipped; seed 1: 56% -> 30%; with
tally captions 33% -> 3%, when the risen system prompt took the object patches' slots and
γ-MoD skipped every image token). The image-only mean ranks background lowest and the system
prompt with the objects (at ratio 0.5, ~90% of the background and under 1% of the objects and
of the system prompt skipped at the start, on all four dense models measured), so the system
prompt's rise displaces nothing (docs/demo.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

ROUTER_STARTS = ("random", "redundancy")  # DemoConfig.router_start


def calibration_batch(model, tokenizer, train_json: Path, data_dir: Path, n: int, template: str):
    """(ids, pixels, mask, types) of the first `n` training images with their first question
    and answer, padded to one length (training data only: the held-out split stays unseen)."""
    from gmod_jax import token_types as tt
    from gmod_jax.visualize import encode_example

    records = [r for r in json.loads(Path(train_json).read_text()) if r.get("image")][:n]
    encoded = [encode_example(model, tokenizer, data_dir / r["image"],
                              r["conversations"][0]["value"].replace("<image>", "").strip(),
                              answer=r["conversations"][1]["value"], template=template) for r in records]
    length = max(len(e[0]) for e in encoded)
    ids = np.full((len(encoded), length), tokenizer.pad_id, np.int32)
    types = np.full((len(encoded), length), tt.PAD, np.int32)
    mask = np.zeros((len(encoded), length), bool)
    for i, (row_ids, row_types, _, _) in enumerate(encoded):
        ids[i, :len(row_ids)], types[i, :len(row_ids)], mask[i, :len(row_ids)] = row_ids, row_types, True
    return ids, np.stack([e[2] for e in encoded]), mask, types


def layer_inputs(config, params, layer: int, ids, pixels, mask, types) -> np.ndarray:
    """float32 [B, T, D]: what decoder layer `layer` routes on, its input RMSNorm of the
    residual stream, for a dense model (layers before it run dense)."""
    import jax
    import jax.numpy as jnp

    from gmod_jax.layers.norms import rms_norm
    from gmod_jax.models.llama import Collect, RoutingPlan, decoder_walk
    from gmod_jax.models.llava import LlavaModel

    def walk(p, ids, pixels, mask, types):
        x = LlavaModel(config).apply({"params": p}, ids, pixels, method=LlavaModel.embed)
        if layer > 0:
            head = config.replace(text=dataclasses.replace(config.text, num_layers=layer))
            x, _ = decoder_walk(head, jax.tree.map(lambda a: a[:layer], p["llm"]["layers"]), None, x, mask, types,
                                RoutingPlan(mode="dense"), Collect(), by_index=False)
        scale = p["llm"]["layers"]["attn_norm"]["scale"][layer]
        return rms_norm(x, scale, config.text.rms_norm_eps).astype(jnp.float32)

    return np.asarray(jax.device_get(jax.jit(walk)(params, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask),
                                                   jnp.asarray(types))))


def redundancy_direction(inputs: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Unit vector [D]: minus the mean of the image tokens' router inputs. An image token's
    score along it is low when it looks like the typical image token (the many near-copies of the
    background) and high when it does not (object patches)."""
    image = np.asarray(image, bool)
    if not image.any():
        raise ValueError("no image tokens to fit the redundancy direction on")
    mean = np.asarray(inputs, np.float64)[image].mean(axis=0)
    norm = np.linalg.norm(mean)
    if not norm > 0:
        raise ValueError("image-token router inputs average to zero: no redundancy direction")
    return -(mean / norm)


def router_kernel_from_direction(direction: np.ndarray, like: np.ndarray) -> np.ndarray:
    """A shared 2-class router kernel [D, 2] whose keep-logit margin z1 - z0 is a multiple of
    `direction`, at the norm the official random init's margin has on average
    (U(-1/sqrt(D), 1/sqrt(D)) entries: |w1 - w0| ~ sqrt(2/3)), so only the direction changes."""
    d = direction.shape[0]
    if like.shape != (d, 2):
        raise ValueError(f"expected a shared router kernel [{d}, 2], got {like.shape}")
    margin = math.sqrt(2.0 / 3.0) * np.asarray(direction, np.float64)
    return np.stack([-margin / 2, margin / 2], axis=1).astype(like.dtype)


def object_over_background(scores: np.ndarray, objects: np.ndarray) -> float | None:
    """How often an object patch outscores a background patch of the same image (pairs within
    each image, averaged over images that have both): 1 = every object ranked above all the
    background, so a top-k router would skip background first; 0 = the reverse; 0.5 = no order.
    scores: [N, P] router margins of the image tokens; objects: bool [N, P]."""
    per_image = []
    for s, o in zip(np.asarray(scores, np.float64), np.asarray(objects, bool)):
        if o.any() and (~o).any():
            per_image.append(float(np.mean(s[o][:, None] > s[~o][None, :])))
    return float(np.mean(per_image)) if per_image else None


def patch_scores(inputs: np.ndarray, types: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """[N, image tokens]: each image token's score along `direction` (images in reading order)."""
    from gmod_jax import token_types as tt

    rows = [inputs[i][types[i] == tt.IMAGE] @ direction for i in range(len(inputs))]
    return np.stack(rows)


def redundancy_router(config, params, mod_layers, tokenizer, model, train_json: Path, data_dir: Path, n: int,
                      template: str) -> tuple[np.ndarray, dict]:
    """The `router_start="redundancy"` kernel for the adapted model and what it was fitted on,
    with how the start ranks object over background patches on those training images, next to
    the official random starts of router seeds 0-9 (the same model, the same images)."""
    from gmod_jax import token_types as tt
    from gmod_jax.models.llama import _router_init

    ids, pixels, mask, types = calibration_batch(model, tokenizer, train_json, data_dir, n, template)
    first = min(mod_layers)
    inputs = layer_inputs(config, params, first, ids, pixels, mask, types)
    direction = redundancy_direction(inputs, mask & (types == tt.IMAGE))
    like = np.asarray(params["llm"]["mod_router"]["kernel"])
    kernel = router_kernel_from_direction(direction, like if like.ndim == 2 else like[0])
    if like.ndim == 3:  # per-layer routers (the ablation's "not shared" row): each starts from the same direction
        kernel = np.broadcast_to(kernel, like.shape).copy()
    score = inputs @ direction
    info = {"samples": len(ids), "layer": first,
            "mean_score_by_type": {tt.NAMES[t]: float(score[mask & (types == t)].mean()) for t in (tt.SYSTEM, tt.IMAGE)}}
    records = [r for r in json.loads(Path(train_json).read_text()) if r.get("image")][:n]
    maps = [r["scene"].get("patch_objects") for r in records]
    if all(m is not None for m in maps) and not config.vision.feature_strategy == "full":
        objects = np.asarray(maps, bool).reshape(len(maps), -1)
        import jax

        from gmod_jax.config import MoDConfig

        info["object_over_background"] = object_over_background(patch_scores(inputs, types, direction), objects)
        mod_cfg = config.replace(mod=MoDConfig(enabled=True, layers=tuple(mod_layers)))
        random_starts = []
        for seed in range(10):
            k = np.asarray(_router_init(jax.random.PRNGKey(seed), mod_cfg, like.dtype), np.float64)
            random_starts.append(object_over_background(patch_scores(inputs, types, k[:, 1] - k[:, 0]), objects))
        info["object_over_background_random_starts"] = random_starts
    return kernel, info
