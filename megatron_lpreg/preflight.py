"""What the command lines check before spawning ranks, so a user's mistake costs one
line and exit status 2 instead of a traceback per rank.

:func:`check_run` (``python -m megatron_lpreg.train``): the wandb package when
``logging.wandb`` is on, paths (model, tokenizer, data, benchmarks), the model's config
against TP/PP (heads, KV heads, FFN width, layers) and its context against the prompt
and response lengths, and the world size against TP x PP (and the step's rows against
DP for the reference's batching). Reading the data itself happens in the ranks; its
errors are reported once (:mod:`megatron_lpreg.job`).
"""

from __future__ import annotations

from pathlib import Path

from megatron_lpreg.trainer import wandb_log


class UserError(ValueError):
    """A problem in the user's config, paths or layout, said in one line."""


def check_model_dir(path: str | Path, what: str) -> None:
    p = Path(path)
    if not str(path):
        raise UserError(f"{what} is not set")
    if not p.is_dir():
        raise UserError(f"{what}={path} does not exist (models are never downloaded: give a local directory)")
    if not (p / "config.json").is_file():
        raise UserError(f"{what}={path} has no config.json: not a Hugging Face model directory")


def check_layout(spec, tp: int, pp: int, world_size: int | None) -> None:
    """TP/PP against the model, and the world size against TP x PP."""
    from megatron_lpreg.model.hf_config import UnsupportedConfig

    try:
        spec.check_parallel(tp, pp)
    except UnsupportedConfig as e:
        raise UserError(str(e)) from None
    if world_size is not None and world_size % (tp * pp):
        raise UserError(f"{world_size} processes do not split into tp={tp} x pp={pp} model-parallel groups; "
                        f"use a multiple of {tp * pp}")


def check_run(cfg, world_size: int | None = None) -> None:
    """Everything about a training run that can be known before its ranks start."""
    from megatron_lpreg.model.hf_config import UnsupportedConfig, load_spec
    from megatron_lpreg.trainer.reference_batching import uses_reference_batching

    if (msg := wandb_log.missing_package(cfg)) is not None:
        raise UserError(msg)
    check_model_dir(cfg.model.hf_dir, "model.hf_dir")
    if cfg.ops.backend == "triton":
        import torch

        if not torch.cuda.is_available():
            raise UserError("ops.backend=triton needs a CUDA GPU (Triton's interpreter is for tests); "
                            "use ops.backend=auto or torch")
    if cfg.model.attention == "te":
        from megatron_lpreg.model.attention import te_available

        if not te_available():
            raise UserError("model.attention=te needs Transformer Engine on a GPU; use model.attention=auto "
                            "(sdpa where TE is missing)")
    if cfg.model.tokenizer_dir and not Path(cfg.model.tokenizer_dir).is_dir():
        raise UserError(f"model.tokenizer_dir={cfg.model.tokenizer_dir} does not exist")
    try:
        spec = load_spec(cfg.model.hf_dir)
    except UnsupportedConfig as e:
        raise UserError(f"model.hf_dir={cfg.model.hf_dir}: {e}") from None
    check_layout(spec, cfg.parallel.tp, cfg.parallel.pp, world_size)
    need = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    if need > spec.max_position_embeddings:
        raise UserError(f"data.max_prompt_tokens + rollout.max_new_tokens = {need} exceed the model's context "
                        f"(max_position_embeddings={spec.max_position_embeddings})")
    data = Path(cfg.data.train_path)
    if not data.is_file():
        raise UserError(f"data.train_path={cfg.data.train_path} does not exist (data is never downloaded: "
                        "give a local .jsonl or .parquet file)")
    if data.suffix not in (".jsonl", ".json", ".parquet"):
        raise UserError(f"data.train_path={cfg.data.train_path}: expected a .jsonl or .parquet file")
    if cfg.eval.every_n_steps:
        from megatron_lpreg.data.prompts import DataError
        from megatron_lpreg.eval.benchmarks import find_file
        from megatron_lpreg.eval.run import benchmark_names

        try:
            for name in benchmark_names(cfg.eval.benchmarks):
                find_file(cfg.eval.data_dir, name)
        except (DataError, ValueError) as e:
            raise UserError(f"eval: {e}") from None
    if world_size is not None and uses_reference_batching(cfg.algo):
        dp = world_size // (cfg.parallel.tp * cfg.parallel.pp)
        rows = cfg.rollout.prompts_per_step * cfg.rollout.n
        if rows % dp:
            raise UserError(f"the reference's batching needs the step's {rows} rows (rollout.prompts_per_step x "
                            f"rollout.n) to divide over {dp} data-parallel ranks")
