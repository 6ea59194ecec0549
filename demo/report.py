"""`<workdir>/report.md` and its plots for `python -m demo` (see demo/pipeline.py).

Everything here is read back from the stage outputs (metrics JSONL of each training run, the
ARank report, evaluation metrics, routing summary, timings), so the report can be rewritten
from a finished run at no cost.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

LOSS_PNG = "loss_curves.png"
STAGE_ORDER = ("dataset", "tokenizer", "tfds", "vision", "pretrain", "dense", "arank", "adapt_warmup", "mod_warmup", "adapt", "mod_ft", "dense_ft",
               "eval_dense", "eval_dense_ft", "eval_mod_ft", "routing", "speed")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: Path) -> list[dict]:
    """Training metrics JSONL, one record per logged step (last record wins for a step, so a
    resumed run's overlap is not drawn twice)."""
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if "loss" in rec:
                by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


def plot_losses(root: Path, path: Path) -> None:
    """Stage 1 (dense from scratch) LM loss; stage 2 LM losses of the γ-MoD and dense
    fine-tunes; the γ-MoD router loss and training skip ratio."""
    runs = {name: read_metrics(root / "train" / name / "metrics.jsonl")
            for name in ("pretrain", "dense", "mod_ft", "dense_ft")}
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))

    def curve(ax, recs, key, offset=0, **kw):
        pts = [(r["step"] + offset, r[key]) for r in recs if key in r]
        if pts:
            ax.plot(*zip(*pts), **kw)

    # The question phase continues the captions phase: one step axis for both.
    offset = runs["pretrain"][-1]["step"] if runs["pretrain"] else 0
    curve(axes[0], runs["pretrain"], "lm_loss", color="tab:purple", label="captions (plain)")
    curve(axes[0], runs["dense"], "lm_loss", offset, color="tab:blue", label="questions (vicuna_v1)")
    axes[0].set_title("dense LLaVA: projector + LLM from scratch")
    curve(axes[1], runs["dense_ft"], "lm_loss", color="tab:blue", label="dense fine-tune")
    curve(axes[1], runs["mod_ft"], "lm_loss", color="tab:orange", label="γ-MoD fine-tune")
    axes[1].set_title("stage 2: LM loss, same budget")
    curve(axes[2], runs["mod_ft"], "router_loss", color="tab:red", label="router loss (coef. applied)")
    axes[2].set_title("γ-MoD routing")
    twin = axes[2].twinx()
    curve(twin, runs["mod_ft"], "skip_ratio", color="tab:gray", linestyle="--", label="train skip ratio")
    for kind, color in (("system", "tab:green"), ("image", "tab:purple")):
        curve(twin, runs["mod_ft"], f"skip_ratio/{kind}", color=color, linestyle=":", label=f"{kind} tokens skipped")
    twin.set_ylim(0, 1)
    twin.set_ylabel("skip ratio")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("LM loss (answer tokens)")
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    for ax in (axes[0], axes[1]):
        ax.legend(fontsize=8)
    handles = axes[2].get_legend_handles_labels()
    twin_handles = twin.get_legend_handles_labels()
    axes[2].legend(handles[0] + twin_handles[0], handles[1] + twin_handles[1], fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(x, digits=1):
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def _fmt(x, spec=".2f"):
    return "–" if x is None else format(x, spec)


def _train_skip(run: dict) -> str:
    """Last logged training skip ratio, with the share of each routable token type skipped."""
    by_type = run.get("final_train_skip_by_type") or {}
    parts = ", ".join(f"{kind} {_pct(v)}" for kind, v in by_type.items())
    return _pct(run["final_train_skip_ratio"]) + (f" ({parts})" if parts else "")


def add_patch_table(add, patches: dict, mod_layers, samples: int) -> None:
    """Background vs object patches skipped, per MoD layer and over all of them."""
    o = patches["overall"]
    add(f"Background and object patches ({samples} held-out images, {o['background'] // len(mod_layers)} background "
        f"and {o['objects'] // len(mod_layers)} object patches per layer; a patch is an object patch when it holds "
        "any pixel of a shape, the scene's `patch_objects` map, outlined red in the overlays below):\n")
    add("| MoD layer | background patches skipped | object patches skipped | image tokens skipped "
        "| background share of skipped |\n|---|---|---|---|---|")
    rows = [(f"layer {l}", e) for l, e in zip(mod_layers, patches["per_layer"])] + [("**all MoD layers**", o)]
    for label, e in rows:
        add(f"| {label} | {_pct(e['background_skipped'])} | {_pct(e['object_skipped'])} | {_pct(e['image_skipped'])} "
            f"| {_pct(e['background_share'])} |")
    add("")


def write_report(root: Path, cfg, s: dict) -> Path:
    """Write `report.md` (and the loss plot) from a run summary (`demo.run_demo`)."""
    root = Path(root)
    plot_losses(root, root / LOSS_PNG)
    ev, sp, rt, ar = s["eval"], s["speed"], s["routing"], s["arank"]
    m = s["model"]
    v, t = m["vision"], m["text"]
    n_layers = t["num_layers"]
    mod_layers = s["mod_layers"]
    lines: list[str] = []
    add = lines.append

    add("# γ-MoD demo on the embedded synthetic task\n")
    add("Generated by `python -m demo` (`make demo`). Every number below was measured by this run; "
        "rerunning reuses the finished stages and rewrites this file.\n")

    add("## Acceptance targets\n")
    add("| target | this run | |\n|---|---|---|")
    for c in s["criteria"]:
        add(f"| {c['what']} | {c['value']} | {'✅' if c['ok'] else '❌ missed'} |")
    add("")

    add("## Results on the held-out split\n")
    add(f"{ev['dense']['n']} held-out questions about {s['dataset']['images']} unseen images, each asked alone "
        "(`<image>` + question, vicuna_v1 template), greedy batched generation, scored by exact match of the "
        "short answer (`python -m gmod_jax.eval --benchmark gqa` on the split written in GQA's format). Skip "
        "ratios are over the MoD layers' prefill; *routable* = the token types masked routing lets the "
        f"router skip ({', '.join(rt['routable_types'])}).\n")
    add("| model | accuracy | colour | count | presence | position | prefill skip (all prompt tokens) "
        "| routable tokens skipped | LLM prefill GFLOPs / sample (paper formula) |")
    add("|---|---|---|---|---|---|---|---|---|")
    rows = (("dense, stage 1 (from scratch)", "dense"), ("dense fine-tune (baseline)", "dense_ft"),
            (f"γ-MoD fine-tune ({len(mod_layers)}/{n_layers} MoD layers)", "mod_ft"))
    for label, key in rows:
        e = ev[key]
        fam = e["per_family"]
        routable = _pct(rt["routable_skip"]) if key == "mod_ft" else "0%"
        add(f"| {label} | **{e['accuracy']:.2f}%** | " + " | ".join(_fmt(fam.get(f), ".1f") for f in
                                                                   ("colour", "count", "presence", "position"))
            + f" | {_pct(e['prefill_skip_ratio'])} | {routable} | {e['flops'].get('tflops', 0) * 1e3:.4f} |")
    add("")
    kinds = sorted(ev["dense"]["per_kind"])
    add("Accuracy per question kind (%):\n")
    add("| model | " + " | ".join(kinds) + " |")
    add("|---|" + "---|" * len(kinds))
    for label, key in rows:
        add(f"| {label} | " + " | ".join(_fmt(ev[key]["per_kind"].get(k), ".1f") for k in kinds) + " |")
    add("")
    per_layer = ev["mod_ft"]["prefill_skip_ratio_per_layer"]
    add("γ-MoD prefill skip ratio per MoD layer (all prompt tokens): "
        + ", ".join(f"layer {l}: {_pct(x)}" for l, x in zip(mod_layers, per_layer)) + ".\n")

    add("## Prefill speed\n")
    add(f"The γ-MoD checkpoint's prefill with MoD routing vs the same weights with every layer dense "
        f"(`mode=\"dense\"`), same process, same {sp['batch']} held-out prompts padded to {sp['prompt_bucket']} "
        f"tokens, one new token; median of {sp['repeats']} timed calls after a compiling warm-up, on "
        f"{s['cpu_count']} CPU cores ({sp['rule']} routing, {sp['mod_capacity']} static slots per MoD layer).\n")
    add("| | ms / sample | analytic prefill GFLOPs / sample |\n|---|---|---|")
    add(f"| dense (`mode=\"dense\"`) | {sp['ms_per_sample_dense']:.3f} | {sp['flops_dense'] / 1e9:.4f} |")
    add(f"| γ-MoD | {sp['ms_per_sample_mod']:.3f} | {sp['flops_mod'] / 1e9:.4f} |")
    add(f"| **speed-up** | **{sp['speedup']:.2f}×** | FLOP bound {_fmt(sp['flop_bound_speedup'])}× |")
    add("")

    add("## ARank\n")
    add(f"ARank (rank of each layer's attention maps, mean over heads) of the dense model on "
        f"{ar['num_samples']} held-out image questions (`gmod_jax.arank.cli`). Rule: {ar['rule']} "
        f"(the paper keeps 4 of 32 layers dense; {cfg.num_dense} of {n_layers} here). MoD layers: "
        f"{ar['mod_layers']}; dense: {ar['dense_layers']}.\n")
    if ar.get("tie_break"):
        add(f"ARank tied at the dense/MoD boundary (its own rule would make only {ar['arank_mod_layers']} MoD); "
            "the tie was broken towards keeping earlier layers dense, as the paper's result for Vicuna does.\n")
    add("![ARank per layer](arank/arank.png)\n")
    add("| layer | " + " | ".join(str(i) for i in range(n_layers)) + " |")
    add("|---|" + "---|" * n_layers)
    add("| ARank | " + " | ".join(f"{x:.1f}" for x in ar["per_layer_mean"]) + " |")
    add("| kind | " + " | ".join("MoD" if i in ar["mod_layers"] else "dense" for i in range(n_layers)) + " |\n")

    add("## Training\n")
    add(f"![loss curves]({LOSS_PNG})\n")
    dt, ft = s["dense_train"], s["finetune"]
    dcfg, fcfg = cfg.dense_train, cfg.finetune
    add("| run | data | init | trainable | steps × batch | lr (peak, schedule) | final LM loss | final router loss "
        "| train skip | time |")
    add("|---|---|---|---|---|---|---|---|---|---|")
    st = s["stage_seconds"]
    if s.get("vision") and cfg.vision_pretrain is not None:
        vs, vcfg = s["vision"], cfg.vision_pretrain
        placed, named = vs.get("heldout_position_accuracy"), vs.get("heldout_attribute_accuracy")
        labels = ["content"] + (["shape, colour, size"] if named is not None else []) \
            + (["row, column"] if placed is not None else [])
        add(f"| vision tower (CLIP's stand-in) | {'; '.join(labels)} per patch | random | vision tower, linear read-outs "
            f"| {vs['steps']} × {vs['batch']} | {vcfg.lr:g}, cosine | {vs['loss'][-1][1]:.4f} (held-out patches "
            f"{vs['heldout_token_accuracy']:.1%} right"
            + (f", object patches {vs['heldout_object_token_accuracy']:.1%}"
               if vs.get("heldout_object_token_accuracy") is not None else "")
            + (f", attributes {named:.1%}" if named is not None else "")
            + (f", placed {placed:.1%}" if placed is not None else "") + f") | – | – | {st['vision']:.0f} s |")
    if s.get("pretrain") and cfg.pretrain is not None:
        pt, pcfg = s["pretrain"], cfg.pretrain
        add(f"| dense, captions | captions, `plain` | {'vision run' if s.get('vision') else 'random'} "
            f"| {', '.join(pcfg.optim.trainable)} "
            f"| {pt['steps']} × {pcfg.global_batch} | {pcfg.optim.lr:g}, {pcfg.optim.schedule} "
            f"| {_fmt(pt['final_lm_loss'], '.4f')} | – | – | {st['pretrain']:.0f} s |")
    dense_init = "captions run" if cfg.pretrain is not None else "vision run" if s.get("vision") else "random"
    add(f"| dense, questions | QA, vicuna_v1 | {dense_init} "
        f"| {', '.join(dcfg.optim.trainable)} | {dt['steps']} × {dcfg.global_batch} "
        f"| {dcfg.optim.lr:g}, {dcfg.optim.schedule} | {_fmt(dt['final_lm_loss'], '.4f')} | – | – "
        f"| {st['dense']:.0f} s |")
    for key, label, init in (("mod_ft", "γ-MoD fine-tune", "adapted dense"), ("dense_ft", "dense fine-tune",
                                                                              "dense")):
        r = ft[key]
        add(f"| {label} | QA, vicuna_v1 | {init} | {', '.join(fcfg.optim.trainable)} | {r['steps']} × {fcfg.global_batch} "
            f"| {fcfg.optim.lr:g}, {fcfg.optim.schedule} | {_fmt(r['final_lm_loss'], '.4f')} "
            f"| {_fmt(r['final_router_loss'], '.4f')} | {_train_skip(r)} | {st[key]:.0f} s |")
    add("")
    add("There is no pretrained CLIP or LLM here. "
        + ("The vision tower is first trained on its own to label the content of the scene cell under each "
           "patch" + (", that content's shape, colour and size on their own"
                      if cfg.vision_pretrain.attribute_labels else "")
           + (" and the patch's row and column" if cfg.vision_pretrain.position_labels else "")
           + " (standing in for CLIP's pretraining; `demo.vision`) and then stays frozen; "
           if cfg.vision_pretrain is not None else "The vision tower starts from random weights; ")
        + "the model (the trainable parts as in the table, the LLM from random weights) is trained "
        + ("first on the captions with LLaVA's stage-1 `plain` template (the caption right after the image), "
           "then on the questions with vicuna_v1. "
           if cfg.pretrain is not None else "on the questions with vicuna_v1. ")
        + "LLaVA itself aligns a frozen pretrained CLIP to a pretrained LLM on captions and then "
        "instruction-tunes. The γ-MoD stage follows the paper: ARank on the dense model, adaptation, then a "
        "fine-tune with the vision tower frozen and the projector, LLM and shared router trained with masked "
        f"routing learning (masking `{cfg.masking}`, routing ratio {cfg.routing_ratio}) and the routing loss; "
        "the dense baseline gets the same fine-tune without MoD.\n")

    add("## Where γ-MoD skips\n")
    add(f"Routing of {rt['samples']} held-out prompts followed by the model's own answer (teacher forced, "
        f"as the paper's Fig. 4) with the inference rule (`{rt['rule']}`): skip rate by token type over the "
        "MoD layers, and for a few images the patches each MoD layer skipped, greyed out.\n")
    add("![skip rate by token type](routing/skip_rate_by_token_type.png)\n")
    add("| token type | tokens per layer | skipped | mean keep-prob |\n|---|---|---|---|")
    for name, r in rt["by_type"].items():
        add(f"| {name} | {r['tokens']} | {_pct(r['overall'])} | {_fmt(rt['keep_prob_mean_by_type'].get(name), '.3f')} |")
    add("")
    if rt.get("patches"):
        add_patch_table(add, rt["patches"], rt["mod_layers"], rt["samples"])
    for o in rt["overlays"]:
        add(f"**{o['question']}** model: *{o['answer']}*, gold: *{o['gold']}* — patches skipped per MoD layer: "
            + ", ".join(f"{x:.0%}" for x in o["patch_skip_per_layer"]) + "\n")
        add(f"![routing overlay](routing/{o['file']})\n")

    add("## Set-up\n")
    syn = cfg.synthetic
    add(f"- **Data**: {cfg.num_train} training and {cfg.num_eval} held-out procedurally drawn scenes "
        f"({syn.image_size}×{syn.image_size} px, {syn.grid}×{syn.grid} grid, {syn.min_objects}–{syn.max_objects} "
        f"objects, shapes {', '.join(syn.shapes)}, colours {', '.join(syn.colors)}), 1–{syn.max_turns} "
        "questions per image about colour, count, presence and position "
        f"(`gmod_jax.data.synthetic`, seed {cfg.seed}). LLaVA JSON + PNGs in `data/synthetic/`, pre-tokenised "
        "into a TFDS ArrayRecord dataset (`data/tfds/`) that training reads through the Grain pipeline.")
    tk = s["tokenizer"]
    add(f"- **Tokenizer**: SentencePiece BPE trained on the training text, {tk['vocab_size']} pieces with byte "
        f"fallback, `<image>` = id {tk['image_token_id']}, `<pad>` = id {tk['pad_id']}.")
    add(f"- **Model**: CLIP-style ViT {v['num_layers']} layers × {v['hidden_size']} (patch {v['patch_size']}, "
        f"{(v['image_size'] // v['patch_size']) ** 2} image tokens, feature layer {v['feature_layer']}), "
        f"{m['projector']['type']} projector, LLaMA decoder {n_layers} layers × {t['hidden_size']} "
        f"(FFN {t['intermediate_size']}, {t['num_heads']} heads), vocab {t['vocab_size']}; vicuna_v1 template "
        f"(prompts up to {s['prompt_bucket']} tokens).")
    add(f"- **γ-MoD**: MoD layers {mod_layers} from ARank, one router shared by all of them, "
        f"routing ratio {cfg.routing_ratio}, masking `{cfg.masking}`, inference rule `{sp['rule']}`"
        + (f", options {dict(cfg.mod_options)}" if cfg.mod_options else "") + "."
        + (f" Router probe (issue 26; not the paper's method): start `{cfg.router_start}`"
           + (f", the first {cfg.router_warmup_steps} fine-tune steps with every token kept"
              if cfg.router_warmup_steps else "") + "."
           if cfg.router_start != "random" or cfg.router_warmup_steps else ""))
    add("")

    add("## Stage times\n")
    add(f"Machine: {s['cpu_count']} CPU cores ({platform.processor() or platform.machine()}), load average "
        f"{s['load_average_start'][0]:.1f} at the start and {s['load_average_end'][0]:.1f} at the end of this "
        "invocation. *cached* = reused from an earlier run (its time is from that run).\n")
    add("| stage | seconds | |\n|---|---|---|")
    for name in STAGE_ORDER:
        if name in st:
            add(f"| {name} | {st[name]:.1f} | {'cached' if name in s['cached'] else 'ran'} |")
    add(f"| **all stages** | **{sum(st.values()):.1f}** ({sum(st.values()) / 60:.1f} min) | |")
    add(f"| this invocation | {s['total_seconds_this_run']:.1f} | |\n")

    add("## Files\n")
    add("`ckpt/{dense,mod_init,mod_ft,dense_ft}/` gmod-jax checkpoints (load with `gmod_jax.load`); "
        "`train/*/metrics.jsonl` training logs; `arank/arank.json`; `eval/*/metrics.json` and `answers.jsonl`; "
        "`routing/routing_summary.json`; `summary.json` (all numbers of this report); `stages/*.json` "
        "(stage stamps).\n")
    path = root / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path
