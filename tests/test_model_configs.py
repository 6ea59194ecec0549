"""Full-size configs build abstractly (no weights) with the right parameter counts, and the
config helpers reject bad values."""

import dataclasses
import math

import jax
import numpy as np
import pytest

from gmod_jax import config as C
from gmod_jax.models.llava import LlavaModel


def _count(cfg):
    shapes = jax.eval_shape(lambda r: LlavaModel(cfg).init(r, method=LlavaModel.declare_params)["params"],
                            jax.random.key(0, impl="rbg"))
    return sum(math.prod(a.shape) for a in jax.tree.leaves(shapes)), shapes


def _llama_params(v, d, f, n, kv_dim=None, tied=False):
    kv_dim = kv_dim or d
    per_layer = 2 * d * d + 2 * d * kv_dim + 3 * d * f + 2 * d
    return v * d * (1 if tied else 2) + n * per_layer + d


def _clip_params(d=1024, f=4096, n=24, patches=576, patch=14):
    per_layer = 4 * (d * d + d) + 2 * d * f + f + d + 4 * d
    return patch * patch * 3 * d + d + (patches + 1) * d + 2 * d + n * per_layer + 2 * d


def test_llava_v15_7b_parameter_count():
    total, shapes = _count(C.llava_v15_7b())
    projector = 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    expected = _llama_params(32064, 4096, 11008, 32) + _clip_params() + projector
    assert total == expected == 7_063_427_072  # "LLaVA-1.5-7B ≈ 7.06B"
    assert shapes["llm"]["layers"]["attn"]["q"]["kernel"].shape == (32, 4096, 32, 128)


def test_llava_v15_13b_and_gamma_mod_counts():
    total, _ = _count(C.llava_v15_13b())
    projector = 1024 * 5120 + 5120 + 5120 * 5120 + 5120
    assert total == _llama_params(32064, 5120, 13824, 40) + _clip_params() + projector
    assert 13.3e9 < total < 13.4e9
    mod7, shapes = _count(C.gamma_mod(C.llava_v15_7b()))
    assert mod7 - _count(C.llava_v15_7b())[0] == 4096 * 2  # one router shared by all MoD layers
    assert C.gamma_mod(C.llava_v15_7b()).mod.layers == tuple(range(3, 31))
    assert C.gamma_mod(C.llava_v15_13b()).mod.layers == tuple(range(3, 39))


def test_placements_and_validation():
    assert C.mod_layer_indices("every_2nd", 8) == (0, 2, 4, 6)
    assert C.mod_layer_indices("two_of_three", 6) == (0, 1, 3, 4)
    assert C.mod_layer_indices("all", 3) == (0, 1, 2)
    with pytest.raises(ValueError, match="outside"):
        C.mod_layer_indices("explicit", 4, (1, 4))
    with pytest.raises(ValueError, match="masking"):
        C.MoDConfig(masking="answers")
    with pytest.raises(ValueError, match="routing_ratio"):
        C.MoDConfig(routing_ratio=1.0)
    with pytest.raises(ValueError, match="num_kv_heads"):
        C.LlamaConfig(num_heads=32, num_kv_heads=5)
    with pytest.raises(ValueError, match="initializer_range"):
        C.LlamaConfig(initializer_range=0.0)


@pytest.mark.parametrize("std", [0.02, 0.05])
def test_llm_weights_start_at_initializer_range(std):
    import gmod_jax

    cfg = C.tiny(text=dataclasses.replace(C.tiny().text, initializer_range=std))
    params = gmod_jax.init_random(cfg).params["llm"]
    for name, kernel in (("embed", params["embed"]), ("q", params["layers"]["attn"]["q"]["kernel"]),
                         ("down", params["layers"]["mlp"]["down"]["kernel"]), ("lm_head", params["lm_head"]["kernel"])):
        assert np.std(np.asarray(kernel)) == pytest.approx(std, rel=0.03), name
    assert np.all(np.asarray(params["layers"]["attn_norm"]["scale"]) == 1.0)


def test_config_json_round_trip():
    cfg = C.gamma_mod(C.llava_v15_7b().replace(
        text=C.LlamaConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
        routing_ratio=0.34)
    assert C.ModelConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        C.ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})
