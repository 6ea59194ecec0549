"""Training parity: our jitted train step follows a PyTorch AdamW loop on the transformers LLaVA
model step for step (fp32, eager attention).

Forward parity (tests/test_convert_parity.py) does not cover what training adds: the masked
next-token loss, gradients through the frozen vision tower, global-norm clipping, AdamW with
its weight-decay mask, the warmup + cosine schedule (checked against transformers'
`get_cosine_schedule_with_warmup`) and the trainable/frozen split. The demo's language model
learns slowly from scratch; this test is why that is not blamed on the trainer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import get_cosine_schedule_with_warmup

from convert import pipeline
from gmod_jax.checkpoint import flatten
from gmod_jax import sharding as shd
from gmod_jax.models.llava import default_token_types
from tests import hf_fixtures as fx
from train import optimizer as opt
from train import step as step_lib
from train.config import OptimConfig
from train.data import IGNORE_INDEX

STEPS = 6
TRAINABLE = (r"^projector/", r"^llm/")  # LLaVA stage 2: the vision tower stays frozen


def _batches(spec, image_token_index):
    """Per step: (torch inputs, our batch with a leading accumulation axis of 1)."""
    out = []
    for seed in range(STEPS):
        ids, mask, pixels = fx.parity_inputs(spec, seed=seed)
        labels = np.where((ids == spec.image_token) | (mask == 0), IGNORE_INDEX, ids)
        labels[:, :5] = IGNORE_INDEX  # a prompt: no loss on the first tokens
        valid = mask.astype(bool)
        ours = {"input_ids": ids, "labels": labels, "attention_mask": valid,
                "token_types": np.asarray(default_token_types(jnp.asarray(ids), image_token_index, jnp.asarray(valid))),
                "pixel_values": pixels.transpose(0, 2, 3, 1)}
        theirs = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
                  "pixel_values": torch.tensor(pixels), "labels": torch.tensor(labels)}
        out.append((theirs, {k: jnp.asarray(v)[None] for k, v in ours.items()}))
    return out


def _torch_optimizer(model, cfg: OptimConfig):
    """AdamW over the LLM and projector; no decay on biases and norm weights (our `no_decay`)."""
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("model.vision_tower."))
    groups = {True: [], False: []}  # decayed or not
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[not (name.endswith("bias") or "norm" in name)].append(p)
    adamw = torch.optim.AdamW([{"params": groups[True], "weight_decay": cfg.weight_decay},
                               {"params": groups[False], "weight_decay": 0.0}],
                              lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps)
    return adamw, groups[True] + groups[False]


def test_train_steps_match_torch_adamw(tmp_path):
    spec = fx.SPECS["base"]
    model = fx.build_model(spec, seed=13)
    model.set_attn_implementation("eager")
    config, params, _ = pipeline.load_params(_save_state(model, spec, tmp_path / "src"))

    cfg = OptimConfig(lr=1e-2, schedule="cosine", warmup_steps=2, weight_decay=0.1, grad_clip=0.5,
                      trainable=TRAINABLE)
    state_spec = step_lib.make_state_spec(config, opt.make_optimizer(cfg, STEPS), opt.make_schedule(cfg, STEPS),
                                          cfg, shd.make_mesh(shd.MeshConfig()))
    with jax.set_mesh(state_spec.mesh):
        state = step_lib.make_opt_init(state_spec)(jax.tree.map(jnp.asarray, params))
        train_step = step_lib.make_train_step(state_spec, accum=1, capacity=None)
        adamw, trainable = _torch_optimizer(model, cfg)
        schedule = get_cosine_schedule_with_warmup(adamw, num_warmup_steps=2, num_training_steps=STEPS)
        for theirs, ours in _batches(spec, config.image_token_index):
            state, metrics = train_step(state, ours)
            loss = model(**theirs).loss
            adamw.zero_grad()
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            lr = adamw.param_groups[0]["lr"]
            adamw.step()
            schedule.step()
            assert abs(float(metrics["loss"]) - loss.item()) <= 1e-5 * loss.item()
            assert abs(float(metrics["grad_norm"]) - norm.item()) <= 1e-4 * norm.item()
            assert abs(float(metrics["lr"]) - lr) <= 1e-7
        ours_after = jax.device_get(state["params"])

    # Every trained tensor, after six clipped AdamW steps at lr 1e-2, matches; the tower is untouched.
    _, theirs_after, _ = pipeline.load_params(_save_state(model, spec, tmp_path / "after"))
    flat_ours, flat_theirs, flat_init = (flatten(t) for t in (ours_after, theirs_after, params))
    assert flat_ours.keys() == flat_theirs.keys()
    for key, value in flat_ours.items():
        value = np.asarray(value)
        if key[0] == "vision":
            assert np.array_equal(value, flat_init[key]), "/".join(key)
        else:
            assert not np.array_equal(value, flat_init[key]), f"{'/'.join(key)} did not train"
            np.testing.assert_allclose(value, flat_theirs[key], rtol=0, atol=1e-5, err_msg="/".join(key))


def _save_state(model, spec, out):
    """The torch model's weights as a checkpoint directory the converter reads."""
    fx.write_weights(fx.state_dict_c(model), out, "safetensors")
    fx.write_json(out / "config.json", fx.config_v5(spec))
    return out
