"""The Flax parameter tree, declared once.

Every leaf the model creates has one row here: its path, its shape as a function of the config,
the logical axis of each dimension (what `gmod_jax.sharding` maps onto the mesh), and where it
comes from in a PyTorch checkpoint (the converter's canonical key, per-layer shape and the
transform between the two). The sharding rules, the converter's expected-key table and
docs/param_layout.md all follow from these rows, and the test suite proves that the modules'
`init` creates exactly these leaves with exactly these shapes, for every preset.

Layers are stacked on a leading axis `[L, ...]` so the tree is the same for dense and γ-MoD
models; `{n}` in a PyTorch key stands for the layer index, `{i}` in a path and a key for the
index of a repeated module (the projector's linear layers). Kernels are `[in, out]`, attention
projections split into heads.

Canonical PyTorch keys are HF 5.x module names without the `model.` wrappers
(`language_model.*`, `lm_head.*`, `multi_modal_projector.linear_{i}.*`, `vision_tower.*`);
`convert.keymap` maps each on-disk layout onto them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

from gmod_jax.config import ConvNeXtConfig, ModelConfig

TRANSFORMS = {
    "copy": "as is",
    "linear": "`.T`",
    "heads_in": "`.T.reshape(in, heads, head_dim)`",
    "heads_out": "`.T.reshape(heads, head_dim, out)`",
    "head_bias": "`.reshape(heads, head_dim)`",
    "conv": "OIHW → HWIO `.transpose(2, 3, 1, 0)`",
    "conv1x1": "1x1 conv [O, I, 1, 1] → `[:, :, 0, 0].T`",
}

Shape = Callable[[ModelConfig], tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class Row:
    """One leaf (or one leaf per `{i}`) of the tree.

    axes: logical axis per Flax dimension, or None to replicate the leaf whatever its rank; a
        function of `{i}` for repeated leaves whose axes depend on it.
    shape / torch_shape: Flax shape (with the stack axis for stacked leaves) and the PyTorch
        shape of one layer's tensor; functions of (config, i) for repeated leaves.
    stack: "vision" or "llm" for leaves stacked over that tower's layers (`{n}` in the key), or
        a function (config, i) -> count for other stacks (a ConvNeXt stage's blocks).
    heads: (heads, head_dim) for the head-splitting transforms.
    present: whether a config has this leaf (optional biases, untied head, γ-MoD router).
    repeat: the values `{i}` takes for a config. Consecutive repeated rows of one `group` are
        emitted index by index (fc1 kernel, fc1 bias, fc2 kernel, ...), the order of the PyTorch
        modules.
    torch_key: None for leaves the converter places itself (the γ-MoD router).
    """

    path: str
    axes: tuple[str | None, ...] | Callable[[int], tuple[str | None, ...]] | None
    shape: Shape
    torch_key: str | None = None
    torch_shape: Shape | None = None
    transform: str = "copy"
    stack: str | Callable[[ModelConfig, int | None], int] | None = None
    heads: Callable[[ModelConfig], tuple[int, int]] | None = None
    present: Callable[[ModelConfig], bool] = lambda c: True
    repeat: Callable[[ModelConfig], range] | None = None
    group: str | None = None
    note: str = ""

    def layers(self, config: ModelConfig, index: int | None) -> int | None:
        """How many layers a stacked leaf holds (None: not stacked)."""
        if self.stack is None:
            return None
        if callable(self.stack):
            return int(self.stack(config, index))
        return config.vision.num_layers if self.stack == "vision" else config.text.num_layers

    @property
    def pattern(self) -> re.Pattern:
        return re.compile("^" + re.escape(self.path).replace(r"\{i\}", r"(\d+)") + "$")


def _v(c):
    return c.vision


def _t(c):
    return c.text


def _lv(c):
    return (c.vision.num_layers,)


def _l(c):
    return (c.text.num_layers,)


def _vision_rows() -> list[Row]:
    p = "vision_tower."
    layer = p + "encoder.layers.{n}."
    dv = lambda c: c.vision.hidden_size  # noqa: E731
    fv = lambda c: c.vision.intermediate_size  # noqa: E731
    vheads = lambda c: (c.vision.num_heads, c.vision.head_dim)  # noqa: E731
    rows = [
        Row("vision/patch_embed/kernel", (None, None, None, "embed"),
            lambda c: (_v(c).patch_size, _v(c).patch_size, _v(c).num_channels, dv(c)),
            p + "embeddings.patch_embedding.weight",
            lambda c: (dv(c), _v(c).num_channels, _v(c).patch_size, _v(c).patch_size), "conv"),
        Row("vision/cls", None, lambda c: (dv(c),), p + "embeddings.class_embedding", lambda c: (dv(c),)),
        Row("vision/pos_embed", (None, "embed"), lambda c: (_v(c).num_patches + 1, dv(c)),
            p + "embeddings.position_embedding.weight", lambda c: (_v(c).num_patches + 1, dv(c))),
    ]
    for name, torch_name, note in (("pre_ln", "pre_layrnorm", ""),
                                   ("post_ln", "post_layernorm", "unused by LLaVA, kept for exact round trips")):
        for leaf, suffix in (("scale", "weight"), ("bias", "bias")):
            rows.append(Row(f"vision/{name}/{leaf}", None, lambda c: (dv(c),), f"{p}{torch_name}.{suffix}",
                            lambda c: (dv(c),), note=note))
    for ln in ("1", "2"):
        for leaf, suffix in (("scale", "weight"), ("bias", "bias")):
            rows.append(Row(f"vision/layers/ln{ln}/{leaf}", ("layers", "norm"), lambda c: _lv(c) + (dv(c),),
                            f"{layer}layer_norm{ln}.{suffix}", lambda c: (dv(c),), stack="vision"))
    for proj in "qkv":
        rows.append(Row(f"vision/layers/attn/{proj}/kernel", ("layers", "embed", "heads", "head_dim"),
                        lambda c: _lv(c) + (dv(c),) + vheads(c), f"{layer}self_attn.{proj}_proj.weight",
                        lambda c: (vheads(c)[0] * vheads(c)[1], dv(c)), "heads_in", "vision", vheads))
        rows.append(Row(f"vision/layers/attn/{proj}/bias", ("layers", "heads", "head_dim"),
                        lambda c: _lv(c) + vheads(c), f"{layer}self_attn.{proj}_proj.bias",
                        lambda c: (vheads(c)[0] * vheads(c)[1],), "head_bias", "vision", vheads))
    rows += [
        Row("vision/layers/attn/o/kernel", ("layers", "heads", "head_dim", "embed"),
            lambda c: _lv(c) + vheads(c) + (dv(c),), f"{layer}self_attn.out_proj.weight",
            lambda c: (dv(c), vheads(c)[0] * vheads(c)[1]), "heads_out", "vision", vheads),
        Row("vision/layers/attn/o/bias", ("layers", "embed"), lambda c: _lv(c) + (dv(c),),
            f"{layer}self_attn.out_proj.bias", lambda c: (dv(c),), stack="vision"),
        Row("vision/layers/fc1/kernel", ("layers", "embed", "mlp"), lambda c: _lv(c) + (dv(c), fv(c)),
            f"{layer}mlp.fc1.weight", lambda c: (fv(c), dv(c)), "linear", "vision"),
        Row("vision/layers/fc1/bias", ("layers", "mlp"), lambda c: _lv(c) + (fv(c),), f"{layer}mlp.fc1.bias",
            lambda c: (fv(c),), stack="vision"),
        Row("vision/layers/fc2/kernel", ("layers", "mlp", "embed"), lambda c: _lv(c) + (fv(c), dv(c)),
            f"{layer}mlp.fc2.weight", lambda c: (dv(c), fv(c)), "linear", "vision"),
        Row("vision/layers/fc2/bias", ("layers", "embed"), lambda c: _lv(c) + (dv(c),), f"{layer}mlp.fc2.bias",
            lambda c: (dv(c),), stack="vision"),
    ]
    return rows


def convnext_rows(path: str, torch_prefix: str, trunk: Callable[[ModelConfig], ConvNeXtConfig],
                  present: Callable[[ModelConfig], bool], layer_scale_key: str,
                  stem: str = "stem", stages: str = "stages") -> list[Row]:
    """A timm-architecture ConvNeXt trunk (`gmod_jax.models.convnext`) under `path`, its PyTorch
    keys under `torch_prefix` (stem `{stem}.{0,1}`, stage i `{stages}.{i}.downsample.{0,1}` and
    `{stages}.{i}.blocks.{n}.*`). Blocks are stacked per stage; the layer scale is named
    `gamma` by timm and open_clip, `weight` in LLaVA-HR's vendored copy."""
    dim = lambda c, i: trunk(c).dims[i]  # noqa: E731
    prev = lambda c, i: trunk(c).dims[i - 1]  # noqa: E731
    hidden = lambda c, i: trunk(c).mlp_ratio * trunk(c).dims[i]  # noqa: E731
    depth = lambda c, i: trunk(c).depths[i]  # noqa: E731
    k = lambda c: trunk(c).kernel_size  # noqa: E731
    every = lambda c: range(trunk(c).num_stages)  # noqa: E731
    later = lambda c: range(1, trunk(c).num_stages)  # noqa: E731
    t = torch_prefix
    block = f"{t}{stages}.{{i}}.blocks.{{n}}."
    group = path
    rows = [
        Row(f"{path}/stem/conv/kernel", (None, None, None, "embed"),
            lambda c: (trunk(c).patch_size, trunk(c).patch_size, c.vision.num_channels, trunk(c).dims[0]),
            f"{t}{stem}.0.weight",
            lambda c: (trunk(c).dims[0], c.vision.num_channels, trunk(c).patch_size, trunk(c).patch_size), "conv",
            present=present),
    ]
    for leaf, key, kind in (("stem/conv/bias", f"{stem}.0.bias", "copy"), ("stem/norm/scale", f"{stem}.1.weight", "copy"),
                            ("stem/norm/bias", f"{stem}.1.bias", "copy")):
        rows.append(Row(f"{path}/{leaf}", None, lambda c: (trunk(c).dims[0],), t + key,
                        lambda c: (trunk(c).dims[0],), kind, present=present))
    down = f"{t}{stages}.{{i}}.downsample."
    rows += [
        Row(f"{path}/stages_{{i}}/downsample/norm/scale", None, lambda c, i: (prev(c, i),), down + "0.weight",
            lambda c, i: (prev(c, i),), present=present, repeat=later, group=group),
        Row(f"{path}/stages_{{i}}/downsample/norm/bias", None, lambda c, i: (prev(c, i),), down + "0.bias",
            lambda c, i: (prev(c, i),), present=present, repeat=later, group=group),
        Row(f"{path}/stages_{{i}}/downsample/conv/kernel", (None, None, None, "embed"),
            lambda c, i: (2, 2, prev(c, i), dim(c, i)), down + "1.weight", lambda c, i: (dim(c, i), prev(c, i), 2, 2),
            "conv", present=present, repeat=later, group=group),
        Row(f"{path}/stages_{{i}}/downsample/conv/bias", None, lambda c, i: (dim(c, i),), down + "1.bias",
            lambda c, i: (dim(c, i),), present=present, repeat=later, group=group),
        Row(f"{path}/stages_{{i}}/blocks/conv_dw/kernel", ("layers", None, None, None, "embed"),
            lambda c, i: (depth(c, i), k(c), k(c), 1, dim(c, i)), block + "conv_dw.weight",
            lambda c, i: (dim(c, i), 1, k(c), k(c)), "conv", stack=depth, present=present, repeat=every, group=group),
    ]
    for leaf, key, axes, shape, torch_shape, kind in (
            ("conv_dw/bias", "conv_dw.bias", ("layers", "norm"), dim, dim, "copy"),
            ("norm/scale", "norm.weight", ("layers", "norm"), dim, dim, "copy"),
            ("norm/bias", "norm.bias", ("layers", "norm"), dim, dim, "copy")):
        rows.append(Row(f"{path}/stages_{{i}}/blocks/{leaf}", axes, lambda c, i, f=shape: (depth(c, i), f(c, i)),
                        block + key, lambda c, i, f=torch_shape: (f(c, i),), kind, stack=depth, present=present,
                        repeat=every, group=group))
    rows += [
        Row(f"{path}/stages_{{i}}/blocks/mlp/fc1/kernel", ("layers", "embed", "mlp"),
            lambda c, i: (depth(c, i), dim(c, i), hidden(c, i)), block + "mlp.fc1.weight",
            lambda c, i: (hidden(c, i), dim(c, i)), "linear", stack=depth, present=present, repeat=every, group=group),
        Row(f"{path}/stages_{{i}}/blocks/mlp/fc1/bias", ("layers", "mlp"), lambda c, i: (depth(c, i), hidden(c, i)),
            block + "mlp.fc1.bias", lambda c, i: (hidden(c, i),), stack=depth, present=present, repeat=every,
            group=group),
        Row(f"{path}/stages_{{i}}/blocks/mlp/fc2/kernel", ("layers", "mlp", "embed"),
            lambda c, i: (depth(c, i), hidden(c, i), dim(c, i)), block + "mlp.fc2.weight",
            lambda c, i: (dim(c, i), hidden(c, i)), "linear", stack=depth, present=present, repeat=every, group=group),
        Row(f"{path}/stages_{{i}}/blocks/mlp/fc2/bias", ("layers", "norm"), lambda c, i: (depth(c, i), dim(c, i)),
            block + "mlp.fc2.bias", lambda c, i: (dim(c, i),), stack=depth, present=present, repeat=every,
            group=group),
        Row(f"{path}/stages_{{i}}/blocks/layer_scale", ("layers", "norm"), lambda c, i: (depth(c, i), dim(c, i)),
            block + layer_scale_key, lambda c, i: (dim(c, i),), stack=depth,
            present=lambda c: present(c) and trunk(c).layer_scale, repeat=every, group=group),
    ]
    return rows


def _multipath_rows() -> list[Row]:
    """LLaVA-HR's multi-path tower beyond its CLIP fast path: the ConvNeXt slow trunk (LLaVA-HR's
    vendored timm copy names the layer scale `weight`), the three MR-adapters (stacked; official
    `S2FStitchAlignModuleV2`, 1x1 convs as matrices) and the final fusion (`MultiPathAlignModule`).
    PyTorch names are the official ones under `model.` (`vision_tower.slow_vision_tower...`,
    `vision_tower.align_stages_latent.N.*`, `vision_tower.align_stages.0.*`)."""
    hr = lambda c: c.vision.tower == "multipath"  # noqa: E731
    adapters = lambda c: hr(c) and c.vision.latent_adapters  # noqa: E731
    n_adapters = lambda c, i: 3  # noqa: E731  (after the first three quarters of the CLIP layers)
    d = lambda c: c.vision.hidden_size  # noqa: E731
    w = lambda c: c.vision.slow.width  # noqa: E731
    k = 7  # the adapters' depthwise conv
    rows = convnext_rows("vision/slow", "vision_tower.slow_vision_tower.vision_tower.", lambda c: c.vision.slow, hr,
                         "weight")
    a = "vision_tower.align_stages_latent.{n}."
    for name, n_in, n_out in (("slow_conv", w, w), ("slow_proj", w, d), ("fast_proj", d, d)):
        rows += [
            Row(f"vision/adapters/{name}/kernel", ("layers", None, "embed"), lambda c, f=n_in, g=n_out: (3, f(c), g(c)),
                f"{a}{name}.weight", lambda c, f=n_in, g=n_out: (g(c), f(c), 1, 1), "conv1x1", stack=n_adapters,
                present=adapters),
            Row(f"vision/adapters/{name}/bias", ("layers", "norm"), lambda c, g=n_out: (3, g(c)), f"{a}{name}.bias",
                lambda c, g=n_out: (g(c),), stack=n_adapters, present=adapters),
        ]
    rows += [
        Row("vision/adapters/fast_conv/kernel", ("layers", None, None, None, "embed"), lambda c: (3, k, k, 1, d(c)),
            a + "fast_conv.weight", lambda c: (d(c), 1, k, k), "conv", stack=n_adapters, present=adapters),
        Row("vision/adapters/fast_conv/bias", ("layers", "norm"), lambda c: (3, d(c)), a + "fast_conv.bias",
            lambda c: (d(c),), stack=n_adapters, present=adapters),
        Row("vision/adapters/gate/fc1/kernel", ("layers", "embed", None), lambda c: (3, 2 * d(c), d(c) // 2),
            a + "gate.0.weight", lambda c: (d(c) // 2, 2 * d(c)), "linear", stack=n_adapters, present=adapters),
        Row("vision/adapters/gate/fc1/bias", ("layers", "norm"), lambda c: (3, d(c) // 2), a + "gate.0.bias",
            lambda c: (d(c) // 2,), stack=n_adapters, present=adapters),
        Row("vision/adapters/gate/fc2/kernel", ("layers", None, None), lambda c: (3, d(c) // 2, 1),
            a + "gate.2.weight", lambda c: (1, d(c) // 2), "linear", stack=n_adapters, present=adapters),
        Row("vision/adapters/gate/fc2/bias", ("layers", "norm"), lambda c: (3, 1), a + "gate.2.bias",
            lambda c: (1,), stack=n_adapters, present=adapters),
    ]
    f = "vision_tower.align_stages.0."
    for name, n_in in (("fast_proj", d), ("slow_proj", w)):
        rows += [
            Row(f"vision/fusion/{name}/kernel", (None, "embed"), lambda c, g=n_in: (g(c), d(c)), f"{f}{name}.weight",
                lambda c, g=n_in: (d(c), g(c)), "linear", present=hr),
            Row(f"vision/fusion/{name}/bias", None, lambda c: (d(c),), f"{f}{name}.bias", lambda c: (d(c),),
                present=hr),
        ]
    return rows


def _mgm_rows() -> list[Row]:
    """Mini-Gemini's auxiliary ConvNeXt trunk (open_clip names, `gamma` layer scale) and the
    patch-info-mining projectors (LayerNorm + Linear: query on CLIP width, key/value on the aux
    map's concatenated stage widths)."""
    mgm = lambda c: c.vision.tower == "mgm"  # noqa: E731
    rows = convnext_rows("vision/aux", "vision_tower_aux.", lambda c: c.vision.aux, mgm, "gamma",
                         stem="vision_stem", stages="vision_stages")
    d = lambda c: c.vision.hidden_size  # noqa: E731
    for name, torch_name, d_in in (("uni_query", "vlm_uni_query_projector", d),
                                   ("uni_aux", "vlm_uni_aux_projector", lambda c: c.vision.mm_hidden_size_aux),
                                   ("uni_val", "vlm_uni_val_projector", lambda c: c.vision.mm_hidden_size_aux)):
        rows += [
            Row(f"vision/{name}/ln/scale", None, lambda c, f=d_in: (f(c),), f"{torch_name}.0.weight",
                lambda c, f=d_in: (f(c),), present=mgm),
            Row(f"vision/{name}/ln/bias", None, lambda c, f=d_in: (f(c),), f"{torch_name}.0.bias",
                lambda c, f=d_in: (f(c),), present=mgm),
            Row(f"vision/{name}/fc/kernel", ("embed", "mlp"), lambda c, f=d_in: (f(c), d(c)), f"{torch_name}.1.weight",
                lambda c, f=d_in: (d(c), f(c)), "linear", present=mgm),
            Row(f"vision/{name}/fc/bias", None, lambda c: (d(c),), f"{torch_name}.1.bias", lambda c: (d(c),),
                present=mgm),
        ]
    return rows


def _projector_rows() -> list[Row]:
    d = lambda c: c.text.hidden_size  # noqa: E731
    d_in = lambda c: c.vision.feature_dim  # noqa: E731
    depth = lambda c: range(1, c.projector.depth + 1)  # noqa: E731
    return [
        # Megatron pairs: the first linear column-parallel, the next ones row-parallel.
        Row("projector/fc{i}/kernel", lambda i: ("embed", "mlp") if i == 1 else ("mlp", "embed"),
            lambda c, i: (d_in(c) if i == 1 else d(c), d(c)), "multi_modal_projector.linear_{i}.weight",
            lambda c, i: (d(c), d_in(c) if i == 1 else d(c)), "linear", repeat=depth, group="projector",
            note="fc1 [embed, mlp] (column-parallel), later ones [mlp, embed] (row-parallel)"),
        Row("projector/fc{i}/bias", None, lambda c, i: (d(c),), "multi_modal_projector.linear_{i}.bias",
            lambda c, i: (d(c),), present=lambda c: c.projector.bias, repeat=depth, group="projector"),
    ]


def _llm_rows() -> list[Row]:
    p = "language_model."
    layer = p + "layers.{n}."
    d = lambda c: c.text.hidden_size  # noqa: E731
    f = lambda c: c.text.intermediate_size  # noqa: E731
    q_heads = lambda c: (c.text.num_heads, c.text.head_dim)  # noqa: E731
    kv_heads = lambda c: (c.text.num_kv_heads, c.text.head_dim)  # noqa: E731
    attn_bias = lambda c: c.text.attention_bias  # noqa: E731
    mlp_bias = lambda c: c.text.mlp_bias  # noqa: E731
    rows = [
        Row("llm/embed", ("vocab", "embed"), lambda c: (_t(c).vocab_size, d(c)), p + "embed_tokens.weight",
            lambda c: (_t(c).vocab_size, d(c))),
        Row("llm/layers/attn_norm/scale", ("layers", "norm"), lambda c: _l(c) + (d(c),),
            layer + "input_layernorm.weight", lambda c: (d(c),), stack="llm"),
        Row("llm/layers/mlp_norm/scale", ("layers", "norm"), lambda c: _l(c) + (d(c),),
            layer + "post_attention_layernorm.weight", lambda c: (d(c),), stack="llm"),
    ]
    for proj, heads, axis in (("q", q_heads, "heads"), ("k", kv_heads, "kv_heads"), ("v", kv_heads, "kv_heads")):
        rows.append(Row(f"llm/layers/attn/{proj}/kernel", ("layers", "embed", axis, "head_dim"),
                        lambda c, h=heads: _l(c) + (d(c),) + h(c), f"{layer}self_attn.{proj}_proj.weight",
                        lambda c, h=heads: (h(c)[0] * h(c)[1], d(c)), "heads_in", "llm", heads))
        rows.append(Row(f"llm/layers/attn/{proj}/bias", ("layers", axis, "head_dim"),
                        lambda c, h=heads: _l(c) + h(c), f"{layer}self_attn.{proj}_proj.bias",
                        lambda c, h=heads: (h(c)[0] * h(c)[1],), "head_bias", "llm", heads, present=attn_bias))
    rows += [
        Row("llm/layers/attn/o/kernel", ("layers", "heads", "head_dim", "embed"),
            lambda c: _l(c) + q_heads(c) + (d(c),), layer + "self_attn.o_proj.weight",
            lambda c: (d(c), q_heads(c)[0] * q_heads(c)[1]), "heads_out", "llm", q_heads),
        Row("llm/layers/attn/o/bias", ("layers", "embed"), lambda c: _l(c) + (d(c),), layer + "self_attn.o_proj.bias",
            lambda c: (d(c),), stack="llm", present=attn_bias),
    ]
    for proj, (n_in, n_out), axes in (("gate", (d, f), ("embed", "mlp")), ("up", (d, f), ("embed", "mlp")),
                                      ("down", (f, d), ("mlp", "embed"))):
        rows.append(Row(f"llm/layers/mlp/{proj}/kernel", ("layers",) + axes,
                        lambda c, a=n_in, b=n_out: _l(c) + (a(c), b(c)), f"{layer}mlp.{proj}_proj.weight",
                        lambda c, a=n_in, b=n_out: (b(c), a(c)), "linear", "llm"))
        rows.append(Row(f"llm/layers/mlp/{proj}/bias", ("layers", axes[1]), lambda c, b=n_out: _l(c) + (b(c),),
                        f"{layer}mlp.{proj}_proj.bias", lambda c, b=n_out: (b(c),), stack="llm", present=mlp_bias))
    rows += [
        Row("llm/final_norm/scale", ("norm",), lambda c: (d(c),), p + "norm.weight", lambda c: (d(c),)),
        Row("llm/lm_head/kernel", ("embed", "vocab"), lambda c: (d(c), _t(c).vocab_size), "lm_head.weight",
            lambda c: (_t(c).vocab_size, d(c)), "linear", present=lambda c: not c.text.tie_word_embeddings,
            note="absent when `tie_word_embeddings`"),
        # [D, 2] shared by every MoD layer, or [n_mod, D, 2] per layer: tiny, replicated. Stored in
        # PyTorch under every MoD layer (`model.layers.N.router.weight`), placed by the converter.
        Row("llm/mod_router/kernel", None,
            lambda c: ((d(c), 2) if c.mod.shared_router else (len(c.mod.layers), d(c), 2)),
            present=lambda c: c.mod.enabled,
            note="γ-MoD only: `model.layers.N.router.weight.T` (every copy equal when shared)"),
    ]
    return rows


ROWS: tuple[Row, ...] = tuple(_vision_rows() + _multipath_rows() + _mgm_rows() + _projector_rows()
                              + _llm_rows())


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One leaf of a concrete config's tree (a `Row` with its `{i}` filled in)."""

    path: str
    shape: tuple[int, ...]
    row: Row
    index: int | None = None  # the value of `{i}`

    @property
    def layers(self) -> int | None:
        """Stacked layers (the leading axis), or None."""
        return self.shape[0] if self.row.stack is not None else None

    @property
    def torch_key(self) -> str | None:
        key = self.row.torch_key
        return None if key is None else key.replace("{i}", str(self.index))

    def torch_shape(self, config: ModelConfig) -> tuple[int, ...]:
        fn = self.row.torch_shape
        return tuple(int(n) for n in (fn(config) if self.index is None else fn(config, self.index)))


def leaves(config: ModelConfig) -> list[Leaf]:
    """Every leaf of `config`'s parameter tree, in PyTorch module order."""
    out, run = [], []

    def flush():
        indices = sorted({i for row in run for i in row.repeat(config)})
        for i in indices:
            for row in run:
                if i in row.repeat(config):
                    out.append(Leaf(row.path.replace("{i}", str(i)), tuple(int(n) for n in row.shape(config, i)),
                                    row, i))
        run.clear()

    for row in ROWS:
        if not row.present(config):
            continue
        if run and row.group != run[0].group:
            flush()
        if row.repeat:
            run.append(row)
            continue
        flush()
        out.append(Leaf(row.path, tuple(int(n) for n in row.shape(config)), row))
    flush()
    return out


def shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{path: Flax shape} of `config`'s tree."""
    return {leaf.path: leaf.shape for leaf in leaves(config)}


class UnannotatedParam(KeyError):
    """A param leaf with no row here: it would otherwise be silently replicated."""


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    """Logical axis per dimension of the leaf at `path` (None entries: not sharded)."""
    for row in ROWS:
        match = row.pattern.match(path)
        if match:
            axes = row.axes(int(match.group(1))) if callable(row.axes) else row.axes
            if axes is None:
                return (None,) * ndim
            if len(axes) != ndim:
                raise ValueError(f"param {path!r} has rank {ndim} but gmod_jax.param_layout declares axes {axes}")
            return axes
    raise UnannotatedParam(f"param {path!r} has no row in gmod_jax.param_layout: declare its shape, logical axes "
                           "and PyTorch source there")


def markdown() -> str:
    """docs/param_layout.md, generated from the rows (`python -m gmod_jax.param_layout`)."""
    from gmod_jax.config import gamma_mod, llava_v15_7b

    example = gamma_mod(llava_v15_7b())
    example_shapes: dict[Row, list[str]] = {}
    for leaf in leaves(example):
        example_shapes.setdefault(leaf.row, []).append(str(list(leaf.shape)))
    lines = [
        "# Flax parameter tree (canonical layout)",
        "",
        "Generated from `gmod_jax/param_layout.py` by `python -m gmod_jax.param_layout > docs/param_layout.md`;",
        "the test suite checks that this file is current. One plain pytree, the same for dense and γ-MoD",
        "checkpoints (γ-MoD only adds `llm/mod_router`). Decoder and vision layers are stacked on a leading",
        "layer axis `[L, ...]`; `{n}` in a PyTorch key is the layer index, `{i}` the index of a repeated module.",
        "Canonical PyTorch keys are HF 5.x names without the `model.` wrappers; `convert.keymap` maps every",
        "supported on-disk layout onto them. Shapes are those of γ-MoD-LLaVA-1.5-7B.",
        "",
        "| path | shape (γ-MoD 7B) | logical axes | PyTorch key | transform | note |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in ROWS:
        if callable(row.axes):
            axes = "by `{i}`, see note"
        else:
            axes = "replicated" if row.axes is None else "[" + ", ".join(a or "–" for a in row.axes) + "]"
        key = f"`{row.torch_key}`" if row.torch_key else "–"
        transform = TRANSFORMS[row.transform] if row.torch_key else "–"
        shape = ", ".join(example_shapes.get(row, ["absent"]))
        lines.append(f"| `{row.path}` | {shape} | {axes} | {key} | {transform} | {row.note} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
