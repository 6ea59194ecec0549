"""Tokenizer wrapper over a real SentencePiece `tokenizer.model` or HF `tokenizer.json`.

Tokenisation follows LLaVA's `tokenizer_image_token`: the prompt is split on `<image>`, each
chunk is tokenised on its own (only the first keeps BOS), so the text right after the image
starts with a fresh dummy prefix ("▁", "\\n"), exactly as the original training data did. The
image becomes one `IMAGE_PLACEHOLDER` (LLaVA's -200) at this stage; `expand_image_placeholder`
later turns it into `image_seq_length` copies of the model's `image_token_index` (the HF
convention: the model merges vision features at those positions).

Special tokens written as text ("</s>" closes every vicuna_v1 answer) are matched and mapped to
their ids, as the HF slow LlamaTokenizer that LLaVA trains with does. Its `legacy` flag (read
from `tokenizer_config.json`) decides whether text after a special token gets SentencePiece's
dummy-prefix space ("</s>USER" -> "▁USER" when legacy, "USER" when not).
"""

from __future__ import annotations

import abc
import bisect
import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from gmod_jax import token_types as tt
from gmod_jax.data.templates import IMAGE_TAG, Segment

IMAGE_PLACEHOLDER = -200  # LLaVA's IMAGE_TOKEN_INDEX: stands for one whole image before expansion
SPECIAL_TOKENS_FILE = "special_tokens.json"


class EncodedText(NamedTuple):
    """Token ids with one IMAGE_PLACEHOLDER per image, per-token types and loss flags."""

    input_ids: np.ndarray  # int32 [N]
    token_types: np.ndarray  # int8 [N]
    loss_mask: np.ndarray  # bool [N]


class Tokenizer(abc.ABC):
    """Common API over SentencePiece and HF tokenizers (ids, offsets, special ids)."""

    kind: str
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int | None
    image_token_id: int | None  # id of "<image>" when the vocabulary has it (HF llava, synthetic)

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""

    @property
    @abc.abstractmethod
    def fingerprint(self) -> str:
        """Identifies the vocabulary and special-token behaviour (stored with pre-tokenised data)."""

    @abc.abstractmethod
    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Ids of `text` (no BOS) and each token's start offset in characters."""

    @abc.abstractmethod
    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; ids outside the vocabulary (image tokens, -100) are dropped."""

    @abc.abstractmethod
    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry of one id."""

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self.encode_with_offsets(text)[0]
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def _valid_ids(self, ids, skip_special_tokens: bool) -> list[int]:
        skip = {self.bos_id, self.eos_id, self.pad_id} if skip_special_tokens else set()
        return [int(i) for i in np.asarray(ids).reshape(-1) if 0 <= i < self.vocab_size and int(i) not in skip
                and (not skip_special_tokens or i != self.image_token_id)]

    def tokenizer_image_token(self, prompt: str, image_token_index: int = IMAGE_PLACEHOLDER,
                              image_seq_length: int = 1, add_bos: bool = True) -> np.ndarray:
        """LLaVA's `tokenizer_image_token` on a raw prompt string; each `<image>` expands in place."""
        ids = [self.bos_id] if add_bos else []
        for i, chunk in enumerate(prompt.split(IMAGE_TAG)):
            if i:
                ids.extend([image_token_index] * image_seq_length)
            ids.extend(self.encode(chunk))
        return np.asarray(ids, np.int32)

    def encode_segments(self, segments: Sequence[Segment], add_bos: bool = True) -> EncodedText:
        """Tokenise rendered segments; each token takes the type of the segment it starts in."""
        has_image = any(s.token_type == tt.IMAGE for s in segments)
        ids: list[int] = []
        types: list[int] = []
        loss: list[bool] = []
        if add_bos:
            ids.append(self.bos_id)
            types.append(tt.SYSTEM if has_image else tt.TEXT)
            loss.append(False)

        chunk: list[Segment] = []

        def flush():
            if not chunk:
                return
            text = "".join(s.text for s in chunk)
            starts = np.cumsum([0] + [len(s.text) for s in chunk[:-1]]).tolist()
            chunk_ids, offsets = self.encode_with_offsets(text)
            for token_id, offset in zip(chunk_ids, offsets):
                seg = chunk[max(0, bisect.bisect_right(starts, min(offset, len(text) - 1)) - 1)]
                ids.append(token_id)
                types.append(seg.token_type)
                loss.append(seg.has_loss)
            chunk.clear()

        for seg in segments:
            if seg.token_type == tt.IMAGE:
                flush()
                ids.append(IMAGE_PLACEHOLDER)
                types.append(tt.IMAGE)
                loss.append(False)
            else:
                chunk.append(seg)
        flush()
        return EncodedText(np.asarray(ids, np.int32), np.asarray(types, np.int8), np.asarray(loss, bool))


def expand_image_placeholder(encoded: EncodedText, image_token_index: int, image_seq_length: int) -> EncodedText:
    """Replace each IMAGE_PLACEHOLDER by `image_seq_length` copies of `image_token_index`."""
    is_image = encoded.input_ids == IMAGE_PLACEHOLDER
    if not is_image.any():
        return encoded
    repeats = np.where(is_image, image_seq_length, 1)
    ids = np.repeat(encoded.input_ids, repeats)
    ids[ids == IMAGE_PLACEHOLDER] = image_token_index
    return EncodedText(ids.astype(np.int32), np.repeat(encoded.token_types, repeats),
                       np.repeat(encoded.loss_mask, repeats))


# ----------------------------------------------------------------------------------------------
# SentencePiece

def _byte_to_char(text: str) -> np.ndarray:
    lengths = [len(c.encode("utf-8")) for c in text]
    return np.concatenate([np.repeat(np.arange(len(text)), lengths), [len(text)]]).astype(np.int64)


def _user_defined_pieces(model_proto: bytes) -> dict[str, int]:
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(model_proto)
    user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    return {p.piece: i for i, p in enumerate(model.pieces) if p.type == user_defined}


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, *, pad_id: int | None = None, legacy: bool = True,
                 bos_id: int | None = None, eos_id: int | None = None, source: str = ""):
        import sentencepiece as spm

        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.legacy = bool(legacy)
        self.source = source
        sp = self._sp
        self.bos_id = sp.bos_id() if bos_id is None else int(bos_id)
        self.eos_id = sp.eos_id() if eos_id is None else int(eos_id)
        self.unk_id = sp.unk_id() if sp.unk_id() >= 0 else None
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"SentencePiece model {source!r} lacks BOS/EOS pieces")
        if pad_id is None:
            pad_id = sp.pad_id() if sp.pad_id() >= 0 else self.unk_id  # LLaVA v1: pad = unk
        self.pad_id = int(pad_id if pad_id is not None else 0)
        image = sp.piece_to_id(IMAGE_TAG)
        self.image_token_id = image if image != self.unk_id and sp.id_to_piece(image) == IMAGE_TAG else None
        # HF's LlamaTokenizer matches special tokens (control, unknown and user-defined pieces)
        # in the text and tokenises the text between them as separate chunks, which changes the
        # dummy-prefix spaces around them; do the same (longest match first).
        self._special_ids = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())
                             if sp.is_control(i) or sp.is_unknown(i)}
        self._special_ids.update(_user_defined_pieces(self._proto))
        self._special_re = re.compile("|".join(re.escape(p) for p in sorted(self._special_ids, key=len, reverse=True))) \
            if self._special_ids else None
        unk_piece = sp.id_to_piece(self.unk_id) if self.unk_id is not None else None
        self._unk_prefix = unk_piece
        self._unk_prefix_len = len(sp.encode(unk_piece)) if unk_piece else 0

    def __getstate__(self):
        return {"proto": self._proto, "pad_id": self.pad_id, "legacy": self.legacy, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "source": self.source}

    def __setstate__(self, state):
        self.__init__(state["proto"], pad_id=state["pad_id"], legacy=state["legacy"], bos_id=state["bos_id"],
                      eos_id=state["eos_id"], source=state["source"])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(self._proto)
        h.update(json.dumps([self.kind, self.bos_id, self.eos_id, self.pad_id, self.legacy]).encode())
        return h.hexdigest()[:16]

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def _split_specials(self, text: str):
        """Yield (start, text, special_id or None) runs of `text`."""
        start = 0
        for m in self._special_re.finditer(text) if self._special_re is not None else ():
            if start < m.start():
                yield start, text[start:m.start()], None
            yield m.start(), m.group(), self._special_ids[m.group()]
            start = m.end()
        if start < len(text):
            yield start, text[start:], None

    def _encode_plain(self, text: str, dummy_prefix: bool) -> tuple[list[int], list[int]]:
        if dummy_prefix or not self._unk_prefix:
            proto = self._sp.encode(text, return_type="proto")
            pieces, shift = list(proto.pieces), 0
        else:
            # HF non-legacy trick: encode "<unk>" + text and drop the unk pieces, which
            # suppresses the dummy-prefix space that SentencePiece would add.
            proto = self._sp.encode(self._unk_prefix + text, return_type="proto")
            pieces = list(proto.pieces)[self._unk_prefix_len:]
            shift = len(self._unk_prefix.encode("utf-8"))
        b2c = _byte_to_char(text)
        ids = [p.id for p in pieces]
        offsets = [int(b2c[min(max(p.begin - shift, 0), len(b2c) - 1)]) for p in pieces]
        return ids, offsets

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        offsets: list[int] = []
        for start, piece, special in self._split_specials(text):
            if special is not None:
                ids.append(special)
                offsets.append(start)
                continue
            sub_ids, sub_offsets = self._encode_plain(piece, dummy_prefix=self.legacy or start == 0)
            ids.extend(sub_ids)
            offsets.extend(o + start for o in sub_offsets)
        return ids, offsets

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._sp.decode(self._valid_ids(ids, skip_special_tokens))


# ----------------------------------------------------------------------------------------------
# HF tokenizers (tokenizer.json)

_BOS_FALLBACKS = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
_EOS_FALLBACKS = ("</s>", "<|end_of_text|>", "<|eot_id|>", "<eos>", "<|endoftext|>", "<|im_end|>")
_PAD_FALLBACKS = ("<pad>", "<|pad|>", "[PAD]", "<unk>")
_UNK_FALLBACKS = ("<unk>", "[UNK]")


class HFTokenizer(Tokenizer):
    kind = "hf"

    def __init__(self, tokenizer_json: str, *, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None, unk_id: int | None = None, source: str = ""):
        from tokenizers import Tokenizer as _HF

        self._json = tokenizer_json
        self._tok = _HF.from_str(tokenizer_json)
        self.source = source

        def find(names):
            for name in names:
                i = self._tok.token_to_id(name)
                if i is not None:
                    return i
            return None

        self.bos_id = find(_BOS_FALLBACKS) if bos_id is None else int(bos_id)
        self.eos_id = find(_EOS_FALLBACKS) if eos_id is None else int(eos_id)
        self.unk_id = find(_UNK_FALLBACKS) if unk_id is None else int(unk_id)
        if self.bos_id is None or self.eos_id is None:
            raise ValueError(f"cannot tell the BOS/EOS tokens of {source!r}; put bos_token/eos_token in "
                             "tokenizer_config.json or special_tokens.json")
        if pad_id is None:
            pad_id = find(_PAD_FALLBACKS)
        self.pad_id = int(pad_id if pad_id is not None else 0)
        self.image_token_id = self._tok.token_to_id(IMAGE_TAG)

    def __getstate__(self):
        return {"json": self._json, "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "unk_id": self.unk_id, "source": self.source}

    def __setstate__(self, state):
        self.__init__(state["json"], bos_id=state["bos_id"], eos_id=state["eos_id"], pad_id=state["pad_id"],
                      unk_id=state["unk_id"], source=state["source"])

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(self._json.encode())
        h.update(json.dumps([self.kind, self.bos_id, self.eos_id, self.pad_id]).encode())
        return h.hexdigest()[:16]

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        if not text:
            return [], []
        # BOS/EOS come from the caller, never from the tokenizer's own post-processor.
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [int(start) for start, _ in enc.offsets]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(self._valid_ids(ids, skip_special_tokens), skip_special_tokens=skip_special_tokens)


# ----------------------------------------------------------------------------------------------
# Loading and training

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(path: str | os.PathLike, prefer: str = "sentencepiece") -> Tokenizer:
    """Load a tokenizer from a checkpoint/tokenizer directory or a model file.

    A directory may hold `tokenizer.model` (SentencePiece), `tokenizer.json` (HF tokenizers) or
    both; `prefer` picks one when both exist (LLaVA itself trains with the slow SentencePiece
    tokenizer). Special ids come from `special_tokens.json` (written by `train_sentencepiece`),
    else from `tokenizer_config.json` / `special_tokens_map.json`, else from the model.
    """
    path = Path(path)
    if path.is_file():
        directory, files = path.parent, {path.suffix: path}
    elif path.is_dir():
        directory = path
        files = {s: path / n for s, n in ((".model", "tokenizer.model"), (".json", "tokenizer.json"))
                 if (path / n).is_file()}
    else:
        raise FileNotFoundError(f"no tokenizer at {path}")
    if not files:
        raise FileNotFoundError(f"{path} holds neither tokenizer.model nor tokenizer.json")
    order = (".model", ".json") if prefer == "sentencepiece" else (".json", ".model")
    suffix = next(s for s in order if s in files)

    ours = _read_json(directory / SPECIAL_TOKENS_FILE)
    config = _read_json(directory / "tokenizer_config.json")
    config.update({k: v for k, v in _read_json(directory / "special_tokens_map.json").items() if k not in config})

    if suffix == ".model":
        import sentencepiece as spm

        proto = files[".model"].read_bytes()
        sp = spm.SentencePieceProcessor(model_proto=proto)

        def sp_id(key):
            content = _token_content(config.get(key))
            if content is None:
                return None
            i = sp.piece_to_id(content)
            return i if sp.id_to_piece(i) == content else None

        pad_id = ours.get("pad_id", sp_id("pad_token"))
        legacy = ours.get("legacy", config.get("legacy", True))  # HF's default when unset
        if legacy is None:
            legacy = True
        return SentencePieceTokenizer(proto, pad_id=pad_id, legacy=legacy, bos_id=ours.get("bos_id", sp_id("bos_token")),
                                      eos_id=ours.get("eos_id", sp_id("eos_token")), source=str(files[".model"]))

    text = files[".json"].read_text()
    from tokenizers import Tokenizer as _HF

    probe = _HF.from_str(text)

    def hf_id(key):
        content = _token_content(config.get(key))
        return None if content is None else probe.token_to_id(content)

    return HFTokenizer(text, bos_id=ours.get("bos_id", hf_id("bos_token")), eos_id=ours.get("eos_id", hf_id("eos_token")),
                       pad_id=ours.get("pad_id", hf_id("pad_token")), unk_id=ours.get("unk_id", hf_id("unk_token")),
                       source=str(files[".json"]))


def train_sentencepiece(texts, out_dir: str | os.PathLike, vocab_size: int = 512, model_type: str = "bpe",
                        legacy: bool = False, seed_sentencepiece_size: int = 100_000) -> SentencePieceTokenizer:
    """Train a small LLaMA-style SentencePiece model on `texts` and save it to `out_dir`.

    LLaMA's conventions: unk=0, bos=1 ("<s>"), eos=2 ("</s>"), byte fallback, identity
    normalisation, dummy prefix, split digits. `<pad>` (id 3) and `<image>` (id 4) are
    user-defined symbols. Writes `tokenizer.model` and `special_tokens.json`. The vocabulary may
    come out smaller than `vocab_size` for a tiny corpus; read `.vocab_size` afterwards.
    """
    import sentencepiece as spm

    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_sentencepiece needs some non-empty texts")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buffer, vocab_size=vocab_size, model_type=model_type,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=["<pad>", IMAGE_TAG],
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, character_coverage=1.0, hard_vocab_limit=False,
        seed_sentencepiece_size=seed_sentencepiece_size, num_threads=1, minloglevel=2,
        max_sentence_length=1 << 16)
    proto = buffer.getvalue()
    (out_dir / "tokenizer.model").write_bytes(proto)
    tok = SentencePieceTokenizer(proto, pad_id=3, legacy=legacy, source=str(out_dir / "tokenizer.model"))
    if tok.id_to_piece(3) != "<pad>" or tok.image_token_id != 4:
        raise RuntimeError("SentencePiece did not place <pad>/<image> at ids 3/4")
    special = {"bos_id": tok.bos_id, "eos_id": tok.eos_id, "unk_id": tok.unk_id, "pad_id": tok.pad_id,
               "image_token_id": tok.image_token_id, "vocab_size": tok.vocab_size, "legacy": legacy}
    (out_dir / SPECIAL_TOKENS_FILE).write_text(json.dumps(special, indent=2) + "\n")
    return tok
