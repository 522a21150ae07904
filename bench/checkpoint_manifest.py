"""Benchmark: the cost of checkpoint manifests (sizes + xxh3 of every file) on save and resume.

A random Qwen3-shaped megatron model with its Adam state is saved on gloo ranks
(TP=2) by the trainer's ``save_checkpoint``, with and without the manifest,
alternating, ``--repeats`` times each; then the newest checkpoint is verified as a
resume does (``full``: checksums, ``sizes``). Sizes: the demo's model (2 layers,
hidden 128, vocabulary 200) and a larger one (``--hidden``, default 1024: ~1.6 GB of
weights and optimiser state). Prints one JSON document: median seconds per save with
and without the manifest, their ratio, the checkpoint's size and the verification
seconds. The target: a small fixed cost next to writing the checkpoint.

    python bench/checkpoint_manifest.py
    python bench/checkpoint_manifest.py --hidden 2048 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_lpreg.local_ranks import Layout, run_ranks  # noqa: E402


def _measure(cfg: dict, out: str, repeats: int) -> dict:
    import torch
    import torch.distributed as dist
    from megatron.core import tensor_parallel

    from megatron_lpreg.config import RunConfig
    from megatron_lpreg.model.builder import build_gpt
    from megatron_lpreg.model.hf_config import spec_from_hf_config
    from megatron_lpreg.trainer.optim import make_optimizer
    from megatron_lpreg.trainer.parallelize import wrap_ddp
    from megatron_lpreg.trainer.state import save_checkpoint, verify_checkpoint

    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    run = RunConfig()
    model = wrap_ddp(build_gpt(spec_from_hf_config(cfg)), run)
    opt = make_optimizer(model, run.optim)
    tokens = torch.arange(1, 9).unsqueeze(0)  # one step: Adam's state exists and is saved
    model(tokens, torch.arange(8).unsqueeze(0), None).float().mean().backward()
    model.finish_grad_sync()
    opt.step()
    times = {True: [], False: []}
    step = 0
    for _ in range(repeats):
        for manifest in (False, True):
            step += 1
            dist.barrier()
            t = time.perf_counter()
            path = save_checkpoint(out, step, model, opt, {"step": step}, keep_last=1, manifest=manifest)
            dist.barrier()
            times[manifest].append(time.perf_counter() - t)
    verify = {}
    for mode in ("full", "sizes"):
        dist.barrier()
        t = time.perf_counter()
        assert verify_checkpoint(path, mode) == []
        verify[mode] = time.perf_counter() - t
    size = sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
    return {"checkpoint_mb": size / 2**20, "save_s_without": statistics.median(times[False]),
            "save_s_with": statistics.median(times[True]), "verify_full_s": verify["full"],
            "verify_sizes_s": verify["sizes"]}


def model_config(hidden: int, layers: int, vocab: int) -> dict:
    return dict(model_type="qwen3", vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                num_hidden_layers=layers, num_attention_heads=max(2, hidden // 64), num_key_value_heads=2,
                head_dim=64, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
                architectures=["Qwen3ForCausalLM"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024, help="hidden size of the larger model")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tp", type=int, default=2)
    a = ap.parse_args(argv)
    points = {"demo": model_config(128, 2, 200), "larger": model_config(a.hidden, a.layers, 32_000)}
    out = {"tp": a.tp, "repeats": a.repeats, "points": {}}
    for name, cfg in points.items():
        with tempfile.TemporaryDirectory(dir=ROOT / "runs" if (ROOT / "runs").is_dir() else None) as d:
            r = run_ranks(_measure, Layout(tp=a.tp), cfg, d, a.repeats, timeout=1800)[0]
        r["manifest_overhead_s"] = r["save_s_with"] - r["save_s_without"]
        r["save_ratio"] = r["save_s_with"] / r["save_s_without"]
        out["points"][name] = r
        print(f"[bench] {name}: {json.dumps(r)}", file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
