"""ARank core: numerical rank of diagonal-zeroed causal attention maps, layer choice, aggregation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gmod_jax import arank


def _causal_softmax(scores: np.ndarray) -> np.ndarray:
    t = scores.shape[-1]
    scores = np.where(np.tri(t, dtype=bool), scores, -np.inf)
    scores = scores - scores.max(-1, keepdims=True)
    p = np.exp(scores)
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def _sink_map(t: int, r: int, rng: np.random.Generator) -> np.ndarray:
    """Causal map of rank exactly r after zeroing the diagonal.

    Rows i < r attend uniformly to 0..i (r-1 independent rows once the diagonal is gone); rows
    i >= r spread random weights over the first r "sink" keys only, so together they span
    exactly the first r columns.
    """
    a = np.zeros((t, t), np.float32)
    for i in range(r):
        a[i, : i + 1] = 1.0 / (i + 1)
    a[r:, :r] = rng.dirichlet(np.ones(r), size=t - r)
    return a


def _torch_rank(a: np.ndarray) -> np.ndarray:
    m = torch.tril(torch.from_numpy(np.ascontiguousarray(a)), diagonal=-1).float()
    return torch.linalg.matrix_rank(m).numpy()


@pytest.mark.parametrize("r", [1, 2, 3, 5])
def test_constructed_map_rank(r):
    rng = np.random.default_rng(r)
    maps = np.stack([_sink_map(12, r, rng), _sink_map(12, r, rng)])
    np.testing.assert_array_equal(np.asarray(arank.attention_rank(maps)), [r, r])
    np.testing.assert_array_equal(_torch_rank(maps), [r, r])


def test_diagonal_is_zeroed_and_full_maps():
    t = 10
    eye = np.eye(t, dtype=np.float32)  # every token attends to itself only: nothing left
    assert int(arank.attention_rank(eye)) == 0
    assert int(arank.attention_rank(np.ones((1, 1), np.float32))) == 0
    uniform = _causal_softmax(np.zeros((t, t)))  # strictly lower part has rank t - 1
    assert int(arank.attention_rank(uniform)) == t - 1
    # Upper-triangular garbage is ignored (maps are causal by construction in the model).
    noisy = uniform + np.triu(np.ones((t, t), np.float32), 1)
    assert int(arank.attention_rank(noisy)) == t - 1


def test_agrees_with_torch_matrix_rank_on_random_causal_maps():
    rng = np.random.default_rng(0)
    t, heads = 24, 32
    # Low-dimensional, sharp scores give rank-deficient maps with many singular values near the
    # tolerance, which is where an implementation mismatch would show.
    d = rng.integers(1, 4, size=heads)
    scale = rng.choice([0.5, 5.0, 30.0, 200.0], size=heads)
    maps = np.stack([
        _causal_softmax(scale[h] * rng.normal(size=(t, d[h])) @ rng.normal(size=(d[h], t)))
        for h in range(heads)
    ]).reshape(4, 8, t, t)
    ours = np.asarray(jax.jit(arank.attention_rank)(maps))
    ref = _torch_rank(maps)
    assert ours.shape == (4, 8)
    assert len(np.unique(ref)) > 3  # the maps really have different ranks
    np.testing.assert_array_equal(ours, ref)


def test_layer_arank_per_sample_valid_length():
    rng = np.random.default_rng(1)
    t, heads = 16, 3
    lengths = [16, 9, 5]
    full = np.stack([
        np.stack([_causal_softmax(20 * rng.normal(size=(t, 2)) @ rng.normal(size=(2, t))) for _ in range(heads)])
        for _ in lengths
    ])
    per_head, mean = arank.layer_arank(full, valid_len=np.asarray(lengths))
    assert per_head.shape == (3, heads) and mean.shape == (3,)
    for b, n in enumerate(lengths):
        # A real padded batch: the valid block renormalised on its own is what the model sees;
        # anything beyond valid_len must not matter.
        alone = _torch_rank(full[b, :, :n, :n])
        np.testing.assert_array_equal(np.asarray(per_head[b]), alone)
        np.testing.assert_allclose(float(mean[b]), alone.mean())
    unpadded, unpadded_mean = arank.layer_arank(full)
    np.testing.assert_array_equal(np.asarray(unpadded[0]), np.asarray(per_head[0]))
    np.testing.assert_allclose(np.asarray(unpadded_mean), np.asarray(unpadded).mean(-1))


def test_select_mod_layers_top_n_and_ties():
    ranks = np.array([120.0, 118.0, 115.0, 60.0, 70.0, 65.0, 112.0, 80.0])
    assert arank.select_mod_layers(ranks, num_dense=4) == (3, 4, 5, 7)
    tied = np.array([120.0, 100.0, 100.0, 100.0, 100.0, 10.0, 20.0])
    assert arank.select_mod_layers(tied, num_dense=2) == (5, 6)  # ties keep 5 layers dense
    assert arank.select_mod_layers(ranks, threshold=110.0) == (3, 4, 5, 7)
    assert arank.select_mod_layers(ranks, threshold=112.0) == (3, 4, 5, 7)  # rank < threshold -> MoD
    assert arank.select_mod_layers(ranks, threshold=112.5) == (3, 4, 5, 6, 7)
    assert arank.select_mod_layers(ranks, num_dense=0) == tuple(range(8))
    assert arank.select_mod_layers(ranks, num_dense=8) == ()
    # The official Vicuna-7B outcome: 4 high-rank layers {0, 1, 2, 31}, MoD everywhere else.
    vicuna = np.full(32, 50.0)
    vicuna[[0, 1, 2, 31]] = [300.0, 200.0, 150.0, 120.0]
    assert arank.select_mod_layers(vicuna) == tuple(range(3, 31))
    with pytest.raises(ValueError):
        arank.select_mod_layers(ranks, num_dense=9)


def test_aggregate_mean_over_heads_then_samples():
    per_head = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4)  # [N, L, H]
    mean, std = arank.aggregate(per_head)
    head_mean = per_head.mean(-1)
    np.testing.assert_allclose(mean, head_mean.mean(0))
    np.testing.assert_allclose(std, head_mean.std(0))
    mean2, std2 = arank.aggregate(head_mean)
    np.testing.assert_allclose(mean2, mean)
    np.testing.assert_allclose(std2, std)
    with pytest.raises(ValueError):
        arank.aggregate(np.zeros(3))


def test_attention_rank_jit_compiles_once_per_shape():
    fn = jax.jit(arank.layer_arank)
    rng = np.random.default_rng(2)
    for _ in range(3):
        maps = jnp.asarray(rng.uniform(size=(2, 2, 8, 8)).astype(np.float32))
        fn(maps, jnp.asarray(rng.integers(1, 9, size=2)))
    assert fn._cache_size() == 1
