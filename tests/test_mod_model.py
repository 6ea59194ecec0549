"""γ-MoD at the model level: equivalences with the dense model, the official PyTorch layer, both
routing implementations, gradients into the shared router, and one compile per shape."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gmod_jax
from gmod_jax import config as C
from gmod_jax import routing
from gmod_jax import token_types as tt
from gmod_jax.api import _jitted_apply
from gmod_jax.models import llama
from gmod_jax.models.llama import RoutingPlan
from gmod_jax.models.llava import LlavaModel

IMG = 127


def _batch(cfg, seed=0, batch=2, question=5, pad_last=2):
    n = cfg.image_seq_length
    rng = np.random.RandomState(seed)
    prefix = 3
    t = prefix + n + question
    ids = rng.randint(1, 100, size=(batch, t)).astype(np.int32)
    ids[:, prefix:prefix + n] = IMG
    mask = np.ones((batch, t), bool)
    if pad_last:
        mask[-1, -pad_last:] = False
        ids[-1, -pad_last:] = 0
    types = np.full((batch, t), tt.QUESTION, np.int32)
    types[:, :prefix] = tt.SYSTEM
    types[:, prefix:prefix + n] = tt.IMAGE
    types[:, -2:] = tt.ANSWER
    types[~mask] = tt.PAD
    px = rng.randn(batch, cfg.vision.image_size, cfg.vision.image_size, 3).astype(np.float32)
    return ids, px, mask, types


@pytest.fixture(scope="module")
def mod_model():
    base = C.tiny(vision=C.VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                        image_size=56, patch_size=14))  # 16 image tokens
    return gmod_jax.init_random(C.gamma_mod(base, "explicit", 0.5, layers=(1, 2)), seed=1)


def _dense_twin(model):
    cfg = model.config.replace(mod=C.MoDConfig())
    params = {**model.params, "llm": {k: v for k, v in model.params["llm"].items() if k != "mod_router"}}
    return gmod_jax.Model(cfg, params)


def test_keep_everything_router_equals_dense(mod_model, monkeypatch):
    """Ratio 0 with a router whose keep-prob is 1 reproduces the dense model exactly."""
    ids, px, mask, types = _batch(mod_model.config)
    dense = _dense_twin(mod_model).forward(ids, px, mask, types, mode="inference")["logits"]
    cfg0 = mod_model.config.replace(mod=dataclasses.replace(mod_model.config.mod, routing_ratio=0.0))
    monkeypatch.setattr(routing, "router_probs", lambda logits: jnp.ones(logits.shape[:-1], jnp.float32))
    for compact in (True, False):
        cfg = cfg0.replace(mod=dataclasses.replace(cfg0.mod, compact_positions=compact))
        out = gmod_jax.Model(cfg, mod_model.params).forward(ids, px, mask, types, mode="train")
        assert out["skip_ratio"] == 0.0
        np.testing.assert_allclose(out["logits"][mask], dense[mask], atol=1e-5, rtol=0)


def test_dense_plan_equals_dense_model(mod_model):
    ids, px, mask, types = _batch(mod_model.config)
    dense = _dense_twin(mod_model).forward(ids, px, mask, types)["logits"]
    out = mod_model.forward(ids, px, mask, types, mode="dense")["logits"]
    np.testing.assert_array_equal(out, dense)


def test_unstacked_and_unscanned_layers_equal_the_stack(mod_model):
    """Per-layer params (`unstack_layers`, what the decode loop runs on) and `scan_layers=False`
    walk the same layers as the scanned stack, here with one router per MoD layer and the top-k
    rule: same logits (float rounding), kept sets and router loss."""
    from gmod_jax.models.llama import unstack_layers

    cfg = mod_model.config.replace(mod=dataclasses.replace(mod_model.config.mod, shared_router=False))
    router = mod_model.params["llm"]["mod_router"]["kernel"]
    params = {**mod_model.params, "llm": {**mod_model.params["llm"], "mod_router": {"kernel": jnp.stack([router, -router])}}}
    ids, px, mask, types = _batch(cfg)
    unstacked = {**params, "llm": {**params["llm"], "layers": unstack_layers(params["llm"]["layers"])}}
    assert len(unstacked["llm"]["layers"]) == cfg.text.num_layers
    ref = gmod_jax.Model(cfg, params).forward(ids, px, mask, types, mode="train")
    for model in (gmod_jax.Model(cfg, unstacked), gmod_jax.Model(cfg.replace(scan_layers=False), params)):
        out = model.forward(ids, px, mask, types, mode="train")
        np.testing.assert_allclose(out["logits"][mask], ref["logits"][mask], atol=2e-5, rtol=0)
        np.testing.assert_array_equal(out["mod_kept"], ref["mod_kept"])
        np.testing.assert_allclose(out["router_loss"], ref["router_loss"], rtol=1e-5)
    assert 0 < ref["skip_ratio"] < 1


def _masked_oracle(model, ids, px, mask, types):
    """Full-sequence recompute: every token runs every layer, MoD layers keep only the selected
    tokens' updates, attention restricted to selected tokens, compacted positions. Returns the
    logits and the kept tokens of each routable type per MoD layer [n_mod, R]."""
    cfg, p = model.config, model.params
    module = LlavaModel(cfg)
    x = module.apply({"params": p}, ids, px, method=LlavaModel.embed)
    layers, router = p["llm"]["layers"], p["llm"]["mod_router"]["kernel"]
    t = cfg.text
    pos = llama.position_ids(jnp.asarray(mask))
    inv, sc = llama.inv_freq_and_scale(pos, theta=t.rope_theta, dim=t.head_dim, scaling=None,
                                       max_pos=t.max_position_embeddings)
    dense_mask = llama.causal_mask(jnp.asarray(mask))
    n_skip = routing.skip_counts(types, cfg.mod.routable_types, cfg.mod.routing_ratio)
    kept_by_type = []
    for i in range(t.num_layers):
        pl = jax.tree.map(lambda a: a[i], layers)
        if i not in cfg.mod.layers:
            cos, sin = llama.rope_cos_sin(pos, inv, sc)
            x, _ = llama.decoder_layer(cfg, pl, x, cos, sin, dense_mask)
            continue
        probs = np.asarray(routing.router_probs(llama.router_logits(cfg, pl, router, x)))
        prio = probs + (~np.isin(types, cfg.mod.routable_types))
        keep = np.zeros_like(mask)
        for b in range(len(ids)):
            order = np.argsort(-prio[b], kind="stable")
            keep[b, order[: ids.shape[1] - n_skip[b]]] = True
        kept_by_type.append([np.sum(keep & mask & (types == ty)) for ty in cfg.mod.routable_types])
        kpos = np.maximum(np.cumsum(keep & mask, -1) - 1, 0)
        cos, sin = llama.rope_cos_sin(jnp.asarray(kpos), inv, sc)
        att = llama.causal_mask(jnp.asarray(keep & mask)) | jnp.eye(ids.shape[1], dtype=bool)
        y, _ = llama.decoder_layer(cfg, pl, x, cos, sin, att, mlp_scale=jnp.asarray(probs))
        x = jnp.where(jnp.asarray(keep)[..., None], y, x)
    return np.asarray(module.apply({"params": p}, x, method=lambda m, h: m.llm.logits(h))), np.asarray(kept_by_type)


@pytest.mark.parametrize("impl", ["gather", "onehot"])
def test_mod_forward_matches_masked_oracle(mod_model, impl):
    ids, px, mask, types = _batch(mod_model.config, seed=3)
    cfg = mod_model.config.replace(mod=dataclasses.replace(mod_model.config.mod, implementation=impl))
    out = gmod_jax.Model(cfg, mod_model.params).forward(ids, px, mask, types, mode="train")
    oracle, oracle_kept_by_type = _masked_oracle(mod_model, ids, px, mask, types)
    np.testing.assert_allclose(out["logits"][mask], oracle[mask], atol=2e-5, rtol=0)
    # 16 image + 3 system tokens routable, half skipped per MoD layer: floor(0.5 * 19) = 9 of 24 / 22.
    np.testing.assert_allclose(out["skip_ratio_per_layer"], 18 / 46)
    np.testing.assert_array_equal(out["mod_kept_by_type"], oracle_kept_by_type)
    routable_per_type = [np.sum(mask & (types == ty)) for ty in cfg.mod.routable_types]
    np.testing.assert_array_equal(out["mod_tokens_by_type"], [routable_per_type] * len(cfg.mod.layers))
    assert out["mod_kept_by_type"].sum(axis=1).tolist() == [sum(routable_per_type) - 18] * len(cfg.mod.layers)


def _loss_fn(cfg, capacity):
    module = LlavaModel(cfg)

    def loss(params, ids, px, mask, types):
        out = module.apply({"params": params}, ids, px, mask, types, RoutingPlan("train", capacity))
        logp = jax.nn.log_softmax(out["logits"][:, :-1])
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(nll * mask[:, 1:]) / jnp.sum(mask[:, 1:]), out["router_loss"]

    return loss


def test_router_gradient_paths(mod_model):
    """W_r receives gradient from the LM loss (through r·MLP) and from the routing loss."""
    ids, px, mask, types = _batch(mod_model.config)
    cap = gmod_jax.api.routing_capacity(mod_model.config, types, "train")
    loss = _loss_fn(mod_model.config, cap)

    @jax.jit
    def both_grads(p):  # one forward, a backward pass per loss
        _, vjp = jax.vjp(lambda q: loss(q, ids, px, mask, types), p)
        return vjp((jnp.float32(1), jnp.float32(0)))[0], vjp((jnp.float32(0), jnp.float32(1)))[0]

    lm_grad, rl_grad = both_grads(mod_model.params)
    assert float(jnp.abs(lm_grad["llm"]["mod_router"]["kernel"]).max()) > 1e-6
    assert float(jnp.abs(rl_grad["llm"]["mod_router"]["kernel"]).max()) > 1e-6
    # The routing loss touches nothing but the router and what feeds it (norms, earlier layers).
    assert float(jnp.abs(rl_grad["llm"]["lm_head"]["kernel"]).max()) == 0.0


def test_gather_and_onehot_gradients_agree(mod_model):
    ids, px, mask, types = _batch(mod_model.config, seed=5)
    cap = gmod_jax.api.routing_capacity(mod_model.config, types, "train")
    grads = []
    for impl in ("gather", "onehot"):
        cfg = mod_model.config.replace(mod=dataclasses.replace(mod_model.config.mod, implementation=impl))
        f = _loss_fn(cfg, cap)
        grads.append(jax.jit(jax.grad(lambda p: sum(f(p, ids, px, mask, types))))(mod_model.params))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4)


def test_one_compile_per_shape(mod_model):
    cfg = mod_model.config
    ids, px, mask, types = _batch(cfg, seed=7)
    cap = gmod_jax.api.routing_capacity(cfg, types, "train")
    fn = _jitted_apply(cfg, RoutingPlan("train", cap), True)
    before = fn._cache_size()
    for seed in range(3):
        ids, px, mask, types = _batch(cfg, seed=seed)
        mod_model.forward(ids, px, mask, types, mode="train")
    assert fn._cache_size() - before <= 1


def test_threshold_inference_skips_by_probability(mod_model):
    """Official prefill rule: keep iff keep-prob > 0.005; a router pushed to 'skip' skips all."""
    ids, px, mask, types = _batch(mod_model.config)
    params = jax.tree.map(lambda a: a, mod_model.params)
    w = np.zeros_like(np.asarray(params["llm"]["mod_router"]["kernel"]))
    params["llm"]["mod_router"]["kernel"] = jnp.asarray(w)  # keep-prob exactly 0.5 everywhere
    out = gmod_jax.Model(mod_model.config, params).forward(ids, px, mask, types, mode="inference")
    assert out["skip_ratio"] == 0.0
    cfg = mod_model.config.replace(mod=dataclasses.replace(mod_model.config.mod, prefill_threshold=0.6))
    out = gmod_jax.Model(cfg, params).forward(ids, px, mask, types, mode="inference")
    assert out["skip_ratio"] == 1.0


# ----------------------------------------------------------------------------------------------
# The official MoD layer, re-implemented in PyTorch from the reference notes (training forward of
# `MoDLlamaDecoderLayer`): router on input_layernorm(x), +1 on every token after the routable
# prefix, k = ceil(T·(1 − ρ·P/T)), sorted top-k, gather, HF Llama layer with positions 0..k-1 and
# a causal mask among kept tokens, MLP output × r, scatter, CE(router logits, membership).

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _torch_official_mod_layer(layer, router, x, prefix_len, ratio):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    b, t, d = x.shape
    h = layer.input_layernorm(x)
    logits = router(h)
    probs = torch.softmax(logits, dim=-1)[..., 1]
    if t <= prefix_len:
        k = t
        prio = probs
    else:
        forced = (torch.arange(t) >= prefix_len).float()
        prio = probs + forced
        k = math.ceil(t * (1 - ratio * prefix_len / t))
    idx = torch.topk(prio, k, dim=-1).indices.sort(dim=-1).values
    xk = torch.gather(x, 1, idx[..., None].expand(-1, -1, d))
    rk = torch.gather(probs, 1, idx)
    pos = torch.arange(k)[None].expand(b, -1)
    cos, sin = LlamaRotaryEmbedding(layer.self_attn.config)(xk, pos)
    causal = torch.full((k, k), torch.finfo(torch.float32).min).triu(1)[None, None]
    residual = xk
    hk = layer.input_layernorm(xk)
    attn, _ = layer.self_attn(hidden_states=hk, attention_mask=causal, position_embeddings=(cos, sin))
    hk = residual + attn
    yk = hk + rk[..., None] * layer.mlp(layer.post_attention_layernorm(hk))
    out = x.scatter(1, idx[..., None].expand(-1, -1, d), yk)
    target = torch.zeros(b, t, dtype=torch.long).scatter(1, idx, 1)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 2), target.reshape(-1))
    return out, loss, idx


def test_matches_official_torch_mod_layer():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    torch.manual_seed(0)
    hc = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                     rms_norm_eps=1e-5, rope_theta=10000.0, attn_implementation="eager")
    layer = LlamaDecoderLayer(hc, layer_idx=0).eval()
    for prm in layer.parameters():  # HF init leaves norms at 1; randomise so the test can fail
        prm.data.normal_(0, 0.3 if prm.dim() == 1 else 0.05)
    router = torch.nn.Linear(64, 2, bias=False)
    b, prefix, t, ratio = 3, 23, 31, 0.5
    x = torch.randn(b, t, 64)
    with torch.no_grad():
        ref_out, ref_loss, ref_idx = _torch_official_mod_layer(layer, router, x, prefix, ratio)

    cfg = C.ModelConfig(text=C.LlamaConfig(vocab_size=8, hidden_size=64, intermediate_size=128, num_layers=1,
                                           num_heads=4, num_kv_heads=2, rms_norm_eps=1e-5),
                        mod=C.MoDConfig(enabled=True, layers=(0,), routing_ratio=ratio))
    sd = {k: v.numpy() for k, v in layer.state_dict().items()}
    p = {
        "attn_norm": {"scale": sd["input_layernorm.weight"]},
        "mlp_norm": {"scale": sd["post_attention_layernorm.weight"]},
        "attn": {"q": {"kernel": sd["self_attn.q_proj.weight"].T.reshape(64, 4, 16)},
                 "k": {"kernel": sd["self_attn.k_proj.weight"].T.reshape(64, 2, 16)},
                 "v": {"kernel": sd["self_attn.v_proj.weight"].T.reshape(64, 2, 16)},
                 "o": {"kernel": sd["self_attn.o_proj.weight"].T.reshape(4, 16, 64)}},
        "mlp": {n: {"kernel": sd[f"mlp.{n}_proj.weight"].T} for n in ("gate", "up", "down")},
    }
    types = np.full((b, t), tt.QUESTION, np.int32)
    types[:, :prefix] = tt.IMAGE
    mask = np.ones((b, t), bool)
    xj = jnp.asarray(x.numpy())
    tcfg = cfg.text
    pos = llama.position_ids(jnp.asarray(mask))

    def rope(q):
        inv, sc = llama.inv_freq_and_scale(pos, theta=tcfg.rope_theta, dim=tcfg.head_dim, scaling=None,
                                           max_pos=tcfg.max_position_embeddings)
        return llama.rope_cos_sin(q, inv, sc)

    cap = routing.static_keep_capacity(types, cfg.mod.routable_types, ratio)
    assert cap == math.ceil(t * (1 - ratio * prefix / t))
    out, counts = llama.mod_layer(cfg, p, router.weight.detach().numpy().T, xj, pos, jnp.asarray(mask),
                                  jnp.asarray(types), RoutingPlan("train", cap), rope)
    loss = counts["loss"]
    sel = routing.select_topk(routing.router_probs(llama.router_logits(cfg, p, router.weight.detach().numpy().T, xj)),
                              jnp.asarray(types), cfg.mod.routable_types, ratio, cap)
    np.testing.assert_array_equal(np.asarray(sel.indices), ref_idx.numpy())
    np.testing.assert_allclose(np.asarray(out), ref_out.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(loss), float(ref_loss), atol=1e-6)
    # The per-type counts, from the reference's kept indices: the routable types are (system,
    # image); here the image is the whole prefix and there is no system prompt.
    assert cfg.mod.routable_types == (tt.SYSTEM, tt.IMAGE)
    kept_image = int((ref_idx.numpy() < prefix).sum())
    assert 0 < kept_image < b * prefix
    assert int(counts["kept"]) == ref_idx.numel() and int(counts["tokens"]) == b * t
    np.testing.assert_array_equal(np.asarray(counts["kept_by_type"]), [0, kept_image])
    np.testing.assert_array_equal(np.asarray(counts["tokens_by_type"]), [0, b * prefix])


@pytest.mark.parametrize("accum", [1, 2])
def test_train_step_reports_skip_ratio_per_token_type(mod_model, accum):
    """The train step's `skip_ratio/<type>` metrics are the forward's per-type counts (pre-update
    params), summed over MoD layers and micro-batches."""
    from gmod_jax import sharding as shd
    from train import data as data_lib
    from train import optimizer as opt
    from train import step as step_lib
    from train.config import OptimConfig

    ids, px, mask, types = _batch(mod_model.config, seed=5, batch=4)
    labels = np.where(types == tt.ANSWER, ids, -100).astype(np.int32)
    out = mod_model.forward(ids, px, mask, types, mode="train")
    kept, tokens = out["mod_kept_by_type"].sum(0), out["mod_tokens_by_type"].sum(0)
    assert mod_model.config.mod.routable_types == (tt.SYSTEM, tt.IMAGE) and 0 < kept[1] < tokens[1]

    cfg = OptimConfig(lr=1e-3)
    spec = step_lib.make_state_spec(mod_model.config, opt.make_optimizer(cfg, 2), opt.make_schedule(cfg, 2), cfg,
                                    shd.make_mesh(shd.MeshConfig()))
    batch = {"input_ids": ids, "pixel_values": px, "attention_mask": mask, "token_types": types, "labels": labels}
    with jax.set_mesh(spec.mesh):
        # A copy: the init donates its argument, and the fixture's params are shared.
        state = step_lib.make_opt_init(spec)(jax.tree.map(jnp.array, mod_model.params))
        capacity = gmod_jax.api.routing_capacity(mod_model.config, types, "train")
        _, metrics = step_lib.make_train_step(spec, accum, capacity)(state, data_lib.split_micro(batch, accum))
    for i, name in enumerate(("system", "image")):
        assert float(metrics[f"skip_ratio/{name}"]) == pytest.approx(1 - kept[i] / tokens[i], abs=1e-6)
