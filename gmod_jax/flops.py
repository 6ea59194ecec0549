"""FLOP accounting for dense and γ-MoD LLaVA models.

Three views of the same quantity, kept side by side so each can check the others:

1. `paper_tflops`: the γ-MoD paper's own TFLOPs formula (`gamma_mod/eval/cal_flops.py`), LLM
   decoder only, reproducing the numbers printed in the paper (19.16 / 9.26 TFLOPs etc.).
2. `prefill_flops` / `train_step_flops` / `decode_flops`: a full analytic count of this
   implementation *as executed*: vision tower, projector, every decoder layer with its real
   GQA k/v widths, the shared router, the one-hot dispatch einsums when that routing
   implementation is used, and the lm_head (last token for prefill, every token for training).
   MoD layers are charged for the tokens they actually process (`kept`), so the ratio of two
   counts is the speedup a perfectly efficient implementation would get: the *FLOP bound*.
3. `xla_flops`: what XLA's HloCostAnalysis reports for a compiled executable.

Conventions: 2 FLOPs per multiply-add; softmax, norms, activations, residual adds, RoPE and
bias adds are not counted (they are O(T·D) per layer next to O(T·D²) matmuls: ~1% at D=1024,
a few % at toy sizes; XLA does count them, which is most of the XLA-vs-analytic gap).

Attention (QKᵀ and AV, 4·n_q·n_kv·H·hd per layer): by default (`attention="blocked"`) what the
decoder executes: `layers.attention.causal_attention` scores query blocks against the keys up
to their last row (the full square for short sequences and the bidirectional vision tower), and
XLA reports the same. `"full"` counts the whole square, the paper's `4·L²·d` term;
`"causal"` only the unmasked lower triangle, n(n+1)/2 pairs, the work of a kernel that skips
every masked pair.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Sequence

import jax

from gmod_jax.config import ModelConfig

ATTENTION_MODES = ("blocked", "full", "causal")

# ----------------------------------------------------------------------------------------------
# 1. The paper's formula

# (typical sequence length L the paper plugs in, hidden d, FFN d_ff, decoder layers). The paper
# keeps 4 layers dense in every model (N_dense = 4, N_mod = layers - 4); the official script says
# 3 and 29, but only 4/28 reproduces the published numbers (reference notes §5).
PAPER_MODELS: dict[str, tuple[int, int, int, int]] = {
    "llava-hr-7b": (1400, 4096, 11008, 32),
    "llava-1.5-7b": (800, 4096, 11008, 32),
    "mgm-hd-7b": (4000, 4096, 11008, 32),
    "llava-hr-13b": (1400, 5120, 13824, 40),
}
PAPER_DENSE_LAYERS = 4


def paper_layer_flops(seq_len: int, hidden: int, intermediate: int) -> float:
    """F(L) = 8·L·d² + 4·L²·d + 6·L·d·d_ff: MHA projections, full QKᵀ/AV, SwiGLU FFN."""
    L, d = seq_len, hidden
    return 8.0 * L * d * d + 4.0 * L * L * d + 6.0 * L * d * intermediate


def paper_tflops(seq_len: int, hidden: int, intermediate: int, n_dense: int, n_mod: int,
                 skip_ratio: float = 0.0) -> float:
    """[N_dense·F(L) + N_mod·F(int(L·(1−s)))] / 1e12 (LLM prefill only: no vision, head, router)."""
    kept = int(seq_len * (1.0 - skip_ratio))
    return (n_dense * paper_layer_flops(seq_len, hidden, intermediate)
            + n_mod * paper_layer_flops(kept, hidden, intermediate)) / 1e12


def paper_model_tflops(name: str, skip_ratio: float = 0.0, all_mod: bool = False) -> float:
    """The paper's TFLOPs for one of `PAPER_MODELS` (dense when skip_ratio is 0); `all_mod`
    for the "all layers MoD" ablation row."""
    seq_len, hidden, intermediate, layers = PAPER_MODELS[name]
    n_dense = 0 if all_mod else PAPER_DENSE_LAYERS
    return paper_tflops(seq_len, hidden, intermediate, n_dense, layers - n_dense, skip_ratio)


# ----------------------------------------------------------------------------------------------
# 2. Full analytic count


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """FLOPs by part. `layers` = decoder-layer matmuls, `attention` = QKᵀ + AV, `router` =
    router logits, `dispatch` = one-hot gather/scatter einsums (implementation "onehot" only)."""

    vision: float = 0.0
    projector: float = 0.0
    layers: float = 0.0
    attention: float = 0.0
    router: float = 0.0
    dispatch: float = 0.0
    lm_head: float = 0.0

    @property
    def llm(self) -> float:
        return self.layers + self.attention + self.router + self.dispatch + self.lm_head

    @property
    def total(self) -> float:
        return self.vision + self.projector + self.llm

    @property
    def useful(self) -> float:
        """`total` less the one-hot dispatch einsums: the work every MoD implementation does, the
        MFU numerator (counting dispatch would credit `onehot` with FLOPs `gather` never needs)."""
        return self.total - self.dispatch

    def __add__(self, other: "FlopCount") -> "FlopCount":
        return FlopCount(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)})

    def scale(self, factor: float, parts: Sequence[str] | None = None) -> "FlopCount":
        names = [f.name for f in dataclasses.fields(self)] if parts is None else parts
        return dataclasses.replace(self, **{n: getattr(self, n) * factor for n in names})

    def to_dict(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "total": self.total}


def _check_attention(attention: str):
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")


def _pairs(n_q: float, n_kv: float, attention: str) -> float:
    """Query/key pairs scored. Causal counting assumes the queries are the last n_q of n_kv keys;
    blocked counting applies to self-attention (n_q == n_kv), with the blocks of the static size
    (a realised average n interpolates between the block layouts of its neighbours)."""
    _check_attention(attention)
    if attention == "blocked" and n_q == n_kv:
        lo = int(n_q)
        frac = n_q - lo
        return (1 - frac) * _blocked_pairs(lo) + (frac * _blocked_pairs(lo + 1) if frac else 0.0)
    if attention in ("full", "blocked"):
        return n_q * n_kv
    return n_q * n_kv - n_q * (n_q - 1) / 2.0


def _blocked_pairs(t: int) -> float:
    from gmod_jax.layers.attention import causal_block_bounds

    bounds = causal_block_bounds(t)
    return float(sum((stop - start) * stop for start, stop in zip(bounds[:-1], bounds[1:])))


def layer_linear_flops(config: ModelConfig, tokens: float) -> float:
    """q, k, v, o projections (k/v at the GQA width) and the SwiGLU MLP for `tokens` tokens."""
    t = config.text
    q_width, kv_width = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    per_token = t.hidden_size * (2 * q_width + 2 * kv_width) + 3 * t.hidden_size * t.intermediate_size
    return 2.0 * tokens * per_token


def attention_flops(config: ModelConfig, n_q: float, n_kv: float, attention: str = "blocked") -> float:
    """QKᵀ and AV (both at query-head width: grouped queries still read every score)."""
    t = config.text
    return 4.0 * _pairs(n_q, n_kv, attention) * t.num_heads * t.head_dim


def vision_flops(config: ModelConfig, images: int, attention: str = "blocked") -> float:
    """The vision tower `config.vision.tower` names, for `images` images: the CLIP up to the
    deepest feature layer used (layers after it never run); LLaVA-HR's multi-path tower
    (`multipath_flops`); Mini-Gemini's views, aux tower and patch info mining (`mgm_flops`)."""
    v = config.vision
    _check_attention(attention)
    if v.tower == "multipath":
        return images * multipath_flops(config)
    if v.tower == "mgm":
        return images * mgm_flops(config)
    return images * _clip_flops(config, v.num_patches, cls=True, layers=max(v.feature_layers))


def _clip_flops(config: ModelConfig, patches: int, cls: bool, layers: int) -> float:
    """One CLIP run on `patches` patches (+ CLS): patch embedding and `layers` encoder layers."""
    v = config.vision
    n = patches + int(cls)
    patch = 2.0 * patches * v.patch_size ** 2 * v.num_channels * v.hidden_size
    linear = 2.0 * n * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
    attn = 4.0 * n * n * v.hidden_size  # bidirectional: the full square is real work
    return patch + layers * (linear + attn)


def convnext_flops(convnext, side: int, in_channels: int) -> float:
    """One ConvNeXt trunk (`gmod_jax.models.convnext`) on a side x side image: stem, downsample
    convs, depthwise convs and the blocks' MLPs."""
    c = convnext
    grid = side // c.patch_size
    macs = grid * grid * c.patch_size ** 2 * in_channels * c.dims[0]
    for i, (depth, dim) in enumerate(zip(c.depths, c.dims)):
        if i:
            grid //= 2
            macs += grid * grid * 4 * c.dims[i - 1] * dim
        macs += depth * grid * grid * (c.kernel_size ** 2 * dim + 2 * c.mlp_ratio * dim * dim)
    return 2.0 * macs


def _resize_flops(n_in: int, n_out: int, channels: int) -> float:
    """A separable square resize executed as two dense contractions (rows, then columns)."""
    return 2.0 * channels * (n_out * n_in * n_in + n_out * n_out * n_in)


def multipath_flops(config: ModelConfig) -> float:
    """LLaVA-HR's tower per image (`gmod_jax.models.multipath`): the fast-input resize, the CLIP
    on the fast grid (all layers, no CLS), the ConvNeXt on the S x S image, the three
    MR-adapters (when present) and the final fusion, with their slow-to-fast upsampling. The
    position-table resample runs once per forward, not per image, and is left out."""
    from gmod_jax.models.multipath import ADAPTER_KERNEL, N_ADAPTERS

    v = config.vision
    d, c, n, slow = v.hidden_size, v.slow.width, v.num_image_tokens, v.slow_grid
    total = _clip_flops(config, n, cls=False, layers=v.num_layers)
    if v.fast_image_size != v.pixel_size:
        total += _resize_flops(v.pixel_size, v.fast_image_size, v.num_channels)
    total += convnext_flops(v.slow, v.pixel_size, v.num_channels)
    upsample = slow < v.token_grid
    if v.latent_adapters:
        k = ADAPTER_KERNEL  # slow conv + projection, fast depthwise conv + projection, pooled gate MLP
        per = 2.0 * (slow * slow * (c * c + c * d) + n * (k * k * d + d * d) + 2 * d * (d // 2) + d // 2)
        if upsample:
            per += _resize_flops(slow, v.token_grid, d)
        total += N_ADAPTERS * per
    total += 2.0 * n * (d * d + c * d) + (_resize_flops(slow, v.token_grid, c) if upsample else 0.0)
    return total


def mgm_flops(config: ModelConfig) -> float:
    """Mini-Gemini's stack per image (`gmod_jax.models.mgm`): the CLIP views (resizes and one
    CLIP run each), the aux ConvNeXt with its stage maps resized to stage 0's grid, the global
    view's aux map, and patch info mining (query, key and value projections, logits, mixing)."""
    v = config.vision
    d, c_aux, views = v.hidden_size, v.mm_hidden_size_aux, v.num_views
    tokens = v.num_patches
    big = v.image_size * v.image_grid
    total = _resize_flops(v.image_size_aux, big, v.num_channels)
    if v.image_global:
        total += _resize_flops(big, v.image_size, v.num_channels)
    total += views * _clip_flops(config, tokens, cls=True, layers=max(v.feature_layers))
    a = v.aux
    side = v.image_size_aux // a.patch_size
    total += convnext_flops(a, v.image_size_aux, v.num_channels)
    total += sum(_resize_flops(side >> i, side, dim) for i, dim in enumerate(a.dims) if i)
    if v.image_global:
        total += _resize_flops(side, side // v.image_grid, c_aux)
    cell = (side // v.image_grid // math.isqrt(tokens)) ** 2  # aux vectors per CLIP token
    total += views * 2.0 * tokens * (d * d + 2 * cell * c_aux * d + 2 * cell * d)
    return total


def projector_flops(config: ModelConfig, images: int) -> float:
    d_in = config.vision.feature_dim
    d = config.text.hidden_size
    per_token = d_in * d + (config.projector.depth - 1) * d * d
    return 2.0 * images * config.image_seq_length * per_token


def _kept_per_layer(config: ModelConfig, kept) -> dict[int, float]:
    layers = config.mod_layers
    if kept is None or not layers:
        return {}
    if isinstance(kept, (int, float)):
        return {layer: float(kept) for layer in layers}
    kept = [float(k) for k in kept]
    if len(kept) != len(layers):
        raise ValueError(f"kept has {len(kept)} entries for {len(layers)} MoD layers")
    return dict(zip(layers, kept))


def forward_flops(config: ModelConfig, batch: int, seq_len: int, kept=None, *, logits: str = "last",
                  attention: str = "blocked", images: int | None = None) -> FlopCount:
    """One forward pass over `batch` rows of `seq_len` tokens.

    kept: None (every layer dense, also for a γ-MoD config run in dense mode), or the tokens per
    row each MoD layer processes (a number, or one per MoD layer; may be a realised average).
    logits: "last" (prefill: one row of logits per sequence), "all" (training), "none".
    images: images through the vision tower (default one per row; 0 for text-only).
    """
    t = config.text
    images = batch if images is None else images
    per_layer = _kept_per_layer(config, kept)
    layers = attn = router = dispatch = 0.0
    for layer in range(t.num_layers):
        n = per_layer.get(layer, float(seq_len))
        layers += layer_linear_flops(config, n)
        attn += attention_flops(config, n, n, attention)
        if layer in per_layer:
            router += 2.0 * seq_len * t.hidden_size * 2  # every token is scored
            if config.mod.implementation == "onehot":
                # dispatch einsum [K,T]x[T,D] and combine einsum [K,T]x[K,D] over the static slots
                dispatch += 2 * 2.0 * n * seq_len * t.hidden_size
    logit_rows = {"last": 1, "all": seq_len, "none": 0}[logits]
    lm_head = 2.0 * logit_rows * t.hidden_size * t.vocab_size
    llm = FlopCount(layers=layers, attention=attn, router=router, dispatch=dispatch, lm_head=lm_head).scale(batch)
    return llm + FlopCount(vision=vision_flops(config, images), projector=projector_flops(config, images))


def prefill_flops(config: ModelConfig, batch: int, seq_len: int, kept=None, *, attention: str = "blocked",
                  images: int | None = None) -> FlopCount:
    """Prefill: the whole prompt through the model, logits for the last position only."""
    return forward_flops(config, batch, seq_len, kept, logits="last", attention=attention, images=images)


def train_step_flops(config: ModelConfig, batch: int, seq_len: int, kept=None, *, attention: str = "blocked",
                     images: int | None = None) -> FlopCount:
    """One training step with a frozen vision tower: forward + backward = 3× forward for the
    trainable parts (projector, LLM, router: activation and weight gradients each cost about one
    forward), 1× for the frozen tower, whose output needs no gradient. Logits on every token.
    The optimizer update (O(params) elementwise) is not counted."""
    fwd = forward_flops(config, batch, seq_len, kept, logits="all", attention=attention, images=images)
    return fwd.scale(3.0, ("projector", "layers", "attention", "router", "dispatch", "lm_head"))


def decode_flops(config: ModelConfig, batch: int, prompt_len: int, new_tokens: int, *, mod_capacity: int = 0,
                 mod_run_fraction=1.0, skip_compute: bool | None = None) -> FlopCount:
    """The decode loop of `gmod_jax.inference.generate` as executed: `new_tokens - 1` steps
    (the first new token comes from the prefill logits), one token per row per step.

    Static caches: dense layers attend over all `prompt_len + new_tokens` slots plus the token
    itself, MoD layers over `mod_capacity + new_tokens` slots plus itself (masked slots are
    still scored). A MoD layer's linear work runs for the share `mod_run_fraction` (a number or
    one per MoD layer: decode tokens whose keep-prob passed the decode threshold) only when
    the implementation really skips (`skip_compute`, batch 1 uses `lax.cond`); larger batches
    mask the result, so every row pays for every layer. The router scores every token.
    """
    t = config.text
    steps = max(new_tokens - 1, 0)
    skip_compute = batch == 1 if skip_compute is None else skip_compute
    run = _kept_per_layer(config, mod_run_fraction) if config.mod_layers else {}
    dense_slots = prompt_len + new_tokens + 1
    mod_slots = mod_capacity + new_tokens + 1
    layers = attn = router = 0.0
    for layer in range(t.num_layers):
        if layer in run:
            share = run[layer] if skip_compute else 1.0
            layers += share * layer_linear_flops(config, 1)
            attn += share * attention_flops(config, 1, mod_slots)
            router += 2.0 * t.hidden_size * 2
        else:
            layers += layer_linear_flops(config, 1)
            attn += attention_flops(config, 1, dense_slots)
    lm_head = 2.0 * t.hidden_size * t.vocab_size
    return FlopCount(layers=layers, attention=attn, router=router, lm_head=lm_head).scale(batch * steps)


def bound_speedup(dense_flops: float | None, mod_flops: float | None) -> float | None:
    """The FLOP bound on the MoD speedup: dense FLOPs / MoD FLOPs at the realised skip ratio."""
    if not dense_flops or not mod_flops:
        return None
    return float(dense_flops) / float(mod_flops)


# ----------------------------------------------------------------------------------------------
# 3. XLA's count


def xla_flops(compiled) -> float | None:
    """FLOPs XLA's cost analysis reports for a compiled executable (`jit(f).lower(..).compile()`).

    `cost_analysis()` returned a list with one dict per program in older JAX and a dict now;
    both are handled (list entries are summed). None when the backend reports nothing.

    XLA counts a while loop's body once whatever its trip count, and `lax.scan` lowers to a
    while loop: compile the program under `unrolled_scans()` to count a layer stack fully.
    """
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends / executables do not implement it
        return None
    if analysis is None:
        return None
    entries = analysis if isinstance(analysis, (list, tuple)) else [analysis]
    values = [float(e["flops"]) for e in entries if isinstance(e, dict) and "flops" in e]
    if not values:
        return None
    total = sum(values)
    return total if total >= 0 else None


@contextlib.contextmanager
def unrolled_scans():
    """Trace with every `jax.lax.scan` fully unrolled and every `jax.lax.map` turned into straight-line
    code (no while loops), so XLA's cost analysis sees each iteration. Only for counting: unrolled
    programs compile slower and are not what the benchmarks time. Scans that set `unroll` win."""
    original_scan, original_map = jax.lax.scan, jax.lax.map

    def unrolled_map(f, xs, **_):
        n = jax.tree.leaves(xs)[0].shape[0]
        outs = [f(jax.tree.map(lambda a: a[i], xs)) for i in range(n)]
        return jax.tree.map(lambda *a: jax.numpy.stack(a), *outs)

    jax.lax.scan = functools.partial(original_scan, unroll=True)
    jax.lax.map = unrolled_map  # the per-head attention loop on CPU
    try:
        yield
    finally:
        jax.lax.scan, jax.lax.map = original_scan, original_map


# ----------------------------------------------------------------------------------------------
# Peak throughput for MFU

# Dense (non-sparse) bf16 peak per chip from vendor datasheets, matched by substring of
# `jax.Device.device_kind`, most specific first. H100 and H200 share the 989 TFLOP/s SXM figure.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("TPU v6", 918.0),
    ("TPU v5p", 459.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5", 459.0),
    ("TPU v4", 275.0),
)


def peak_flops(device_kind: str) -> float | None:
    """bf16 dense peak FLOP/s for a device kind, None when unknown (e.g. CPUs)."""
    kind = device_kind.lower()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in kind:
            return tflops * 1e12
    return None
