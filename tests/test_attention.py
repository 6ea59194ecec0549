"""Block-causal attention (`causal_attention`) == plain masked attention on causal masks; the
flattened projections (`project`) == their einsums."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmod_jax import routing
from gmod_jax.layers import attention as A


def _qkv(t, heads=4, kv=2, d=8, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (2, t, heads, d)), jax.random.normal(ks[1], (2, t, kv, d)),
            jax.random.normal(ks[2], (2, t, kv, d)))


@pytest.mark.parametrize("t", [129, 300, 1100])  # 2, 3 and the capped 8 blocks (9 wanted)
def test_blocked_equals_unblocked_with_padding_and_gqa(t):
    q, k, v = _qkv(t)
    valid = jnp.arange(t)[None] >= jnp.array([[0], [17]])  # row 1 left-padded
    mask = A.causal_mask(valid)
    got, _ = A.causal_attention(q, k, v, mask, scale=0.3)
    want, _ = A.dot_product_attention(q, k, v, mask, scale=0.3)
    real = np.asarray(valid)  # padding queries attend to nothing: unused, not compared
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-6)

    def loss(fn, q):
        out, _ = fn(q, k, v, mask, scale=0.3)
        return jnp.sum(jnp.where(valid[..., None, None], out, 0.0) ** 2)

    g_got = jax.grad(lambda q: loss(A.causal_attention, q))(q)
    g_want = jax.grad(lambda q: loss(A.dot_product_attention, q))(q)
    np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), atol=2e-5)


def test_blocked_equals_unblocked_on_mod_slot_masks():
    t, cap = 400, 260
    q, k, v = _qkv(cap, seed=1)
    probs = jax.random.uniform(jax.random.key(2), (2, t))
    types = jnp.full((2, t), 2, jnp.int32).at[:, -30:].set(3)  # image tokens, then a question
    sel = routing.select_topk(probs, types, (2,), 0.5, cap)
    mask = routing.kept_attention_mask(sel)
    got, _ = A.causal_attention(q, k, v, mask, scale=0.3)
    want, _ = A.dot_product_attention(q, k, v, mask, scale=0.3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)


def test_probabilities_and_short_inputs_take_the_plain_path():
    q, k, v = _qkv(300)
    mask = A.causal_mask(jnp.ones((2, 300), bool))
    got, probs = A.causal_attention(q, k, v, mask, scale=0.3, return_probs=True)
    want, want_probs = A.dot_product_attention(q, k, v, mask, scale=0.3, return_probs=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(probs), np.asarray(want_probs))
    q, k, v = _qkv(A.CAUSAL_BLOCK_ROWS)
    mask = A.causal_mask(jnp.ones((2, A.CAUSAL_BLOCK_ROWS), bool))
    np.testing.assert_array_equal(np.asarray(A.causal_attention(q, k, v, mask, scale=0.3)[0]),
                                  np.asarray(A.dot_product_attention(q, k, v, mask, scale=0.3)[0]))


@pytest.mark.parametrize("eqn, x_shape, k_shape, out_dims", [
    ("btd,dhk->bthk", (2, 5, 8), (8, 3, 4), (3, 4)),  # q/k/v
    ("bthk,hkd->btd", (2, 5, 3, 4), (3, 4, 8), (8,)),  # attention output
    ("btd,df->btf", (2, 5, 8), (8, 6), (6,)),  # MLP, lm head
    ("bnd,de->bne", (3, 7, 8), (8, 6), (6,)),  # projector
])
def test_project_matches_einsum_with_gradients(eqn, x_shape, k_shape, out_dims):
    """`project` flattens to one 2-D matmul (faster backward on CPU); values and gradients must
    stay the einsum's."""
    kx, kk, kb = jax.random.split(jax.random.key(1), 3)
    x, kernel, bias = (jax.random.normal(k, s) for k, s in ((kx, x_shape), (kk, k_shape), (kb, out_dims)))

    def ours(x, kernel):
        return A.project(x, {"kernel": kernel, "bias": bias}, eqn, jnp.float32)

    def einsum(x, kernel):
        return jnp.einsum(eqn, x, kernel) + bias

    np.testing.assert_allclose(np.asarray(ours(x, kernel)), np.asarray(einsum(x, kernel)), rtol=1e-5, atol=1e-5)
    grads = [jax.grad(lambda x, k, f=f: jnp.sum(jnp.sin(f(x, k))), argnums=(0, 1))(x, kernel) for f in (ours, einsum)]
    for got, want in zip(*grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eqn", ["btd,fd->btf", "bdt,df->btf", "btd,df->bft"])
def test_project_rejects_other_contractions(eqn):
    with pytest.raises(ValueError, match="trailing-into-leading"):
        A.project(jnp.ones((2, 3, 3)), {"kernel": jnp.ones((3, 3))}, eqn, jnp.float32)
