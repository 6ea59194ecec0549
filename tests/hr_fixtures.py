"""Hand-written PyTorch references for LLaVA-HR's vision stack (and the ConvNeXt trunk MGM reuses).

Written from /work/shared/reference/llava-hr-and-mgm.md §1.1-1.6 with the official module and
attribute names, so their state dicts carry the official key suffixes: timm's ConvNeXt (which
cannot be imported here: timm imports torchvision, whose wheel fails against the CPU torch) and
LLaVA-HR's `S2FStitchAlignModuleV2` / `MultiPathAlignModule`. The helpers at the end map these
state dicts onto Flax trees through the declarative leaf tables of the models, so the tables
are checked too.
"""

from __future__ import annotations

import math

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


def perturb_(module: nn.Module, seed: int, scale: float = 0.1):
    """Add noise to every parameter of a module with a sensible init (HF CLIP / Llama), so biases
    and norm offsets are not all zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


# ----------------------------------------------------------------------------------------------
# LLaVA-HR fusion modules and multi-path forward (note §1.1, §1.5, §1.6; official attribute names)


def _align_tokens(src, n_dst: int):
    """Slow tokens [B, L, C] -> [B, n_dst, C]: bilinear align_corners upsample in float32 when
    fewer, avg_pool2d (kernel = stride = ratio) when more."""
    b, l, c = src.shape
    s, d = int(math.isqrt(l)), int(math.isqrt(n_dst))
    if l < n_dst:
        m = src.transpose(1, 2).reshape(b, c, s, s)
        m = F.interpolate(m.float(), size=(d, d), mode="bilinear", align_corners=True).to(src.dtype)
        return m.reshape(b, c, -1).transpose(1, 2)
    if l > n_dst:
        m = src.transpose(1, 2).reshape(b, c, s, s)
        m = F.avg_pool2d(m, s // d, s // d)
        return m.reshape(b, c, -1).transpose(1, 2)
    return src


class MultiPathAlignModule(nn.Module):
    def __init__(self, d, c):
        super().__init__()
        self.fast_proj = nn.Linear(d, d)
        self.slow_proj = nn.Linear(c, d)

    def forward(self, fast, slow):  # fast [B, N, d], slow [B, c, h, w]
        b, c, h, w = slow.shape
        slow = _align_tokens(slow.reshape(b, c, -1).transpose(1, 2), fast.shape[1])
        return self.fast_proj(fast) + self.slow_proj(slow)


class S2FStitchAlignModuleV2(nn.Module):
    def __init__(self, d, c):
        super().__init__()
        self.slow_conv = nn.Conv2d(c, c, 1)
        self.slow_proj = nn.Conv2d(c, d, 1)
        self.fast_conv = nn.Conv2d(d, d, 7, padding=3, groups=d)
        self.fast_proj = nn.Conv2d(d, d, 1)
        self.gate = nn.Sequential(nn.Linear(2 * d, d // 2), nn.GELU(), nn.Linear(d // 2, 1))
        nn.init.zeros_(self.slow_proj.weight)  # the official zero init of both projections
        nn.init.zeros_(self.slow_proj.bias)
        nn.init.zeros_(self.fast_proj.weight)
        nn.init.zeros_(self.fast_proj.bias)

    def forward(self, fast, slow):
        b = slow.shape[0]
        _, n, d = fast.shape
        s = self.slow_proj(F.gelu(self.slow_conv(slow))).reshape(b, d, -1).transpose(1, 2)
        s = _align_tokens(s, n)
        g = int(math.isqrt(n))
        f = fast.transpose(1, 2).reshape(b, d, g, g)
        f = f + self.fast_proj(F.gelu(self.fast_conv(f)))
        f = f.reshape(b, d, n).transpose(1, 2)
        gate = self.gate(torch.cat([f, s], -1).mean(1)).unsqueeze(1)
        return f + s * gate.tanh()


def resample_pos_embed(pos, n_tokens: int):
    """LLaVA-HR's `resample_pos_embed`: CLS row kept, patch rows bicubic + antialias in float32."""
    new = int(math.isqrt(n_tokens - 1))
    old = int(math.isqrt(pos.shape[1] - 1))
    prefix, rows = pos[:, :1], pos[:, 1:]
    grid = rows.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=[new, new], mode="bicubic", antialias=True)
    return torch.cat([prefix, grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(pos.dtype)], 1)


class MultiPathTower(nn.Module):
    """`MultiPathCLIPVisionTower.forward` on an HF `CLIPVisionModel` (5.x flat layout) and the
    ConvNeXt trunk above."""

    def __init__(self, clip, slow: ConvNeXtTrunk, input_image_size: int, fast_image_size: int, adapters: bool = True):
        super().__init__()
        self.clip, self.slow = clip, slow
        d, c = clip.config.hidden_size, slow.stages[-1].blocks[0].norm.normalized_shape[0]
        self.image_size, self.fast_image_size = input_image_size, fast_image_size
        self.align_stages_latent = nn.ModuleList([S2FStitchAlignModuleV2(d, c) for _ in range(3)]) if adapters else None
        self.align_stages = nn.ModuleList([MultiPathAlignModule(d, c)])

    def forward(self, x):
        emb = self.clip.embeddings
        y = F.interpolate(x.float(), size=(self.fast_image_size,) * 2, mode="bilinear",
                          align_corners=True).to(x.dtype)
        patches = emb.patch_embedding(y).flatten(2).transpose(1, 2)
        tokens = torch.cat([emb.class_embedding.expand(x.shape[0], 1, -1), patches], 1)
        pos = emb.position_embedding.weight[None]
        if pos.shape[1] != tokens.shape[1]:
            pos = resample_pos_embed(pos, tokens.shape[1])
        y = self.clip.pre_layrnorm((tokens + pos)[:, 1:])
        slow = self.slow(x)[-1]
        layers = self.clip.encoder.layers
        n = len(layers) // 4
        for g in range(4):
            for layer in layers[g * n:(g + 1) * n]:
                y = layer(y, None)
            if g < 3 and self.align_stages_latent is not None:
                y = self.align_stages_latent[g](y, slow)
        return self.align_stages[0](y, slow)


# ----------------------------------------------------------------------------------------------
# torch modules -> Flax tree


def multipath_params(tower: MultiPathTower, config) -> dict:
    """`vision/` subtree: CLIP leaves via `convert.keymap` targets, slow trunk, adapters, fusion
    via the models' leaf tables (LLaVA-HR's `weight` layer-scale name is not needed here)."""
    from gmod_jax.models.multipath import MULTIPATH_LEAVES

    canonical = {"vision_tower." + k: v for k, v in tower.clip.state_dict().items()}
    tree = canonical_params(config, canonical, "vision")
    tree["slow"] = convnext_params(tower.slow.state_dict(), config.vision.slow)
    sd = {k: v.detach().numpy() for k, v in tower.state_dict().items()}
    for path, key, kind in MULTIPATH_LEAVES:
        if "{a}" in key:
            if tower.align_stages_latent is None:
                continue
            _set(tree, path, np.stack([to_flax(kind, sd[key.format(a=a)]) for a in range(3)]))
        else:
            _set(tree, path, to_flax(kind, sd[key]))
    return tree


def canonical_params(config, canonical: dict, root: str) -> dict:
    """The `root` ("vision", "projector" or "llm") subtree from canonical (HF layout C) tensors,
    through `convert.keymap.expected_keys`; per-layer tensors stacked on the layer axis."""
    from convert import keymap

    tree: dict = {}
    stacks: dict = {}
    for name, target in keymap.expected_keys(config).items():
        if target.path[0] != root or name not in canonical:
            continue
        value = canonical[name]
        value = np.ascontiguousarray(target.to_flax(value.detach().numpy() if hasattr(value, "detach") else value))
        if target.layer is None:
            _set(tree, "/".join(target.path[1:]), value)
        else:
            stacks.setdefault(target.path[1:], {})[target.layer] = value
    for path, layers in stacks.items():
        _set(tree, "/".join(path), np.stack([layers[i] for i in sorted(layers)]))
    return tree
