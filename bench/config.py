"""Benchmark recipes: `BenchConfig` (one per config file, `get_config() -> BenchConfig`) and its cases."""

from __future__ import annotations

import dataclasses
import os

from gmod_jax import flops as F
from gmod_jax.config import ModelConfig, gamma_mod
from train.config import OptimConfig

KINDS = ("prefill", "decode", "train_step")


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class Case:
    """One measurement. `repeats` overrides the config default for this case (big batches can
    afford fewer), so `--set repeats=N` only changes cases that leave it unset."""

    kind: str
    batch: int
    repeats: int | None = None
    new_tokens: int = 32  # decode only

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"case kind must be one of {KINDS}, got {self.kind!r}")
        if self.batch < 1 or (self.kind == "decode" and self.new_tokens < 2):
            raise ValueError(f"bad case {self}")

    @property
    def name(self) -> str:
        if self.kind == "decode":
            return f"decode_b{self.batch}_n{self.new_tokens}"
        return f"{self.kind}_b{self.batch}"


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """A benchmark recipe; config files define `get_config() -> BenchConfig`."""

    section: str  # BENCHMARKS.md section key (markers `<!-- bench:<section>:start/end -->`)
    title: str
    model: ModelConfig  # the dense base model; the γ-MoD twin is derived from it
    cases: tuple[Case, ...]
    placement: str = "arank_mod"  # `config.mod_layer_indices` strategy (official: all but 0,1,2,L-1)
    mod_layers: tuple[int, ...] = ()  # for placement "explicit"
    routing_ratio: float = 0.5
    inference_routing: str = "capacity"  # see the module docstring
    masking: str = "official"
    # Token layout of every sequence: system prefix (BOS, system prompt, "USER:"; 35 in LLaVA's
    # vicuna_v1 template), one image, then question text. Training marks the last
    # `answer_tokens` of the question part as the answer (the only tokens with LM loss).
    system_tokens: int = 35
    question_tokens: int = 29
    answer_tokens: int = 16
    warmup: int = 1
    repeats: int = 5
    seed: int = 0
    # The train-step rows run the trainer's own jitted step (`train.step.make_train_step`) with
    # this optimizer: AdamW + global-norm clip on its schedule, `trainable` selecting what trains
    # (LLaVA stage 2 / γ-MoD fine-tuning: projector + LLM with the router; the tower frozen) and
    # `grad_accum_steps` micro-batches scanned inside the step (a case's batch is the global batch).
    optim: OptimConfig = OptimConfig(lr=1e-5, trainable=(r"^projector/", r"^llm/"))
    xla_flops: bool = True  # compile an unrolled twin of each program to read XLA's FLOP count
    attention_flops: str = "blocked"  # analytic attention counting, see gmod_jax.flops
    # Prefill rows for the official threshold rule (keep iff keep-prob > 0.005, capacity buckets)
    # next to every prefill case, on the γ-MoD model with its router first fitted for
    # `router_fit_steps` Adam steps (learning rate `router_fit_lr` / hidden size, i.e. about that
    # much change of a router logit per step) so that the rule skips about the capacity rule's
    # share of the routable tokens (`bench.router_fit`). The other rows keep the
    # unfitted router.
    official_rule_rows: bool = False
    # The official rule's capacity buckets (`MoDConfig.threshold_buckets`: equal steps of T). A MoD
    # layer runs the smallest bucket holding its kept tokens, so up to T / buckets slots per layer
    # are computed for nothing; finer buckets track the realised skip closer for a larger program.
    threshold_buckets: int = 8
    router_fit_steps: int = 40
    router_fit_lr: float = 1.0
    # The layer weights' form in the prefill and decode programs (`Model.inference_params`):
    # "auto" (per-layer buffers when the copy fits: what `generate` and `Model.forward` run),
    # "stacked" or "unstacked". Training steps always run the stack.
    inference_layers: str = "auto"
    torch_baseline: bool = True  # HF LlavaForConditionalGeneration on the dense weights (prefill)
    torch_attention: str = "sdpa"  # "sdpa" | "eager"
    threads: int | None = None  # torch intra-op threads; None = the cores this process may use
    require_platform: str | None = None  # e.g. "gpu": exit cleanly without running elsewhere
    peak_tflops: float | None = None  # MFU denominator; None = look up the device kind

    def __post_init__(self):
        object.__setattr__(self, "cases", tuple(self.cases))
        object.__setattr__(self, "mod_layers", tuple(self.mod_layers))
        if self.model.mod.enabled:
            raise ValueError("BenchConfig.model is the dense base model (mod disabled)")
        if self.attention_flops not in F.ATTENTION_MODES:
            raise ValueError(f"attention_flops must be one of {F.ATTENTION_MODES}")
        if self.router_fit_steps < 0 or self.router_fit_lr <= 0:
            raise ValueError("router_fit_steps must be >= 0 and router_fit_lr > 0")
        if self.inference_layers not in ("auto", "stacked", "unstacked"):
            raise ValueError("inference_layers must be 'auto', 'stacked' or 'unstacked'")
        if self.warmup < 0 or self.repeats < 1:
            raise ValueError("warmup must be >= 0 and repeats >= 1")
        for c in self.cases:
            if c.kind == "train_step" and c.batch % self.optim.grad_accum_steps:
                raise ValueError(f"case {c.name}: batch {c.batch} is not divisible by "
                                 f"optim.grad_accum_steps {self.optim.grad_accum_steps}")
        names = [c.name for c in self.cases]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate cases: {names}")

    @property
    def seq_len(self) -> int:
        return self.system_tokens + self.model.image_seq_length + self.question_tokens

    def mod_model_config(self) -> ModelConfig:
        config = gamma_mod(self.model, self.placement, self.routing_ratio, self.mod_layers,
                           inference_routing=self.inference_routing, masking=self.masking)
        return config.replace(mod=dataclasses.replace(config.mod, threshold_buckets=self.threshold_buckets))


def load_config(path: str | os.PathLike) -> BenchConfig:
    from gmod_jax.config_files import load_config_file

    return load_config_file(path, BenchConfig)
