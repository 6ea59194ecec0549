"""Hand-written PyTorch references for LLaVA-HR's vision stack (and the ConvNeXt trunk MGM reuses).

Written from /work/shared/reference/llava-hr-and-mgm.md §1.1-1.6 with the official module and
attribute names, so their state dicts carry the official key suffixes: timm's ConvNeXt (which
cannot be imported here: timm imports torchvision, whose wheel fails against the CPU torch) and
LLaVA-HR's `S2FStitchAlignModuleV2` / `MultiPathAlignModule`. The helpers at the end map these
state dicts onto Flax trees through the declarative leaf tables of the models, so the tables
are checked too.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gmod_jax.config import ConvNeXtConfig

# ----------------------------------------------------------------------------------------------
# ConvNeXt (timm `convnext.py`: stem, stages, ConvNeXtBlock with conv_mlp False)


class LayerNorm2d(nn.LayerNorm):
    """timm LayerNorm2d: LayerNorm over channels of an NCHW map."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim, kernel_size, eps, mlp_ratio, layer_scale):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=True)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_ratio * dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6)) if layer_scale else None

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x).permute(0, 2, 3, 1)
        x = self.mlp(self.norm(x))
        if self.gamma is not None:
            x = x * self.gamma
        return x.permute(0, 3, 1, 2) + shortcut


class ConvNeXtStage(nn.Module):
    def __init__(self, c: ConvNeXtConfig, i: int):
        super().__init__()
        dim = c.dims[i]
        if i:
            self.downsample = nn.Sequential(LayerNorm2d(c.dims[i - 1], eps=c.norm_eps),
                                            nn.Conv2d(c.dims[i - 1], dim, 2, stride=2))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[ConvNeXtBlock(dim, c.kernel_size, c.norm_eps, c.mlp_ratio, c.layer_scale)
                                      for _ in range(c.depths[i])])

    def forward(self, x):
        return self.blocks(self.downsample(x))


class ConvNeXtTrunk(nn.Module):
    """timm ConvNeXt without head; `forward` returns every stage output (NCHW)."""

    def __init__(self, c: ConvNeXtConfig, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c.dims[0], c.patch_size, stride=c.patch_size),
                                  LayerNorm2d(c.dims[0], eps=c.norm_eps))
        self.stages = nn.Sequential(*[ConvNeXtStage(c, i) for i in range(c.num_stages)])

    def forward(self, x):
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


def randomize_(module: nn.Module, seed: int, scale: float = 0.2):
    """Every parameter random (layer scale and zero-initialised projections included) so that
    no term of the forward pass is silently zero or one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and name.endswith(("norm.weight", "stem.1.weight", "downsample.0.weight")):
                p.copy_(1.0 + scale * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return module


# ----------------------------------------------------------------------------------------------
# torch state dict -> Flax tree through a declarative leaf table


def to_flax(kind: str, a: np.ndarray) -> np.ndarray:
    """`convert.keymap.Target` kinds (+ `conv1x1`: [O, I, 1, 1] -> [I, O])."""
    if kind == "copy":
        return a
    if kind == "linear":
        return a.T
    if kind == "conv":
        return a.transpose(2, 3, 1, 0)
    if kind == "conv1x1":
        return a[:, :, 0, 0].T
    raise AssertionError(kind)


def _set(tree: dict, path: str, value):
    *head, last = path.split("/")
    for k in head:
        tree = tree.setdefault(k, {})
    tree[last] = value


def convnext_params(state: dict, c: ConvNeXtConfig, prefix: str = "", layer_scale_name: str = "gamma") -> dict:
    """Flax ConvNeXt tree from a timm-named state dict via `convnext.CONVNEXT_LEAVES`."""
    from gmod_jax.models.convnext import CONVNEXT_LEAVES

    sd = {k: v.detach().numpy() for k, v in state.items()}
    tree: dict = {}
    for path, key, kind in CONVNEXT_LEAVES:
        key = prefix + key.replace(".gamma", "." + layer_scale_name)
        if "{i}" not in path:
            _set(tree, path, to_flax(kind, sd[key]))
            continue
        for i, depth in enumerate(c.depths):
            if "downsample" in path and i == 0:
                continue
            if "layer_scale" in path and not c.layer_scale:
                continue
            if "{b}" in key:
                value = np.stack([to_flax(kind, sd[key.format(i=i, b=b)]) for b in range(depth)])
            else:
                value = to_flax(kind, sd[key.format(i=i)])
            _set(tree, path.format(i=i), value)
    return tree
