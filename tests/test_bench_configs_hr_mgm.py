"""The LLaVA-HR and MGM-HD benchmark configs (configs/bench_cpu_hr.py, bench_gpu_hr.py,
bench_gpu_mgm.py) load, and their dense and γ-MoD models take the inputs the benchmark builds:
shapes only (`jax.eval_shape`), no weights, no timing."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from gmod_jax import flops as F
from gmod_jax import token_types as tt
from bench.config import load_config
from bench.runner import make_inputs
from gmod_jax.models.llama import RoutingPlan, routing_capacity
from gmod_jax.models.llava import LlavaModel
from tests.test_sharding import ROOT

# config -> (image tokens, sequence length, MoD layers, decoder layers, paper model or None)
EXPECTED = {
    "bench_cpu_hr": (1024, 35 + 1024 + 29, 7, 8, None),
    "bench_gpu_hr": (1024, 1400, 28, 32, "llava-hr-7b"),
    "bench_gpu_mgm": (2880, 4000, 28, 32, "mgm-hd-7b"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bench_config_builds_its_models(name):
    config = load_config(ROOT / "configs" / f"{name}.py")
    image_tokens, seq_len, n_mod, n_layers, paper = EXPECTED[name]
    mod_cfg = config.mod_model_config()
    assert config.model.image_seq_length == image_tokens and config.seq_len == seq_len
    assert len(mod_cfg.mod_layers) == n_mod and mod_cfg.text.num_layers == n_layers
    if paper is not None:  # the paper's TFLOPs formula at this very shape and length
        L, d, d_ff, layers = F.PAPER_MODELS[paper]
        assert (L, d, d_ff, layers) == (seq_len, mod_cfg.text.hidden_size, mod_cfg.text.intermediate_size, n_layers)

    x = make_inputs(config, 1)
    assert x["px"].shape[1:] == config.model.pixel_shape
    assert (x["ids"] == config.model.image_token_index).sum() == image_tokens
    assert (x["types"] == tt.SYSTEM).sum() == config.system_tokens
    capacity = routing_capacity(mod_cfg, x["types"], "inference")
    # Capacity rule at ratio 0.5 over system + image: half of them skip in every MoD layer.
    assert capacity == seq_len - (config.system_tokens + image_tokens) // 2
    for cfg, plan in ((config.model, RoutingPlan("dense")), (mod_cfg, RoutingPlan("inference", capacity))):
        module = LlavaModel(cfg)
        params = jax.eval_shape(lambda k, m=module: m.init(k, method=LlavaModel.declare_params)["params"],
                                jax.random.key(0))
        assert ("mod_router" in params["llm"]) == cfg.mod.enabled
        out = jax.eval_shape(lambda p, m=module, plan=plan: m.apply(
            {"params": p}, x["ids"], x["px"], x["mask"], x["types"], plan), params)
        assert out["logits"].shape == (1, seq_len, cfg.text.vocab_size)
        if cfg.mod.enabled:
            assert out["mod_kept"].shape == (n_mod,)
