"""`gmod_jax.param_layout` is the tree's one declaration: the modules create exactly its leaves,
sharding reads its axes (an undeclared leaf is an error), the converter's keys and docs follow."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import pytest

from convert import keymap
from gmod_jax import config as C
from gmod_jax import param_layout, sharding
from gmod_jax.models.llava import LlavaModel

ROOT = Path(__file__).resolve().parent.parent


def _init_shapes(config) -> dict[str, tuple[int, ...]]:
    tree = jax.eval_shape(lambda key: LlavaModel(config).init(key, method=LlavaModel.declare_params)["params"],
                          jax.random.PRNGKey(0))
    return {sharding.path_str(p): tuple(a.shape) for p, a in jax.tree_util.tree_flatten_with_path(tree)[0]}


TINY_TEXT = C.tiny().text
CONFIGS = {
    "tiny": C.tiny(),
    "tiny γ-MoD, per-layer routers": C.gamma_mod(C.tiny(), "every_2nd", 0.5, shared_router=False),
    "biases, tied head, GQA": C.tiny(text=dataclasses.replace(TINY_TEXT, attention_bias=True, mlp_bias=True,
                                                               tie_word_embeddings=True, num_kv_heads=2)),
    "linear projector": C.tiny(projector=C.ProjectorConfig(type="linear")),
    "mlp3x projector, two feature layers": C.tiny(
        projector=C.ProjectorConfig(type="mlp3x_gelu"),
        vision=dataclasses.replace(C.tiny().vision, feature_layer=(-2, -1))),
    "LLaVA-1.5-7B γ-MoD": C.gamma_mod(C.llava_v15_7b()),
    "LLaVA-1.5-13B": C.llava_v15_13b(),
    "tiny Mini-Gemini (grid 2 + global)": C.tiny_mgm(),
    "tiny LLaVA-HR": C.tiny_hr(),
    "LLaVA-HR stage 1 (no adapters), S=384": C.llava_hr_7b(384).replace(
        vision=dataclasses.replace(C.llava_hr_7b(384).vision, latent_adapters=False)),
    "LLaVA-HR-13B γ-MoD": C.gamma_mod(C.llava_hr_13b()),
    "Mini-Gemini-HD-7B γ-MoD": C.gamma_mod_mgm_hd_7b(),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_module_init_creates_exactly_the_declared_leaves(name):
    config = CONFIGS[name]
    assert _init_shapes(config) == param_layout.shapes(config)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_leaf_has_logical_axes_of_its_rank(name):
    for path, shape in param_layout.shapes(CONFIGS[name]).items():
        assert len(sharding.param_logical_axes(path, len(shape))) == len(shape)


def test_an_undeclared_leaf_is_an_error_not_a_silent_replication():
    tree = {"llm": {"embed": jax.ShapeDtypeStruct((8, 4), "float32"),
                    "new_adapter": {"kernel": jax.ShapeDtypeStruct((4, 4), "float32")}}}
    with pytest.raises(param_layout.UnannotatedParam, match="llm/new_adapter/kernel"):
        sharding.param_specs(tree, {"data": 1, "fsdp": 2, "tensor": 1})


@pytest.mark.parametrize("name", list(CONFIGS))
def test_converter_expected_keys_cover_every_leaf_with_matching_shapes(name):
    """Each non-router leaf is filled by exactly its converter keys: one per layer of a stacked
    leaf, and the PyTorch shape transformed is the leaf's (per-layer) shape."""
    config = CONFIGS[name]
    shapes = param_layout.shapes(config)
    by_path: dict[str, list] = {}
    for target in keymap.expected_keys(config).values():
        by_path.setdefault("/".join(target.path), []).append(target)
    expected_paths = {p for p in shapes if p != "llm/mod_router/kernel"}
    assert set(by_path) == expected_paths
    for path, targets in by_path.items():
        layers = sorted(t.layer for t in targets if t.layer is not None)
        if layers:
            assert layers == list(range(shapes[path][0])), path
            assert (len(layers),) + targets[0].flax_shape == shapes[path], path
        else:
            assert len(targets) == 1 and targets[0].flax_shape == shapes[path], path


def test_docs_param_layout_is_generated_and_current():
    assert (ROOT / "docs" / "param_layout.md").read_text() == param_layout.markdown(), (
        "docs/param_layout.md is stale: run `python -m gmod_jax.param_layout > docs/param_layout.md`")


def test_tower_leaf_tables_agree_with_the_layout():
    """The ConvNeXt and multi-path modules' (path, PyTorch key, transform) tables name exactly the
    leaves, keys and transforms the layout declares for LLaVA-HR."""
    from gmod_jax.models.convnext import CONVNEXT_LEAVES
    from gmod_jax.models.multipath import MULTIPATH_LEAVES

    declared = {}
    for leaf in param_layout.leaves(C.tiny_hr()):
        if leaf.path.startswith(("vision/slow/", "vision/adapters/", "vision/fusion/")):
            row = leaf.row
            path = row.path.replace("vision/slow/", "").replace("vision/", "")
            key = row.torch_key.replace("vision_tower.slow_vision_tower.vision_tower.", "").replace("vision_tower.", "")
            key = key.replace("{n}", "{b}" if path.startswith("stages_") else "{a}")
            declared[path] = (key.replace(".weight", ".gamma") if path.endswith("layer_scale") else key, row.transform)
    tables = {path: (key, kind) for path, key, kind in CONVNEXT_LEAVES + MULTIPATH_LEAVES}
    assert tables == declared
