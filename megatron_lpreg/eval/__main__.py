"""Evaluate a checkpoint: ``python -m megatron_lpreg.eval --checkpoint DIR --benchmarks aime24,math500 --k 16``.

``--checkpoint`` is an HF model directory, a training checkpoint
(``runs/x/checkpoints/step_000100``) or a megatron-core distributed checkpoint;
for the last two ``--hf-dir`` gives the model config and tokenizer. Benchmarks are
read from ``--data-dir/<name>.{jsonl,parquet}``. Writes ``<out>.md`` (the paper's
table layout, with its published rows beside) and ``<out>.json``. Started
without torchrun it relaunches itself with ``--tp`` local processes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_lpreg.job import finish_job, init_job, relaunch_under_torchrun


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m megatron_lpreg.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--hf-dir", help="HF config + tokenizer (default: --checkpoint when it is an HF dir)")
    ap.add_argument("--benchmarks", default="aime24,aime25,math500,minerva,olympiadbench")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--k", type=int, default=1, help="samples per problem")
    ap.add_argument("--temperature", type=float, default=None, help="default: 0 (greedy) for k=1, else 1.0")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--max-prompt-tokens", type=int, default=4096,
                    help="longer prompts are left-truncated (also capped by the model's context)")
    ap.add_argument("--limit", type=int, default=0, help="problems per benchmark (0: all)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--engine", choices=["vllm", "torch"], default="vllm")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    ap.add_argument("--out", default="eval_report", help="output prefix (.md and .json)")
    ap.add_argument("--label", default=None, help="row label in the table (default: the checkpoint path)")
    ap.add_argument("--no-chat-template", action="store_true")
    return ap.parse_args(argv)


def _load_weights(gpt, spec, ckpt: Path) -> None:
    from megatron_lpreg.model.builder import load_hf_weights
    from megatron_lpreg.model.checkpoint import load_into
    from megatron_lpreg.model.convert import HFShards

    if (ckpt / "config.json").exists() and any(ckpt.glob("*.safetensors")):
        load_hf_weights(gpt, spec, HFShards(ckpt).get)
    elif (ckpt / "dist").is_dir():
        load_into(gpt, ckpt / "dist", allow_extra=True)  # a training checkpoint: optimiser state too
    elif (ckpt / ".metadata").exists():
        load_into(gpt, ckpt, allow_extra=True)
    else:
        raise SystemExit(f"{ckpt} is neither an HF model dir nor a megatron checkpoint")


def main(argv=None) -> int:
    a = parse_args(argv)
    ckpt = Path(a.checkpoint)
    hf_dir = Path(a.hf_dir) if a.hf_dir else ckpt
    if not (hf_dir / "config.json").exists():
        raise SystemExit(f"no config.json in {hf_dir}: pass --hf-dir")
    rc = relaunch_under_torchrun("megatron_lpreg.eval", argv if argv is not None else sys.argv[1:], a.tp)
    if rc is not None:
        return rc

    import torch
    import torch.distributed as dist
    import transformers

    from megatron_lpreg.config import EvalConfig, RunConfig
    from megatron_lpreg.eval.run import evaluate, write_report
    from megatron_lpreg.model.builder import build_gpt
    from megatron_lpreg.model.hf_config import load_spec
    from megatron_lpreg.reward.pool import VerifierPool
    from megatron_lpreg.rollout.weight_sync import WeightSync
    from megatron_lpreg.trainer.setup import make_engine

    init_job(a.tp)
    from megatron.core import tensor_parallel
    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    spec = load_spec(hf_dir)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype]
    gpt = build_gpt(spec, params_dtype=dtype).eval()
    _load_weights(gpt, spec, ckpt)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    cfg = RunConfig()
    cfg.model.hf_dir, cfg.model.params_dtype = str(hf_dir), a.dtype
    cfg.parallel.tp, cfg.rollout.engine = a.tp, a.engine
    engine = make_engine(cfg, gpt, spec)
    WeightSync(gpt, spec, engine).sync(0)
    temperature = a.temperature if a.temperature is not None else (0.0 if a.k == 1 else 1.0)
    ecfg = EvalConfig(benchmarks=a.benchmarks, data_dir=a.data_dir, k=a.k, temperature=temperature,
                      top_p=a.top_p, max_new_tokens=a.max_new_tokens, limit=a.limit)
    pool = VerifierPool(2) if dist.get_rank() == 0 else None
    try:
        max_prompt = min(a.max_prompt_tokens, spec.max_position_embeddings - a.max_new_tokens)
        if max_prompt < 1:
            raise SystemExit(f"--max-new-tokens {a.max_new_tokens} leaves no room for a prompt in the model's "
                             f"{spec.max_position_embeddings}-token context")
        results = evaluate(engine, tokenizer, ecfg, pool, version=0, max_prompt_tokens=max_prompt,
                           apply_chat_template=not a.no_chat_template)
        if dist.get_rank() == 0:
            md, js = write_report(results, a.out, a.label or str(ckpt))
            print(md.read_text())
            print(f"report: {md} {js}")
    finally:
        if pool is not None:
            pool.close()
        if hasattr(engine, "close"):
            engine.close()
    finish_job()
    return 0


if __name__ == "__main__":
    sys.exit(main())
