"""KV-cache generation == cache-free recompute (dense and γ-MoD), no recompilation, EOS per row."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmod_jax import config as C
from gmod_jax.api import Model
from gmod_jax.inference.generate import bucket_length, decode_jit, generate_ids, prefill_jit, sample_tokens
from tests.support.reference import reference_generate
from gmod_jax.models.llava import LlavaModel

MAX_NEW = 8


def random_params(cfg, seed=0, router_std=0.5):
    """Random weights on the model's own tree: shapes from `eval_shape`, values from numpy, so no
    `init` has to be compiled. Norm scales 1, biases 0, matrices N(0, 0.05²), and a router sharp
    enough (keep-probs pushed towards 0 and 1) that both the prefill (0.005) and the decode (0.5)
    thresholds skip some tokens and keep others."""
    shapes = jax.eval_shape(lambda r: LlavaModel(cfg).init(r, method=LlavaModel.declare_params)["params"],
                            jax.random.PRNGKey(0))
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        names = [str(getattr(k, "key", k)) for k in path]
        if names[-1] == "scale":
            return jnp.ones(s.shape, s.dtype)
        if names[-1] == "bias":
            return jnp.zeros(s.shape, s.dtype)
        std = router_std if "mod_router" in names else 0.05
        return jnp.asarray(std * rng.standard_normal(s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def _prompts(config, n_texts, seed=0):
    """Image prompts (BOS, system-ish text, image run, question) of different lengths."""
    rng = np.random.default_rng(seed)
    hi = min(config.image_token_index, config.text.vocab_size) - 1
    prompts = [np.concatenate([[1], rng.integers(3, hi, 3), [config.image_token_index] * config.image_seq_length,
                               rng.integers(3, hi, n)]).astype(np.int32) for n in n_texts]
    v = config.vision
    pixels = rng.standard_normal((len(n_texts), v.image_size, v.image_size, v.num_channels)).astype(np.float32)
    return prompts, pixels


@pytest.fixture(scope="module")
def mod_model():
    cfg = C.gamma_mod(C.tiny(), "explicit", 0.5, layers=(1, 2))
    return Model(config=cfg, params=random_params(cfg, seed=1))


@pytest.fixture(scope="module")
def dense_model(mod_model):
    # The same weights without the router.
    llm = {k: v for k, v in mod_model.params["llm"].items() if k != "mod_router"}
    return Model(config=C.tiny(), params={**mod_model.params, "llm": llm})


@pytest.fixture(scope="module")
def batch():
    return _prompts(C.tiny(), (3, 7, 1))


def _assert_same(out, ref):
    assert [t.tolist() for t in out.tokens] == [t.tolist() for t in ref.tokens]
    np.testing.assert_array_equal(out.stats["prefill_kept"], ref.prefill_kept)
    np.testing.assert_array_equal(out.stats["decode_kept"], ref.decode_kept)


# Both forms of the layer params inference runs on (`Model.inference_params`): the stack read by
# index inside scans, and per-layer buffers unrolled (the decode loop with per-layer caches).
INFERENCE_LAYERS = pytest.mark.parametrize("layers", ["stacked", "unstacked"])


@INFERENCE_LAYERS
def test_mod_cache_equals_recompute_batched(mod_model, batch, layers):
    prompts, pixels = batch
    out = generate_ids(mod_model, prompts, pixels, max_new_tokens=MAX_NEW, inference_layers=layers)
    ref = reference_generate(mod_model, prompts, pixels, max_new_tokens=MAX_NEW)
    _assert_same(out, ref)
    # The comparison only means something if both thresholds really routed.
    kept, entering = out.stats["prefill_kept"], out.stats["prefill_tokens"]
    assert 0 < kept.sum() < entering.sum()
    assert 0 < out.stats["decode_kept"].sum() < out.stats["decode_tokens"].sum() * len(out.mod_layers)
    np.testing.assert_array_equal(entering, np.broadcast_to([p.size for p in prompts], entering.shape))
    assert 0.0 < out.prefill_skip_ratio < 1.0 and 0.0 < out.decode_skip_ratio < 1.0


@INFERENCE_LAYERS
def test_mod_cache_equals_recompute_batch_one(mod_model, batch, layers):
    """Batch 1 takes the lax.cond path that really skips a layer; rows are batch-independent."""
    prompts, pixels = batch
    both = generate_ids(mod_model, prompts, pixels, max_new_tokens=MAX_NEW, inference_layers=layers)
    for row in (0, 1):
        out = generate_ids(mod_model, prompts[row:row + 1], pixels[row:row + 1], max_new_tokens=MAX_NEW,
                           inference_layers=layers)
        ref = reference_generate(mod_model, prompts[row:row + 1], pixels[row:row + 1], max_new_tokens=MAX_NEW)
        _assert_same(out, ref)
        assert out.tokens[0].tolist() == both.tokens[row].tolist()
        np.testing.assert_array_equal(out.stats["decode_kept"][:, 0], both.stats["decode_kept"][:, row])


def test_dense_cache_equals_recompute(dense_model, batch):
    prompts, pixels = batch
    out = generate_ids(dense_model, prompts, pixels, max_new_tokens=MAX_NEW)
    ref = reference_generate(dense_model, prompts, pixels, max_new_tokens=MAX_NEW)
    assert [t.tolist() for t in out.tokens] == [t.tolist() for t in ref.tokens]
    assert out.mod_layers == () and out.stats["prefill_kept"].shape == (0, 3)


def test_sampling_equals_recompute(mod_model, batch):
    prompts, pixels = batch
    kw = dict(max_new_tokens=MAX_NEW, temperature=1.5, top_p=0.9, seed=7)
    out = generate_ids(mod_model, prompts, pixels, **kw)
    ref = reference_generate(mod_model, prompts, pixels, **kw)
    _assert_same(out, ref)
    greedy = generate_ids(mod_model, prompts, pixels, max_new_tokens=MAX_NEW)
    assert [t.tolist() for t in out.tokens] != [t.tolist() for t in greedy.tokens]


@INFERENCE_LAYERS
def test_capacity_rule_gqa_per_layer_routers_text_row(mod_model, layers):
    """Capacity inference rule (padding forced into kept slots), unshared routers, GQA, and a
    text-only row next to image rows."""
    base = C.tiny()
    cfg = C.gamma_mod(base.replace(text=dataclasses.replace(base.text, num_kv_heads=2)), "explicit", 0.5,
                      layers=(1, 2), inference_routing="capacity", shared_router=False)
    # The fixture's weights with 2 of 4 KV heads and one router per MoD layer.
    llm = dict(mod_model.params["llm"])
    attn = dict(llm["layers"]["attn"])
    attn["k"] = {"kernel": attn["k"]["kernel"][:, :, :2]}
    attn["v"] = {"kernel": attn["v"]["kernel"][:, :, :2]}
    llm["layers"] = {**llm["layers"], "attn": attn}
    router = llm["mod_router"]["kernel"]
    llm["mod_router"] = {"kernel": jnp.stack([router, -0.5 * router])}
    model = Model(config=cfg, params={**mod_model.params, "llm": llm})
    prompts, pixels = _prompts(cfg, (2, 6, 4), seed=1)
    prompts[2] = prompts[2][prompts[2] != cfg.image_token_index]
    images = [pixels[0], pixels[1], None]
    out = generate_ids(model, prompts, images, max_new_tokens=MAX_NEW, inference_layers=layers)
    ref = reference_generate(model, prompts, images, max_new_tokens=MAX_NEW)
    _assert_same(out, ref)
    # The training rule skips floor(0.5 * routable prefix) of each image row, nothing of text rows.
    prefix = 1 + 3 + cfg.image_seq_length
    expected = np.asarray([p.size - prefix // 2 for p in prompts[:2]])
    np.testing.assert_array_equal(out.stats["prefill_kept"][:, :2], np.stack([expected, expected]))
    np.testing.assert_array_equal(out.stats["prefill_kept"][:, 2], prompts[2].size)


def test_no_recompilation_within_a_bucket(mod_model):
    sizes = lambda: (prefill_jit._cache_size(), decode_jit._cache_size())  # noqa: E731
    prompts, pixels = _prompts(mod_model.config, (2, 6, 5), seed=3)
    generate_ids(mod_model, prompts, pixels, max_new_tokens=3)
    before = sizes()
    # Other prompt lengths in the same bucket, other budgets in the same new-token bucket, other
    # sampling settings and EOS ids: the same two executables.
    for n_texts, max_new, temp, eos in (((1, 3, 4), 8, 0.0, None), ((5, 2, 6), 16, 0.7, 2), ((4, 4, 4), 1, 0.0, (2, 9))):
        prompts, pixels = _prompts(mod_model.config, n_texts, seed=max_new)
        out = generate_ids(mod_model, prompts, pixels, max_new_tokens=max_new, temperature=temp, eos_token_id=eos)
        assert out.spec.prompt_len == 16 and out.sequences.shape == (3, max_new)
    assert sizes() == before


def test_eos_stops_each_row(mod_model, batch):
    prompts, pixels = batch
    free = generate_ids(mod_model, prompts, pixels, max_new_tokens=MAX_NEW)
    eos = int(free.tokens[0][2])
    stop = [list(t).index(eos) + 1 if eos in t else MAX_NEW for t in free.tokens]
    assert stop[0] <= 3 and max(stop) == MAX_NEW  # row 0 stops early, another row never does
    out = generate_ids(mod_model, prompts, pixels, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=0)
    np.testing.assert_array_equal(out.lengths, stop)
    for row, n in enumerate(stop):
        assert out.tokens[row].tolist() == free.tokens[row][:n].tolist()
        assert (out.sequences[row, n:] == 0).all()
    np.testing.assert_array_equal(out.stats["decode_tokens"], np.asarray(stop) - 1)
    ref = reference_generate(mod_model, prompts, pixels, max_new_tokens=MAX_NEW, eos_token_id=eos)
    _assert_same(out, ref)
    # Batch 1: the loop ends at EOS.
    one = generate_ids(mod_model, prompts[:1], pixels[:1], max_new_tokens=MAX_NEW, eos_token_id=eos)
    assert one.lengths[0] == stop[0] and one.stats["decode_tokens"][0] == stop[0] - 1


def test_bucket_length():
    assert [bucket_length(n) for n in (1, 16, 17, 33, 48, 49, 600, 700)] == [16, 16, 32, 48, 48, 64, 768, 768]
    assert bucket_length(10, (8, 12, 40)) == 12
    with pytest.raises(ValueError):
        bucket_length(41, (8, 12, 40))


def test_top_p_keeps_the_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 64))
    rows = jnp.arange(64, dtype=jnp.int32)
    draw = jax.jit(lambda t, p: sample_tokens(logits, jax.random.PRNGKey(0), 0, t, p, rows))
    assert (np.asarray(draw(np.float32(1.0), np.float32(0.4))) == 0).all()  # 0.5 alone covers 0.4
    assert set(np.asarray(draw(np.float32(1.0), np.float32(0.7))).tolist()) == {0, 1}
    assert set(np.asarray(draw(np.float32(1.0), np.float32(1.0))).tolist()) == {0, 1, 2, 3}
    assert (np.asarray(draw(np.float32(0.0), np.float32(0.7))) == 0).all()  # temperature 0: greedy


def test_input_validation(mod_model, batch):
    prompts, pixels = batch
    with pytest.raises(ValueError, match="pixel_values"):
        generate_ids(mod_model, prompts, None)
    with pytest.raises(ValueError, match="image tokens"):
        generate_ids(mod_model, [prompts[0][:-3][:6]], pixels[:1])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_ids(mod_model, prompts, pixels, max_new_tokens=0)


@pytest.mark.parametrize("form", ["stacked", "unstacked"])
def test_layer_every_row_skips_is_not_computed(form):
    """At batch > 1 a MoD layer that every row skips takes the skip branch. With a decode
    threshold no keep-prob reaches, every decode token skips every MoD layer; the MoD layers'
    weights are then poisoned (NaN) for the decode only. Had a layer been computed, its NaN key
    would sit in the cache slot each step writes (masked invalid, but written); the skip branch
    writes zeros there. The tokens equal those of the clean weights (the layers are skipped)."""
    from bench import runner
    from bench.config import BenchConfig
    from gmod_jax.inference.generate import CacheSpec, mod_prefill_capacity

    base = C.tiny(vision=C.VisionConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                                        image_size=56, patch_size=14), image_token_index=127, pad_token_id=0)
    bench = BenchConfig(section="t", title="t", model=base, cases=(), placement="explicit", mod_layers=(1, 2),
                        system_tokens=3, question_tokens=5, inference_routing="capacity")
    _, mod = runner.build_models(bench)
    cfg = mod.config.replace(mod=dataclasses.replace(mod.config.mod, decode_threshold=1.0))
    b, n, t = 2, 4, bench.seq_len
    x = runner.make_inputs(bench, b)
    spec = CacheSpec(batch=b, prompt_len=t, new_slots=n, mod_capacity=mod_prefill_capacity(cfg, x["types"], "inference"))
    logits, cache, _ = prefill_jit(mod.params, x["ids"], x["px"], x["mask"], x["types"], config=cfg, spec=spec)
    dyn = (logits, np.full((b,), t, np.int32), np.int32(n), np.full((8,), -1, np.int32), np.int32(0),
           jax.random.PRNGKey(0), np.float32(0.0), np.float32(1.0), np.arange(b, dtype=np.int32))
    stack = mod.params["llm"]["layers"]
    poisoned_k = stack["attn"]["k"]["kernel"].at[jnp.asarray(cfg.mod_layers)].set(jnp.nan)
    poisoned = {**mod.params, "llm": {**mod.params["llm"], "layers": {
        **stack, "attn": {**stack["attn"], "k": {**stack["attn"]["k"], "kernel": poisoned_k}}}}}
    clean, poisoned = (Model(config=cfg, params=p).inference_params(form) for p in (mod.params, poisoned))
    clean_tokens, _, _, _ = decode_jit(clean, jax.tree.map(jnp.copy, cache), *dyn, config=cfg, spec=spec)
    tokens, _, stats, out_cache = decode_jit(poisoned, cache, *dyn, config=cfg, spec=spec)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(clean_tokens))
    assert np.all(np.asarray(stats["decode_layer_runs"]) == 0) and np.all(np.asarray(stats["decode_kept"]) == 0)
    mod_k, length = np.asarray(out_cache.mod_k), np.asarray(out_cache.mod_length)
    written = mod_k[np.arange(len(cfg.mod_layers))[:, None], np.arange(b)[None, :], :, length]  # [L_mod, B, KV, hd]
    assert np.all(written == 0.0), "a MoD layer every row skipped was computed"


def test_inference_params_forms(dense_model):
    """`Model.inference_params`: "stacked" is the model's own tree; "unstacked" splits every layer
    leaf (equal values, built once per params object); a bad choice names the options."""
    stacked = dense_model.params["llm"]["layers"]
    assert dense_model.inference_params("stacked") is dense_model.params
    un = dense_model.inference_params("unstacked")
    assert dense_model.inference_params("unstacked") is un
    layers = un["llm"]["layers"]
    assert isinstance(layers, tuple) and len(layers) == dense_model.config.text.num_layers
    for i, layer in enumerate(layers):
        jax.tree.map(lambda a, s, i=i: np.testing.assert_array_equal(a, s[i]), layer, stacked)
    assert dense_model.inference_params("auto")["llm"]["layers"] is layers  # tiny: the copy fits
    with pytest.raises(ValueError, match="inference layers must be one of"):
        dense_model.inference_params("scan")
