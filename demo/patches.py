"""Which image patches γ-MoD skips: background or objects (issue 26, the paper's Fig. 4 claim).

The synthetic scenes record per patch whether it holds object pixels (`patch_objects`, written
when `SyntheticConfig.patch_grid` is set); the routing stage's trace says, per MoD layer, which
image tokens each layer processed. This module scores one against the other, in plain NumPy so
the arithmetic is checked against a hand-made mask in tests/test_demo_patches.py.
"""

from __future__ import annotations

import numpy as np


def patch_skip_shares(kept: np.ndarray, objects: np.ndarray) -> dict:
    """Per MoD layer and over all of them, how background and object patches were routed.

    kept: bool [n_mod, N, P] (or [n_mod, N, g, g]): True where MoD layer i processed patch p of
    image n. objects: bool [N, P] (or [N, g, g]): True where the patch holds object pixels.
    Returns {"per_layer": [{...}, ...], "overall": {...}} where each entry holds
      background_skipped  skipped background patches / background patches
      object_skipped      skipped object patches / object patches
      image_skipped       skipped patches / patches (all image tokens)
      background_share    skipped background patches / skipped patches (None: nothing skipped)
    and the counts behind them (background, objects, skipped_background, skipped_objects).
    """
    kept = np.asarray(kept, bool)
    objects = np.asarray(objects, bool)
    n_mod, n = kept.shape[:2]
    kept = kept.reshape(n_mod, n, -1)
    objects = objects.reshape(n, -1)
    if kept.shape[1:] != objects.shape:
        raise ValueError(f"routing mask {kept.shape[1:]} and patch map {objects.shape} disagree")
    background = ~objects
    skipped = ~kept
    skipped_bg = (skipped & background[None]).sum(axis=(1, 2))  # [n_mod]
    skipped_obj = (skipped & objects[None]).sum(axis=(1, 2))
    n_bg, n_obj = int(background.sum()), int(objects.sum())

    def entry(s_bg: int, s_obj: int, layers: int) -> dict:
        total = s_bg + s_obj
        return {"background": n_bg * layers, "objects": n_obj * layers,
                "skipped_background": int(s_bg), "skipped_objects": int(s_obj),
                "background_skipped": s_bg / (n_bg * layers) if n_bg else None,
                "object_skipped": s_obj / (n_obj * layers) if n_obj else None,
                "image_skipped": total / ((n_bg + n_obj) * layers) if n_bg + n_obj else None,
                "background_share": s_bg / total if total else None}

    return {"per_layer": [entry(int(b), int(o), 1) for b, o in zip(skipped_bg, skipped_obj)],
            "overall": entry(int(skipped_bg.sum()), int(skipped_obj.sum()), n_mod)}
