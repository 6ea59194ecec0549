"""Loop-aware FLOPs, bytes and collectives of a compiled XLA program, read from its HLO text.

XLA's `compiled.cost_analysis()` counts a while loop's body once, whatever its trip count, and
every layer stack here is a `lax.scan` (a while loop): for a 32-layer model it reports about one
layer's work. This walks the optimized HLO instead and multiplies each computation's cost by how
often it runs: a while body by its trip count (`known_trip_count` when XLA records it, else from
the loop condition `i < N` with the counter's start and step: `lax.scan` steps by 1, the TPU's
windowed collective matmuls by 2), a fusion or call by its caller's count, a conditional by its
costliest branch. Loops whose bound is only known at run time (the decode loop's token budget)
count once and are reported in `unknown_trip_loops`.

What is counted, per device (the SPMD-partitioned program):
* flops: 2 per multiply-add of every `dot` and `convolution` (the TPU compiler writes matmuls,
  batched ones included, as convolutions; only window positions that read real input count, not
  padding). Element-wise work is not counted (XLA's own count adds it: a few percent), nor
  matrix-vector products XLA rewrites as multiply + reduce (one-row decode steps).
* bytes: for every instruction of a non-fused computation, its operands plus its result; a fusion
  operand read only through slices costs the slices, an in-place dynamic-update-slice result the
  update. Tuple plumbing, parameters and constants are free. An approximation of XLA's model.
* collectives: all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute (and their
  async `-start` halves): executions and bytes (the larger of operands and result).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1,
               "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
               "f64": 8, "c64": 8, "c128": 16}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all")
_FREE = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while", "conditional", "call",
         "after-all", "partition-id", "replica-id", "iota", "opt-barrier", "add-dependency"}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_NAME = re.compile(r"%([\w.\-]+)")


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(shape)]


def shape_bytes(shape: str) -> float:
    return sum(DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in _arrays(shape))


def _closing(text: str, start: int) -> int:
    """Index just past the bracket group opening at text[start]."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    for i in range(start, len(text)):
        c = text[i]
        if c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
    return len(text)


@dataclasses.dataclass
class _Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    args: str  # the text between the opcode's parentheses
    attrs: str
    is_root: bool = False


def _parse_instruction(line: str) -> _Instr | None:
    body = line.strip()
    is_root = body.startswith("ROOT ")
    if is_root:
        body = body[5:]
    if " = " not in body or not body.startswith("%"):
        return None
    name, rest = body.split(" = ", 1)
    rest = rest.lstrip()
    if rest.startswith("("):
        end = _closing(rest, 0)
    else:
        end = rest.find(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    m = re.match(r"([\w\-]+)\(", rest)
    if not m:
        return None
    close = _closing(rest, m.end() - 1)
    args = rest[m.end():close - 1]
    return _Instr(name.lstrip("%"), shape, m.group(1), _NAME.findall(args), args, rest[close:], is_root)


@dataclasses.dataclass
class _Computation:
    flops: float = 0.0
    bytes: float = 0.0
    collectives: dict = dataclasses.field(default_factory=lambda: defaultdict(lambda: [0.0, 0.0]))
    calls: list = dataclasses.field(default_factory=list)  # (callee, multiplier, counts_bytes)
    branches: list = dataclasses.field(default_factory=list)  # conditionals: [callee, ...] per instruction
    unknown_loops: int = 0


@dataclasses.dataclass
class HloCost:
    flops: float
    bytes_accessed: float
    collectives: list[dict]  # {"kind", "count" (executions), "bytes" (per device, all executions)}
    unknown_trip_loops: int

    @property
    def collective_bytes(self) -> float:
        return sum(c["bytes"] for c in self.collectives)


def _dims(shape: str) -> tuple[int, ...]:
    arrays = _arrays(shape)
    return arrays[0][1] if arrays else ()


def _dot_flops(ins: _Instr, shapes: dict[str, str]) -> float:
    out = math.prod(_dims(ins.shape))
    if ins.opcode == "dot":
        lhs = _dims(shapes.get(ins.operands[0], ""))
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
        contracted = [int(d) for d in m.group(1).split(",") if d] if m else []
        return 2.0 * out * math.prod(lhs[d] for d in contracted if d < len(lhs))
    return _convolution_flops(ins, shapes)


def _window_pairs(out: int, size: int, inp: int, stride: int, pad_lo: int, lhs_dil: int, rhs_dil: int) -> int:
    """(output position, window position) pairs of one spatial dimension that read a real input
    element, not padding: what a convolution multiplies along that dimension."""
    pairs = 0
    last = (inp - 1) * lhs_dil  # the dilated input's last real position
    for k in range(size):
        shift = k * rhs_dil - pad_lo  # input position = o * stride + shift
        first_o = max(0, -(-(-shift) // stride))
        last_o = min(out - 1, (last - shift) // stride)
        if last_o < first_o:
            continue
        if lhs_dil == 1:
            pairs += last_o - first_o + 1
        else:
            pairs += sum(1 for o in range(first_o, last_o + 1) if (o * stride + shift) % lhs_dil == 0)
    return pairs


def _window_field(window: str, key: str, n: int, default: int) -> list:
    m = re.search(key + r"=([\d_x\-]+)", window)
    if not m:
        return [default] * n
    return m.group(1).split("x")


def _convolution_flops(ins: _Instr, shapes: dict[str, str]) -> float:
    """2 x output batch x output features x kernel input features x, per spatial dimension, the
    window positions that hit real input. The TPU compiler writes batched matmuls as convolutions
    whose batch dimension is a padded window (`size=4 pad=3_3`): only one window position per
    output then reads data, and counting the whole window would overstate the work."""
    m = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
    lhs, kernel, out = _dims(shapes.get(ins.operands[0], "")), _dims(shapes.get(ins.operands[1], "")), _dims(ins.shape)
    if not m or not lhs or not kernel:
        return 0.0
    lhs_labels, kernel_labels, out_labels = m.groups()
    spatial = sorted(c for c in out_labels if c.isdigit())
    w = re.search(r"window=\{([^}]*)\}", ins.attrs)
    window = w.group(1) if w else ""
    n = len(spatial)
    sizes = [int(x) for x in _window_field(window, "size", n, 1)]
    strides = [int(x) for x in _window_field(window, "stride", n, 1)]
    pads = [int(x.split("_")[0]) for x in _window_field(window, "pad", n, 0)] if "pad=" in window else [0] * n
    lhs_dil = [int(x) for x in _window_field(window, "lhs_dilate", n, 1)]
    rhs_dil = [int(x) for x in _window_field(window, "rhs_dilate", n, 1)]
    pairs = 1
    for i, d in enumerate(spatial):
        pairs *= _window_pairs(out[out_labels.index(d)], sizes[i], lhs[lhs_labels.index(d)], strides[i], pads[i],
                               lhs_dil[i], rhs_dil[i])
    return 2.0 * out[out_labels.index("b")] * out[out_labels.index("f")] * kernel[kernel_labels.index("i")] * pairs


_SLICES = ("dynamic-slice", "slice", "gather")


def _traffic(ins: _Instr, shapes: dict[str, str], computations: dict[str, list[_Instr]]) -> float:
    """HBM bytes an unfused instruction moves: its operands and its result. For a fusion, an
    operand read only through slices costs the slices (a scanned layer stack reads one layer per
    iteration, not the stack), and a result written by an in-place dynamic-update-slice costs the
    update (the rest of the buffer is untouched), as in XLA's own model."""
    operand_bytes = [shape_bytes(shapes.get(o, "")) for o in ins.operands]
    out_bytes = shape_bytes(ins.shape)
    called = re.search(r"calls=%([\w.\-]+)", ins.attrs) if ins.opcode == "fusion" else None
    body = computations.get(called.group(1), []) if called else []
    if not body:
        return out_bytes + sum(operand_bytes)
    by_name = {i.name: i for i in body}
    users: dict[str, list[_Instr]] = defaultdict(list)
    for i in body:
        for o in i.operands:
            users[o].append(i)
    for i in body:
        if i.opcode != "parameter" or not re.fullmatch(r"\d+", i.args.strip()):
            continue
        k = int(i.args)
        readers = users.get(i.name, [])
        if k < len(operand_bytes) and readers and all(r.opcode in _SLICES and r.operands[0] == i.name
                                                      for r in readers):
            operand_bytes[k] = sum(shape_bytes(r.shape) for r in readers)
    root = next((i for i in body if i.is_root), body[-1])
    outputs = [by_name.get(o) for o in root.operands] if root.opcode == "tuple" else [root]
    if any(o is not None and o.opcode == "dynamic-update-slice" for o in outputs):
        out_bytes = sum(shape_bytes(shapes.get(o.operands[1], "")) if o.opcode == "dynamic-update-slice"
                        else shape_bytes(o.shape) for o in outputs if o is not None)
    return out_bytes + sum(operand_bytes)


def _trip_count(ins: _Instr, computations: dict[str, list[_Instr]], constants: dict[str, float],
                by_name: dict[str, _Instr]) -> int | None:
    """Iterations of a while loop: XLA's `known_trip_count`, else from `counter < bound` in the
    condition, the counter's start (the loop's initial tuple) and its step (the body's
    `counter + step`; windowed collective matmuls step by 2)."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.attrs)
    if m:
        return int(m.group(1))
    cond = re.search(r"condition=%([\w.\-]+)", ins.attrs)
    body = re.search(r"body=%([\w.\-]+)", ins.attrs)
    cond_instrs = computations.get(cond.group(1), []) if cond else []
    cond_by_name = {c.name: c for c in cond_instrs}
    for c in cond_instrs:
        if c.opcode != "compare" or "direction=LT" not in c.attrs:
            continue
        bounds = [constants[o] for o in c.operands if o in constants]
        counters = [cond_by_name[o] for o in c.operands if o in cond_by_name
                    and cond_by_name[o].opcode == "get-tuple-element"]
        if len(bounds) != 1:
            continue
        start, step = 0, 1
        if counters:
            index = int(re.search(r"index=(\d+)", counters[0].attrs).group(1))
            init = by_name.get(ins.operands[0]) if ins.operands else None
            if init is not None and init.opcode == "tuple" and index < len(init.operands):
                start = constants.get(init.operands[index], 0)
            body_instrs = computations.get(body.group(1), []) if body else []
            root = next((i for i in body_instrs if i.is_root), None)
            if root is not None and root.opcode == "tuple" and index < len(root.operands):
                body_by_name = {i.name: i for i in body_instrs}
                update = body_by_name.get(root.operands[index])
                while update is not None and update.opcode == "copy":
                    update = body_by_name.get(update.operands[0])
                if update is not None and update.opcode == "add":
                    steps = [constants[o] for o in update.operands if o in constants]
                    step = steps[0] if len(steps) == 1 and steps[0] > 0 else 1
        return max(0, -(-(int(bounds[0]) - start) // step))
    return None


def analyze(hlo_text: str) -> HloCost:
    """Loop-aware cost of an optimized HLO module (`compiled.as_text()`)."""
    computations: dict[str, list[_Instr]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
            continue
        if current is not None and line.startswith(" "):
            ins = _parse_instruction(line)
            if ins is not None:
                computations[current].append(ins)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    shapes = {i.name: i.shape for instrs in computations.values() for i in instrs}
    by_name = {i.name: i for instrs in computations.values() for i in instrs}
    constants = {i.name: int(i.args) for instrs in computations.values() for i in instrs
                 if i.opcode == "constant" and re.fullmatch(r"-?\d+", i.args.strip())}

    costs: dict[str, _Computation] = {}
    for cname, instrs in computations.items():
        c = _Computation()
        for i in instrs:
            if i.opcode in ("dot", "convolution"):
                c.flops += _dot_flops(i, shapes)
            kind = i.opcode[:-6] if i.opcode.endswith("-start") else i.opcode
            if kind in COLLECTIVES:
                # An async -start's result is a tuple that repeats its operands: count operands.
                size = sum(shape_bytes(shapes.get(o, "")) for o in i.operands)
                if not i.opcode.endswith("-start"):
                    size = max(size, shape_bytes(i.shape))
                c.collectives[kind][0] += 1
                c.collectives[kind][1] += size
            if i.opcode not in _FREE and not i.opcode.endswith("-done"):
                c.bytes += _traffic(i, shapes, computations)
            if i.opcode == "while":
                trips = _trip_count(i, computations, constants, by_name)
                if trips is None:
                    c.unknown_loops += 1
                for key in ("body", "condition"):
                    m = re.search(key + r"=%([\w.\-]+)", i.attrs)
                    if m:
                        c.calls.append((m.group(1), trips or 1, True))
            elif i.opcode == "conditional":
                m = re.search(r"branch_computations=\{([^}]*)\}", i.attrs)
                names = _NAME.findall(m.group(1)) if m else re.findall(r"(?:true|false)_computation=%([\w.\-]+)",
                                                                       i.attrs)
                c.branches.append(names)
            else:
                for key in ("calls", "to_apply"):
                    for m in re.finditer(key + r"=%([\w.\-]+)", i.attrs):
                        c.calls.append((m.group(1), 1, i.opcode == "call"))
        costs[cname] = c

    memo: dict[str, tuple] = {}

    def total(name: str, depth: int = 0):
        if name in memo:
            return memo[name]
        if depth > 200 or name not in costs:
            return 0.0, 0.0, {}, 0
        c = costs[name]
        flops, nbytes, unknown = c.flops, c.bytes, c.unknown_loops
        coll = {k: list(v) for k, v in c.collectives.items()}

        def add(sub, mult, with_bytes):
            nonlocal flops, nbytes, unknown
            f, b, cl, u = sub
            flops += mult * f
            nbytes += mult * b if with_bytes else 0.0
            unknown += u
            for k, (n, s) in cl.items():
                acc = coll.setdefault(k, [0.0, 0.0])
                acc[0] += mult * n
                acc[1] += mult * s

        for callee, mult, with_bytes in c.calls:
            add(total(callee, depth + 1), mult, with_bytes)
        for names in c.branches:  # the costliest branch (an upper bound on what runs)
            subs = [total(n, depth + 1) for n in names]
            if subs:
                add(max(subs, key=lambda s: (s[0], s[1])), 1, True)
        memo[name] = (flops, nbytes, coll, unknown)
        return memo[name]

    flops, nbytes, coll, unknown = total(entry)
    collectives = [{"kind": k, "count": int(round(n)), "bytes": float(s)} for k, (n, s) in sorted(coll.items())]
    return HloCost(flops, nbytes, collectives, unknown)


def xla_cost_analysis(compiled) -> dict:
    """XLA's own numbers (`flops`, `bytes accessed`), loop bodies counted once; {} if unavailable."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some executables implement none
        return {}
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return {k: float(v) for k, v in (analysis or {}).items() if k in ("flops", "bytes accessed")}


