"""LLaVA-1.5-7B stage 1 (feature alignment): train only the mlp2x_gelu projector.

Official recipe (haotian-liu/LLaVA scripts/v1_5/pretrain.sh): LCS-558K captions
(blip_laion_cc_sbu_558k.json), `plain` template, global batch 256 (32 x 8 GPUs), lr 1e-3,
cosine, warmup ratio 0.03, weight decay 0, 1 epoch, model_max_length 2048, bf16, gradient
checkpointing, vision tower and LLM frozen.

Set `init_from` to a gmod-jax checkpoint holding the CLIP-L/336 tower and Vicuna-7B-v1.5
(e.g. a converted llava-v1.5-7b whose projector is re-initialised with
`init_skip='^projector/'`), and the data paths:

    python -m train --config configs/llava_v15_7b_stage1.py --workdir gs://.../stage1 \\
        --mesh configs/mesh_tpu_v5p_64.py \\
        --set init_from=/ckpt/llava-v1.5-7b init_skip=^projector/ \\
              data.path=/data/blip_laion_cc_sbu_558k.json data.image_folder=/data/images \\
              data.tokenizer=/ckpt/llava-v1.5-7b
"""

from gmod_jax import config as C
from gmod_jax.sharding import MeshConfig
from train.config import DataConfig, OptimConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model=C.llava_v15_7b(),
        compute_dtype="bfloat16",  # bf16 matmuls, float32 params and optimizer state
        param_dtype="float32",
        remat="full",  # LLaVA trains with gradient checkpointing
        data=DataConfig(source="llava_json", template="plain", max_length=2048, num_workers=8),
        optim=OptimConfig(lr=1e-3, schedule="cosine", warmup_ratio=0.03, weight_decay=0.0, grad_clip=1.0,
                          trainable=(r"^projector/",)),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        global_batch=256,
        num_epochs=1.0,
        log_every=10,
        eval_every=0,
        checkpoint_every=500,
        keep_checkpoints=2,
        seed=0,
    )
