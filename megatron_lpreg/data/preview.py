"""Print prompts exactly as a run will feed them, before spending GPUs on it.

    python -m megatron_lpreg.data.preview --config examples/qwen3_14b_lpreg_onpolicy.yaml --n 3
    python -m megatron_lpreg.data.preview --config CONFIG model.hf_dir=/models/x --eval --n 2

One JSON object per line on stdout: ``prompt_text`` (the exact string that is
tokenised), ``prompt_ids`` (after left-truncation to ``data.max_prompt_tokens``),
``answer`` (the ground truth the grader compares with) and, with ``--eval``, the
benchmark and its sampling settings. Training prompts come in the order the
trainer draws them (``data.shuffle_seed``, first epoch). A summary (template, the
token ids that end a response, answer format) goes to stderr. Reads the tokenizer
only: no model weights, no GPU.
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m megatron_lpreg.data.preview", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML run config (see examples/)")
    ap.add_argument("--n", type=int, default=3, help="prompts to print (per benchmark with --eval)")
    ap.add_argument("--eval", action="store_true", help="the evaluation prompts (eval.benchmarks) instead")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.hf_dir=/models/x")
    return ap.parse_args(argv)


def training_prompts(cfg, tokenizer, n: int):
    from megatron_lpreg.data.prompts import ShuffledOrder, get_path, read_rows
    from megatron_lpreg.data.template import encode_prompt, render_prompt

    rows = read_rows(cfg.data.train_path)
    order = ShuffledOrder(len(rows), cfg.data.shuffle_seed)
    for i in order.take(min(n, len(rows))):
        prompt = get_path(rows[i], cfg.data.prompt_key)
        full = encode_prompt(tokenizer, prompt, template=cfg.data.prompt_template, max_tokens=1 << 30)
        yield {"row": i, "prompt_text": render_prompt(tokenizer, prompt, cfg.data.prompt_template),
               "prompt_ids": full[-cfg.data.max_prompt_tokens:],
               "truncated_tokens": max(0, len(full) - cfg.data.max_prompt_tokens),
               "answer": str(get_path(rows[i], cfg.data.answer_key))}


def eval_prompts(cfg, tokenizer, n: int):
    from megatron_lpreg.config import eval_max_new_tokens
    from megatron_lpreg.data.template import encode_prompt, render_prompt
    from megatron_lpreg.eval.benchmarks import BENCHMARKS, find_file, load_benchmark
    from megatron_lpreg.eval.run import benchmark_names, benchmark_prompt, benchmark_sampling

    if not cfg.eval.benchmarks or not cfg.eval.data_dir:
        raise SystemExit("--eval: the config has no eval.benchmarks / eval.data_dir")
    for name in benchmark_names(cfg.eval.benchmarks):
        temperature, top_p, k = benchmark_sampling(cfg.eval, name)
        for p in load_benchmark(find_file(cfg.eval.data_dir, name), BENCHMARKS[name], limit=n):
            text = benchmark_prompt(p.problem, BENCHMARKS[name])
            yield {"benchmark": name, "prompt_text": render_prompt(tokenizer, text, cfg.data.prompt_template),
                   "prompt_ids": encode_prompt(tokenizer, text, template=cfg.data.prompt_template, max_tokens=1 << 30),
                   "answer": p.answer, "temperature": temperature, "top_p": top_p, "k": k,
                   "max_new_tokens": eval_max_new_tokens(cfg)}


def main(argv=None) -> int:
    a = parse_args(argv)
    import transformers

    from megatron_lpreg.config import ConfigError, load_config
    from megatron_lpreg.data.prompts import DataError
    from megatron_lpreg.data.template import TemplateError, end_token_ids

    try:
        cfg = load_config(a.config, a.overrides)
        tok_dir = cfg.model.tokenizer_dir or cfg.model.hf_dir
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir)
        except OSError as e:
            raise SystemExit(f"cannot load a tokenizer from {tok_dir!r} (model.tokenizer_dir / model.hf_dir): "
                             f"{str(e).splitlines()[0]}") from None
        stop = end_token_ids(tokenizer, cfg.model.hf_dir)
        print(f"[preview] template={cfg.data.prompt_template} answer_format={cfg.reward.answer_format} "
              f"stop_ids={list(stop)} {tokenizer.convert_ids_to_tokens(list(stop))}", file=sys.stderr)
        for rec in (eval_prompts if a.eval else training_prompts)(cfg, tokenizer, a.n):
            print(json.dumps(rec, ensure_ascii=False), flush=True)
    except (ConfigError, DataError, TemplateError) as e:
        raise SystemExit(f"preview: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
