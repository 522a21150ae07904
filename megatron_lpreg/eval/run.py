"""Evaluate a policy on benchmarks through a rollout engine, grade with the reward module.

Every rank of the job calls :func:`evaluate` (the engine's collectives); rank 0
grades and broadcasts, as in training.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_lpreg.config import EvalConfig
from megatron_lpreg.data.prompts import encode_prompt
from megatron_lpreg.eval.benchmarks import (
    BENCHMARKS,
    INSTRUCTION,
    PAPER_AVERAGES,
    find_file,
    load_benchmark,
)
from megatron_lpreg.eval.estimators import avg_at_k, mean_pass_at_k
from megatron_lpreg.job import broadcast_object
from megatron_lpreg.rollout.engine import SamplingConfig


def benchmark_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmarks {unknown}; known: {sorted(BENCHMARKS)}")
    return names


def evaluate(engine, tokenizer, ecfg: EvalConfig, pool, *, version: int, max_prompt_tokens: int = 4096,
             apply_chat_template: bool = True, seed: int = 0) -> dict:
    """Returns ``{benchmark: {"avg@k", "pass@k", "pass@1", "problems", "k"}, "average": avg@k mean}``
    (accuracies in percent). ``pool`` grades on rank 0 (None elsewhere)."""
    eos = tokenizer.eos_token_id
    results: dict = {}
    for name in benchmark_names(ecfg.benchmarks):
        spec = BENCHMARKS[name]
        problems = load_benchmark(find_file(ecfg.data_dir, name), spec, limit=ecfg.limit or None)
        full = [encode_prompt(tokenizer, f"{p.problem}\n{INSTRUCTION}", apply_chat_template=apply_chat_template,
                              max_tokens=1 << 30) for p in problems]
        # left truncation keeps the question's end and the generation prompt; counted, not silent
        prompts = [ids[-max_prompt_tokens:] for ids in full]
        truncated = sum(len(ids) > max_prompt_tokens for ids in full)
        sampling = SamplingConfig(n=ecfg.k, temperature=ecfg.temperature, top_p=ecfg.top_p,
                                  max_new_tokens=ecfg.max_new_tokens,
                                  stop_token_ids=(eos,) if eos is not None else (), seed=seed)
        batch = engine.generate(prompts, sampling, expected_version=version)
        scores = None
        if pool is not None:
            texts = [tokenizer.decode(r, skip_special_tokens=True) for r in batch.responses]
            truths = [problems[i].answer for i in batch.prompt_index]
            scores = [g.score for g in pool.score(texts, truths)]
        scores = broadcast_object(scores)
        per_problem = [[] for _ in problems]
        for i, s in zip(batch.prompt_index, scores, strict=True):
            per_problem[i].append(s)
        results[name] = {
            "avg@k": 100 * avg_at_k(per_problem),
            "pass@k": 100 * mean_pass_at_k(per_problem, ecfg.k),
            "pass@1": 100 * mean_pass_at_k(per_problem, 1),
            "problems": len(problems),
            "k": ecfg.k,
            "truncated_prompts": truncated,
        }
    if results:
        results["average"] = sum(r["avg@k"] for r in results.values()) / len(results)
    return results


def report_markdown(results: dict, label: str = "this run") -> str:
    """The paper's table layout: one column per benchmark and the average (avg@k, %),
    with the paper's published averages printed beside for comparison."""
    cols = [n for n in BENCHMARKS]
    head = "| model / method | " + " | ".join(BENCHMARKS[n].title for n in cols) + " | Avg. |"
    sep = "|" + "---|" * (len(cols) + 2)
    k = next((r["k"] for n, r in results.items() if n != "average"), 1)

    def cell(n):
        return f"{results[n]['avg@k']:.2f}" if n in results else "-"

    avg = f"{results['average']:.2f}" if "average" in results else "-"
    lines = [f"avg@{k} (%)", "", head, sep, f"| {label} | " + " | ".join(cell(n) for n in cols) + f" | {avg} |"]
    for setting, rows in PAPER_AVERAGES.items():
        for method, value in rows.items():
            lines.append(f"| paper: {setting} {method} | " + " | ".join("-" for _ in cols) + f" | {value:.2f} |")
    return "\n".join(lines)


def write_report(results: dict, out_prefix: str | Path, label: str = "this run") -> tuple[Path, Path]:
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    md, js = out_prefix.with_suffix(".md"), out_prefix.with_suffix(".json")
    md.write_text(report_markdown(results, label) + "\n")
    js.write_text(json.dumps(results, indent=1) + "\n")
    return md, js
