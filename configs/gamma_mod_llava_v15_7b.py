"""γ-MoD on LLaVA-1.5-7B: stage-2 instruction tuning with Mixture-of-Depth layers.

Official settings (Yaxin9Luo/Gamma-MOD scripts/v1_5/fine_tune_mod.sh, paper §4): MoD in every
layer the ARank rule selects for Vicuna-7B (`arank_mod`: all but layers 0, 1, 2 and 31, i.e.
28 of 32), one router shared by all MoD layers, routing ratio 0.5 (the code default,
"γ-MoD-0.5"; the released "-0.34" checkpoints use `--set model.mod.routing_ratio=0.34`),
masked routing learning over the system+image prefix only, routing loss coefficient 0.01
summed over MoD layers; lr 2e-5, cosine, warmup ratio 0.03, weight decay 0, global batch 128
(8 per GPU x 2 accumulation x 8 GPUs), 1 epoch, model_max_length 2496, bf16, gradient
checkpointing, LLM + projector (+ router) trained, vision frozen. γ-MoD is applied during the
standard SFT, starting from Vicuna + the stage-1 projector.

`init_from` is a dense stage-1 checkpoint (the router, absent there, is freshly initialised
as the official code does) or one written by `python -m convert.to_mod`:

    python -m train --config configs/gamma_mod_llava_v15_7b.py --workdir gs://.../gmod \\
        --mesh configs/mesh_tpu_v5p_64.py \\
        --set init_from=/ckpt/stage1 data.path=/data/modified_llava_v1_5_mix665k.json \\
              data.image_folder=/data data.tokenizer=/ckpt/stage1
"""

from gmod_jax import config as C
from gmod_jax.sharding import MeshConfig
from train.config import DataConfig, OptimConfig, TrainConfig


def get_config() -> TrainConfig:
    model = C.gamma_mod(C.llava_v15_7b(), placement="arank_mod", routing_ratio=0.5, router_aux_loss_coef=0.01)
    return TrainConfig(
        model=model,
        compute_dtype="bfloat16",
        param_dtype="float32",
        remat="full",
        data=DataConfig(source="llava_json", template="vicuna_v1", max_length=2496, num_workers=8),
        optim=OptimConfig(lr=2e-5, schedule="cosine", warmup_ratio=0.03, weight_decay=0.0, grad_clip=1.0,
                          grad_accum_steps=2, trainable=(r"^projector/", r"^llm/")),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        global_batch=128,
        num_epochs=1.0,
        log_every=10,
        eval_every=0,
        checkpoint_every=500,
        keep_checkpoints=2,
        seed=0,
    )
