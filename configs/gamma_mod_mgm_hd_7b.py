"""γ-MoD-Mini-Gemini-HD-7B: stage-2 instruction tuning of MGM-HD with Mixture-of-Depth layers.

Sources: shared/reference/llava-hr-and-mgm.md §4 and gamma-mod-paper-and-code.md §2 (items 2, 14)
and §3.3 (Yaxin9Luo/Gamma-MOD gamma_mod/MGM/scripts/llama/train/mod_mgm_finetune.sh, and MGM's
stage_2_full_v7b_672_hr_1536.sh for the HD geometry). Choices:

* model: `gamma_mod_mgm_hd_7b(0.5)`: Vicuna-7B, CLIP-L/336 on 2x2 tiles of the 672-px view plus
  a global view, ConvNeXt-L aux tower at 1536 px, patch info mining: 5 x 576 = 2880 image tokens;
  MoD layers 3..30 (`arank_mod`), one shared router with MGM's xavier-uniform init, ratio 0.5
  (the released "-0.34": `--set model.mod.routing_ratio=0.34`), routing loss 0.01 summed over
  MoD layers.
* routable span: system prompt + the whole image from the token types (project default: 35 + 2880
  routable, 1457 skipped per MoD layer). The official `image_token_number = 2880` quirk (35
  system + the first 2845 image tokens) is `--set model.mod.routable_span=first_n
  model.mod.routable_first_n=2880`.
* trainable as MGM's SFT: the LLM and the router (`llm/`), the projector and the patch-info-mining
  projectors (`vision/uni_{query,aux,val}`); frozen: the CLIP main tower and the ConvNeXt aux
  trunk (MGM freezes both and runs the aux tower under no_grad).
* lengths: the preset's `tokenizer_model_max_length` 4096 (the HD stage-2 script's
  model_max_length; the γ-MoD script's 2048 would cut the question after 2880 image tokens) is
  the data pipeline's cap too; a 3072 bucket holds the typical image sample (35 system + 2880
  image + question ≈ 3000 tokens) without padding it to 4096. Text-only rows use the small buckets.
* optimisation: global batch 128 (the script's 16 per GPU x 8 GPUs), lr 2e-5, 1 epoch, cosine,
  warmup ratio 0.03, weight decay 0 (the LLaVA-family defaults the script keeps), bf16, gradient
  checkpointing, homogeneous image / text-only batches. Two accumulation steps (the script has
  none): on `mesh_tpu_v5p_64` that is 2 rows per chip per micro-batch, whose compiled train step
  XLA:CPU estimates at 69 GiB of temporaries; 4 rows came to 126 GiB, more than a v5p
  chip's 95 GB (tests/test_recipes_hr_mgm.py prints the estimates).

Deviations: text-only rows skip nothing (MGM's code skips ceil(0.5·T) of them); the aux tower's
train-mode stochastic depth is not modelled (docs/mgm.md).

`init_from` is an MGM-HD checkpoint with its stage-1 projector (e.g. `python -m convert` of an
official MGM checkpoint, or its `convert.to_mod` result); a router it lacks is initialised fresh:

    python -m train --config configs/gamma_mod_mgm_hd_7b.py --workdir gs://.../gmod_mgm \\
        --mesh configs/mesh_tpu_v5p_64.py \\
        --set init_from=/ckpt/mgm-hd-7b data.path=/data/modified_mgm_instruction.json \\
              data.image_folder=/data data.tokenizer=/ckpt/mgm-hd-7b
"""

from gmod_jax import config as C
from gmod_jax.data.batching import default_buckets
from gmod_jax.sharding import MeshConfig
from train.config import DataConfig, OptimConfig, TrainConfig

MGM_SFT_TRAINABLE = (r"^llm/", r"^projector/", r"^vision/uni_(query|aux|val)/")
TYPICAL_IMAGE_SAMPLE = 3072  # bucket for 35 system + 2880 image + question tokens


def get_config() -> TrainConfig:
    model = C.gamma_mod_mgm_hd_7b(routing_ratio=0.5, routable_span="token_types")
    max_length = model.tokenizer_model_max_length
    buckets = tuple(sorted({*default_buckets(max_length), TYPICAL_IMAGE_SAMPLE}))
    return TrainConfig(
        model=model,
        compute_dtype="bfloat16",
        param_dtype="float32",
        remat="full",
        data=DataConfig(source="llava_json", template="vicuna_v1", max_length=max_length, buckets=buckets,
                        num_workers=8),
        optim=OptimConfig(lr=2e-5, schedule="cosine", warmup_ratio=0.03, weight_decay=0.0, grad_clip=1.0,
                          grad_accum_steps=2, trainable=MGM_SFT_TRAINABLE),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        global_batch=128,
        num_epochs=1.0,
        log_every=10,
        eval_every=0,
        checkpoint_every=500,
        keep_checkpoints=2,
        seed=0,
    )
