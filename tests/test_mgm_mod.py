"""γ-MoD on Mini-Gemini: the routable span options (token types vs the official first-n quirk),
training skip counts on a tiny MGM config, KV-cache generation == the cache-free reference, and
the post-splice cut (tokenizer_model_max_length)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmod_jax import config as C
from gmod_jax import routing
from gmod_jax import token_types as tt
from gmod_jax.api import Model, routing_capacity
from gmod_jax.inference.generate import expand_prompt, generate_ids
from tests.support.reference import reference_generate
from tests.test_generate import random_params


def _official_layout(n_sys=35, n_img=2880, n_after=40, left_pad=(0, 5)):
    """Rows of BOS + system prompt + "USER:" (SYSTEM), the image, then question / answer tokens."""
    rows = []
    for pad in left_pad:
        after = [tt.QUESTION] * (n_after // 2) + [tt.ANSWER] * (n_after - n_after // 2)
        rows.append([tt.PAD] * pad + [tt.SYSTEM] * n_sys + [tt.IMAGE] * n_img + after[:n_after - pad])
    return np.asarray(rows, np.int32)


def test_first_n_span_routes_35_system_and_2845_image_tokens():
    types = _official_layout()
    by_types = C.gamma_mod_mgm_hd_7b().mod.routable_types
    first_n = C.gamma_mod_mgm_hd_7b(routable_span="first_n").mod.routable_types
    assert tuple(first_n) == tuple(by_types) == (tt.SYSTEM, tt.IMAGE) and first_n.first_n == 2880
    for xp in (np, jnp):
        mask = np.asarray(routing.routable_mask(xp.asarray(types), first_n))
        for row, pad in enumerate((0, 5)):  # left padding does not move the bound
            image = slice(pad + 35, pad + 35 + 2880)
            assert mask[row, pad:pad + 35].all() and mask[row, image][:2845].all()
            assert not mask[row, image][2845:].any() and not mask[row, :pad].any()
            assert not mask[row, pad + 35 + 2880:].any()
        np.testing.assert_array_equal(np.asarray(routing.skip_counts(xp.asarray(types), first_n, 0.5)), [1440, 1440])
        np.testing.assert_array_equal(np.asarray(routing.skip_counts(xp.asarray(types), by_types, 0.5)), [1457, 1457])
    # Adversarial router: the last image tokens least likely kept; the bound still keeps them.
    t = types.shape[1]
    probs = np.broadcast_to(np.linspace(1.0, 0.0, t, dtype=np.float32), types.shape)
    capacity = routing.static_keep_capacity(types, first_n, 0.5)
    sel = routing.select_topk(jnp.asarray(probs), jnp.asarray(types), first_n, 0.5, capacity)
    selected = np.asarray(sel.selected)
    assert selected[0, 35 + 2845:35 + 2880].all() and not selected[0, 35 + 2880 - 1440 - 35:35 + 2845].any()
    np.testing.assert_array_equal(np.asarray(sel.num_kept), t - 1440)


def _train_batch(cfg, batch=2, n_sys=3, n_question=4, n_answer=3, seed=0):
    rng = np.random.default_rng(seed)
    n = cfg.image_seq_length
    t = n_sys + n + n_question + n_answer
    ids = rng.integers(3, cfg.text.vocab_size - 2, (batch, t)).astype(np.int32)
    ids[:, n_sys:n_sys + n] = cfg.image_token_index
    types = np.full((batch, t), tt.QUESTION, np.int32)
    types[:, :n_sys], types[:, n_sys:n_sys + n], types[:, t - n_answer:] = tt.SYSTEM, tt.IMAGE, tt.ANSWER
    labels = np.where(types == tt.ANSWER, ids, -100).astype(np.int32)
    px = rng.standard_normal((batch, *cfg.pixel_shape)).astype(np.float32)
    return {"input_ids": ids, "pixel_values": px, "attention_mask": np.ones((batch, t), bool),
            "token_types": types, "labels": labels}


def _position_ranked(logits):
    """Router stand-in: keep-prob falls with the position, so the earliest tokens are kept first."""
    n = logits.shape[-2]
    return jnp.broadcast_to(1.0 - jnp.arange(n, dtype=jnp.float32) / n, logits.shape[:-1])


def _tiny_mod(span):
    return C.gamma_mod_mgm(C.tiny_mgm(), "explicit", 0.5, layers=(1, 2), routable_span=span)


@pytest.mark.parametrize("span,skipped", [("token_types", 11), ("first_n", 10)])
def test_training_routing_skips_the_documented_tokens(span, skipped, monkeypatch):
    """Tiny MGM (20 image tokens after 3 system tokens), ratio 0.5: the token-type span routes 23
    tokens and skips 11 per row and MoD layer; the first-n span (n = 20 image tokens, no system
    allowance) routes 3 system + the first 17 image tokens, skips 10, and always keeps the last 3
    image tokens. The training forward (top-k, router loss) with a router that ranks tokens by
    position shows which tokens go. Routing reads token types only, so the image slots keep
    their placeholder embedding here (no vision tower to compile)."""
    cfg = _tiny_mod(span)
    assert cfg.mod.router_init == "xavier_uniform"
    batch = _train_batch(cfg)
    b, t = batch["input_ids"].shape
    assert routing_capacity(cfg, batch["token_types"], "train") == t - skipped
    model = Model(config=cfg, params=random_params(cfg, seed=1))
    monkeypatch.setattr(routing, "router_probs", _position_ranked)
    out = model.forward(batch["input_ids"], None, batch["attention_mask"], batch["token_types"], mode="train")
    np.testing.assert_array_equal(out["mod_kept"], [b * (t - skipped)] * 2)
    # kept per routable type (system, image) per MoD layer: all image skips come off the end of
    # the routable span, so the first-n span keeps the last 3 image tokens the other one drops.
    np.testing.assert_array_equal(out["mod_kept_by_type"], [[b * 3, b * (20 - skipped)]] * 2)
    assert float(out["router_loss"]) > 0


@pytest.mark.slow
def test_train_step_on_tiny_mgm_first_n_span():
    """One real train step of γ-MoD-MGM (MGM SFT's trainable set: LLM, projector, mining
    projectors; towers frozen) with the official first-n span: finite loss, 10 of 30 tokens
    skipped per row and MoD layer."""
    from gmod_jax import sharding as shd
    from train import optimizer as opt
    from train import step as step_lib
    from train.config import OptimConfig

    cfg = _tiny_mod("first_n")
    batch = _train_batch(cfg)
    t = batch["input_ids"].shape[1]
    ocfg = OptimConfig(lr=1e-3, trainable=(r"^llm/", r"^projector/", r"^vision/uni_"))
    spec = step_lib.make_state_spec(cfg, opt.make_optimizer(ocfg, 2), opt.make_schedule(ocfg, 2), ocfg,
                                    shd.make_mesh(shd.MeshConfig()))
    with jax.set_mesh(spec.mesh):
        state = step_lib.make_opt_init(spec)(random_params(cfg, seed=1))
        capacity = routing_capacity(cfg, batch["token_types"], "train")
        new_state, metrics = step_lib.make_train_step(spec, 1, capacity)(state, jax.tree.map(lambda a: a[None], batch))
    assert int(new_state["step"]) == 1 and np.isfinite(float(metrics["loss"]))
    np.testing.assert_allclose(np.asarray(metrics["skip_ratio_per_layer"]), [10 / t] * 2, rtol=1e-6)
    assert float(metrics["skip_ratio/image"]) + float(metrics["skip_ratio/system"]) > 0


@pytest.mark.slow
def test_mod_generation_with_kv_cache_equals_reference():
    cfg = C.gamma_mod_mgm(C.tiny_mgm(), "explicit", 0.5, layers=(1, 2))
    model = Model(config=cfg, params=random_params(cfg, seed=1))
    rng = np.random.default_rng(3)
    prompts = [np.concatenate([[1], rng.integers(3, 120, 3), [cfg.image_token_index] * cfg.image_seq_length,
                               rng.integers(3, 120, n)]).astype(np.int32) for n in (2, 6)]
    pixels = rng.standard_normal((2, *cfg.pixel_shape)).astype(np.float32)
    out = generate_ids(model, prompts, pixels, max_new_tokens=6)
    ref = reference_generate(model, prompts, pixels, max_new_tokens=6)
    assert [t.tolist() for t in out.tokens] == [t.tolist() for t in ref.tokens]
    np.testing.assert_array_equal(out.stats["prefill_kept"], ref.prefill_kept)
    np.testing.assert_array_equal(out.stats["decode_kept"], ref.decode_kept)
    kept, entering = out.stats["prefill_kept"], out.stats["prefill_tokens"]
    assert 0 < kept.sum() < entering.sum()  # the threshold really routed
    with pytest.raises(ValueError, match=r"pixel_values must be \[2, 64, 64, 3\]"):
        generate_ids(model, prompts, pixels[:, :28, :28], max_new_tokens=2)


def test_tokenizer_model_max_length_cuts_spliced_sequences():
    from gmod_jax.data import pipeline

    cfg = C.tiny_mgm().replace(tokenizer_model_max_length=30)
    prompt = np.asarray([1, 5, 6, -200] + list(range(7, 27)), np.int64)  # 3 + 20 image + 20 = 43 spliced
    ids, types = expand_prompt(cfg, prompt, np.arange(prompt.size))
    assert ids.size == 30 and types.size == 30 and np.sum(ids == cfg.image_token_index) == 20
    np.testing.assert_array_equal(ids[23:], np.arange(7, 14))
    assert expand_prompt(cfg.replace(tokenizer_model_max_length=None), prompt)[0].size == 43
    with pytest.raises(ValueError, match="would split its image block"):
        expand_prompt(cfg.replace(tokenizer_model_max_length=10), prompt)
    pcfg = pipeline.PipelineConfig.for_model(cfg, batch_size=2, max_length=64)
    assert pcfg.max_length == 30 and pcfg.image.image_size == 64 and pcfg.image_seq_length == 20
    assert pipeline.PipelineConfig.for_model(cfg, batch_size=2, max_length=24).max_length == 24
    with pytest.raises(ValueError, match="pixel input size 64"):
        pipeline.PipelineConfig.for_model(cfg, batch_size=2, max_length=64,
                                          image=dataclasses.replace(pcfg.image, image_size=28))
