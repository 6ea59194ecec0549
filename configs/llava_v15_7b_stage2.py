"""LLaVA-1.5-7B stage 2 (visual instruction tuning): LLM + projector, vision tower frozen.

Official recipe (haotian-liu/LLaVA scripts/v1_5/finetune.sh): llava_v1_5_mix665k.json,
`vicuna_v1` template, global batch 128 (16 x 8 GPUs), lr 2e-5, cosine, warmup ratio 0.03,
weight decay 0, 1 epoch, model_max_length 2048, bf16, gradient checkpointing.

`init_from` is the stage-1 result exported with `python -m train.export` (or a converted
checkpoint); `data.tokenizer` the Vicuna tokenizer directory:

    python -m train --config configs/llava_v15_7b_stage2.py --workdir gs://.../stage2 \\
        --mesh configs/mesh_tpu_v5p_64.py \\
        --set init_from=/ckpt/stage1 data.path=/data/llava_v1_5_mix665k.json \\
              data.image_folder=/data data.tokenizer=/ckpt/stage1
"""

from gmod_jax import config as C
from gmod_jax.sharding import MeshConfig
from train.config import DataConfig, OptimConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model=C.llava_v15_7b(),
        compute_dtype="bfloat16",
        param_dtype="float32",
        remat="full",
        data=DataConfig(source="llava_json", template="vicuna_v1", max_length=2048, num_workers=8),
        optim=OptimConfig(lr=2e-5, schedule="cosine", warmup_ratio=0.03, weight_decay=0.0, grad_clip=1.0,
                          trainable=(r"^projector/", r"^llm/")),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        global_batch=128,
        num_epochs=1.0,
        log_every=10,
        eval_every=0,
        checkpoint_every=500,
        keep_checkpoints=2,
        seed=0,
    )
