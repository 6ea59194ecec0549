"""The benchmark's BENCHMARKS.md section, rendered from a result dict (written through
`gmod_jax.benchmarks_md`, which owns the section markers)."""

from __future__ import annotations


def fmt(v, spec=".1f", none="–"):
    return none if v is None else format(v, spec)


def _gflop(a, x):
    return f"{fmt(a and a / 1e9, '.1f')} / {fmt(x and x / 1e9, '.1f')}"


def _ms(stats: dict | None):
    if not stats:
        return "–"
    return f"{stats['median_ms']:.1f} [{stats['iqr_ms']:.1f}; {stats['min_ms']:.1f}]"


def render_markdown(result: dict, command: str) -> str:
    cfg, m = result["config"], result["machine"]
    model, text, vision = cfg["model"], cfg["model"]["text"], cfg["model"]["vision"]
    lines = [
        f"## {cfg['title']}",
        "",
        f"Written by `{command}` on {result['date']}.",
        "",
        f"- **Machine**: {m['cpu']} ({m['cores_usable']} usable of {m['cores']} cores), JAX platform "
        f"`{m['platform']}` ({m['device_kind']}); load average {m.get('load_avg_start')} at start, "
        f"{m.get('load_avg_end')} at end. jax {m['jax']}, jaxlib {m['jaxlib']}, flax {m['flax']}, "
        f"torch {m['torch']}, transformers {m['transformers']}.",
        f"- **Model** (random weights, {model['dtype']}): LLaMA d={text['hidden_size']}, "
        f"ffn={text['intermediate_size']}, {text['num_layers']} layers, {text['num_heads']} heads "
        f"({text['num_kv_heads']} kv), vocab {text['vocab_size']}; CLIP d={vision['hidden_size']}, "
        f"{vision['num_layers']} layers, {vision['image_size']}px/{vision['patch_size']} → "
        f"{result['image_tokens']} image tokens; projector {model['projector']['type']}. "
        f"γ-MoD layers {cfg['mod_layers_resolved']} ({len(cfg['mod_layers_resolved'])} of {text['num_layers']}, "
        f"placement `{cfg['placement']}`), one shared router.",
        f"- **Inputs**: {cfg['system_tokens']} system + {result['image_tokens']} image + {cfg['question_tokens']} "
        f"question tokens = {cfg['seq_len']} per row (training: the last {cfg['answer_tokens']} are the answer).",
        f"- **Routing**: {cfg['routing_rule']}, ratio {cfg['routing_ratio']}. Decode: {cfg['decode_rule']}.",
        f"- **Timing**: AOT-compiled, {cfg['warmup']} warm-up run(s) dropped, then dense and MoD interleaved; "
        f"cells are median [IQR; min] ms over the repeats; speedup = dense median / MoD median.",
    ]
    fit = result.get("router_fit")
    if fit:
        lines.append(
            f"- **Official rule rows** (`prefill_official_*`): keep iff keep-prob > 0.005 with capacity buckets, "
            f"on the γ-MoD model whose router was first fitted ({fit['steps']} Adam steps of a routing-only loss "
            f"towards the capacity rule's top-k on the {fit['rows']} prefill prompts, "
            f"{fit['fit_s']:.0f} s){_calibration(fit)}: the rule skips {fit['official_routable_skip']:.3f} of the "
            f"routable tokens (capacity rule {fit['target_routable_skip']:.3f}; "
            f"{fit['official_routable_skip_before']:.3f} before the fit). The other rows use the unfitted router.")
    if result.get("torch"):
        tinfo = result["torch"]
        if "skipped" in tinfo:
            lines.append(f"- **PyTorch baseline**: skipped ({tinfo['skipped']}).")
        else:
            lines.append(f"- **PyTorch baseline**: HF transformers {tinfo['transformers']} "
                         f"`LlavaForConditionalGeneration`, {tinfo['dtype']}, attention `{tinfo['attention']}`, "
                         f"{tinfo['threads']} threads, `inference_mode`, same dense weights and inputs; prefill: "
                         f"last-position logits; decode: greedy `generate` with its KV cache, no EOS, decode loop "
                         f"= time of n new tokens − time of 1.")
    lines += [
        "",
        "| case | B | T | dense ms | γ-MoD ms | speedup | FLOP bound | speedup / bound | skip | "
        "GFLOP dense (analytic / XLA) | GFLOP γ-MoD (analytic / XLA) | compile s (dense / γ-MoD) | "
        "torch dense ms | decode tok/s (dense / γ-MoD) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["cases"]:
        if "skipped" in r:
            lines.append(f"| {r['name']} | {r['batch']} | | skipped: {r['skipped']} | | | | | | | | | | |")
            continue
        tok = (f"{r['tokens_per_s_dense']:.1f} / {r['tokens_per_s_mod']:.1f}" if r["kind"] == "decode" else "–")
        torch_ms = _ms(r.get("torch_dense_stats"))
        if r.get("tokens_per_s_torch"):
            tok += f" (torch {r['tokens_per_s_torch']:.1f})"
            torch_ms = f"{r['torch_decode_ms']:.1f} (decode loop)"
        lines.append(
            f"| {r['name']} | {r['batch']} | {r['seq_len']} | {_ms(r['dense_stats'])} | {_ms(r['mod_stats'])} | "
            f"{fmt(r['speedup'], '.2f')}× | {fmt(r['flop_bound_speedup'], '.2f')}× | "
            f"{fmt(r['speedup_over_bound'], '.2f')} | {r['skip_ratio']:.3f} | "
            f"{_gflop(r['dense_flops_analytic'], r['dense_flops_xla'])} | "
            f"{_gflop(r['mod_flops_analytic'], r['mod_flops_xla'])} | "
            f"{r['compile_s_dense']:.1f} / {r['compile_s_mod']:.1f} | "
            f"{torch_ms} | {tok} |")
    if any(r.get("mfu_dense") is not None for r in result["cases"]):
        lines += ["", "MFU (analytic FLOPs / time / bf16 peak "
                  f"{fmt(result.get('peak_tflops'), '.0f')} TFLOP/s): " + "; ".join(
                      f"{r['name']} dense {100 * r['mfu_dense']:.1f}%, γ-MoD {100 * r['mfu_mod']:.1f}%"
                      for r in result["cases"] if r.get("mfu_dense") is not None) + "."]
    paper = result.get("paper_formula")
    if paper:
        lines += ["", f"The paper's TFLOPs formula (LLM decoder only, F(L)=8Ld²+4L²d+6Ld·d_ff, "
                  f"{paper['n_dense']} dense + {paper['n_mod']} MoD layers) at L={paper['seq_len']}: dense "
                  f"{paper['dense_tflops']:.4f}, γ-MoD at skip {paper['skip_ratio']:.3f} {paper['mod_tflops']:.4f} "
                  f"TFLOPs ({paper['dense_tflops'] / paper['mod_tflops']:.2f}×)."]
    lines += ["", "**How to read.** *FLOP bound* = analytic dense FLOPs / analytic γ-MoD FLOPs at the realised "
              "skip ratio (vision tower, projector, every decoder layer with GQA widths, QKᵀ/AV over the "
              "block-causal pairs the attention executes, router, lm_head on the last position for prefill and on all positions for training; "
              "training = 3× forward for the trainable parts, 1× for the frozen tower): the speedup a perfect "
              "implementation would reach. *speedup / bound* near 1 means routing overhead (router, top-k, "
              "gather/scatter) costs nothing measurable; well below 1 means it does. *skip* = tokens not "
              "processed / tokens entering, over all MoD layers (decode rows: over decode tokens). XLA FLOPs "
              "come from XLA's cost analysis of a fully unrolled twin of each program and include elementwise "
              "ops the analytic count leaves out (a few % above it); decode loops have no XLA count (a "
              "data-dependent while loop). Decode tok/s = batch × (new tokens − 1) / decode-loop time (the "
              "first new token comes from the prefill); a MoD layer's compute is skipped in a step when every row's "
              "keep-prob is below the decode threshold (at batch 1: the row's own decision); rows that skip a "
              "computed layer are masked, and the shorter MoD-layer KV caches save the rest. The PyTorch column is HF eager-mode Python, a "
              "reference point, not a tuned baseline. Timings on a shared machine are noisy: compare ratios "
              "within one run, and check the load average above."]
    return "\n".join(lines) + "\n"


def _calibration(fit: dict) -> str:
    """The router-scale calibration's part of the official-rule line (absent in older JSONs)."""
    if "router_scale" not in fit or fit["router_scale"] == 1.0:
        return ""
    return (f", then the router kernel scaled by {fit['router_scale']:.3g} so that the official walk skips the "
            f"target share ({fit['official_routable_skip_fitted']:.3f} of the routable tokens before scaling, "
            f"{len(fit['calibration'])} probes)")
