"""LLaVA conversation templates rendered into typed text segments.

A rendered conversation is a list of `Segment(text, token_type, has_loss)`. Tokenisation keeps
the segment boundaries (by character offsets), so every token knows whether it belongs to the
system prefix, the image, the question side or an answer: MoD routing masks come from these
types, never from hard-coded prefix lengths (the official code's `1024 + 35`).

Templates reproduce LLaVA's `conv_vicuna_v1` (SeparatorStyle.TWO) and `conv_llava_plain`
(stage-1 captioning) byte for byte, so token ids match LLaVA's preprocessing.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

from gmod_jax import token_types as tt
from gmod_jax.data.errors import BadRecord

IMAGE_TAG = "<image>"
HUMAN, GPT = "human", "gpt"
ROLE_ALIASES = {"human": HUMAN, "user": HUMAN, "gpt": GPT, "assistant": GPT}


class Segment(NamedTuple):
    text: str
    token_type: int
    has_loss: bool


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    style: str  # "two" (LLaVA SeparatorStyle.TWO) or "plain"
    system: str = ""
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"


VICUNA_V1 = Template(
    name="vicuna_v1",
    style="two",
    system=("A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions."),
    roles=("USER", "ASSISTANT"),
    sep=" ",
    sep2="</s>",
)
# LLaVA's conv_llava_plain: the human turn is replaced by the bare image, the caption follows.
PLAIN = Template(name="plain", style="plain", system="", roles=("", ""), sep="\n", sep2="\n")

TEMPLATES = {"vicuna_v1": VICUNA_V1, "v1": VICUNA_V1, "plain": PLAIN}


def get_template(template: str | Template) -> Template:
    if isinstance(template, Template):
        return template
    try:
        return TEMPLATES[template]
    except KeyError:
        raise ValueError(f"unknown conversation template {template!r}; choose from {sorted(TEMPLATES)}") from None


def normalize_conversation(conversations, *, has_image: bool, move_image_to_front: bool = True,
                           record_id="?", for_prompt: bool = False) -> list[tuple[str, str]]:
    """Validate a LLaVA `conversations` list and return alternating (role, text) turns.

    Follows LLaVA's preprocessing: a leading assistant turn is dropped, turns must alternate
    human/gpt. A trailing unanswered human turn is dropped for training (it carries no loss)
    and required for prompts (`for_prompt`). With `move_image_to_front`, the turn holding
    `<image>` becomes `"<image>\\n" + rest` (γ-MoD's `modify_data_config.py`; LLaVA's
    `preprocess_multimodal` does the same), which gives the token layout γ-MoD routes on.
    Raises BadRecord naming `record_id` on anything malformed.
    """
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise BadRecord(record_id, "'conversations' must be a non-empty list")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise BadRecord(record_id, f"turn {i} is not a {{'from', 'value'}} dict")
        role = ROLE_ALIASES.get(str(turn["from"]).lower())
        if role is None:
            raise BadRecord(record_id, f"turn {i} has unknown role {turn['from']!r}")
        if not isinstance(turn["value"], str):
            raise BadRecord(record_id, f"turn {i} value is not a string")
        turns.append((role, turn["value"]))
    if turns[0][0] == GPT:
        turns = turns[1:]
    for i, (role, _) in enumerate(turns):
        if role != (HUMAN if i % 2 == 0 else GPT):
            raise BadRecord(record_id, f"turns do not alternate human/gpt (turn {i} is {role})")
    if for_prompt:
        if not turns or turns[-1][0] != HUMAN:
            raise BadRecord(record_id, "a prompt must end with a human turn")
    else:
        if len(turns) % 2:
            turns = turns[:-1]
        if not turns:
            raise BadRecord(record_id, "no answered human turn")

    n_tags = sum(text.count(IMAGE_TAG) for _, text in turns)
    if has_image and n_tags != 1:
        raise BadRecord(record_id, f"record has an image but {n_tags} {IMAGE_TAG} tags (need exactly 1)")
    if not has_image and n_tags:
        raise BadRecord(record_id, f"record has no image but its text contains {IMAGE_TAG}")
    if has_image and not any(IMAGE_TAG in text for role, text in turns if role == HUMAN):
        raise BadRecord(record_id, f"{IMAGE_TAG} must be in a human turn")
    if move_image_to_front and has_image:
        turns = [(role, (IMAGE_TAG + "\n" + text.replace(IMAGE_TAG, "").strip()).strip()
                  if IMAGE_TAG in text else text) for role, text in turns]
    return turns


def _render_pieces(turns: Sequence[tuple[str, str]], template: Template, *, has_image: bool,
                   record_id) -> list[tuple[str, bool]]:
    """(text, is_answer) pieces whose concatenation is LLaVA's prompt string."""
    if template.style == "plain":
        if not has_image:
            raise BadRecord(record_id, "the plain (captioning) template needs an image")
        if len(turns) > 2:
            raise BadRecord(record_id, f"the plain template takes one caption, got {len(turns)} turns")
        # LLaVA's preprocess_plain replaces the whole human turn by the bare image tag.
        pieces = [(IMAGE_TAG, False)]
        if len(turns) == 2:
            pieces.append((turns[1][1] + template.sep, True))
        return pieces
    if template.style != "two":
        raise ValueError(f"unsupported template style {template.style!r}")
    user, assistant = template.roles
    pieces = [(template.system + template.sep, False)]
    for role, text in turns:
        if role == HUMAN:
            pieces.append((f"{user}: {text}{template.sep}{assistant}:", False))
        else:
            # The space after "ASSISTANT:" starts the answer: tokenizers fold it into the first
            # answer token ("▁Yes"), and LLaVA's target mask starts at that token.
            pieces.append((f" {text}{template.sep2}", True))
    return pieces


def _typed_segments(pieces: Sequence[tuple[str, bool]], has_image: bool) -> list[Segment]:
    segments: list[Segment] = []
    seen_image = False
    for text, is_answer in pieces:
        parts = text.split(IMAGE_TAG)
        for j, part in enumerate(parts):
            if j > 0:
                segments.append(Segment(IMAGE_TAG, tt.IMAGE, False))
                seen_image = True
            if not part:
                continue
            if is_answer:
                kind = tt.ANSWER
            elif not has_image:
                kind = tt.TEXT
            else:
                kind = tt.QUESTION if seen_image else tt.SYSTEM
            if segments and segments[-1][1:] == (kind, is_answer) and kind != tt.IMAGE:
                segments[-1] = Segment(segments[-1].text + part, kind, is_answer)
            else:
                segments.append(Segment(part, kind, is_answer))
    return segments


def render_conversation(conversations, template: str | Template = "vicuna_v1", *, has_image: bool | None = None,
                        move_image_to_front: bool = True, record_id="?") -> list[Segment]:
    """Render a LLaVA conversation for training: typed segments, loss only on answers.

    `has_image` defaults to whether the text contains `<image>`.
    """
    template = get_template(template)
    if has_image is None:
        has_image = any(IMAGE_TAG in str(t.get("value", "")) for t in conversations if isinstance(t, dict))
    turns = normalize_conversation(conversations, has_image=has_image, move_image_to_front=move_image_to_front,
                                   record_id=record_id)
    return _typed_segments(_render_pieces(turns, template, has_image=has_image, record_id=record_id), has_image)


def render_prompt(conversations, template: str | Template = "vicuna_v1", *, has_image: bool | None = None,
                  move_image_to_front: bool = True, record_id="prompt") -> list[Segment]:
    """Render an inference prompt: the conversation so far, ending with the assistant tag.

    `conversations` is a LLaVA conversation ending with a human turn, or a single question string
    (put `<image>` in it for an image prompt). vicuna_v1 prompts end with " ASSISTANT:"; plain
    prompts are the bare image.
    """
    template = get_template(template)
    if isinstance(conversations, str):
        conversations = [{"from": HUMAN, "value": conversations}]
    if has_image is None:
        has_image = any(IMAGE_TAG in str(t.get("value", "")) for t in conversations if isinstance(t, dict))
    turns = normalize_conversation(conversations, has_image=has_image, move_image_to_front=move_image_to_front,
                                   record_id=record_id, for_prompt=True)
    return _typed_segments(_render_pieces(turns, template, has_image=has_image, record_id=record_id), has_image)


def segments_text(segments: Sequence[Segment]) -> str:
    return "".join(s.text for s in segments)
