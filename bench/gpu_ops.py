"""GPU benchmarks for ``bench/gpu_check.sh``: the op, the fused output layer, and an
Lp-Reg vs GRPO update step, each method side by side in one process, medians of
``--repeats`` timed calls after one warm-up call (Triton compiles there).

Writes into ``--out``:

* ``op.json``: per token count (default 8k and 32k) x vocabulary 151,936, bf16 logits:
  - forward statistics: ours with the torch path, ours with Triton (log-prob,
    entropy, min-p proxy), the reference's naive dense path (fp32 softmax over the
    row; skipped where it would not fit), megatron-core's
    ``vocab_parallel_cross_entropy`` (log-prob only, the least any method must do);
  - update pass (forward + backward of the log-prob and entropy): torch path,
    Triton, megatron's CE forward + backward;
  each with seconds, peak memory above the inputs, and the effective bandwidth:
  the bytes a method must move at least (one read of the logits forward; two reads
  and one gradient write for forward + backward) over its time, and that as a share
  of the device's peak (``--peak-gbs``, or looked up from the device name).
* ``fused.json``: hidden 5,120, output layer fused with the op vs logits then the op
  (forward + backward with hidden and weight gradients): seconds, peak memory.
* ``step.json``: a small megatron GPT at TP=1 (bf16 weights on CUDA): one update step
  (old-policy pass, forward, loss, backward, AdamW step) with Lp-Reg and with GRPO, and
  the ratio (target: Lp-Reg adds less than 2%).

Parts whose packages are missing (megatron-core for the megatron CE and the model
step) are written as ``{"skipped": "why"}``. ``--device cpu`` with tiny sizes checks
the logic where there is no GPU (CI does so through ``tests/test_gpu_check.py``).

    python bench/gpu_ops.py --out /tmp/gpu                   # CUDA, the sizes above
    python bench/gpu_ops.py --out /tmp/cpu --device cpu --tokens 64 --vocab 1000 --hidden 64
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vocab_parallel import KAPPA, naive_stats  # noqa: E402

from megatron_lpreg.ops.vocab_parallel import token_stats, vocab_parallel_logprob  # noqa: E402

# HBM bandwidth (GB/s) by a substring of torch.cuda.get_device_name()
PEAK_GBS = {"H200": 4800.0, "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100": 2039.0}


def log(msg: str) -> None:
    print(f"[gpu_ops] {msg}", file=sys.stderr, flush=True)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev: torch.device, repeats: int) -> dict:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up, and the peak
    memory it allocated above what was allocated before (CUDA; None on CPU)."""
    fn()
    _sync(dev)
    times, peak = [], None
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
        if dev.type == "cuda":
            peak = max(peak or 0, torch.cuda.max_memory_allocated() - base)
    return {"seconds": statistics.median(times), "peak_extra_bytes": peak}


def _bandwidth(r: dict, bytes_moved: int, peak_gbs: float | None) -> dict:
    gbs = bytes_moved / r["seconds"] / 1e9
    # four significant digits: tiny CPU checks move kilobytes, a GPU hundreds of GB/s
    return {**r, "min_bytes": bytes_moved, "effective_gbs": float(f"{gbs:.4g}"),
            "share_of_peak": float(f"{gbs / peak_gbs:.4g}") if peak_gbs else None}


def _fits(dev: torch.device, need_bytes: int) -> bool:
    if dev.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info()
    return need_bytes < 0.8 * free


def _has_megatron() -> bool:
    return importlib.util.find_spec("megatron.core") is not None


def _in_one_rank(fn, *args):
    """Run ``fn`` in a fresh TP=1 job (megatron's parallel state initialised)."""
    from megatron_lpreg.local_ranks import Layout, run_ranks

    return run_ranks(fn, Layout(tp=1), *args, timeout=500)[0]  # a device command may run 600 s


def _megatron_ce(n_tokens: int, vocab: int, repeats: int, peak_gbs: float | None) -> dict:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    logits = (torch.randn(n_tokens, vocab, device=dev) * 3).to(torch.bfloat16)
    target = torch.randint(0, vocab, (n_tokens,), device=dev)
    nbytes = logits.numel() * logits.element_size()

    def fwd():
        with torch.no_grad():
            vocab_parallel_cross_entropy(logits.clone(), target)

    def fwd_bwd():
        leaf = logits.clone().requires_grad_(True)  # megatron's CE writes into its input
        vocab_parallel_cross_entropy(leaf, target).sum().backward()

    # the clone is part of the timed call; its one read and write are counted as moved bytes
    return {"forward": _bandwidth(timed(fwd, dev, repeats), 3 * nbytes, peak_gbs),
            "forward_backward": _bandwidth(timed(fwd_bwd, dev, repeats), 5 * nbytes, peak_gbs),
            "note": "each call clones the logits first (megatron's CE writes into its input): "
                    "min_bytes counts that copy"}


def bench_op(dev, tokens_list, vocab, repeats, peak_gbs) -> dict:
    out = {"vocab": vocab, "dtype": "bfloat16", "kappa": KAPPA, "points": []}
    for n in tokens_list:
        log(f"op: {n} tokens x {vocab}")
        point = _op_point(dev, n, vocab, repeats, peak_gbs)
        for k, v in point.items():
            if isinstance(v, dict) and "seconds" in v:
                log(f"  {k:16s} {v['seconds'] * 1e3:9.2f} ms  {v['effective_gbs']:8.1f} GB/s")
        out["points"].append(point)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _op_point(dev, n, vocab, repeats, peak_gbs) -> dict:
    g = torch.Generator(device=dev).manual_seed(0)
    logits = (torch.randn(n, vocab, generator=g, device=dev) * 3).to(torch.bfloat16)
    target = torch.randint(0, vocab, (n,), generator=g, device=dev)
    nbytes = logits.numel() * logits.element_size()
    point = {"tokens": n, "logits_bytes": nbytes}
    backends = ["torch", "triton"] if dev.type == "cuda" else ["torch"]
    for b in backends:
        point[f"stats_{b}"] = _bandwidth(timed(
            lambda b=b: token_stats(logits, target, proxy="minp", proxy_threshold=KAPPA, backend=b),
            dev, repeats), nbytes, peak_gbs)

        def fwd_bwd(b=b):
            leaf = logits.detach().requires_grad_(True)
            lp, h = vocab_parallel_logprob(leaf, target, with_entropy=True, backend=b)
            (lp.sum() + h.sum()).backward()

        point[f"update_{b}"] = _bandwidth(timed(fwd_bwd, dev, repeats), 3 * nbytes, peak_gbs)
    if dev.type != "cuda":
        point["stats_triton"] = point["update_triton"] = {"skipped": "Triton runs on CUDA only"}
    # naive: fp32 copy, softmax, log_softmax, mask, masked log_softmax: ~6 fp32 rows alive
    need = 6 * n * vocab * 4
    point["stats_naive"] = {"skipped": f"needs ~{need / 2**30:.0f} GiB of fp32 rows"}
    if _fits(dev, need):
        try:
            point["stats_naive"] = _bandwidth(timed(lambda: naive_stats(logits, target), dev, repeats), nbytes,
                                              peak_gbs)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
    if _has_megatron():
        try:
            point["megatron_ce"] = _in_one_rank(_megatron_ce, n, vocab, repeats, peak_gbs)
        except Exception as e:  # noqa: BLE001 - a failed comparison is reported, the others still run
            point["megatron_ce"] = {"skipped": f"failed: {str(e).strip().splitlines()[-1][:300]}"}
    else:
        point["megatron_ce"] = {"skipped": "megatron-core is not installed (bring it with --wheels)"}
    return point


def bench_fused(dev, n_tokens, hidden, vocab, repeats) -> dict:
    from megatron_lpreg.ops.fused_output import fused_logprob

    log(f"fused: {n_tokens} tokens, hidden {hidden}, vocab {vocab}")
    g = torch.Generator(device=dev).manual_seed(1)
    h = torch.randn(n_tokens, hidden, generator=g, device=dev).to(torch.bfloat16)
    w = (torch.randn(vocab, hidden, generator=g, device=dev) / hidden**0.5).to(torch.bfloat16)
    target = torch.randint(0, vocab, (n_tokens,), generator=g, device=dev)
    chunk = max(1, n_tokens // 8)

    def run(fused: bool):
        hl, wl = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
        if fused:
            lp, ent = fused_logprob(hl, wl, target, with_entropy=True, chunk_tokens=chunk)
        else:
            lp, ent = vocab_parallel_logprob(hl @ wl.t(), target, with_entropy=True)
        (lp.sum() + ent.sum()).backward()

    res = {"tokens": n_tokens, "hidden": hidden, "vocab": vocab, "chunk_tokens": chunk,
           "unfused": timed(lambda: run(False), dev, repeats), "fused": timed(lambda: run(True), dev, repeats)}
    res["time_ratio_fused_over_unfused"] = round(res["fused"]["seconds"] / res["unfused"]["seconds"], 3)
    if dev.type == "cuda":
        res["memory_ratio_fused_over_unfused"] = round(
            res["fused"]["peak_extra_bytes"] / res["unfused"]["peak_extra_bytes"], 3)
    log(f"  fused/unfused time {res['time_ratio_fused_over_unfused']}")
    return res


def _step_rank(cfg: dict, batch: int, seq: int, repeats: int) -> dict:
    """A TP=1 job: one update step of a small GPT with each loss, interleaved; bf16
    weights on CUDA (the training dtype), fp32 on CPU."""
    from megatron.core import tensor_parallel

    from megatron_lpreg.algo.advantages import grpo_advantages
    from megatron_lpreg.loss.lp_reg import lp_reg_loss
    from megatron_lpreg.loss.ppo import ppo_clip_loss
    from megatron_lpreg.model.builder import build_gpt
    from megatron_lpreg.model.hf_config import spec_from_hf_config

    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    spec = spec_from_hf_config(cfg)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = build_gpt(spec, params_dtype=dtype).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    g = torch.Generator(device=dev).manual_seed(2)
    tokens = torch.randint(0, spec.vocab_size, (batch, seq), generator=g, device=dev)
    pos = torch.arange(seq, device=dev).unsqueeze(0).expand(batch, -1)
    mask = torch.ones(batch, seq - 1, device=dev)
    scores = torch.randint(0, 2, (batch,), generator=g, device=dev).float()
    adv = grpo_advantages(scores.cpu(), torch.arange(batch) // 8, mask.cpu()).to(dev)
    target = tokens[:, 1:]

    def step(loss_name: str):
        with torch.no_grad():  # the old-policy pass (Lp-Reg's proxy comes with it)
            st = token_stats(model(tokens, pos, None)[:, :-1], target, vocab_size=spec.vocab_size)
        lp, ent = vocab_parallel_logprob(model(tokens, pos, None)[:, :-1], target, vocab_size=spec.vocab_size,
                                         with_entropy=True)
        if loss_name == "lp_reg":
            loss, _ = lp_reg_loss(lp, st.logprob, st.proxy_logprob, adv, mask, neg_percent=0.01, entropy=ent)
        else:
            loss, _ = ppo_clip_loss(lp, st.logprob, adv, mask, entropy=ent)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = {"grpo": [], "lp_reg": []}
    for it in range(repeats + 1):
        for name in times:
            _sync(dev)
            t0 = time.perf_counter()
            step(name)
            _sync(dev)
            if it:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": {k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
            "dtype": str(dtype).removeprefix("torch."), "batch": batch,
            "seq": seq, "seconds": med, "lp_reg_over_grpo": round(med["lp_reg"] / med["grpo"], 4),
            "target": "lp_reg_over_grpo < 1.02"}


def bench_step(model_cfg: dict, batch: int, seq: int, repeats: int) -> dict:
    if not _has_megatron():
        return {"skipped": "megatron-core is not installed (bring it with --wheels)"}
    log(f"step: GPT hidden {model_cfg['hidden_size']} x {model_cfg['num_hidden_layers']} layers, "
        f"{batch} x {seq} tokens")
    res = _in_one_rank(_step_rank, model_cfg, batch, seq, repeats)
    log(f"  Lp-Reg / GRPO step time {res['lp_reg_over_grpo']}")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for op.json, fused.json, step.json")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tokens", default="8192,32768", help="comma-separated token counts for the op")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=5120, help="hidden size of the fused-output comparison")
    ap.add_argument("--fused-tokens", type=int, default=8192)
    ap.add_argument("--step-hidden", type=int, default=1024)
    ap.add_argument("--step-layers", type=int, default=4)
    ap.add_argument("--step-batch", type=int, default=32)
    ap.add_argument("--step-seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peak-gbs", type=float, default=None, help="device memory bandwidth (default: by name)")
    ap.add_argument("--parts", default="op,fused,step")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_ops: --device cuda but torch sees no CUDA GPU (use --device cpu to check the logic)",
              file=sys.stderr)
        return 2
    try:
        tokens = [int(t) for t in a.tokens.split(",")]
    except ValueError:
        print(f"gpu_ops: --tokens {a.tokens!r}: expected comma-separated integers", file=sys.stderr)
        return 2
    dev = torch.device(a.device)
    peak = a.peak_gbs
    if peak is None and dev.type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_GBS.items() if k in name), None)
    a.out.mkdir(parents=True, exist_ok=True)
    parts = set(a.parts.split(","))
    vocab_cfg = a.vocab if a.vocab < 2048 else 32000  # the step's model: a small vocabulary unless told tiny
    model_cfg = dict(model_type="qwen3", vocab_size=vocab_cfg, hidden_size=a.step_hidden,
                     intermediate_size=3 * a.step_hidden, num_hidden_layers=a.step_layers,
                     num_attention_heads=max(1, a.step_hidden // 128), num_key_value_heads=max(1, a.step_hidden // 512),
                     head_dim=min(128, a.step_hidden), max_position_embeddings=max(a.step_seq, 64),
                     rms_norm_eps=1e-6, tie_word_embeddings=False)
    jobs = {"op": lambda: bench_op(dev, tokens, a.vocab, a.repeats, peak),
            "fused": lambda: bench_fused(dev, a.fused_tokens, a.hidden, a.vocab, a.repeats),
            "step": lambda: bench_step(model_cfg, a.step_batch, a.step_seq, a.repeats)}
    meta = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "peak_gbs": peak,
            "torch": torch.__version__}
    for name in ("op", "fused", "step"):
        if name in parts:
            res = {"meta": meta, **jobs[name]()}
            (a.out / f"{name}.json").write_text(json.dumps(res, indent=1))
            log(f"wrote {a.out / (name + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
