"""The demo pipeline at a drastically reduced size: every stage runs, nothing is learned. The
data and routing options are the default demo's, so the tests run its code paths; the vision
tower also learns the optional attribute labels, so that path and its report line run too.

    python -m demo --workdir /tmp/demo_smoke --config configs/demo_smoke.py

Used by tests/test_demo.py (end to end in well under a minute on 2 CPU cores).
"""

from gmod_jax import config as C
from gmod_jax.data.synthetic import SyntheticConfig
from demo import DemoConfig
from demo.vision import VisionPretrainConfig
from train.config import DataConfig, OptimConfig, TrainConfig


def get_config() -> DemoConfig:
    synthetic = SyntheticConfig(image_size=28, grid=2, min_objects=1, max_objects=2, shapes=("circle", "square"),
                                colors=("red", "blue"), max_turns=1, text_only_fraction=0.0, caption_order="colour",
                                caption_positions=True, vertical_question="where", answer_style="key",
                                patch_grid=2)  # per-patch object maps: the routing stage scores them
    model = C.ModelConfig(
        vision=C.VisionConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, image_size=28,
                              patch_size=14, feature_layer=-1),  # 4 image tokens
        text=C.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=2,
                           num_kv_heads=2, max_position_embeddings=128),
    )
    data = DataConfig(max_length=64, buckets=(64,))

    def recipe(steps: int, trainable=(r".*",)) -> TrainConfig:
        return TrainConfig(model=model, data=data, global_batch=4, num_steps=steps, log_every=1, checkpoint_every=0,
                           keep_checkpoints=1, progress_bar=False,
                           optim=OptimConfig(lr=1e-3, warmup_steps=1, trainable=trainable))

    return DemoConfig(
        model=model,
        vision_pretrain=VisionPretrainConfig(steps=2, batch=8, warmup_steps=1, position_labels=True,
                                             attribute_labels=True),
        pretrain=recipe(2, (r"^projector/", r"^llm/")).replace(data=DataConfig(max_length=32, buckets=(32,))),
        dense_train=recipe(2, (r"^projector/", r"^llm/")),
        finetune=recipe(2, (r"^projector/", r"^llm/")),
        synthetic=synthetic, num_train=24, num_eval=6, vocab_size=512, tokenizer_texts=400,
        arank_samples=4, num_dense=2, eval_batch=8, speed_batch=2, speed_repeats=1, routing_samples=4,
        num_overlays=1, mod_options=(("inference_routing", "capacity"), ("decode_threshold", 0.0)),
    )
