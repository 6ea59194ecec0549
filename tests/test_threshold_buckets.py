"""The official threshold rule with capacity buckets: the kept sets and outputs are the unbounded
rule's, the compute follows the realised skip ratio, and nothing recompiles across prompts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from gmod_jax import api
from gmod_jax import config as C
from gmod_jax.api import Model
from gmod_jax.inference.generate import generate_ids, prefill_jit
from gmod_jax.models.llama import RoutingPlan, threshold_buckets
from gmod_jax.visualize import routing_masks
from tests.support.reference import reference_generate
from tests.test_generate import _prompts, random_params


def _with_buckets(model: Model, n: int) -> Model:
    mod = dataclasses.replace(model.config.mod, threshold_buckets=n)
    return Model(config=model.config.replace(mod=mod), params=model.params)


@pytest.fixture(scope="module")
def model():
    cfg = C.gamma_mod(C.tiny(), "explicit", 0.5, layers=(1, 2))
    return Model(config=cfg, params=random_params(cfg, seed=1, router_std=0.5))


def _left_padded(config, n_texts, seed):
    prompts, pixels = _prompts(config, n_texts, seed)
    t = max(p.size for p in prompts)
    ids = np.zeros((len(prompts), t), np.int32)
    mask = np.zeros((len(prompts), t), bool)
    for row, p in enumerate(prompts):
        ids[row, t - p.size:], mask[row, t - p.size:] = p, True
    return ids, pixels, mask


def test_buckets_are_equal_steps_capped_by_the_static_bound():
    cfg = C.gamma_mod(C.tiny(), "explicit", 0.5, layers=(1,))
    assert threshold_buckets(cfg, RoutingPlan("inference"), 64) == (8, 16, 24, 32, 40, 48, 56, 64)
    capped = cfg.replace(mod=dataclasses.replace(cfg.mod, threshold_max_capacity=0.3))
    assert threshold_buckets(capped, RoutingPlan("inference"), 64) == (8, 16, 20)
    single = cfg.replace(mod=dataclasses.replace(cfg.mod, threshold_buckets=1))
    assert threshold_buckets(single, RoutingPlan("inference"), 64) == (64,)
    assert threshold_buckets(cfg, RoutingPlan("train", 40), 64) == ()
    with pytest.raises(ValueError, match="threshold_buckets"):
        dataclasses.replace(cfg.mod, threshold_buckets=0)


@pytest.mark.parametrize("n_texts", [(5,), (3, 9, 1)], ids=["batch1", "batch3_left_padded"])
def test_bucketed_prefill_equals_the_unbounded_rule(model, n_texts):
    ids, pixels, mask = _left_padded(model.config, n_texts, seed=2)
    bucketed, exact = model, _with_buckets(model, 1)  # 1 bucket: capacity T, the rule unbounded
    out_b = bucketed.forward(ids, pixels, mask, mode="inference")
    out_e = exact.forward(ids, pixels, mask, mode="inference")
    np.testing.assert_array_equal(out_b["mod_kept"], out_e["mod_kept"])
    np.testing.assert_allclose(out_b["logits"][mask], out_e["logits"][mask], atol=1e-5, rtol=0)
    kept_b = routing_masks(bucketed, ids, pixels, mask)
    kept_e = routing_masks(exact, ids, pixels, mask)
    np.testing.assert_array_equal(kept_b, kept_e)
    # Some layer really ran below full capacity: its busiest row kept at most 7/8 of T.
    t = ids.shape[1]
    assert kept_b.sum(-1).max(-1).min() <= t * 7 // 8 and out_b["skip_ratio"] > 0.1


def test_generation_with_buckets_equals_the_cache_free_reference(model):
    prompts, pixels = _prompts(model.config, (4, 11, 2), seed=3)
    out = generate_ids(model, prompts, pixels, max_new_tokens=6)
    ref = reference_generate(model, prompts, pixels, max_new_tokens=6)
    assert [t.tolist() for t in out.tokens] == [t.tolist() for t in ref.tokens]
    np.testing.assert_array_equal(out.stats["prefill_kept"], ref.prefill_kept)
    np.testing.assert_array_equal(out.stats["decode_kept"], ref.decode_kept)
    assert out.prefill_skip_ratio > 0.1


def test_no_recompilation_across_prompts_with_different_skip_ratios(model):
    cfg = model.config
    first = _left_padded(cfg, (6, 6), seed=4)
    second = _left_padded(cfg, (6, 6), seed=5)
    skips = [model.forward(*batch, mode="inference")["skip_ratio"] for batch in (first, second)]
    assert skips[0] != skips[1]
    plan = RoutingPlan("inference", threshold_buckets(cfg, RoutingPlan("inference"), first[0].shape[1])[-1])
    assert api._jitted_apply(cfg, plan, True)._cache_size() == 1

    prompts_a, px_a = _prompts(cfg, (7, 2), seed=6)
    prompts_b, px_b = _prompts(cfg, (3, 5), seed=7)
    out_a = generate_ids(model, prompts_a, px_a, max_new_tokens=2)
    compiled = prefill_jit._cache_size()
    out_b = generate_ids(model, prompts_b, px_b, max_new_tokens=2)
    assert out_a.spec == out_b.spec and out_a.prefill_skip_ratio != out_b.prefill_skip_ratio
    assert prefill_jit._cache_size() == compiled
