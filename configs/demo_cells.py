"""The demo on scenes with one shape per image token (16 tokens): `make demo`'s default until
2026-12-07, and the base that configs/demo_default.py (64-patch scenes) changes.

    python -m demo --workdir runs/demo_cells --config configs/demo_cells.py [--set key=value ...]

Its router skips the system prompt and no image token (48.5% / 0%): with one token per shape
there is little image redundancy, and the 33 system-prompt tokens are two thirds of the
routable span (issue 26; docs/demo.md).

Why these sizes and choices:
- Scenes: 56x56 px on a 4x4 grid of 14 px cells, 1-4 shapes, small or large. Patches of 14 px
  put each cell under exactly one image token (16 in all), so a token shows one whole shape or
  background, and γ-MoD has background tokens to skip. Every question family of the generator is
  kept (colour, count, presence, position).
- Answers name their subject first ("red circle: yes", `answer_style="key"`): the answer word
  is then predicted right after the words it depends on, a look-up the model learns, where a bare
  "yes" needs the question compared with the image across the prompt (dense 67% -> 83%).
- The vision tower is pretrained on its own first (`vision_pretrain`, standing in for CLIP; see
  demo/vision.py) and stays frozen afterwards, as LLaVA keeps CLIP frozen. Trained
  through the LLM instead, its features collapsed to one vector for every patch. Its patches also
  name their grid row and column (`position_labels`): with the content label alone the features
  kept no position (a linear probe told left from right for 59% of object patches), and
  left/right questions stayed at chance.
- Stage 1 is LLaVA's: captions with the `plain` template, then instruction tuning on the
  questions with vicuna_v1. The LLM (random weights) is trained in both: there is no pretrained
  LLM to align to. Captions list the shapes by colour (`caption_order="colour"`): to write
  "a red ..." the model has to find the red shapes among the image tokens, the look-up the
  questions need. They also say where each group lies ("at the top left", `caption_positions`):
  position questions trained alone on a position-aware tower stayed at chance for 300 steps;
  after such captions they reach 95%. Position questions ask where a named shape lies
  (`vertical_question="where"`) for top/bottom as for left/right.
- The LLM is LLaMA-shaped, 6 layers; 2 of them (the top-ARank ones) stay dense; the other 4
  skip 34% of their routable tokens (γ-MoD-0.3).
- Its weights start from normal(0.05) (`initializer_range`), not HF's 0.02. 0.02 suits the
  4096-wide LLaMAs (about 1.3/sqrt(d)); at d=128 it is 0.23/sqrt(d), attention starts almost
  uniform, and the from-scratch model sat on a plateau before it formed its look-ups by shape:
  dense 86.9 / 75.4 / 71.3% on seeds 0 / 1 / 2 with 0.02, 93.8 / 91.5 / 92.3% with 0.05 (0.08:
  81.8% on seed 0).
- The fine-tunes use the question stage's learning rate, 2e-3, as γ-MoD's SFT uses LLaVA's
  stage-2 rate. At 1e-3 the γ-MoD router of seed 0 kept dropping one object per image and
  ended 4.0 points under the dense fine-tune.
- One sequence-length bucket per stage (all batches pad to it): one compiled train step each.

Measured on 2 CPU cores: see docs/demo.md (the four targets of 2026-11-30 held on seed 0; on
seed 2 γ-MoD ends 12 points under the dense fine-tune; no image token is skipped on seed 0).
"""

from gmod_jax import config as C
from gmod_jax.data.synthetic import SyntheticConfig
from demo import DemoConfig
from demo.vision import VisionPretrainConfig
from train.config import DataConfig, OptimConfig, TrainConfig

PROJECTOR_AND_LLM = (r"^projector/", r"^llm/")  # the vision tower stays frozen after its pretraining


def get_config() -> DemoConfig:
    synthetic = SyntheticConfig(image_size=56, grid=4, min_objects=1, max_objects=4,
                                shapes=("circle", "square", "triangle"), colors=("red", "green", "blue", "yellow"),
                                max_turns=3, text_only_fraction=0.0, caption_order="colour", caption_positions=True,
                                vertical_question="where", answer_style="key")
    model = C.ModelConfig(
        vision=C.VisionConfig(hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4, image_size=56,
                              patch_size=14, feature_layer=-1),  # 16 image tokens; last layer (no CLIP to reuse)
        projector=C.ProjectorConfig(type="mlp2x_gelu"),
        text=C.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=6, num_heads=4,
                           num_kv_heads=4, max_position_embeddings=256, initializer_range=0.05),
    )

    def recipe(steps: int, lr: float, max_length: int) -> TrainConfig:
        return TrainConfig(
            model=model, data=DataConfig(max_length=max_length, buckets=(max_length,)),
            optim=OptimConfig(lr=lr, schedule="cosine", warmup_ratio=0.05, weight_decay=0.0, grad_clip=1.0,
                              trainable=PROJECTOR_AND_LLM),
            global_batch=32, num_steps=steps, log_every=5, checkpoint_every=100, keep_checkpoints=1)

    return DemoConfig(
        model=model,
        vision_pretrain=VisionPretrainConfig(steps=400, batch=128, lr=3e-3, position_labels=True),
        pretrain=recipe(400, 3e-3, 56),  # plain captions: 16 image + caption (<= 32) + end
        dense_train=recipe(700, 2e-3, 112),  # vicuna_v1: 33 system + 16 image + 1-3 turns (<= 112)
        finetune=recipe(200, 2e-3, 112),  # stage 2, the γ-MoD fine-tune and the dense baseline alike
        synthetic=synthetic, num_train=10000, num_eval=300, vocab_size=512, tokenizer_texts=2000,
        # γ-MoD-0.3, the paper's ratio 0.34 (the released "-0.34" checkpoints). The official code's
        # 0.5 scored 1.0 point under it here (README ablation table), 7.1 under the dense fine-tune
        # on the earlier one-word-answer default.
        arank_samples=50, num_dense=2, routing_ratio=0.34, masking="official",
        # Inference routes with the training top-k rule: a router fine-tuned this briefly never
        # gets a keep-prob below the official prefill threshold 0.005 (0% skipped), and a 0.5
        # threshold, unmasked at inference as officially, skips question tokens (11% accuracy).
        # Generated tokens are never skipped (`decode_threshold` 0; officially a keep-prob < 0.5
        # skips): training never routes answer tokens, and the official rule dropped the subject
        # words of multi-token answers (26% accuracy). The routing loss weighs 0.07 per MoD layer:
        # the official 0.01 is summed over 28 MoD layers (0.28 in all); 4 layers x 0.07 match it.
        mod_options=(("inference_routing", "capacity"), ("decode_threshold", 0.0), ("router_aux_loss_coef", 0.07)),
        eval_batch=64, speed_batch=16, speed_repeats=5, routing_samples=64, num_overlays=3,
    )
