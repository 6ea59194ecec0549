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
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig as HFLlamaConfig, LlamaForCausalLM

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


def reference_tower(cfg, seed=0, adapters=True) -> MultiPathTower:
    """The multi-path tower of `cfg` (transformers CLIP + the trunk and fusion modules above),
    every weight random: adapter projections and layer scales included."""
    v = cfg.vision
    torch.manual_seed(seed)  # CLIP's own init, then perturbed
    clip = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
        hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps, attn_implementation="eager"))
    perturb_(clip, seed)
    slow = randomize_(ConvNeXtTrunk(v.slow), seed + 1)
    tower = MultiPathTower(clip, slow, v.input_image_size, v.fast_image_size, adapters)
    for i, module in enumerate([*(tower.align_stages_latent or []), *tower.align_stages]):
        randomize_(module, seed + 2 + i, scale=0.3)
    return tower.eval()


def tiny_llama(cfg, seed=0) -> LlamaForCausalLM:
    t = cfg.text
    torch.manual_seed(seed)
    model = LlamaForCausalLM(HFLlamaConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
        rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta, max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=False, attn_implementation="eager"))
    return perturb_(model, seed, 0.02).eval()


def reference_logits(cfg, tower, projector, llama, ids: np.ndarray, pixels: np.ndarray):
    """(tower features, logits) of the reference LLaVA-HR: projected features spliced in place
    of the ids equal to `cfg.image_token_index` (pixels NCHW)."""
    with torch.no_grad():
        feats = tower(torch.tensor(pixels))
        is_image = torch.tensor(ids == cfg.image_token_index)
        embeds = llama.model.embed_tokens(torch.tensor(np.where(ids == cfg.image_token_index, 0, ids)))
        embeds[is_image] = projector(feats).reshape(-1, cfg.text.hidden_size)
        return feats.numpy(), llama(inputs_embeds=embeds).logits.numpy()


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


# ----------------------------------------------------------------------------------------------
# official LLaVA-HR / γ-MoD-LLaVA-HR checkpoints (llava-hr-and-mgm.md §2.2-2.3)

FAST = "model.vision_tower.fast_vision_tower.vision_tower.vision_model."
SLOW = "model.vision_tower.slow_vision_tower.vision_tower."
HEAD_CLASSES = 1000  # the default timm tag's ImageNet head (llava-hr-and-mgm.md §0.1), never used


def official_state_dict(tower: MultiPathTower, projector: nn.Module, llama: LlamaForCausalLM, seed: int = 0,
                        head: bool = True) -> dict[str, torch.Tensor]:
    """The reference model under the official keys, written out here independently of
    `convert.keymap`: CLIP under FAST (+ its legacy `position_ids` buffer), the ConvNeXt under
    SLOW with the vendored copy's `weight` layer-scale name and a classifier head of another
    shape than any trunk tensor, adapters and fusion, `mm_projector`, Vicuna keys."""
    sd = {FAST + k: v for k, v in tower.clip.state_dict().items()}
    sd[FAST + "embeddings.position_ids"] = torch.arange(tower.clip.embeddings.position_embedding.num_embeddings)[None]
    for k, v in tower.slow.state_dict().items():
        sd[SLOW + (k[:-len("gamma")] + "weight" if k.endswith(".gamma") else k)] = v
    if head:
        c = tower.slow.stages[-1].blocks[0].norm.normalized_shape[0]
        g = torch.Generator().manual_seed(seed)
        for name, shape in (("head.norm.weight", (c,)), ("head.norm.bias", (c,)), ("head.pre_logits.fc.weight", (c, c)),
                            ("head.pre_logits.fc.bias", (c,)), ("head.fc.weight", (HEAD_CLASSES, c)),
                            ("head.fc.bias", (HEAD_CLASSES,))):
            sd[SLOW + name] = torch.randn(shape, generator=g)
    sd.update({"model.vision_tower." + k: v for k, v in tower.state_dict().items() if k.startswith("align_stages")})
    sd.update({"model.mm_projector." + k: v for k, v in projector.state_dict().items()})
    sd.update(llama.state_dict())
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def official_config(cfg, mod_layers: list[int] | None = None, slow_name: str = "convnext_large_mlp.clip_laion2b_ft_320",
                    adapters: bool = True) -> dict:
    """config.json of LLaVA-HR (`llava`) or, with `mod_layers`, γ-MoD-LLaVA-HR (`mod_llava_llama`):
    flat Llama fields and the official multi-path fields (§2.2). The tiny CLIP's head count is the
    one thing neither the weights nor the OpenAI CLIP name tell, so it travels in
    `mm_vision_config` (the field the project's exporter writes)."""
    t, v = cfg.text, cfg.vision
    out = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "vocab_size": t.vocab_size,
           "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
           "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads, "rms_norm_eps": t.rms_norm_eps,
           "max_position_embeddings": t.max_position_embeddings, "hidden_act": "silu", "torch_dtype": "float32",
           "pad_token_id": 0, "transformers_version": "4.31.0",
           "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_vision_config": {"num_attention_heads": v.num_heads},
           "vision_tower_slow": slow_name, "is_multipath_encoder": True, "input_image_size": v.input_image_size,
           "freeze_vision": not adapters, "mm_hidden_size": v.hidden_size, "mm_projector_type": "mlp2x_gelu",
           "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
           "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "tune_mm_mlp_adapter": False,
           "freeze_mm_mlp_adapter": False, "use_mm_proj": True, "image_grid_pinpoints": None, "delay_load": False}
    if mod_layers is not None:
        out.update(architectures=["MoDLLaVALlamaForCausalLM"], model_type="mod_llava_llama",
                   mod={"mod_enable": True, "mod_mode": "arank_mod", "mod_layers_idx": list(mod_layers),
                        "capacity_factor": 0.5, "router_aux_loss_coef": 0.01})
    return out


def with_router(sd: dict[str, torch.Tensor], router: torch.Tensor, mod_layers: list[int], container: str) -> dict:
    """γ-MoD's one shared router: under every MoD layer's name, one storage, in a 4.31 `.bin`;
    only the first name in a 4.36 safetensors save (checkpoint-formats.md §5.3)."""
    names = mod_layers if container == "bin" else mod_layers[:1]
    return {**sd, **{f"model.layers.{i}.router.weight": router for i in names}}
