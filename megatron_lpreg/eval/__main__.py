"""Evaluate a checkpoint: ``python -m megatron_lpreg.eval --checkpoint DIR --benchmarks aime24,math500 --k 16``.

``--checkpoint`` is an HF model directory, a training checkpoint
(``runs/x/checkpoints/step_000100``, optimiser state and all, at any TP) or a
megatron-core distributed checkpoint; for the last two ``--hf-dir`` gives the model
config and tokenizer. A training checkpoint's run config (``runs/x/config.yaml``, or
``--config``) supplies the defaults: model directory, prompt template, answer format,
response length and the eval section (benchmarks, per-benchmark sampling); flags
override them. Benchmarks are read from ``--data-dir/<name>.{jsonl,parquet}``. Writes ``<out>.md`` (the paper's
table layout, with its published rows beside) and ``<out>.json``. Started
without torchrun it relaunches itself with ``--tp`` local processes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megatron_lpreg.data.template import TEMPLATES
from megatron_lpreg.eval.run import DEFAULT_MAX_NEW_TOKENS
from megatron_lpreg.job import finish_job, init_job, relaunch_under_torchrun, report_failure
from megatron_lpreg.preflight import UserError
from megatron_lpreg.reward.extract import ANSWER_FORMATS
from megatron_lpreg.reward.pool import GRADERS

DEFAULT_BENCHMARKS = "aime24,aime25,math500,minerva,olympiadbench"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m megatron_lpreg.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--config", help="the run's config.yaml (default: found beside a training checkpoint)")
    ap.add_argument("--hf-dir", help="HF config + tokenizer (default: the run's model.hf_dir, or --checkpoint "
                                     "when it is an HF dir)")
    ap.add_argument("--benchmarks", help="default: the run's eval.benchmarks, else " + DEFAULT_BENCHMARKS)
    ap.add_argument("--data-dir", help="default: the run's eval.data_dir")
    ap.add_argument("--k", type=int, default=None, help="samples per problem (default: the run's eval.k, else 1)")
    ap.add_argument("--temperature", type=float, default=None,
                    help="default: the run's eval.temperature, else 0 (greedy) for k=1 and 1.0 otherwise")
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--sample", action="append", default=[], metavar="NAMES:key=v,...",
                    help="per-benchmark sampling, e.g. aime24,aime25,amc:temperature=0.6,top_p=1,k=16 "
                         "(repeatable; keys temperature, top_p, k)")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="default: the run's response length (eval.max_new_tokens or rollout.max_new_tokens), "
                         f"else {DEFAULT_MAX_NEW_TOKENS}")
    ap.add_argument("--max-prompt-tokens", type=int, default=4096,
                    help="longer prompts are left-truncated (also capped by the model's context)")
    ap.add_argument("--prompt-template", choices=TEMPLATES, default=None,
                    help="default: the run's data.prompt_template, else chat")
    ap.add_argument("--answer-format", choices=ANSWER_FORMATS, default=None,
                    help="default: the run's reward.answer_format, else any")
    ap.add_argument("--grader", choices=GRADERS, default=None,
                    help="default: the run's reward.grader, else math (coins: the coin task's verifier)")
    ap.add_argument("--limit", type=int, default=0, help="problems per benchmark (0: all)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--engine", choices=["vllm", "torch"], default="vllm")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    ap.add_argument("--out", default="eval_report", help="output prefix (.md and .json)")
    ap.add_argument("--label", default=None, help="row label in the table (default: the checkpoint path)")
    return ap.parse_args(argv)


def run_config_of(checkpoint: Path, given: str | None):
    """The training run's config: ``given``, else ``<out_dir>/config.yaml`` beside a
    training checkpoint (``<out_dir>/checkpoints/step_N``), else None."""
    from megatron_lpreg.config import load_config

    path = Path(given) if given else checkpoint.resolve().parent.parent / "config.yaml"
    if given and not path.exists():
        raise UserError(f"--config {path} does not exist")
    return load_config(path) if path.exists() and (given or checkpoint.parent.name == "checkpoints") else None


def parse_sample(text: str) -> dict:
    """``"aime24,amc:temperature=0.6,k=16"`` -> ``{"aime24": {...}, "amc": {...}}``."""
    names, sep, settings = text.partition(":")
    if not sep or not names.strip():
        raise UserError(f"--sample {text!r}: expected NAMES:key=value,... (e.g. aime24:temperature=0.6,k=16)")
    kinds = {"temperature": float, "top_p": float, "k": int}
    values = {}
    for item in filter(None, (x.strip() for x in settings.split(","))):
        key, eq, raw = item.partition("=")
        if not eq or key not in kinds:
            raise UserError(f"--sample {text!r}: {item!r} is not one of {sorted(kinds)}=value")
        try:
            values[key] = kinds[key](raw)
        except ValueError:
            raise UserError(f"--sample {text!r}: {key}={raw!r} is not a {kinds[key].__name__}") from None
    return {n.strip(): dict(values) for n in names.split(",") if n.strip()}


def eval_settings(a, run):
    """(EvalConfig, prompt template, (grader, answer format)): the command line over the
    run's config over the defaults."""
    from megatron_lpreg.config import EvalConfig, _apply, eval_max_new_tokens

    ecfg = EvalConfig(**vars(run.eval)) if run is not None else EvalConfig()
    ecfg.per_benchmark = dict(ecfg.per_benchmark)
    for field, value in (("benchmarks", a.benchmarks), ("data_dir", a.data_dir), ("k", a.k),
                         ("temperature", a.temperature), ("top_p", a.top_p)):
        if value is not None:
            setattr(ecfg, field, value)
    ecfg.benchmarks = ecfg.benchmarks or DEFAULT_BENCHMARKS
    if run is None and a.temperature is None:
        ecfg.temperature = 0.0 if ecfg.k == 1 else 1.0
    for text in a.sample:
        _apply(ecfg, {"per_benchmark": parse_sample(text)})
    ecfg.max_new_tokens = a.max_new_tokens or (eval_max_new_tokens(run) if run else DEFAULT_MAX_NEW_TOKENS)
    ecfg.limit = a.limit
    if not ecfg.data_dir:
        raise UserError("no benchmark directory: pass --data-dir (or set eval.data_dir in the run's config)")
    template = a.prompt_template or (run.data.prompt_template if run else "chat")
    answer_format = a.answer_format or (run.reward.answer_format if run else "any")
    grader = a.grader or (run.reward.grader if run else "math")
    return ecfg, template, (grader, answer_format)


def checkpoint_kind(ckpt: Path) -> str:
    """``hf`` (config.json + safetensors), ``training`` (a trainer's ``step_N`` with
    ``dist/``) or ``megatron`` (a converted torch_dist checkpoint)."""
    if (ckpt / "config.json").exists() and any(ckpt.glob("*.safetensors")):
        return "hf"
    if (ckpt / "dist").is_dir():
        return "training"
    if (ckpt / ".metadata").exists():
        return "megatron"
    raise UserError(f"{ckpt} is neither an HF model dir nor a megatron checkpoint")


def _load_weights(gpt, spec, ckpt: Path) -> None:
    from megatron_lpreg.model.builder import load_hf_weights
    from megatron_lpreg.model.checkpoint import load_into
    from megatron_lpreg.model.hf_shards import HFShards

    kind = checkpoint_kind(ckpt)
    if kind == "hf":
        load_hf_weights(gpt, spec, HFShards(ckpt).get)
    else:  # a training checkpoint holds the optimiser state too
        load_into(gpt, ckpt / "dist" if kind == "training" else ckpt, allow_extra=True)


def prepare(a):
    """Everything checked before the ranks start: ``(checkpoint, hf_dir, spec, eval config,
    template, answer format)``; a :class:`UserError` names the first problem."""
    from megatron_lpreg.data.prompts import DataError
    from megatron_lpreg.eval.benchmarks import find_file
    from megatron_lpreg.eval.run import benchmark_names
    from megatron_lpreg.model.hf_config import UnsupportedConfig, load_spec
    from megatron_lpreg.preflight import check_layout, check_model_dir

    ckpt = Path(a.checkpoint)
    if not ckpt.exists():
        raise UserError(f"--checkpoint {ckpt} does not exist")
    run = run_config_of(ckpt, a.config)
    hf_dir = Path(a.hf_dir) if a.hf_dir else (Path(run.model.hf_dir) if run else ckpt)
    check_model_dir(hf_dir, "--hf-dir" if a.hf_dir or not run else "the run's model.hf_dir")
    checkpoint_kind(ckpt)
    try:
        spec = load_spec(hf_dir)
    except UnsupportedConfig as e:
        raise UserError(f"{hf_dir}: {e}") from None
    check_layout(spec, a.tp, 1, int(os.environ.get("WORLD_SIZE", a.tp)))
    ecfg, template, grading = eval_settings(a, run)
    if spec.max_position_embeddings - ecfg.max_new_tokens < 1:
        raise UserError(f"max new tokens {ecfg.max_new_tokens} leave no room for a prompt in the model's "
                        f"{spec.max_position_embeddings}-token context")
    try:
        for name in benchmark_names(ecfg.benchmarks):
            find_file(ecfg.data_dir, name)
    except (DataError, ValueError) as e:
        raise UserError(str(e)) from None
    return ckpt, hf_dir, spec, ecfg, template, grading


def main(argv=None) -> int:
    a = parse_args(argv)
    from megatron_lpreg.config import ConfigError

    try:
        ckpt, hf_dir, spec, ecfg, template, grading = prepare(a)
    except (UserError, ConfigError, OSError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"eval: error: {e}", file=sys.stderr)
        return 2
    errors = Path(f"{a.out}.errors")
    rc = relaunch_under_torchrun("megatron_lpreg.eval", argv if argv is not None else sys.argv[1:], a.tp,
                                 command="eval", error_dir=errors)
    if rc is not None:
        return rc
    groups = init_job(a.tp)
    try:
        evaluate_in_ranks(a, groups, ckpt, hf_dir, spec, ecfg, template, grading)
    except Exception as e:  # noqa: BLE001 - reported once, traceback in <out>.errors/
        return report_failure("eval", e, errors)
    finish_job()
    return 0


def evaluate_in_ranks(a, groups, ckpt, hf_dir, spec, ecfg, template, grading) -> None:
    import torch
    import torch.distributed as dist
    import transformers
    from megatron.core import tensor_parallel

    from megatron_lpreg.config import RunConfig
    from megatron_lpreg.data.template import end_token_ids
    from megatron_lpreg.eval.run import evaluate, write_report
    from megatron_lpreg.model.builder import build_gpt
    from megatron_lpreg.reward.pool import VerifierPool, grader_function
    from megatron_lpreg.rollout.factory import make_engine
    from megatron_lpreg.rollout.weight_sync import WeightSync

    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype]
    gpt = build_gpt(spec, params_dtype=dtype).eval()
    _load_weights(gpt, spec, ckpt)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    cfg = RunConfig()
    cfg.model.hf_dir, cfg.model.params_dtype = str(hf_dir), a.dtype
    cfg.parallel.tp, cfg.rollout.engine = a.tp, a.engine
    engine = make_engine(cfg, gpt, spec)
    WeightSync(gpt, spec, engine, groups=groups).sync(0)
    pool = VerifierPool(2, grade_fn=grader_function(*grading)) if dist.get_rank() == 0 else None
    try:
        max_prompt = min(a.max_prompt_tokens, spec.max_position_embeddings - ecfg.max_new_tokens)
        results = evaluate(engine, tokenizer, ecfg, pool, version=0, max_prompt_tokens=max_prompt,
                           prompt_template=template, stop_ids=end_token_ids(tokenizer, hf_dir))
        if dist.get_rank() == 0:
            md, js = write_report(results, a.out, a.label or str(ckpt))
            print(md.read_text())
            print(f"report: {md} {js}")
    finally:
        if pool is not None:
            pool.close()
        if hasattr(engine, "close"):
            engine.close()


if __name__ == "__main__":
    sys.exit(main())
