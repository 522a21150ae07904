"""Evaluate a policy on benchmarks through a rollout engine, grade with the reward module.

Every rank of the job calls :func:`evaluate` (the engine's collectives); rank 0
grades and broadcasts, as in training.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_lpreg.collectives import broadcast_object
from megatron_lpreg.config import BenchmarkSampling, EvalConfig
from megatron_lpreg.data.template import encode_prompt
from megatron_lpreg.eval.benchmarks import (
    BENCHMARKS,
    INSTRUCTION,
    PAPER_AVERAGES,
    PAPER_BENCHMARKS,
    BenchmarkSpec,
    find_file,
    load_benchmark,
)
from megatron_lpreg.eval.estimators import avg_at_k, mean_pass_at_k
from megatron_lpreg.rollout.engine import SamplingConfig


def benchmark_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmarks {unknown}; known: {sorted(BENCHMARKS)}")
    return names


DEFAULT_MAX_NEW_TOKENS = 1024  # when neither the caller nor the eval section sets one


def benchmark_sampling(ecfg: EvalConfig, name: str) -> tuple[float, float, int]:
    """(temperature, top_p, k) of one benchmark: its ``per_benchmark`` entry, else the section's."""
    unknown = sorted(set(ecfg.per_benchmark) - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"eval.per_benchmark names unknown benchmarks {unknown}; known: {sorted(BENCHMARKS)}")
    o = ecfg.per_benchmark.get(name) or BenchmarkSampling()
    return (ecfg.temperature if o.temperature is None else o.temperature,
            ecfg.top_p if o.top_p is None else o.top_p,
            ecfg.k if o.k is None else o.k)


def benchmark_prompt(problem: str, spec: BenchmarkSpec | None = None) -> str:
    """The user message of an evaluation problem; the run's template wraps it."""
    if spec is not None and not spec.instruction:
        return problem
    return f"{problem}\n{INSTRUCTION}"


def evaluate(engine, tokenizer, ecfg: EvalConfig, pool, *, version: int, max_prompt_tokens: int = 4096,
             max_new_tokens: int | None = None, prompt_template: str = "chat",
             stop_ids: tuple[int, ...] | None = None, seed: int = 0) -> dict:
    """Returns ``{benchmark: {"avg@k", "pass@k", "pass@1", "problems", "k", "temperature", ...},
    "average": avg@k mean}`` (accuracies in percent; the average is over the paper's five
    benchmarks when any of them ran). ``pool`` grades on rank 0 (None elsewhere);
    ``stop_ids`` default to the tokenizer's eos."""
    if stop_ids is None:
        stop_ids = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
    max_new_tokens = max_new_tokens or ecfg.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    results: dict = {}
    for name in benchmark_names(ecfg.benchmarks):
        spec = BENCHMARKS[name]
        temperature, top_p, k = benchmark_sampling(ecfg, name)
        problems = load_benchmark(find_file(ecfg.data_dir, name), spec, limit=ecfg.limit or None)
        full = [encode_prompt(tokenizer, benchmark_prompt(p.problem, spec), template=prompt_template, max_tokens=1 << 30)
                for p in problems]
        # left truncation keeps the question's end and the generation prompt; counted, not silent
        prompts = [ids[-max_prompt_tokens:] for ids in full]
        truncated = sum(len(ids) > max_prompt_tokens for ids in full)
        sampling = SamplingConfig(n=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                  stop_token_ids=tuple(stop_ids), seed=seed)
        batch = engine.generate(prompts, sampling, expected_version=version)
        scores = None
        if pool is not None:
            texts = [tokenizer.decode(r, skip_special_tokens=True) for r in batch.responses]
            truths = [problems[i].answer for i in batch.prompt_index]
            scores = [g.score for g in pool.score(texts, truths)]
        scores = broadcast_object(scores)
        per_problem = [[] for _ in problems]
        firsts = [set() for _ in problems]
        for i, s, r in zip(batch.prompt_index, scores, batch.responses, strict=True):
            per_problem[i].append(s)
            if len(r):
                firsts[i].add(int(r[0]))
        strategies = None
        if spec.strategy is not None:
            found = [set() for _ in problems]
            for i, r in zip(batch.prompt_index, batch.responses, strict=True):
                strategy = spec.strategy(problems[i].problem, tokenizer.decode(r, skip_special_tokens=True))
                if strategy is not None:
                    found[i].add(strategy)
            strategies = sum(len(f) for f in found) / len(problems)
        results[name] = {
            "avg@k": 100 * avg_at_k(per_problem),
            "pass@k": 100 * mean_pass_at_k(per_problem, k),
            "pass@1": 100 * mean_pass_at_k(per_problem, 1),
            "problems": len(problems),
            "k": k,
            "temperature": temperature,
            "top_p": top_p,
            "max_new_tokens": max_new_tokens,
            "truncated_prompts": truncated,
            "truncated_responses": sum(f == "length" for f in batch.finish_reasons),
            # how many ways a problem's samples begin (phrasings included)
            "distinct_first_tokens": sum(len(f) for f in firsts) / len(problems),
        }
        if strategies is not None:  # distinct solution strategies among a problem's samples
            results[name]["strategies"] = strategies
    if results:
        in_average = [n for n in results if n in PAPER_BENCHMARKS] or list(results)
        results["average"] = sum(results[n]["avg@k"] for n in in_average) / len(in_average)
    return results


def report_markdown(results: dict, label: str = "this run") -> str:
    """The paper's table layout: one column per benchmark of the paper (and any other that
    ran, e.g. AMC) and the average over the paper's five (avg@k, %), with the paper's
    published averages printed beside for comparison."""
    cols = list(PAPER_BENCHMARKS) + [n for n in BENCHMARKS if n not in PAPER_BENCHMARKS and n in results]
    head = "| model / method | " + " | ".join(BENCHMARKS[n].title for n in cols) + " | Avg. |"
    sep = "|" + "---|" * (len(cols) + 2)
    ks = {r["k"] for n, r in results.items() if n != "average"}
    k = ks.pop() if len(ks) == 1 else "k"

    def cell(n):
        return f"{results[n]['avg@k']:.2f}" if n in results else "-"

    avg = f"{results['average']:.2f}" if "average" in results else "-"
    settings = ", ".join(f"{n}: k={r['k']} T={r['temperature']:g}" for n, r in results.items() if n != "average")
    lines = [f"avg@{k} (%); {settings}", "", head, sep, f"| {label} | " + " | ".join(cell(n) for n in cols) + f" | {avg} |"]
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
