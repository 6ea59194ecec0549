"""ConvNeXt trunk: parity with a hand-written timm-architecture torch ConvNeXt (random weights,
layer scale included), the init tree equals the tree the leaf table builds, config round trip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gmod_jax.config import ConvNeXtConfig, ModelConfig, VisionConfig
from gmod_jax.models.convnext import convnext_stages, init_convnext
from tests import hr_fixtures as hr

TINY = ConvNeXtConfig(depths=(2, 1, 2, 1), dims=(8, 16, 24, 32), patch_size=4)


@pytest.mark.parametrize("config", [TINY, ConvNeXtConfig(depths=(1, 2), dims=(8, 12), patch_size=2,
                                                         kernel_size=5, norm_eps=1e-5, layer_scale=False)])
def test_stage_outputs_match_torch(config):
    torch_model = hr.randomize_(hr.ConvNeXtTrunk(config), seed=3).eval()
    rng = np.random.default_rng(0)
    side = 2 * config.stride
    pixels = rng.standard_normal((2, 3, side, side)).astype(np.float32)
    with torch.no_grad():
        theirs = [o.numpy().transpose(0, 2, 3, 1) for o in torch_model(torch.tensor(pixels))]
    params = hr.convnext_params(torch_model.state_dict(), config)
    ours = jax.jit(lambda p, x: convnext_stages(config, p, x))(params, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    assert len(ours) == config.num_stages
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape, (i, a.shape, b.shape)
        scale = max(1.0, float(np.max(np.abs(b))))
        diff = float(np.max(np.abs(np.asarray(a) - b)))
        assert diff <= 1e-5 * scale, f"stage {i}: max |diff| {diff:.2e} (scale {scale:.1f})"


def test_init_tree_is_the_leaf_table_tree():
    """The init tree has exactly the leaves (paths, shapes) the torch -> Flax table produces."""
    torch_model = hr.ConvNeXtTrunk(TINY)
    converted = hr.convnext_params(torch_model.state_dict(), TINY)
    # One compile with the rbg PRNG (threefry's unrolled hashing compiles slowly on CPU), as init_random.
    init = jax.jit(lambda rng: init_convnext(TINY, rng, 3))(jax.random.key(0, impl="rbg"))
    shapes = lambda t: {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(t)[0]}
    assert shapes(init) == shapes(converted)
    assert float(init["stages_1"]["blocks"]["layer_scale"][0, 0]) == pytest.approx(1e-6)


def test_input_not_multiple_of_stride_is_rejected():
    with pytest.raises(ValueError, match="multiple of its total stride 32"):
        convnext_stages(TINY, None, jnp.zeros((1, 48, 48, 3)))  # checked before any param is read


def test_config_round_trip_with_nested_convnext():
    cfg = ModelConfig(vision=VisionConfig(slow=TINY))
    back = ModelConfig.from_json(cfg.to_json())
    assert back == cfg and isinstance(back.vision.slow, ConvNeXtConfig)
    assert TINY.stride == 32 and TINY.width == 32
    bad = cfg.to_dict()
    bad["vision"]["slow"]["depth"] = 3
    with pytest.raises(ValueError, match=r"vision\.slow.*depth"):
        ModelConfig.from_dict(bad)
    with pytest.raises(ValueError, match="equal length"):
        ConvNeXtConfig(depths=(1, 1), dims=(8,))


def test_trunk_init_matches_its_param_layout_rows():
    """`init_convnext` creates exactly the leaves `param_layout.convnext_rows` declares (here as
    Mini-Gemini's aux trunk), each with logical axes of its rank."""
    from gmod_jax import config as C
    from gmod_jax import param_layout
    from gmod_jax.sharding import param_logical_axes, path_str

    cfg = C.tiny_mgm()
    init = jax.eval_shape(lambda: {"vision": {"aux": init_convnext(cfg.vision.aux, jax.random.PRNGKey(0), 3)}})
    created = {path_str(p): tuple(a.shape) for p, a in jax.tree_util.tree_flatten_with_path(init)[0]}
    declared = {k: v for k, v in param_layout.shapes(cfg).items() if k.startswith("vision/aux/")}
    assert created == declared
    for name, shape in created.items():
        assert len(param_logical_axes(name, len(shape))) == len(shape)
