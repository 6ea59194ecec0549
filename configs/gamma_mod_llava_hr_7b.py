"""γ-MoD-LLaVA-HR-7B: stage-2 instruction tuning with Mixture-of-Depth layers, as the paper trains it.

Official settings (Yaxin9Luo/Gamma-MOD scripts/v1_5/fine_tune_mod.sh; shared/reference/
gamma-mod-paper-and-code.md §3.3, llava-hr-and-mgm.md §1.8 and §3):

* model: LLaVA-HR-7B at S = 1024 (1024 image tokens: CLIP fast path at 448 px, ConvNeXt-L slow
  path at 1024 px, the three MR-adapters and the final fusion), MoD in layers 3..30 (`arank_mod`,
  28 of 32), one shared router (PyTorch default init), routing ratio 0.5 (the code's hard-coded
  capacity; the released "-0.34" checkpoints: `--set model.mod.routing_ratio=0.34`), routing loss
  0.01 summed over MoD layers;
* routable span: the system prompt + the 1024 image tokens, derived from the token types (the
  default `official` masking). The official code routes the literal first 1024 + 35 positions,
  the same tokens for its v1 template with `<image>` first;
* everything trains (`--freeze_vision False`): LLM, router, projector, CLIP, ConvNeXt, adapters
  and fusion;
* lr 2e-5, cosine, warmup ratio 0.03, weight decay 0, global batch 128 (8 per GPU x 2
  accumulation x 8 GPUs), 1 epoch, model_max_length 2496, bf16, gradient checkpointing,
  homogeneous image / text-only batches (`group_by_modality_length True`).

Deviation: `data.max_length` bounds the spliced sequence (image tokens expanded); the official
collator truncates the unspliced ids at 2496, so its LLM sequences can reach 2495 + 1024.
`--set data.max_length=3519` reproduces that bound at the cost of memory.

`init_from` is the stage-1 result (configs/llava_hr_7b_stage1.py, exported with
`python -m train.export`) or the γ-MoD checkpoint `python -m convert.to_mod` wrote from it; the
MR-adapters, absent in stage 1, start at identity (their projections are zero-initialised), and
the router, when absent, is initialised fresh, as the official code does. MoD layers chosen by
ARank on the stage-1 model go in with `--set model.mod.layers=3,4,...` (the list
`arank.json` names):

    python -m train --config configs/gamma_mod_llava_hr_7b.py --workdir gs://.../gmod_hr \\
        --mesh configs/mesh_tpu_v5p_64.py \\
        --set init_from=/ckpt/hr_stage1_mod data.path=/data/modified_llava_v1_5_mix665k.json \\
              data.image_folder=/data data.tokenizer=/ckpt/hr_stage1_mod
"""

from gmod_jax import config as C
from gmod_jax.sharding import MeshConfig
from train.config import DataConfig, OptimConfig, TrainConfig


def get_config() -> TrainConfig:
    model = C.gamma_mod(C.llava_hr_7b(input_image_size=1024), placement="arank_mod", routing_ratio=0.5,
                        router_aux_loss_coef=0.01)
    return TrainConfig(
        model=model,
        compute_dtype="bfloat16",
        param_dtype="float32",
        remat="full",
        data=DataConfig(source="llava_json", template="vicuna_v1", max_length=2496, num_workers=8),
        optim=OptimConfig(lr=2e-5, schedule="cosine", warmup_ratio=0.03, weight_decay=0.0, grad_clip=1.0,
                          grad_accum_steps=2, trainable=(r".*",)),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        global_batch=128,
        num_epochs=1.0,
        log_every=10,
        eval_every=0,
        checkpoint_every=500,
        keep_checkpoints=2,
        seed=0,
    )
