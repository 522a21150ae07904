"""Markdown tables of measured benchmark runs, from their JSON in bench/results/.

    python bench/tables.py bench/results/vocab_parallel_cpu.json
    python bench/tables.py bench/results/weight_sync_cpu.json

Each benchmark (``make bench``) prints one JSON document; a measured run is kept in
``bench/results/``. This prints the table docs/benchmarks.md shows for it (the table's
marker names this command; ``tests/test_docs_tables.py`` checks they agree). Reads
files only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MIB = 2 ** 20


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def header(*names) -> list[str]:
    return [row(*names), "|" + "---|" * len(names)]


def vocab_parallel(d: dict) -> list[str]:
    """(a) this op, (b) the naive dense path, (c) megatron's CE; old-policy pass and update pass."""
    out = header("tokens", "TP", "(a) s", "(c) s", "a/c time", "update pass a/c time", "(b) s",
                 "(a) peak extra", "(b) peak extra", "a/b peak extra")
    for r in d["rows"]:
        res = r["results"]
        a, c, naive = res["ours"], res["megatron"], res.get("naive")
        if naive:
            b_s, b_mem = f"{naive['seconds']:.1f}", f"{naive['peak_extra_bytes'] / MIB:,.0f} MiB"
            ratio = f"{r['ratio_peak_extra_a_over_b']:.3f}"
        else:
            b_s, b_mem, ratio = f"skipped: {r['naive_skipped']}", "-", "-"
        out.append(row(r["tokens"], r["tp"], f"{a['seconds']:.2f}", f"{c['seconds']:.2f}",
                       f"{r['ratio_time_a_over_c']:.2f}", f"{r['ratio_time_update_a_over_c']:.2f}", b_s,
                       f"{a['peak_extra_bytes'] / MIB:.1f} MiB", b_mem, ratio))
    return out


def convert(d: dict) -> list[str]:
    out = header("direction", "GB/s", f"/ raw read ({d['raw_read_gb_per_s']:.1f} GB/s, page cache)",
                 f"/ raw write ({d['raw_write_gb_per_s']:.2f} GB/s)", "peak RSS rise", "/ largest tensor")
    for key, name in (("hf_to_megatron", "HF -> megatron"), ("megatron_to_hf", "megatron -> HF")):
        r = d[key]
        out.append(row(name, f"{r['gb_per_s']:.2f}", f"{r['throughput_over_raw_read']:.3f}",
                       f"{r['throughput_over_raw_write']:.2f}", f"{r['peak_rss_rise_gb']:.2f} GB",
                       f"{r['peak_rss_over_largest_tensor']:.1f}"))
    return out


def weight_sync(d: dict) -> list[str]:
    out = header("TP", "sync path", "seconds", "sync / plain copy", "peak extra / bucket", "decode tokens/s")
    for r in d["results"]:
        plain = r["plain_decode_tokens_per_s"]
        for name, s, decode in (("direct (plain weights)", r["sync"], plain),
                                ("stream only, in place", r["sync_stream_only"], plain),
                                ("stream + reload (packed, the CPU default)", r["packed_engine"],
                                 r["packed_engine"]["decode_tokens_per_s"])):
            out.append(row(r["tp"], name, f"{s['seconds']:.3f}", f"{s['sync_over_copy']:.2f}",
                           f"{s['peak_extra_over_bucket']:.1f}", f"{decode:.0f}"))
    return out


def fused_output(d: dict) -> list[str]:
    out = header("tokens", "TP", "chunk", "method", "seconds", "time / unfused", "peak extra", "memory / unfused")
    methods = (("fused", "`fused_logprob` (recompute)"), ("fused_loss", "`fused_logprob_loss` (gradients in forward)"))
    for r in d["results"]:
        out.append(row(r["tokens"], r["tp"], r["chunk"], "unfused (logits, then the op)", f"{r['unfused_s']:.1f}",
                       "1", f"{r['unfused_peak_mb']:,.0f} MB", "1"))
        for key, name in methods:
            if f"{key}_s" in r:
                out.append(row(r["tokens"], r["tp"], r["chunk"], name, f"{r[f'{key}_s']:.1f}",
                               f"{r[f'{key}_time_ratio']:.2f}", f"{r[f'{key}_peak_mb']:,.0f} MB",
                               f"{r[f'{key}_memory_ratio']:.3f}"))
    return out


def checkpoint_manifest(d: dict) -> list[str]:
    out = header("checkpoint", "size", "save, no manifest", "save with it", "ratio", "verify `full`", "verify `sizes`")
    for name, p in d["points"].items():
        out.append(row(name, f"{p['checkpoint_mb']:,.1f} MB", f"{p['save_s_without']:.3f} s",
                       f"{p['save_s_with']:.3f} s", f"{p['save_ratio']:.2f}", f"{p['verify_full_s']:.3f} s",
                       f"{p['verify_sizes_s'] * 1000:.1f} ms"))
    return out


RENDERERS = {f.__name__: f for f in (vocab_parallel, convert, weight_sync, fused_output, checkpoint_manifest)}


def table(path: Path) -> list[str]:
    d = json.loads(path.read_text())
    name = d.get("benchmark") or next((n for n in RENDERERS if path.stem.startswith(n)), None)
    if name not in RENDERERS:
        raise SystemExit(f"{path}: no table for benchmark {name!r}; known: {sorted(RENDERERS)}")
    return RENDERERS[name](d)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result", type=Path, help="a benchmark's JSON, e.g. bench/results/convert_cpu.json")
    a = ap.parse_args(argv)
    print("\n".join(table(a.result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
