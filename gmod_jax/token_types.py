"""Per-token types emitted by the data pipeline and consumed by MoD routing.

Which tokens a MoD layer may skip is decided from these types (masked routing learning),
never from hard-coded lengths. The integer values are part of the on-disk data format
(TFDS ArrayRecord records store them), so never renumber them.
"""

from __future__ import annotations

import numpy as np

PAD = 0  # padding: attended by nobody, never counted
SYSTEM = 1  # BOS, system prompt and role tags before the first image ("USER:")
IMAGE = 2  # image placeholder tokens (replaced by projected vision features)
QUESTION = 3  # user text after the image, later user turns and the "ASSISTANT:" role tags
ANSWER = 4  # assistant replies (the tokens that carry LM loss), including their EOS
TEXT = 5  # every non-pad token of a sample that has no image

NAMES = {PAD: "pad", SYSTEM: "system", IMAGE: "image", QUESTION: "question", ANSWER: "answer", TEXT: "text"}

# Routable token types per masking preset (Table 1 "Masked token" ablation of the paper).
# "official" reproduces the reference code: only the prefix up to and including the image is
# routable, everything after it (question, answer, later turns, padding) is always kept.
MASKING_PRESETS: dict[str, tuple[int, ...]] = {
    "official": (SYSTEM, IMAGE),
    "none": (SYSTEM, IMAGE, QUESTION, ANSWER, TEXT),
    "question": (SYSTEM, IMAGE, ANSWER, TEXT),
    "question_answer": (SYSTEM, IMAGE, TEXT),
}


class RoutableTypes(tuple):
    """The routable token types of a MoD config, optionally bounded to a row's first `first_n`
    non-pad positions.

    It is a tuple of type ids (so `len`, iteration and `np.isin` see the types), and the routing
    functions (`gmod_jax.routing.routable_mask`, `skip_counts`, `select_topk`) also honour the
    bound. The bound reproduces Mini-Gemini's γ-MoD code, which routes the first
    `image_token_number` = 2880 positions whatever they hold (35 system tokens and the first 2845
    image tokens), so the last 35 image tokens are always kept (`MoDConfig.routable_span`).
    """

    first_n: int | None

    def __new__(cls, types, first_n: int | None = None):
        obj = super().__new__(cls, (int(t) for t in types))
        if first_n is not None and first_n < 1:
            raise ValueError(f"routable first_n must be >= 1, got {first_n}")
        obj.first_n = first_n
        return obj

    def __repr__(self):
        return f"RoutableTypes({tuple(self)!r}, first_n={self.first_n})"

    def __reduce__(self):
        return (RoutableTypes, (tuple(self), self.first_n))


def infer_token_types(input_ids, image_token_index: int, attention_mask=None) -> np.ndarray:
    """Token types for inputs that come without them (inference on raw prompts).

    Everything up to and including the last image token is SYSTEM/IMAGE, everything after is
    QUESTION (there is no answer in a prompt), padding is PAD, and rows without an image are TEXT.
    """
    ids = np.asarray(input_ids)
    mask = np.ones_like(ids, dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    is_image = ids == image_token_index
    positions = np.arange(ids.shape[-1])
    last_image = np.where(is_image.any(-1), np.max(np.where(is_image, positions, -1), axis=-1), -1)
    types = np.where(positions <= last_image[..., None], SYSTEM, QUESTION)
    types = np.where(is_image, IMAGE, types)
    types = np.where(is_image.any(-1, keepdims=True), types, TEXT)
    return np.where(mask, types, PAD).astype(np.int32)
