"""Data layer: templates, tokenizer, image preprocessing, LLaVA JSON / TFDS sources, Grain pipeline.

Typical use:

    tok = load_tokenizer(checkpoint_dir)
    source = LlavaJsonSource("llava_v1_5_mix665k.json", image_root="data/")      # or
    source = open_tfds_source(data_dir, "llava665k_vicuna_v1", split="train")    # after build_tfds
    cfg = PipelineConfig.for_model(model_config, batch_size=8, max_length=2048, seed=0)
    it = iter(make_dataset(source, cfg, tok))
    batch = next(it)            # dict of numpy arrays, see batching.pad_to_bucket
    state = it.get_state()      # JSON-able; it.set_state(state) resumes exactly
"""

from gmod_jax.data.batching import bucket_length, default_buckets, pad_to_bucket
from gmod_jax.data.errors import BadRecord, BadRecordTracker, TooManyBadRecords
from gmod_jax.data.images import (CLIP_MEAN, CLIP_STD, ImageConfig, expand2square, load_image, preprocess_image,
                                  to_nchw, to_nhwc)
from gmod_jax.data.llava_json import (IGNORE_INDEX, LlavaJsonSource, encode_example, encode_prompt, finalize_example,
                                      read_records, tokenize_record, validate_record)
from gmod_jax.data.pipeline import PipelineConfig, bad_record_stats, make_dataset
from gmod_jax.data.templates import (PLAIN, TEMPLATES, VICUNA_V1, Segment, Template, get_template,
                                     render_conversation, render_prompt, segments_text)
from gmod_jax.data.tfds_builder import TfdsLlavaSource, build_tfds, open_tfds_source
from gmod_jax.data.tokenizer import (IMAGE_PLACEHOLDER, EncodedText, HFTokenizer, SentencePieceTokenizer, Tokenizer,
                                     expand_image_placeholder, load_tokenizer, train_sentencepiece)
from gmod_jax.data.synthetic import SyntheticConfig, SyntheticDataset, synthetic_texts, write_synthetic_dataset
