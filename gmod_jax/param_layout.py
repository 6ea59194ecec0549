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

from gmod_jax.config import ModelConfig

TRANSFORMS = {
    "copy": "as is",
    "linear": "`.T`",
    "heads_in": "`.T.reshape(in, heads, head_dim)`",
    "heads_out": "`.T.reshape(heads, head_dim, out)`",
    "head_bias": "`.reshape(heads, head_dim)`",
    "conv": "OIHW → HWIO `.transpose(2, 3, 1, 0)`",
}

Shape = Callable[[ModelConfig], tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class Row:
    """One leaf (or one leaf per `{i}`) of the tree.

    axes: logical axis per Flax dimension, or None to replicate the leaf whatever its rank; a
        function of `{i}` for repeated leaves whose axes depend on it.
    shape / torch_shape: Flax shape (with the stack axis for stacked leaves) and the PyTorch
        shape of one layer's tensor; functions of (config, i) for repeated leaves.
    stack: "vision" or "llm" for leaves stacked over that tower's layers (`{n}` in the key).
    heads: (heads, head_dim) for the head-splitting transforms.
    present: whether a config has this leaf (optional biases, untied head, γ-MoD router).
    repeat: the values `{i}` takes for a config. Consecutive repeated rows are emitted index by
        index (fc1 kernel, fc1 bias, fc2 kernel, ...), the order of the PyTorch modules.
    torch_key: None for leaves the converter places itself (the γ-MoD router).
    """

    path: str
    axes: tuple[str | None, ...] | Callable[[int], tuple[str | None, ...]] | None
    shape: Shape
    torch_key: str | None = None
    torch_shape: Shape | None = None
    transform: str = "copy"
    stack: str | None = None
    heads: Callable[[ModelConfig], tuple[int, int]] | None = None
    present: Callable[[ModelConfig], bool] = lambda c: True
    repeat: Callable[[ModelConfig], range] | None = None
    note: str = ""

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


def _projector_rows() -> list[Row]:
    d = lambda c: c.text.hidden_size  # noqa: E731
    d_in = lambda c: c.vision.hidden_size * len(c.vision.feature_layers)  # noqa: E731
    depth = lambda c: range(1, c.projector.depth + 1)  # noqa: E731
    return [
        # Megatron pairs: the first linear column-parallel, the next ones row-parallel.
        Row("projector/fc{i}/kernel", lambda i: ("embed", "mlp") if i == 1 else ("mlp", "embed"),
            lambda c, i: (d_in(c) if i == 1 else d(c), d(c)), "multi_modal_projector.linear_{i}.weight",
            lambda c, i: (d(c), d_in(c) if i == 1 else d(c)), "linear", repeat=depth,
            note="fc1 [embed, mlp] (column-parallel), later ones [mlp, embed] (row-parallel)"),
        Row("projector/fc{i}/bias", None, lambda c, i: (d(c),), "multi_modal_projector.linear_{i}.bias",
            lambda c, i: (d(c),), present=lambda c: c.projector.bias, repeat=depth),
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


ROWS: tuple[Row, ...] = tuple(_vision_rows() + _projector_rows() + _llm_rows())


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One leaf of a concrete config's tree (a `Row` with its `{i}` filled in)."""

    path: str
    shape: tuple[int, ...]
    row: Row
    index: int | None = None  # the value of `{i}`

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
