"""Metrics sinks of the primary process: JSONL log, TensorBoard events, a tqdm progress bar.

`<workdir>/metrics.jsonl` gets one JSON object per logged step (scalars, and the per-MoD-layer
skip ratios as a list); `<workdir>/tb/` gets TensorBoard scalars (`skip_ratio/layer_<i>` per
MoD layer; `skip_ratio/<type>` per routable token type comes from the train step under that name).
Other processes write nothing.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import numpy as np


def _scalar(value):
    a = np.asarray(value)
    if a.ndim == 0:
        return a.item()
    return [x.item() for x in a.reshape(-1)]


def _summary_writer_class():
    """tensorboardX's SummaryWriter. tensorboardX imports torch, if installed, only to accept
    torch tensors (we log Python floats); hiding torch during that import saves seconds of
    start-up per process. A torch imported earlier is left alone and stays visible afterwards."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    def __init__(self, workdir: Path, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if enabled:
            self._jsonl = open(Path(workdir) / "metrics.jsonl", "a", buffering=1)
            self._tb = _summary_writer_class()(str(Path(workdir) / "tb"))

    def write(self, step: int, metrics: dict, mod_layers: tuple[int, ...]) -> None:
        if not self.enabled or not metrics:
            return
        record = {"step": step}
        for key, value in metrics.items():
            if value is None:
                continue
            v = _scalar(value)
            record[key] = v
            if isinstance(v, list):
                if key == "skip_ratio_per_layer":
                    for layer, x in zip(mod_layers, v):
                        self._tb.add_scalar(f"skip_ratio/layer_{layer}", x, step)
                continue
            self._tb.add_scalar(key if "/" in key else f"train/{key}", v, step)
        self._jsonl.write(json.dumps(record) + "\n")

    @contextlib.contextmanager
    def progress(self, total: int, initial: int, enabled: bool):
        bar = _Bar(total, initial, enabled)
        try:
            yield bar
        finally:
            bar.close()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class _Bar:
    def __init__(self, total: int, initial: int, enabled: bool):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self._pos = initial

    def update(self, step: int, m: dict) -> None:
        if self._bar is None:
            return
        self._bar.update(step - self._pos)
        self._pos = step
        post = {"loss": f"{float(m['loss']):.4f}", "lr": f"{float(m['lr']):.2e}",
                "tok/s": f"{float(m['tokens_per_s']):.0f}"}
        if "skip_ratio" in m:
            post["skip"] = f"{float(m['skip_ratio']):.2f}"
        if "mfu" in m:
            post["mfu"] = f"{float(m['mfu']):.1%}"
        self._bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
