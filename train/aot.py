"""Compile a recipe's programs for a Cloud TPU topology on any host, and report what the TPU
compiler made of them: `python -m train.aot --config configs/<recipe>.py --topology v5p-64`.

Programs: the train step exactly as `python -m train` builds it (`train.step.build_train_program`:
same state, optimizer, shardings, remat, accumulation; MoD capacity from a representative token
layout of the recipe: `--system-tokens` system-prompt tokens, the model's image tokens, then
question/answer text up to `data.max_length`), and the generation programs of
`gmod_jax.inference.generate` (prefill of a `--prompt-text`-token question after the image, and
the decode loop) over the same params and mesh.

Per program and per chip: argument / output / temporary bytes from the executable's memory
analysis against the chip's HBM; loop-aware FLOPs, bytes accessed and collectives from its HLO
(`train.hlo_cost`; XLA's own cost analysis counts each scanned layer stack once and is reported
alongside); a roofline time max(FLOPs / peak, bytes / HBM bandwidth) from `train.tpu_topology.CHIPS`
and the MFU that time implies for the model FLOPs of `train.flops` / `gmod_jax.flops`.
`decode_step` is one iteration of the decode loop (one generated token per row): the loop's trip
count is a run-time value.

`--find-batch` searches the largest per-chip train batch whose step fits in `--hbm-fraction`
of HBM (default 95%) by compiling (`find_batch`: candidates predicted from the memory of the sizes
already compiled, the answer confirmed by compiles on both sides), then reports all programs at it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("train.aot")

TRAIN, PREFILL, DECODE = "train_step", "prefill", "decode_step"
PROGRAMS = (TRAIN, PREFILL, DECODE)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Representative token layout of one row: LLaVA's image-first conversation."""

    system_tokens: int = 35  # vicuna_v1 system prompt + "USER: " before the image
    prompt_text_tokens: int = 64  # generation: question + "ASSISTANT:" after the image
    new_tokens: int = 128  # generation: decode budget (cache room)
    infer_batch_per_chip: int = 1  # generation rows per batch shard


def train_token_types(model, rows: int, seq_len: int, layout: Layout):
    import numpy as np

    from gmod_jax import token_types as tt

    types = np.full((rows, seq_len), tt.ANSWER, np.int32)
    image_end = layout.system_tokens + model.image_seq_length
    if image_end >= seq_len:
        raise ValueError(f"sequence length {seq_len} leaves no text after {layout.system_tokens} system and "
                         f"{model.image_seq_length} image tokens")
    types[:, :layout.system_tokens] = tt.SYSTEM
    types[:, layout.system_tokens:image_end] = tt.IMAGE
    return types


def prompt_token_types(model, rows: int, layout: Layout):
    import numpy as np

    from gmod_jax import token_types as tt

    n = layout.system_tokens + model.image_seq_length + layout.prompt_text_tokens
    types = np.full((rows, n), tt.QUESTION, np.int32)
    types[:, :layout.system_tokens] = tt.SYSTEM
    types[:, layout.system_tokens:layout.system_tokens + model.image_seq_length] = tt.IMAGE
    return types


# ----------------------------------------------------------------------------------------------
# Report


@dataclasses.dataclass
class ProgramReport:
    name: str
    topology: str
    chips: int
    chip: str
    per_chip_bytes: dict | None  # arguments, outputs, temporaries, aliased, total
    hbm_bytes: int
    hbm_fraction: float
    fits: bool
    flops: float | None  # per chip, loop-aware
    bytes_accessed: float | None  # per chip, loop-aware
    collectives: list
    estimated_step_s: float | None
    estimated_mfu: float | None
    model_flops: float | None  # all chips
    estimated_collective_s: float | None  # collective bytes / ICI bandwidth (not in the roofline)
    xla_cost_analysis: dict
    unknown_trip_loops: int
    shapes: dict
    compile_s: float
    error: str | None = None
    hlo_path: str | None = None  # where --dump-hlo kept the optimized HLO

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _memory(compiled) -> dict | None:
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    sizes = {"arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
             "temporaries": int(mem.temp_size_in_bytes), "aliased": int(mem.alias_size_in_bytes),
             "generated_code": int(mem.generated_code_size_in_bytes)}
    # Donated inputs that become outputs (the train state) occupy one buffer, not two.
    sizes["total"] = (sizes["arguments"] + sizes["outputs"] - sizes["aliased"] + sizes["temporaries"]
                      + sizes["generated_code"])
    return sizes


def _is_out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "exceeds" in text and "memory" in text


def compile_report(name: str, lowered_fn, topology, model_flops: float | None, shapes: dict,
                   hbm_fraction: float, dump_dir: str | None = None) -> tuple[ProgramReport, object]:
    """Compile (`lowered_fn()` returns a `Lowered`) and measure; an out-of-memory compile is a
    report with fits=False and the compiler's message, any other failure raises. `dump_dir`
    keeps the optimized HLO text (`<name>.hlo.txt`) for a closer look."""
    from train import hlo_cost

    chip = topology.chip
    t0 = time.perf_counter()
    try:
        compiled = lowered_fn().compile()
    except Exception as e:  # noqa: BLE001 - XlaRuntimeError has no stable import path
        if not _is_out_of_memory(e):
            raise
        msg = str(e).strip().splitlines()[0][:500]
        log.info("%s does not fit on %s: %s", name, topology.describe(), msg)
        return ProgramReport(name, topology.name, topology.chips, chip.name, None, chip.hbm_bytes, hbm_fraction,
                             False, None, None, [], None, None, model_flops, None, {}, 0, shapes,
                             time.perf_counter() - t0, error=msg), None
    compile_s = time.perf_counter() - t0
    hlo = compiled.as_text()
    hlo_path = None
    if dump_dir:
        Path(dump_dir).mkdir(parents=True, exist_ok=True)
        hlo_path = str(Path(dump_dir) / f"{name}.hlo.txt")
        Path(hlo_path).write_text(hlo)
    report = measure(name, hlo, _memory(compiled), hlo_cost.xla_cost_analysis(compiled), topology, model_flops,
                     shapes, hbm_fraction, compile_s)
    report.hlo_path = hlo_path
    return report, compiled


def measure(name: str, hlo: str, mem: dict | None, xla: dict, topology, model_flops: float | None, shapes: dict,
            hbm_fraction: float, compile_s: float) -> ProgramReport:
    """The report of one compiled program from its HLO text, memory and XLA cost analysis."""
    from train import hlo_cost

    chip = topology.chip
    cost = hlo_cost.analyze(hlo)
    # The walker counts matmuls over every loop trip; XLA counts all ops but each loop body once
    # (and a matrix-vector product it rewrites as multiply + reduce). Both undercount, each in
    # its own way: the larger is the better floor.
    flops = max(cost.flops, xla.get("flops", 0.0))
    nbytes = max(cost.bytes_accessed, xla.get("bytes accessed", 0.0))
    step_s = max(flops / chip.peak_bf16_flops, nbytes / chip.hbm_bytes_per_s)
    mfu = None
    if model_flops and step_s > 0:
        mfu = model_flops / topology.chips / step_s / chip.peak_bf16_flops
    ici_s = cost.collective_bytes / chip.ici_bytes_per_s if chip.ici_bytes_per_s else None
    fits = mem is not None and mem["total"] <= hbm_fraction * chip.hbm_bytes
    report = ProgramReport(name, topology.name, topology.chips, chip.name, mem, chip.hbm_bytes, hbm_fraction, fits,
                           flops, nbytes, cost.collectives, step_s, mfu, model_flops, ici_s, xla,
                           cost.unknown_trip_loops, shapes, compile_s)
    log.info("%s on %s: %s, %.1f GB/chip of %.1f GB, %.3g FLOPs/chip, est. %.4g s, MFU %s (compile %.0f s)",
             name, topology.describe(), "fits" if fits else "DOES NOT FIT", (mem or {}).get("total", 0) / 1e9,
             chip.hbm_bytes / 1e9, flops, step_s, f"{mfu:.1%}" if mfu else "n/a", compile_s)
    return report


def rescore(path: str) -> dict:
    """Recompute a `--json` report's estimates from the HLO it kept (`--dump-hlo`), without
    compiling again (after a change to the cost model)."""
    from train import tpu_topology

    out = json.loads(Path(path).read_text())
    reports = []
    for p in out["programs"]:
        if not p.get("hlo_path"):
            raise ValueError(f"{path}: program {p['name']} has no hlo_path (compile with --dump-hlo)")
        topology = tpu_topology.parse_topology(p["topology"], p["chips"] // tpu_topology.parse_topology(
            p["topology"]).chips)
        r = measure(p["name"], Path(p["hlo_path"]).read_text(), p["per_chip_bytes"], p["xla_cost_analysis"],
                    topology, p["model_flops"], p["shapes"], p["hbm_fraction"], p["compile_s"])
        r.hlo_path = p["hlo_path"]
        reports.append(r)
    out["programs"] = [r.to_dict() for r in reports]
    out["table"] = summary_rows(reports)
    return out


# ----------------------------------------------------------------------------------------------
# Building the programs


@dataclasses.dataclass
class Target:
    """A recipe resolved for a topology: model, mesh and the train program's static parts."""

    cfg: object
    model: object
    topology: object
    mesh: object
    program: object  # train.step.TrainProgram


def make_target(cfg, topology, devices=None) -> Target:
    from gmod_jax import sharding as shd
    from train import step as step_lib
    from train.loop import resolve_model
    from train import tpu_topology

    devices = tpu_topology.compile_devices(topology) if devices is None else devices
    model = resolve_model(cfg)
    mesh = shd.make_mesh(cfg.mesh, devices)
    # The schedule's length only changes baked-in constants, not shapes or memory.
    total_steps = cfg.num_steps or 1000
    program = step_lib.build_train_program(model, cfg.optim, cfg.global_batch, mesh, total_steps)
    return Target(cfg, model, topology, mesh, program)


def train_step_report(target: Target, layout: Layout, hbm_fraction: float, dump_dir: str | None = None):
    import jax

    from gmod_jax.models.llama import routing_capacity
    from train import step as step_lib

    program, model = target.program, target.model
    seq = target.cfg.data.max_length
    capacity = routing_capacity(model, train_token_types(model, program.micro, seq, layout), "train")
    shapes = {"global_batch": program.accum * program.micro, "grad_accum_steps": program.accum,
              "micro_batch": program.micro, "seq_len": seq, "mod_capacity": capacity,
              "mesh": dict(target.mesh.shape)}

    def lower():
        with jax.set_mesh(target.mesh):
            return program.step(capacity).lower(program.spec.abstract, step_lib.abstract_batch(
                program.spec, program.accum, program.micro, seq))

    return compile_report(TRAIN, lower, target.topology, program.model_flops(seq, capacity), shapes,
                          hbm_fraction, dump_dir)


def generation_reports(target: Target, layout: Layout, hbm_fraction: float,
                       dump_dir: str | None = None) -> list[ProgramReport]:
    import jax
    import jax.numpy as jnp

    from gmod_jax import flops as model_flops
    from gmod_jax import sharding as shd
    from gmod_jax.inference import generate as gen

    model, mesh = target.model, target.mesh
    batch = layout.infer_batch_per_chip * shd.batch_shard_count(mesh)
    types = prompt_token_types(model, batch, layout)
    t = gen.bucket_length(types.shape[1])
    padded = jnp.zeros((batch, t), jnp.int32).at[:, t - types.shape[1]:].set(types)
    spec = gen.CacheSpec(batch=batch, prompt_len=t, new_slots=gen.bucket_length(layout.new_tokens),
                         mod_capacity=gen.mod_prefill_capacity(model, jax.device_get(padded), "inference"))
    rows = shd.batch_sharding(mesh)
    repl = shd.replicated(mesh)
    params = target.program.spec.abstract["params"]

    def sds(shape, dtype, sharding=rows):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    # The model's own input image shape: LLaVA-HR's S x S pixels, MGM-HD's aux image, not CLIP's size.
    prefill_args = (params, sds((batch, t), jnp.int32), sds((batch, *model.pixel_shape), jnp.float32),
                    sds((batch, t), jnp.bool_), sds((batch, t), jnp.int32))
    shapes = {"batch": batch, "prompt_len": t, "new_slots": spec.new_slots, "mod_capacity": spec.mod_capacity,
              "mesh": dict(mesh.shape)}
    kept = spec.mod_capacity or None

    def lower_prefill():
        with jax.set_mesh(mesh):
            return gen.prefill_jit.lower(*prefill_args, config=model, spec=spec)

    prefill, compiled = compile_report(PREFILL, lower_prefill, target.topology,
                                       model_flops.prefill_flops(model, batch, t, kept).useful, shapes, hbm_fraction,
                                       dump_dir)
    reports = [prefill]
    if compiled is None:
        return reports
    logits, cache, _ = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    lower_prefill().out_info, compiled.output_shardings)
    decode_args = (params, cache, logits, sds((batch,), jnp.int32), sds((), jnp.int32, repl),
                   sds((gen.MAX_EOS_IDS,), jnp.int32, repl), sds((), jnp.int32, repl),
                   sds((2,), jnp.uint32, repl), sds((), jnp.float32, repl), sds((), jnp.float32, repl),
                   sds((batch,), jnp.int32))

    def lower_decode():
        with jax.set_mesh(mesh):
            return gen.decode_jit.lower(*decode_args, config=model, spec=spec)

    # One loop iteration = one token per row (decode_flops counts new_tokens - 1 steps).
    per_token = model_flops.decode_flops(model, batch, t, 2, mod_capacity=spec.mod_capacity).useful
    reports.append(compile_report(DECODE, lower_decode, target.topology, per_token, shapes, hbm_fraction,
                                  dump_dir)[0])
    return reports


def with_batch_per_chip(cfg, per_chip: int, batch_shards: int):
    """The recipe with `per_chip` rows per batch shard in each micro-batch (accumulation kept)."""
    return cfg.replace(global_batch=per_chip * batch_shards * cfg.optim.grad_accum_steps)


def find_batch(cfg, topology, devices, layout: Layout, hbm_fraction: float, limit: int = 1024,
               start: int | None = None):
    """Largest per-chip micro-batch whose train step fits in `hbm_fraction` of HBM, by compiling.

    Each compile of a 7B step takes minutes, so candidates are predicted rather than doubled:
    per-chip memory is close to affine in the batch (state + rows x activations), so after two
    fitting sizes the next candidate is the largest batch the line through the two largest fitting
    points allows (once a size fails, the line between it and the largest fitting one), kept
    strictly between the largest fitting and the smallest failing size. The
    search ends when those two are adjacent, so the answer is always confirmed by a compile on
    each side (4 compiles when memory is affine in the batch). `start` (e.g. an earlier answer)
    is compiled first, then its neighbour: 2 compiles when it is still the answer. Returns
    (per_chip or 0, every tried report by size)."""
    from gmod_jax import sharding as shd

    shards = shd.batch_shard_count(shd.make_mesh(cfg.mesh, devices))
    budget = hbm_fraction * topology.chip.hbm_bytes
    tried: dict[int, ProgramReport] = {}

    def fits(b: int) -> bool:
        target = make_target(with_batch_per_chip(cfg, b, shards), topology, devices)
        tried[b] = train_step_report(target, layout, hbm_fraction)[0]
        return tried[b].fits

    lo, hi = 1, None
    if start is not None and start > 1:
        if fits(start):
            lo = start
        else:
            hi = start
    if not (lo > 1 or fits(1)):
        return 0, tried
    b = lo + 1 if hi is None or hi - lo <= 1 else _next_candidate(lo, hi, tried, budget)
    while b <= limit and (hi is None or hi - lo > 1):
        if fits(b):
            lo = b
        else:
            hi = b
        b = _next_candidate(lo, hi, tried, budget)
    return lo, tried


def _next_candidate(lo: int, hi: int | None, tried: dict, budget: float) -> int:
    known = {b: r.per_chip_bytes["total"] for b, r in tried.items() if r.per_chip_bytes}
    points = sorted((b, m) for b, m in known.items() if tried[b].fits)
    guess = 2 * lo
    bracketed = hi in known and lo in known and known[hi] > known[lo]
    if bracketed:
        # Two compiles whose memory is known (a step that does not fit still reports it) on
        # either side: the line between them. Under a convex memory curve it errs low, to a size
        # that fits.
        guess = lo + int((budget - known[lo]) // ((known[hi] - known[lo]) / (hi - lo)))
    elif len(points) >= 2:
        (b0, m0), (b1, m1) = points[-2], points[-1]
        per_row = (m1 - m0) / (b1 - b0)
        if per_row > 0:
            guess = b1 + int((budget - m1) // per_row)
    if hi is None:
        return max(guess, lo + 1)
    # Keep the candidate off the interval's ends so a poor prediction still shrinks it: by a
    # quarter after an extrapolation (bisection's guarantee, nearly), by a sixteenth after an
    # interpolation, which is rarely far off; adjacent sizes are probed once the gap is small.
    margin = max(1, (hi - lo) // (16 if bracketed else 4))
    return min(max(guess, lo + margin), hi - margin)


# ----------------------------------------------------------------------------------------------
# Output


def summary_rows(reports: list[ProgramReport]) -> str:
    head = ("| program | topology | GB/chip (args+out+temp) | HBM | fits | TFLOPs/chip | GB accessed/chip | "
            "collectives | est. s | est. MFU |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in reports:
        mem = f"{r.per_chip_bytes['total'] / 1e9:.1f}" if r.per_chip_bytes else "OOM"
        coll = ", ".join(f"{c['kind']} {c['count']}x {c['bytes'] / 1e9:.2f} GB" for c in r.collectives) or "-"
        lines.append(f"| {r.name} | {r.topology} ({r.chips} chips) | {mem} | {r.hbm_bytes / 1e9:.1f} GB | "
                     f"{'yes' if r.fits else 'no'} | {_fmt(r.flops, 1e12)} | {_fmt(r.bytes_accessed, 1e9)} | "
                     f"{coll} | {_fmt(r.estimated_step_s, 1, '.3g')} | "
                     f"{'-' if r.estimated_mfu is None else f'{r.estimated_mfu:.1%}'} |")
    return "\n".join(lines)


def _fmt(x, scale, spec=".2f"):
    return "-" if x is None else format(x / scale, spec)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.aot",
                                description="Compile a recipe's train / prefill / decode programs for a Cloud TPU "
                                            "topology (no TPU needed; requires the libtpu package).")
    p.add_argument("--config", help="recipe file defining get_config() -> TrainConfig")
    p.add_argument("--topology", help="e.g. v5p-64, v5e-256, v4-32, v6e-16 or v5e:2x2")
    p.add_argument("--rescore", metavar="JSON", help="recompute a --json report (made with --dump-hlo) in place "
                                                      "from its kept HLO, without compiling")
    p.add_argument("--num-slices", type=int, default=1, help="multi-slice: slices joined by DCN (data axis)")
    p.add_argument("--mesh", default=None, help="mesh preset file defining get_mesh()")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config fields (as python -m train)")
    p.add_argument("--programs", default=",".join(PROGRAMS), help=f"comma-separated subset of {PROGRAMS}")
    p.add_argument("--find-batch", action="store_true",
                   help="search the largest per-chip train batch that fits, report the step at that batch")
    p.add_argument("--find-batch-from", type=int, default=None, metavar="N",
                   help="start the search at N rows per chip (e.g. an earlier answer): 2 compiles when N "
                        "still fits and N + 1 does not")
    p.add_argument("--hbm-fraction", type=float, default=0.95, help="a program fits in this share of HBM")
    p.add_argument("--system-tokens", type=int, default=Layout.system_tokens)
    p.add_argument("--prompt-text-tokens", type=int, default=Layout.prompt_text_tokens)
    p.add_argument("--new-tokens", type=int, default=Layout.new_tokens)
    p.add_argument("--infer-batch-per-chip", type=int, default=Layout.infer_batch_per_chip)
    p.add_argument("--json", default=None, help="write the reports here")
    p.add_argument("--dump-hlo", default=None, metavar="DIR", help="keep each program's optimized HLO text here")
    return p


def run(args) -> dict:
    from train import tpu_topology
    from gmod_jax.config_files import apply_overrides
    from train.config import load_mesh_preset, load_recipe

    cfg = load_recipe(args.config)
    if args.mesh:
        cfg = cfg.replace(mesh=load_mesh_preset(args.mesh))
    cfg = apply_overrides(cfg, args.overrides)
    topology = tpu_topology.parse_topology(args.topology, args.num_slices)
    programs = [p.strip() for p in args.programs.split(",") if p.strip()]
    unknown = sorted(set(programs) - set(PROGRAMS))
    if unknown:
        raise ValueError(f"--programs: unknown {unknown}; choose from {PROGRAMS}")
    layout = Layout(args.system_tokens, args.prompt_text_tokens, args.new_tokens, args.infer_batch_per_chip)
    devices = tpu_topology.compile_devices(topology)
    out = {"config": str(args.config), "overrides": list(args.overrides), "topology": topology.describe(),
           # TPU compiler flags change the compiled program (docs/tpu_aot.md: windowed einsums).
           "libtpu_init_args": os.environ.get("LIBTPU_INIT_ARGS", ""),
           "chip_spec": dataclasses.asdict(topology.chip), "layout": dataclasses.asdict(layout)}
    if args.find_batch:
        per_chip, tried = find_batch(cfg, topology, devices, layout, args.hbm_fraction, start=args.find_batch_from)
        # Rows per batch shard (data x fsdp) in each micro-batch: per chip when tensor=1.
        out["find_batch"] = {"per_shard_batch": per_chip, "tried": {
            b: {"fits": r.fits, "total_bytes": (r.per_chip_bytes or {}).get("total"), "error": r.error}
            for b, r in sorted(tried.items())}}
        if per_chip == 0:
            raise SystemExit(f"error: even 1 row per chip does not fit on {topology.describe()}")
        from gmod_jax import sharding as shd

        shards = shd.batch_shard_count(shd.make_mesh(cfg.mesh, devices))
        cfg = with_batch_per_chip(cfg, per_chip, shards)
    target = make_target(cfg, topology, devices)
    out["model"] = {"mod_layers": len(target.model.mod_layers), "mod_implementation": target.model.mod.implementation,
                    "remat": target.model.remat, "dtype": target.model.dtype,
                    # The TPU attention kernel choice, once the model config has one.
                    "attention_implementation": target.model.attention_impl}
    reports: list[ProgramReport] = []
    if TRAIN in programs:
        if args.find_batch and not args.dump_hlo:  # the search compiled exactly this step already
            reports.append(tried[per_chip])
        else:
            reports.append(train_step_report(target, layout, args.hbm_fraction, args.dump_hlo)[0])
    if PREFILL in programs or DECODE in programs:
        reports += [r for r in generation_reports(target, layout, args.hbm_fraction, args.dump_hlo)
                    if r.name in programs]
    out["programs"] = [r.to_dict() for r in reports]
    out["table"] = summary_rows(reports)
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from train import tpu_topology

    if not tpu_topology.libtpu_available():
        print("error: the libtpu package is not installed (pip install -r requirements-dev.txt)", file=sys.stderr)
        return 2
    from gmod_jax.config_files import OverrideError

    try:
        if args.rescore:
            out = rescore(args.rescore)
            args.json = args.json or args.rescore
        elif not (args.config and args.topology):
            raise ValueError("--config and --topology are required (or --rescore JSON)")
        else:
            out = run(args)
    except (OverrideError, ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(out["table"])
    return 0


if __name__ == "__main__":
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    sys.exit(main())
