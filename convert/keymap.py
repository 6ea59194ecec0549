"""Key layouts of LLaVA-family PyTorch checkpoints and their map onto the Flax parameter tree.

Every on-disk key is first rewritten to one canonical name (HF 5.x module names without the
`model.` wrappers: `language_model.*`, `lm_head.*`, `multi_modal_projector.linear_{i}.*`,
`vision_tower.*`), so one table serves all layouts. The table is generated from the
`ModelConfig`: the expected canonical keys with their PyTorch shapes, Flax path, layer slot and
transform. Validating a checkpoint is then set arithmetic plus shape/dtype comparison, done
entirely on headers before any tensor data is read.

Layouts (checkpoint-formats.md §1.2, §2, §5):
  A  transformers 4.x files        language_model.model.*, language_model.lm_head, vision_tower.vision_model.*
  B  transformers 4.52+ in memory  model.language_model.*, lm_head, model.vision_tower.vision_model.*
  C  transformers 5.x in memory    model.language_model.*, lm_head, model.vision_tower.*
  D  transformers 5.x saved        language_model.model.*, language_model.lm_head, vision_tower.*
  E  original LLaVA                model.*, lm_head, model.mm_projector.{0,2}, tower absent or
                                   model.vision_tower.vision_tower.vision_model.*
  gamma_mod                        E + model.layers.N.router.weight (one shared router)
  E_hr                             LLaVA-HR: E with the multi-path tower, the CLIP fast path under
                                   model.vision_tower.fast_vision_tower.vision_tower.vision_model.*,
                                   the ConvNeXt slow trunk under model.vision_tower.slow_vision_tower.
                                   vision_tower.* (its classifier `head.*` dropped), MR-adapters
                                   model.vision_tower.align_stages_latent.N.*, fusion
                                   model.vision_tower.align_stages.0.*
  gamma_mod_hr                     γ-MoD-LLaVA-HR: E_hr + the shared router
  E_mgm                            Mini-Gemini (MGM): E with the CLIP main tower under
                                   model.vision_tower.vision_tower.vision_model.*, the open_clip ConvNeXt
                                   aux trunk under model.vision_tower_aux.{vision_stem,vision_stages}.*
                                   (layer scale `gamma`) and the patch-info-mining projectors
                                   model.vlm_uni_{query,aux,val}_projector.{0,1}.*; either tower may be
                                   absent (then from --vision-tower / --vision-tower-aux)
  gamma_mod_mgm                    γ-MoD-MGM (`mod_mgm`): E_mgm + the shared router
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from convert.errors import ConversionError, UnsupportedFormatError, raise_if_any
from convert.readers import CheckpointReader, TensorEntry
from gmod_jax import param_layout
from gmod_jax.config import ModelConfig

LAYOUTS = {
    "A": "HF transformers 4.x files (language_model.model.*, vision_tower.vision_model.*)",
    "B": "HF transformers 4.52-4.57 state_dict (model.language_model.*, model.vision_tower.vision_model.*)",
    "C": "HF transformers 5.x state_dict (model.language_model.*, model.vision_tower.*)",
    "D": "HF transformers 5.x save_pretrained (language_model.model.*, vision_tower.*)",
    "E": "original LLaVA (model.*, model.mm_projector.*)",
    "gamma_mod": "γ-MoD mod_llava_llama (original LLaVA keys + shared model.layers.N.router.weight)",
    "E_hr": "LLaVA-HR (original LLaVA keys + multi-path tower: model.vision_tower.{fast,slow}_vision_tower.*, "
            "align_stages*)",
    "gamma_mod_hr": "γ-MoD-LLaVA-HR mod_llava_llama (LLaVA-HR keys + shared model.layers.N.router.weight)",
    "E_mgm": "Mini-Gemini mgm (original LLaVA keys + model.vision_tower_aux.*, model.vlm_uni_*_projector.*)",
    "gamma_mod_mgm": "γ-MoD-MGM mod_mgm (Mini-Gemini keys + shared model.layers.N.router.weight)",
}
HF_LAYOUTS = ("A", "B", "C", "D")
HR_LAYOUTS = ("E_hr", "gamma_mod_hr")
MGM_LAYOUTS = ("E_mgm", "gamma_mod_mgm")
ORIGINAL_LAYOUTS = ("E", "gamma_mod") + HR_LAYOUTS + MGM_LAYOUTS

# LLaVA-HR's multi-path tower on disk (llava-hr-and-mgm.md §2.3). The canonical keys of the slow
# trunk, adapters and fusion are these names minus `model.` (gmod_jax.param_layout); the CLIP fast
# path takes the canonical CLIP keys `vision_tower.<HF CLIP name>`.
HR_FAST = "model.vision_tower.fast_vision_tower.vision_tower.vision_model."
HR_SLOW = "model.vision_tower.slow_vision_tower.vision_tower."
HR_ADAPTERS = "model.vision_tower.align_stages_latent."
HR_MULTIPATH = ("model.vision_tower.slow_vision_tower.", HR_ADAPTERS, "model.vision_tower.align_stages.")
# The ConvNeXt classifier head is never called by LLaVA-HR; its shape depends on which timm tag
# initialised it (probably [1000, 1536], llava-hr-and-mgm.md §0.1), so it is dropped unread.
HR_SLOW_HEAD = HR_SLOW + "head."

# Mini-Gemini on disk (llava-hr-and-mgm.md §4.4): canonical keys are these names minus `model.`
# (gmod_jax.param_layout); the CLIP main tower sits where original LLaVA puts its tower.
MGM_CLIP = "model.vision_tower.vision_tower.vision_model."
MGM_AUX = "model.vision_tower_aux."
MGM_UNI = "model.vlm_uni_"
MGM_AUX_KEEP = ("vision_stem.", "vision_stages.")
MGM_AUX_DROPPED = ("head.", "norm_pre.", "vision_head.", "vision_norm_pre.")
# An open_clip ConvNeXt checkpoint (--vision-tower-aux): MGM keeps only the timm trunk's stem and
# stages; its classifier head, norm_pre, the CLIP projection head (visual.head.*) and the text
# tower are never used and dropped unread, whatever their shapes.
OPEN_CLIP_TRUNK = "visual.trunk."
OPEN_CLIP_DROPPED = ("visual.trunk.head.", "visual.trunk.norm_pre.", "visual.head.", "visual.proj")

ROUTER_RE = re.compile(r"^language_model\.layers\.(\d+)\.router\.weight$")
MIN_LAYER_BOUND = 1024  # layer counts up to this always get the full missing-key report
_LAYER_RE = re.compile(r"^(language_model\.layers|vision_tower\.encoder\.layers)\.(\d+)\.")
SLOW_BLOCK_RE = re.compile(r"^vision_tower\.slow_vision_tower\.vision_tower\.stages\.(\d+)\.blocks\.(\d+)\.")
AUX_BLOCK_RE = re.compile(r"^vision_tower_aux\.vision_stages\.(\d+)\.blocks\.(\d+)\.")
_CLIP_SKIP = ("text_model.", "visual_projection.", "text_projection.", "logit_scale")
_CLIP_BARE = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")


# ----------------------------------------------------------------------------------------------
# transforms: PyTorch tensor <-> Flax slot

@dataclasses.dataclass(frozen=True)
class Target:
    """Where one canonical PyTorch tensor goes: Flax leaf path, layer slot, transform, shapes."""

    path: tuple[str, ...]
    layer: int | None
    kind: str  # copy | linear | heads_in | heads_out | head_bias | conv | conv1x1
    torch_shape: tuple[int, ...]
    heads: int = 0
    head_dim: int = 0

    def to_flax(self, a: np.ndarray) -> np.ndarray:
        """A view where possible: the copy happens when it is assigned into the stacked leaf."""
        if self.kind == "copy":
            return a
        if self.kind == "linear":
            return a.T
        if self.kind == "heads_in":  # [H*hd, E] -> [E, H, hd]
            return a.reshape(self.heads, self.head_dim, a.shape[1]).transpose(2, 0, 1)
        if self.kind == "heads_out":  # [E, H*hd] -> [H, hd, E]
            return a.reshape(a.shape[0], self.heads, self.head_dim).transpose(1, 2, 0)
        if self.kind == "head_bias":
            return a.reshape(self.heads, self.head_dim)
        if self.kind == "conv":  # OIHW -> HWIO
            return a.transpose(2, 3, 1, 0)
        if self.kind == "conv1x1":  # [O, I, 1, 1] -> [I, O]
            return a[:, :, 0, 0].T
        raise AssertionError(self.kind)

    def to_torch(self, a: np.ndarray) -> np.ndarray:
        if self.kind == "copy":
            out = a
        elif self.kind == "linear":
            out = a.T
        elif self.kind == "heads_in":
            out = a.transpose(1, 2, 0).reshape(self.heads * self.head_dim, a.shape[0])
        elif self.kind == "heads_out":
            out = a.transpose(2, 0, 1).reshape(a.shape[2], self.heads * self.head_dim)
        elif self.kind == "head_bias":
            out = a.reshape(-1)
        elif self.kind == "conv":
            out = a.transpose(3, 2, 0, 1)
        elif self.kind == "conv1x1":
            out = a.T[:, :, None, None]
        else:
            raise AssertionError(self.kind)
        return np.ascontiguousarray(out)

    @property
    def flax_shape(self) -> tuple[int, ...]:
        return self.to_flax(np.broadcast_to(np.zeros((), np.int8), self.torch_shape)).shape


def expected_keys(config: ModelConfig) -> dict[str, Target]:
    """Every canonical key a checkpoint of `config` must contain, in PyTorch module order (router
    excluded, see `router_target`); read off `gmod_jax.param_layout`, the tree's one declaration."""
    keys: dict[str, Target] = {}
    stacked: list[param_layout.Leaf] = []

    def add(leaf: param_layout.Leaf, layer: int | None):
        heads, head_dim = leaf.row.heads(config) if leaf.row.heads else (0, 0)
        name = leaf.torch_key if layer is None else leaf.torch_key.replace("{n}", str(layer))
        keys[name] = Target(tuple(leaf.path.split("/")), layer, leaf.row.transform, leaf.torch_shape(config),
                            heads, head_dim)

    def add_stacked():
        # Consecutive leaves stacked over the same layers go layer by layer, as PyTorch orders them.
        for n in range(stacked[0].layers if stacked else 0):
            for leaf in stacked:
                add(leaf, n)
        stacked.clear()

    def stack_of(leaf):
        return (leaf.row.stack if isinstance(leaf.row.stack, str) else id(leaf.row.stack), leaf.index)

    for leaf in param_layout.leaves(config):
        if leaf.torch_key is None:
            continue
        if stacked and (leaf.row.stack is None or stack_of(leaf) != stack_of(stacked[0])):
            add_stacked()
        if leaf.row.stack is not None:
            stacked.append(leaf)
        else:
            add(leaf, None)
    add_stacked()
    return keys


def router_target(config: ModelConfig) -> Target:
    return Target(("llm", "mod_router", "kernel"), None, "linear", (2, config.text.hidden_size))


def leaf_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Shape of every Flax leaf (stacked leaves get the leading layer axis)."""
    return {tuple(path.split("/")): shape for path, shape in param_layout.shapes(config).items()}


# ----------------------------------------------------------------------------------------------
# layouts

def is_multipath_key(key: str) -> bool:
    """A key of LLaVA-HR's multi-path vision tower (official layout)."""
    return key.startswith(HR_FAST) or key.startswith(HR_MULTIPATH)


def is_mgm_key(key: str) -> bool:
    """A key of Mini-Gemini's aux tower or patch-info-mining projectors (official layout)."""
    return key.startswith((MGM_AUX, MGM_UNI))


def check_supported(keys: Iterable[str]):
    """Raise UnsupportedFormatError for weights of LLaVA-1.6."""
    for k in keys:
        if k.endswith("image_newline"):
            raise UnsupportedFormatError(f"LLaVA-1.6 any-resolution weights ({k}) are not supported yet")


def detect_layout(keys: Iterable[str], kind: str) -> str:
    """Layout letter of an LLaVA checkpoint's keys; `kind` is the config kind (hf_config.KIND_*)."""
    keys = list(keys)
    check_supported(keys)
    hf_saved = any(k.startswith(("language_model.model.", "language_model.lm_head.")) for k in keys)
    hf_memory = any(k.startswith("model.language_model.") for k in keys)
    original = any(k.startswith(("model.layers.", "model.embed_tokens.", "model.mm_projector.")) for k in keys)
    found = [name for name, hit in (("HF 4.x/5.x saved", hf_saved), ("HF in-memory", hf_memory),
                                    ("original LLaVA", original)) if hit]
    if len(found) != 1:
        sample = ", ".join(sorted(keys)[:8])
        raise ConversionError(
            f"unknown checkpoint layout ({'mixes ' + ' and '.join(found) if found else 'no LLaVA key prefixes'}); "
            f"first keys: {sample}")
    if original:
        if kind == "hf_llava":
            raise ConversionError("config.json is an HF LlavaConfig but the weights use original-LLaVA keys "
                                  "(model.layers.*, model.mm_projector.*)")
        mgm_config = kind in ("mgm", "gamma_mod_mgm")
        mgm_keys = any(is_mgm_key(k) for k in keys)
        if mgm_keys and not mgm_config:
            raise ConversionError("the weights hold Mini-Gemini keys (model.vision_tower_aux.*, model.vlm_uni_*) but "
                                  "config.json was not read as a Mini-Gemini config")
        if mgm_config:  # the aux tower may come from --vision-tower-aux: build_plan names what is missing
            return "gamma_mod_mgm" if kind == "gamma_mod_mgm" else "E_mgm"
        hr_config = kind in ("llava_hr", "gamma_mod_hr")
        hr_keys = any(is_multipath_key(k) for k in keys)
        if hr_config and not hr_keys:
            raise ConversionError("config.json describes LLaVA-HR's multi-path vision tower (is_multipath_encoder) "
                                  "but the weights hold none of its keys (model.vision_tower.fast_vision_tower.*, "
                                  "slow_vision_tower.*, align_stages*)")
        if hr_keys and not hr_config:
            raise ConversionError("the weights hold LLaVA-HR multi-path tower keys but config.json was read as a "
                                  "plain original-LLaVA config")
        if hr_config:
            return "gamma_mod_hr" if kind == "gamma_mod_hr" else "E_hr"
        return "gamma_mod" if kind == "gamma_mod" else "E"
    if kind != "hf_llava":
        raise ConversionError(f"config.json is an original-LLaVA/γ-MoD config but the weights use HF LLaVA keys")
    if hf_saved:
        return "A" if any(k.startswith("vision_tower.vision_model.") for k in keys) else "D"
    return "B" if any(k.startswith("model.vision_tower.vision_model.") for k in keys) else "C"


def is_dropped(key: str) -> bool:
    """Buffers that are recomputed, never parameters."""
    return key.endswith(".position_ids") or key.endswith("rotary_emb.inv_freq")


def canonical_key(key: str, layout: str) -> str | None:
    """The canonical name of an on-disk key; None for tensors the converter drops unread."""
    if layout in HF_LAYOUTS:
        k = key
        if k.startswith("model.") and k[6:].startswith(("language_model.", "vision_tower.", "multi_modal_projector.")):
            k = k[6:]
        if k.startswith("language_model.model."):
            k = "language_model." + k[len("language_model.model."):]
        elif k.startswith("language_model.lm_head."):
            k = k[len("language_model."):]
        if k.startswith("vision_tower.vision_model."):
            k = "vision_tower." + k[len("vision_tower.vision_model."):]
        return k
    if layout in HR_LAYOUTS:
        if key.startswith(HR_SLOW_HEAD):
            return None
        if key.startswith(HR_FAST):
            return "vision_tower." + key[len(HR_FAST):]
        if key.startswith(HR_MULTIPATH):
            return key[len("model."):]
        if key.startswith("model.vision_tower."):  # not a multi-path tower key: reported as unexpected
            return "vision_tower.?" + key
    if layout in MGM_LAYOUTS:
        if key.startswith(MGM_AUX):
            rest = key[len(MGM_AUX):]
            # MGM deletes the trunk's head and norm_pre; a checkpoint that kept them is still read.
            if rest.startswith(MGM_AUX_DROPPED):
                return None
            return "vision_tower_aux." + rest if rest.startswith(MGM_AUX_KEEP) else "vision_tower_aux.?" + key
        if key.startswith(MGM_UNI):
            return key[len("model."):]
    if layout in ORIGINAL_LAYOUTS:
        if key.startswith("model.vision_tower.vision_tower.vision_model."):
            return "vision_tower." + key[len("model.vision_tower.vision_tower.vision_model."):]
        if key.startswith("model.mm_projector."):
            rest = key[len("model.mm_projector."):]
            if rest in ("weight", "bias"):  # mm_projector_type "linear": a bare nn.Linear
                return f"multi_modal_projector.linear_1.{rest}"
            index, _, param = rest.partition(".")
            if index.isdigit() and int(index) % 2 == 0:  # Sequential(Linear, GELU, Linear, ...)
                return f"multi_modal_projector.linear_{int(index) // 2 + 1}.{param}"
            return "multi_modal_projector.?" + rest
        if key.startswith("model."):
            return "language_model." + key[len("model."):]
        return key
    raise AssertionError(layout)


def canonical_clip_key(key: str) -> str | None:
    """Key of a standalone CLIP checkpoint (CLIPModel `vision_model.*`, or a 5.x CLIPVisionModel's
    bare keys) -> canonical; None for the text tower and heads LLaVA does not use."""
    if key.startswith(_CLIP_SKIP):
        return None
    if key.startswith("vision_model."):
        return "vision_tower." + key[len("vision_model."):]
    if key.startswith(_CLIP_BARE):
        return "vision_tower." + key
    return "vision_tower.?" + key


def canonical_aux_key(key: str) -> str | None:
    """Key of a standalone open_clip ConvNeXt checkpoint (`visual.trunk.{stem,stages}.*`, maybe
    under DDP's `module.`) -> canonical `vision_tower_aux.{vision_stem,vision_stages}.*`; None for
    what MGM never uses (text tower, logit_scale, trunk head / norm_pre, CLIP head)."""
    if key.startswith("module."):
        key = key[len("module."):]
    if not key.startswith("visual.") or key.startswith(OPEN_CLIP_DROPPED):
        return None
    if key.startswith(OPEN_CLIP_TRUNK + "stem."):
        return "vision_tower_aux.vision_stem." + key[len(OPEN_CLIP_TRUNK + "stem."):]
    if key.startswith(OPEN_CLIP_TRUNK + "stages."):
        return "vision_tower_aux.vision_stages." + key[len(OPEN_CLIP_TRUNK + "stages."):]
    return "vision_tower_aux.?" + key  # reported as unexpected


def to_layout_key(canonical: str, layout: str) -> str:
    """Canonical key -> the on-disk name in layout D (HF export), gamma_mod/E (original export),
    E_hr/gamma_mod_hr (LLaVA-HR export) or E_mgm/gamma_mod_mgm (Mini-Gemini export)."""
    if layout in HR_LAYOUTS:
        if canonical.startswith(tuple(k[len("model."):] for k in HR_MULTIPATH)):
            return "model." + canonical
        if canonical.startswith("vision_tower."):
            return HR_FAST + canonical[len("vision_tower."):]
        return to_layout_key(canonical, "E")
    if layout in MGM_LAYOUTS:
        if canonical.startswith(("vision_tower_aux.", "vlm_uni_")):
            return "model." + canonical
        return to_layout_key(canonical, "E")
    if layout == "D":
        if canonical.startswith("language_model."):
            return "language_model.model." + canonical[len("language_model."):]
        if canonical.startswith("lm_head."):
            return "language_model." + canonical
        return canonical
    if layout in ("E", "gamma_mod"):
        if canonical.startswith("vision_tower."):
            return "model.vision_tower.vision_tower.vision_model." + canonical[len("vision_tower."):]
        m = re.match(r"^multi_modal_projector\.linear_(\d+)\.(.+)$", canonical)
        if m:
            return f"model.mm_projector.{2 * (int(m.group(1)) - 1)}.{m.group(2)}"
        if canonical.startswith("language_model."):
            return "model." + canonical[len("language_model."):]
        return canonical
    raise ValueError(f"cannot write layout {layout!r}")


def export_key(config: ModelConfig, canonical: str, layout: str) -> str:
    """`to_layout_key`, except that an original-LLaVA `linear` projector is a bare nn.Linear."""
    if layout in ORIGINAL_LAYOUTS and config.projector.type == "linear" and canonical.startswith(
            "multi_modal_projector.linear_1."):
        return "model.mm_projector." + canonical.rsplit(".", 1)[1]
    return to_layout_key(canonical, layout)


# ----------------------------------------------------------------------------------------------
# plan

@dataclasses.dataclass
class Piece:
    reader: CheckpointReader
    key: str
    target: Target


@dataclasses.dataclass
class LeafPlan:
    path: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: np.dtype
    pieces: list[Piece]
    # (reader, key) pairs whose raw tensors must be bit-identical to pieces[0]'s (shared router
    # copies, an lm_head stored although embeddings are tied).
    same_as_first: list[tuple[CheckpointReader, str]] = dataclasses.field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclasses.dataclass
class Plan:
    layout: str
    leaves: list[LeafPlan]
    dtype: str  # the converted tree's dtype
    source_bytes: int  # bytes of tensor data that will be read
    uses_tower_dir: bool = False  # tower weights come from --vision-tower
    uses_aux_file: bool = False  # Mini-Gemini's aux tower weights come from --vision-tower-aux
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(l.shape, dtype=np.int64)) for l in self.leaves)

    @property
    def nbytes(self) -> int:
        return sum(l.nbytes for l in self.leaves)


DTYPE_POLICIES = ("keep", "float32", "bfloat16", "float16")
PARAM_DTYPES = ("float32", "bfloat16", "float16")


def build_plan(config: ModelConfig, main: CheckpointReader, layout: str, tower: CheckpointReader | None = None,
               dtype: str = "keep", aux: CheckpointReader | None = None) -> Plan:
    """Validate the checkpoint against `config` (headers only) and decide where every tensor goes.

    Raises ConversionError listing every missing / unexpected / mis-shaped / mis-typed key at once.
    """
    if dtype not in DTYPE_POLICIES:
        raise ConversionError(f"--dtype must be one of {DTYPE_POLICIES}, got {dtype!r}")
    sources: dict[str, tuple[CheckpointReader, TensorEntry]] = {}
    problems: list[str] = []
    duplicates = []

    def collect(reader: CheckpointReader, canon_fn: Callable[[str], str | None]):
        for key, entry in reader.entries.items():
            if is_dropped(key):
                continue
            canon = canon_fn(key)
            if canon is None:
                continue
            if canon in sources:
                other_reader, other = sources[canon]
                duplicates.append(f"{key} ({reader.path}) duplicates {other.key} ({other_reader.path})")
                continue
            sources[canon] = (reader, entry)

    collect(main, lambda k: canonical_key(k, layout))
    main_has_tower = any(c.startswith("vision_tower.") for c in sources)
    notes = []
    if tower is not None:
        if main_has_tower:
            # The checkpoint's own (possibly fine-tuned) tower wins; the directory still supplied
            # the tower's config.
            notes.append(f"vision tower weights taken from {main.path}; only the config of {tower.path} was used")
            tower = None
        else:
            collect(tower, canonical_clip_key)
    if aux is not None:
        if any(c.startswith("vision_tower_aux.") for c in sources):
            notes.append(f"aux tower weights taken from {main.path}; {aux.path} was not used")
            aux = None
        else:
            collect(aux, canonical_aux_key)
    if duplicates:
        problems.append(f"duplicate tensors: {_names(duplicates)}")

    count_problems, bounded = layer_count_problems(config, sources)
    problems += count_problems
    if not bounded:  # the expected-key table would grow with the config, not the checkpoint: stop here
        raise ConversionError(*problems, title="checkpoint does not match its config")
    expected = expected_keys(config)
    routers = {c: s for c, s in sources.items() if ROUTER_RE.match(c)}
    present = {c: s for c, s in sources.items() if c not in routers}
    tied_head = None
    if config.text.tie_word_embeddings and "lm_head.weight" in present:
        tied_head = present.pop("lm_head.weight")

    missing = [c for c in expected if c not in present]
    unexpected = [c for c in present if c not in expected]
    if missing:
        absent = _absent_towers(missing, present, layout)
        problems += absent.values()
        missing = [c for c in missing if not c.startswith(tuple(absent))]
        if missing:
            names = [_source_name(config, c, layout) for c in missing]
            problems.append(f"missing keys ({len(missing)}): {_names(names)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_names([present[c][1].key for c in unexpected])}")

    router_pieces: list[tuple[int, CheckpointReader, TensorEntry]] = []
    if routers and not config.mod.enabled:
        problems.append(f"unexpected keys: MoD router weights {_names([s[1].key for s in routers.values()])} in a "
                        "checkpoint whose config has no enabled `mod`")
    elif config.mod.enabled:
        if not routers:
            problems.append(f"missing keys: the γ-MoD router (model.layers.{config.mod.layers[0]}.router.weight)")
        for c, (reader, entry) in sorted(routers.items(), key=lambda kv: int(ROUTER_RE.match(kv[0]).group(1))):
            index = int(ROUTER_RE.match(c).group(1))
            if index not in config.mod.layers:
                problems.append(f"router {entry.key} sits on layer {index}, which is not in mod.mod_layers_idx "
                                f"{list(config.mod.layers)}")
            router_pieces.append((index, reader, entry))

    mismatched = []
    for c, (reader, entry) in present.items():
        if c in expected and entry.shape != expected[c].torch_shape:
            mismatched.append(f"{entry.key}: file {list(entry.shape)}, config expects {list(expected[c].torch_shape)}")
    rt = router_target(config)
    for _, reader, entry in router_pieces:
        if entry.shape != rt.torch_shape:
            mismatched.append(f"{entry.key}: file {list(entry.shape)}, config expects {list(rt.torch_shape)}")
    if tied_head is not None and tied_head[1].shape != expected["language_model.embed_tokens.weight"].torch_shape:
        mismatched.append(f"{tied_head[1].key}: shape {list(tied_head[1].shape)} differs from the tied embedding")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_names(mismatched)}")
    raise_if_any(problems, title="checkpoint does not match its config")

    # Group pieces into Flax leaves.
    grouped: dict[tuple[str, ...], list[Piece]] = collections.defaultdict(list)
    for c, target in expected.items():
        reader, entry = present[c]
        grouped[target.path].append(Piece(reader, entry.key, target))
    checks: dict[tuple[str, ...], list] = collections.defaultdict(list)
    if router_pieces:
        first = router_pieces[0]
        grouped[rt.path].append(Piece(first[1], first[2].key, rt))
        checks[rt.path] = [(reader, entry.key) for _, reader, entry in router_pieces[1:]]
    if tied_head is not None:
        checks[expected["language_model.embed_tokens.weight"].path].append((tied_head[0], tied_head[1].key))

    leaf_dtype = _leaf_dtypes(grouped, dtype)
    shapes = leaf_shapes(config)
    leaves = []
    for path, pieces in grouped.items():
        leaves.append(LeafPlan(path, shapes[path], leaf_dtype[path], pieces, checks.get(path, [])))
    # Read order follows storage order so each batch walks the files front to back.
    rank = {id(main): 0, id(tower): 1, id(aux): 2}
    leaves.sort(key=lambda l: min((rank[id(p.reader)],) + p.reader.position(p.key) for p in l.pieces))
    source_bytes = sum(p.reader.entries[p.key].nbytes for l in leaves for p in l.pieces)
    out_dtype = leaf_dtype[("llm", "embed")].name
    return Plan(layout, leaves, out_dtype, source_bytes, uses_tower_dir=tower is not None, notes=notes,
                uses_aux_file=aux is not None)


NO_CLIP_TOWER = ("the checkpoint has no vision tower (original LLaVA and Mini-Gemini load it separately): pass "
                 "--vision-tower DIR with the CLIP checkpoint (e.g. openai/clip-vit-large-patch14-336)")
NO_AUX_TOWER = ("the checkpoint has no Mini-Gemini aux tower (model.vision_tower_aux.*): pass --vision-tower-aux "
                "FILE|DIR with the open_clip ConvNeXt checkpoint (visual.trunk.* keys, e.g. open_clip_pytorch_model.bin "
                "of laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup)")


def _absent_towers(missing: list[str], present: dict, layout: str) -> dict[str, str]:
    """{canonical prefix: problem} for each vision tower that is wholly absent, naming the flag
    that supplies it (original LLaVA and Mini-Gemini keep their frozen towers outside the
    checkpoint). A tower with only some keys missing is listed key by key instead."""
    out = {}
    if layout not in ("E", "gamma_mod") + MGM_LAYOUTS:
        return out
    clip = [c for c in missing if c.startswith("vision_tower.")]
    if clip and not any(c.startswith("vision_tower.") for c in present) and (
            layout in MGM_LAYOUTS or len(clip) == len(missing)):
        out["vision_tower."] = NO_CLIP_TOWER
    aux = [c for c in missing if c.startswith("vision_tower_aux.")]
    if aux and not any(c.startswith("vision_tower_aux.") for c in present):
        out["vision_tower_aux."] = NO_AUX_TOWER
    return out


def _leaf_dtypes(grouped: dict[tuple[str, ...], list[Piece]], policy: str) -> dict[tuple[str, ...], np.dtype]:
    """Per-leaf dtype under the policy; `keep` requires one floating dtype for the whole checkpoint."""
    by_dtype: dict[np.dtype, list[str]] = collections.defaultdict(list)
    for pieces in grouped.values():
        for p in pieces:
            by_dtype[p.reader.entries[p.key].dtype].append(p.key)
    bad = {dt: keys for dt, keys in by_dtype.items() if not _is_float(dt)}
    if bad:
        listing = "; ".join(f"{dt.name}: {_names(keys)}" for dt, keys in bad.items())
        raise ConversionError(f"non-floating tensors where parameters are expected: {listing}")
    if policy == "keep":
        if len(by_dtype) > 1:
            main = max(by_dtype, key=lambda dt: len(by_dtype[dt]))
            odd = "; ".join(f"{dt.name}: {_names(keys)}" for dt, keys in by_dtype.items() if dt != main)
            raise ConversionError(
                f"--dtype keep needs one dtype, but the checkpoint is mostly {main.name} with {odd}; pass --dtype "
                "float32, bfloat16 or float16")
        (only,) = by_dtype
        if only.name not in PARAM_DTYPES:
            raise ConversionError(f"--dtype keep: {only.name} parameters are not supported; pass --dtype float32, "
                                  "bfloat16 or float16")
        target = only
    else:
        target = np.dtype(_np_dtype(policy))
    return {path: target for path in grouped}


def _np_dtype(name: str):
    return {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[name]


def _is_float(dt: np.dtype) -> bool:
    return dt.kind == "f" or dt.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2")


def layer_count_problems(config: ModelConfig, canonical_keys: Iterable[str]) -> tuple[list[str], bool]:
    """Layer counts of the config against the layer indices in the weights' key names.

    Runs before `expected_keys`, whose table grows with the configured layer counts: returns
    (one problem per contradicted count, whether building that table is safe). It is safe when
    no count exceeds max(number of tensors in the checkpoint, MIN_LAYER_BOUND), since every layer
    holds at least one tensor; past that the config cannot describe these weights and the table
    would grow with the config (e.g. num_hidden_layers 1e9) instead of the checkpoint.
    """
    keys = list(canonical_keys)
    found: dict[str, set[int]] = collections.defaultdict(set)
    for c in keys:
        m = _LAYER_RE.match(c)
        if m:
            found[m.group(1)].add(int(m.group(2)))
    has_tower = any(c.startswith("vision_tower.") for c in keys)
    bound = max(len(keys), MIN_LAYER_BOUND)
    problems, bounded = [], True
    for prefix, configured, field in (("language_model.layers", config.text.num_layers, "text num_hidden_layers"),
                                      ("vision_tower.encoder.layers", config.vision.num_layers,
                                       "vision num_hidden_layers")):
        too_many = configured > bound
        bounded = bounded and not too_many
        layers = found.get(prefix)
        if layers and max(layers) + 1 != configured:
            held = f"has layers 0..{max(layers)}"
        elif not layers and (too_many or prefix.startswith("language_model") or has_tower):
            held = f"has no {prefix}.* keys"  # (a checkpoint without any tower: build_plan says so)
        elif too_many:  # a stray key names the configured last layer
            held = f"holds only {len(keys)} tensors"
        else:
            continue
        problems.append(f"config.json says {field}={configured} but the checkpoint {held} (the config contradicts "
                        "the weights)")
    trunks = []
    if config.vision.tower == "multipath" and config.vision.slow is not None:
        trunks.append((config.vision.slow.depths, SLOW_BLOCK_RE, "slow", "slow_vision_tower.vision_tower.stages"))
    if config.vision.tower == "mgm" and config.vision.aux is not None:
        trunks.append((config.vision.aux.depths, AUX_BLOCK_RE, "aux", "vision_tower_aux.vision_stages"))
    for depths, block_re, name, stages in trunks:
        trunk_problems, trunk_bounded = _trunk_depth_problems(depths, keys, bound, block_re, name, stages)
        problems += trunk_problems
        bounded = bounded and trunk_bounded
    return problems, bounded


def _trunk_depth_problems(depths: tuple[int, ...], keys: list[str], bound: int, block_re: re.Pattern, name: str,
                          stages: str) -> tuple[list[str], bool]:
    """A ConvNeXt trunk's stage depths (LLaVA-HR's slow tower, Mini-Gemini's aux tower) against
    the block indices in the key names (the same guard as the layer counts: the expected-key
    table grows with the depths). A trunk without any block key is absent, which build_plan
    reports."""
    found: dict[int, set[int]] = collections.defaultdict(set)
    for c in keys:
        m = block_re.match(c)
        if m:
            found[int(m.group(1))].add(int(m.group(2)))
    bounded = len(depths) <= bound and all(d <= bound for d in depths)
    if not found:
        return ([], True) if bounded else ([f"the ConvNeXt {name} tower's stage depths {list(depths)} exceed "
                                            f"the {len(keys)} tensors the checkpoint holds"], False)
    if max(found, default=0) >= bound:
        return [f"the checkpoint names ConvNeXt {name} tower stage {max(found)} but holds only {len(keys)} tensors"], \
            bounded
    held = tuple(max(found[i]) + 1 if i in found else 0 for i in range(max(found, default=-1) + 1))
    if held != depths:
        return [f"config.json gives the ConvNeXt {name} tower stage depths {list(depths)} but the checkpoint's "
                f"{stages}.S.blocks.B keys give {list(held)} (the config contradicts the weights)"], bounded
    if not bounded:
        deepest = max((k for k in keys if block_re.match(k)), key=lambda k: int(block_re.match(k).group(2)))
        return [f"the ConvNeXt {name} tower's stage depths {list(depths)} exceed the {len(keys)} tensors the "
                f"checkpoint holds (block index of model.{deepest})"], False
    return [], True


def _source_name(config: ModelConfig, canonical: str, layout: str) -> str:
    """Name a missing canonical key the way the user's files would spell it."""
    if layout in ORIGINAL_LAYOUTS:
        return export_key(config, canonical, layout)
    return {"A": _to_a, "B": _to_b, "C": _to_c, "D": lambda c: to_layout_key(c, "D")}[layout](canonical)


def _to_a(c: str) -> str:
    if c.startswith("vision_tower."):
        return "vision_tower.vision_model." + c[len("vision_tower."):]
    return to_layout_key(c, "D")


def _to_c(c: str) -> str:
    return c if c.startswith("lm_head.") else "model." + c


def _to_b(c: str) -> str:
    if c.startswith("vision_tower."):
        return "model.vision_tower.vision_model." + c[len("vision_tower."):]
    return _to_c(c)


def _names(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown
