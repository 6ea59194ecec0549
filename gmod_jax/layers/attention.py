"""Multi-head / grouped-query attention over explicit params, softmax in float32 (HF eager).

Which implementation computes attention is `ModelConfig.attention_impl` (values in
`config.ATTENTION_IMPLS`), resolved at trace time by `resolve_attention_impl`, the only place
that looks at the platform. "xla" (`_attention`) is the reference every other implementation is
tested against (tests/test_attention.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from gmod_jax.config import ATTENTION_IMPLS
from gmod_jax.sharding import BATCH_AXES


def project(x, p, eqn: str, dtype):
    """Projection `eqn` (e.g. "btd,dhk->bthk") with an optional bias (`p` holds `kernel` and
    maybe `bias`). `eqn` must contract the trailing dims of x with the leading dims of the kernel
    and keep the rest in order; every projection of the models does."""
    xs, rest = eqn.split(",")
    ks, out = rest.split("->")
    n = len(set(xs) & set(ks))
    if not (n and xs[-n:] == ks[:n] and out == xs[:-n] + ks[n:] and len(xs) == x.ndim):
        raise ValueError(f"project needs trailing-into-leading contraction, got {eqn!r} for x {x.shape}")
    y = contract(x.astype(dtype), p["kernel"].astype(dtype), n)
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    return y


def contract(x, kernel, n: int):
    """x [..., *K] with kernel [*K, *F] -> [..., *F], summing the n trailing dims of x against
    the n leading dims of the kernel, as one 2-D matmul. Same sums as the einsum, but XLA's CPU
    backend differentiates a 3-D einsum such as "btd,df->btf" into a weight gradient that
    contracts two dims (b, t) and transposes the activations for it; flattened, the CPU
    benchmark's training step is markedly faster (docs/benchmarks.md)."""
    lead, k_shape, f_shape = x.shape[:x.ndim - n], kernel.shape[:n], kernel.shape[n:]
    y = x.reshape(-1, math.prod(k_shape)) @ kernel.reshape(math.prod(k_shape), -1)
    return y.reshape(*lead, *f_shape)


def dot_product_attention(q, k, v, mask, *, scale: float, return_probs: bool = False, impl: str = "auto"):
    """q [B,Tq,H,D], k/v [B,Tk,KV,D], mask bool broadcastable to [B,H,Tq,Tk] (True = attend).

    Grouped-query attention folds the H/KV query heads of a group onto their shared KV head
    instead of repeating K and V. Fully masked rows (e.g. invalid MoD slots) get a uniform
    distribution; their outputs are never used. `impl`: an `ATTENTION_IMPLS` value, resolved
    by `resolve_attention_impl`; without a causal mask "blocked" has no blocks to skip and is
    "xla", and "cpu_blocked" runs one KV head at a time.
    """
    impl = resolve_attention_impl(impl, q, k, mask, causal=False, return_probs=return_probs)
    if impl == "cudnn":
        return _cudnn_attention(q, k, v, mask, scale, causal=False), None
    if impl == "splash":
        key_ok = jnp.broadcast_to(jnp.asarray(mask)[:, 0, 0, :], (q.shape[0], k.shape[1]))
        return _splash_attention(q, k, v, key_ok, scale, causal=False), None
    if impl == "cpu_blocked" and k.shape[2] > 1:
        return _per_kv_head(_attention, q, k, v, mask, scale), None
    return _attention(q, k, v, mask, scale, return_probs)


# ----------------------------------------------------------------------------------------------
# Choosing the implementation


def target_platform() -> str:
    """"cpu", "gpu" or "tpu": the platform of the mesh set with `jax.set_mesh` (so an AOT compile
    for a TPU topology on a CPU host picks TPU kernels), else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    platform = device.platform if device is not None else jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def resolve_attention_impl(impl: str, q, k, mask, *, causal: bool, return_probs: bool = False,
                           platform: str | None = None) -> str:
    """The implementation that computes one attention call (at trace time, from static shapes).

    Post-softmax maps (`return_probs`: ARank, visualize) always come from "xla". "auto" picks
    per platform:
    - CPU: "cpu_blocked". One KV head at a time (`lax.map`) keeps each head's score matrix in
      cache through the mask, softmax and value passes, where all heads at once stream it
      through memory several times (about half the time per layer; docs/benchmarks.md).
    - GPU: "cudnn" unless `cudnn_unsupported` names a reason (e.g. float32), else "blocked".
    - TPU: "splash" unless `splash_unsupported` names a reason, else "blocked".
    An explicit kernel the platform or inputs cannot run is an error, not a silent fallback.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if return_probs:
        return "xla"
    platform = platform or target_platform()
    if impl == "auto":
        if platform == "gpu" and not cudnn_unsupported(q, k):
            return "cudnn"
        if platform == "tpu" and not splash_unsupported(q, k, mask, causal):
            return "splash"
        return "cpu_blocked" if platform == "cpu" else "blocked"
    why = None
    if impl == "cudnn":
        why = f"it needs a CUDA GPU, this computation is for {platform!r}" if platform != "gpu" else cudnn_unsupported(q, k)
    elif impl == "splash":
        why = (f"it needs a TPU (or CPU, interpreted, for tests), this computation is for {platform!r}"
               if platform not in ("tpu", "cpu") else splash_unsupported(q, k, mask, causal))
    if why:
        raise ValueError(f"attention_impl={impl!r} cannot run here: {why}; use 'auto', 'xla' or 'blocked'")
    return impl


def cudnn_unsupported(q, k) -> str | None:
    """Why cuDNN flash attention cannot take these inputs, or None. Odd lengths are fine
    (`_cudnn_attention` pads them). Head dims up to 256 run on Hopper and later; 128 is the
    limit all cuDNN flash-capable GPUs share."""
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN flash attention needs bfloat16 or float16 inputs, got {q.dtype} (the config's dtype)"
    if q.shape[-1] % 8 or q.shape[-1] > 128:
        return f"cuDNN flash attention needs a head dim <= 128 and a multiple of 8, got {q.shape[-1]}"
    return None


def splash_unsupported(q, k, mask, causal: bool) -> str | None:
    """Why the splash kernel cannot express this attention, or None. The kernel takes a static
    causal (or full) mask and per-token segment ids, so the dynamic mask must be causal with a
    per-key validity (the decoder's and the MoD slots' masks, see `causal_key_valid`) or, when
    not causal, one key mask for all queries (the vision tower's)."""
    mask = jnp.asarray(mask)
    if mask.ndim != 4 or mask.shape[1] != 1:
        return f"the mask must be [B|1, 1, Tq|1, Tk], got {mask.shape}"
    if causal and not q.shape[1] == k.shape[1] == mask.shape[2]:
        return f"causal splash attention needs square self-attention, got Tq={q.shape[1]}, Tk={k.shape[1]}"
    if not causal and mask.shape[2] != 1:
        return "non-causal splash attention takes only a key mask shared by all queries"
    return None


def causal_key_valid(mask, batch: int):
    """bool [B, T]: the per-key validity of a causal [B|1, 1, T, T] mask, read off its last query
    row (which sees every key that is visible at all). For the decoder mask (`causal_mask`) that
    is exactly `key_valid`; the MoD slot mask (`routing.kept_attention_mask`) also forces its
    diagonal on, which this row shows only for the last slot, whose own query is then its only
    reader."""
    mask = jnp.asarray(mask)
    return jnp.broadcast_to(mask[:, 0, -1, :], (batch, mask.shape[-1]))


# ----------------------------------------------------------------------------------------------
# Fused kernels


def _cudnn_attention(q, k, v, mask, scale: float, causal: bool, implementation: str = "cudnn"):
    """cuDNN flash attention (`jax.nn.dot_product_attention`) under the model's exact mask.

    The boolean mask goes in whole (cuDNN adds it as a bias, broadcast over heads), so every row
    with a visible key, padding and MoD slot rows included, sees what the reference shows it; a
    row with none (a left-padding query) is uniform over the keys up to it instead of all keys.
    `is_causal` lets cuDNN skip the upper triangle. Odd lengths get one extra masked key/query
    (cuDNN's backward with a bias needs even lengths); a query row past the end is dropped.
    `implementation="xla"` runs the same call through JAX's XLA attention: that is how CPU tests
    check this wiring.
    """
    b, t, _, _ = q.shape
    s = k.shape[1]
    mask = jnp.broadcast_to(jnp.asarray(mask).astype(bool), (b, 1, t, s))
    pad_t, pad_s = t % 2, s % 2
    if pad_t or pad_s:
        q = jnp.pad(q, ((0, 0), (0, pad_t), (0, 0), (0, 0)))
        k, v = (jnp.pad(a, ((0, 0), (0, pad_s), (0, 0), (0, 0))) for a in (k, v))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad_t), (0, pad_s)))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal,
                                       implementation=implementation)
    return out[:, :t]


SPLASH_MAX_BLOCK = 512  # splash tile rows/keys; tiles must be multiples of 128 (TPU lanes)


def _splash_attention(q, k, v, key_ok, scale: float, causal: bool, interpret: bool | None = None):
    """The Pallas TPU splash-attention kernel under a causal (or full) mask and a key mask.

    The key mask becomes segment ids: key j gets `key_ok[j]`, query i gets 1 if any key up to i
    (any key at all, when not causal) is valid, else 0, so no row is empty. A query that sees a
    valid key sees exactly the valid keys the reference shows it: every real token's row, and
    right-padding rows of the dense mask. Two kinds of rows differ, all of them padding or
    invalid MoD slots: a row with no valid key up to it (left padding, leading kept padding
    slots, invalid slots before any valid one) attends to its own masked keys instead of the
    reference's uniform or diagonal-only row; a kept padding or invalid MoD slot after valid
    ones misses its own key, which the reference adds on the diagonal. No model output reads
    them; the router loss over all positions (`loss_token_reduction="all"`) reads the hidden
    states of padding positions, which thus depend on the implementation, as in HF, where eager
    and FlashAttention-2 padding rows differ. The sequence is zero-padded to whole tiles; padded
    keys are masked, padded query rows dropped. Queries are scaled before the kernel (it has no
    scale argument). `interpret` (default: on CPU) runs the Pallas interpreter, for tests.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, t, h, d = q.shape
    s = k.shape[1]
    if interpret is None:
        interpret = target_platform() == "cpu"
    length = -(-max(t, s) // 128) * 128
    block = next(bl for bl in (SPLASH_MAX_BLOCK, 256, 128) if length % bl == 0)
    key_ok = jnp.pad(key_ok.astype(bool), ((0, 0), (0, length - s)))
    seen = jnp.cumsum(key_ok, axis=-1) > 0 if causal else jnp.any(key_ok, axis=-1, keepdims=True)
    q_seg = jnp.broadcast_to(seen, (b, length)).astype(jnp.int32)
    kv_seg = key_ok.astype(jnp.int32)

    def heads_first(a, n):  # [B, n, H, D] -> [B, H, length, D]
        return jnp.swapaxes(jnp.pad(a, ((0, 0), (0, length - n), (0, 0), (0, 0))), 1, 2)

    qh = heads_first((q.astype(jnp.float32) * scale).astype(q.dtype), t)
    kh, vh = heads_first(k, s), heads_first(v, s)
    shape = (length, length)
    mask = splash.MultiHeadMask([splash.CausalMask(shape) if causal else splash.FullMask(shape)] * h)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)

    def run(qh, kh, vh, q_seg, kv_seg):  # one shard: the kernel is per sequence, so vmap the batch
        kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                        interpret=interpret)
        return jax.vmap(lambda *a: kernel(a[0], a[1], a[2], segment_ids=splash.SegmentIds(a[3], a[4])))(
            qh, kh, vh, q_seg, kv_seg)

    out = _over_mesh(run, qh, kh, vh, q_seg, kv_seg)
    return jnp.swapaxes(out, 1, 2)[:, :t]


def _over_mesh(fn, qh, kh, vh, q_seg, kv_seg):
    """fn on each device's share when a mesh is set (`jax.set_mesh`): a Pallas call is opaque to
    GSPMD, which would otherwise gather its inputs onto every device. The batch splits over the
    batch mesh axes and heads over `tensor` where they divide evenly; the rest is replicated."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(qh, kh, vh, q_seg, kv_seg)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    batch_axes = tuple(a for a in BATCH_AXES if a in sizes)
    batch = batch_axes if qh.shape[0] % math.prod(sizes[a] for a in batch_axes) == 0 else None
    tensor = sizes.get("tensor", 1)
    heads = "tensor" if tensor > 1 and qh.shape[1] % tensor == 0 and kh.shape[1] % tensor == 0 else None
    P = jax.sharding.PartitionSpec
    qkv, seg = P(batch, heads, None, None), P(batch, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(qkv, qkv, qkv, seg, seg), out_specs=qkv,
                         check_vma=False)(qh, kh, vh, q_seg, kv_seg)


# ----------------------------------------------------------------------------------------------
# XLA implementations


def _per_kv_head(fn, q, k, v, mask, scale: float):
    """fn(q, k, v, mask, scale, False) -> (out, _) applied to one KV head (and its query group)
    at a time; same result as fn over all heads."""
    b, tq, h, d = q.shape
    kv = k.shape[2]
    qh = jnp.moveaxis(q.reshape(b, tq, kv, h // kv, d), 2, 0)  # [KV, B, Tq, G, D]
    kh, vh = (jnp.moveaxis(a, 2, 0)[:, :, :, None] for a in (k, v))  # [KV, B, Tk, 1, D]
    mask = jnp.asarray(mask)
    if mask.ndim == 4 and mask.shape[1] > 1:  # a mask per query head: split it by KV head too
        mask = jnp.broadcast_to(mask, (mask.shape[0], h, *mask.shape[2:]))
        masks = jnp.moveaxis(mask.reshape(mask.shape[0], kv, h // kv, *mask.shape[2:]), 1, 0)
        out = jax.lax.map(lambda x: fn(x[0], x[1], x[2], x[3], scale, False)[0], (qh, kh, vh, masks))
    else:
        out = jax.lax.map(lambda x: fn(x[0], x[1], x[2], mask, scale, False)[0], (qh, kh, vh))
    return jnp.moveaxis(out, 0, 2).reshape(b, tq, h, d)  # [KV, B, Tq, G, D] -> [B, Tq, H, D]


def _attention(q, k, v, mask, scale: float, return_probs: bool):
    b, tq, h, d = q.shape
    kv = k.shape[2]
    group = h // kv
    qg = q.reshape(b, tq, kv, group, d)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k).astype(jnp.float32) * scale
    mask = jnp.broadcast_to(mask, (b, h, tq, k.shape[1])).reshape(b, kv, group, tq, k.shape[1])
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v).reshape(b, tq, h, d)
    if return_probs:
        return out, probs.reshape(b, h, tq, k.shape[1])
    return out, None


CAUSAL_BLOCK_ROWS = 128  # query rows per block of `causal_attention`
MAX_CAUSAL_BLOCKS = 8  # blocks are unrolled in the program: bounds compile time at long T


def causal_attention(q, k, v, mask, *, scale: float, return_probs: bool = False, impl: str = "auto"):
    """`dot_product_attention` for a causal `mask` (query i never attends to key j > i; every
    decoder mask here is one, the γ-MoD slot masks included), computed by the implementation
    `impl` resolves to (`resolve_attention_impl`).

    "blocked" and "cpu_blocked" (the latter one KV head at a time) send query rows in blocks that
    only see the keys up to their own last row, so most of the masked upper triangle is never
    computed (on CPU, with heads one at a time, well under half the time of all heads and keys
    at once; docs/benchmarks.md). The result equals
    `dot_product_attention` up to float summation order: the keys a block leaves out are masked
    for all its rows, so they carry exactly zero probability. Rows whose keys are all masked
    (padding queries) are uniform over their block's keys instead of all keys; as there, their
    outputs are never used. Short or non-square inputs take the unblocked path.

    "cudnn" and "splash" are fused kernels; `_cudnn_attention` and `_splash_attention` say how
    they receive the mask and which rows (only ones whose outputs are never used) may differ.
    """
    impl = resolve_attention_impl(impl, q, k, mask, causal=True, return_probs=return_probs)
    if impl == "cudnn":
        return _cudnn_attention(q, k, v, mask, scale, causal=True), None
    if impl == "splash":
        return _splash_attention(q, k, v, causal_key_valid(mask, q.shape[0]), scale, causal=True), None
    t = q.shape[1]
    if impl == "xla" or k.shape[1] != t or t <= CAUSAL_BLOCK_ROWS:
        return dot_product_attention(q, k, v, mask, scale=scale, return_probs=return_probs, impl=impl)
    if impl == "cpu_blocked" and k.shape[2] > 1:  # heads outside, blocks inside: the faster nesting on CPU
        return _per_kv_head(_causal_blocks, q, k, v, mask, scale), None
    return _causal_blocks(q, k, v, mask, scale, False)


def causal_block_bounds(t: int) -> list[int]:
    """Row boundaries of `causal_attention`'s query blocks for T=t ([0, t] when unblocked)."""
    blocks = min(MAX_CAUSAL_BLOCKS, -(-t // CAUSAL_BLOCK_ROWS))
    return [int(b) for b in np.linspace(0, t, max(blocks, 1) + 1).round()]


def _causal_blocks(q, k, v, mask, scale: float, return_probs: bool):
    bounds = causal_block_bounds(q.shape[1])
    outs = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        rows = slice(start, stop) if mask.shape[-2] > 1 else slice(None)
        keys = slice(0, stop) if mask.shape[-1] > 1 else slice(None)
        out, _ = _attention(q[:, start:stop], k[:, :stop], v[:, :stop], mask[..., rows, keys], scale, False)
        outs.append(out)
    return jnp.concatenate(outs, axis=1), None


def causal_mask(key_valid, q_len: int | None = None):
    """[B,1,T,T] causal mask that also hides padded keys (key_valid [B,T] bool)."""
    t = key_valid.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    if q_len is not None and q_len != t:
        causal = causal[-q_len:]
    return causal[None, None] & key_valid[:, None, None, :]
