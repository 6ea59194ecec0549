"""LLaVA-HR-7B stage 1 (feature alignment) at S = 384: projector + final fusion trainable.

Official recipe (Yaxin9Luo/Gamma-MOD scripts/v1_5/pretrain_llava_hr.sh; shared/reference/
llava-hr-and-mgm.md §1.8): LCS-558K captions, `plain` template, `--input_image_size 384`,
`--tune_mm_mlp_adapter True` with `freeze_vision` left True. What trains:

* `projector/` (`mm_projector`) and `vision/fusion/` (the final `align_stages.0` fusion: every
  name containing `align_stages` is unfrozen, train.py 1317-1337);
* frozen: the CLIP fast path, the ConvNeXt slow path, the LLM;
* absent: the three MR-adapters (`align_stages_latent` is not built in stage 1), hence
  `vision.latent_adapters=False`. Stage 2 starts them at identity (`init_from` leaves them fresh).

At S = 384 the CLIP sees 336 px (its native 24x24 grid, 576 image tokens) and the ConvNeXt's 12x12
grid is upsampled to it inside the fusion. Hyperparameters are LLaVA-1.5's stage 1 (the HR script
keeps them): global batch 256, lr 1e-3, cosine, warmup ratio 0.03, weight decay 0, 1 epoch,
model_max_length 2048, bf16, gradient checkpointing.

Deviation: γ-MoD's own copy of the slow tower zero-initialises the ConvNeXt when stage 1 runs
(reference §0.4, its slow branch is then dead); here the ConvNeXt comes from `init_from`
(e.g. a converted LLaVA-HR checkpoint, as the original LLaVA-HR code always loads it), with the
projector and fusion re-initialised through `init_skip`:

    python -m train --config configs/llava_hr_7b_stage1.py --workdir gs://.../hr_stage1 \\
        --mesh configs/mesh_tpu_v5p_64.py \\
        --set init_from=/ckpt/llava-hr-7b init_skip=^projector/,^vision/fusion/ \\
              data.path=/data/blip_laion_cc_sbu_558k.json data.image_folder=/data/images \\
              data.tokenizer=/ckpt/llava-hr-7b

Then: `python -m gmod_jax.arank` on the exported stage-1 checkpoint, `python -m convert.to_mod`,
and `configs/gamma_mod_llava_hr_7b.py` (README "LLaVA-HR").
"""

import dataclasses

from gmod_jax import config as C
from gmod_jax.sharding import MeshConfig
from train.config import DataConfig, OptimConfig, TrainConfig

STAGE1_TRAINABLE = (r"^projector/", r"^vision/fusion/")


def get_config() -> TrainConfig:
    base = C.llava_hr_7b(input_image_size=384)
    model = base.replace(vision=dataclasses.replace(base.vision, latent_adapters=False))
    return TrainConfig(
        model=model,
        compute_dtype="bfloat16",  # bf16 matmuls, float32 params and optimizer state
        param_dtype="float32",
        remat="full",
        data=DataConfig(source="llava_json", template="plain", max_length=2048, num_workers=8),
        optim=OptimConfig(lr=1e-3, schedule="cosine", warmup_ratio=0.03, weight_decay=0.0, grad_clip=1.0,
                          trainable=STAGE1_TRAINABLE),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        global_batch=256,
        num_epochs=1.0,
        log_every=10,
        eval_every=0,
        checkpoint_every=500,
        keep_checkpoints=2,
        seed=0,
    )
