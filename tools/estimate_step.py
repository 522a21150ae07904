"""Seconds per RL step of a run config on a GPU you have not got yet: a roofline estimate.

    python tools/estimate_step.py --config examples/qwen25_32b_lpreg_onpolicy.yaml \\
        --hf-config examples/model_configs/qwen25_32b_base.json --gpus 64 --response-tokens 4096
    python tools/estimate_step.py ... --gpus 64 --response-tokens 2048 4096 --markdown   # docs/training.md's table

Symbols: ``P`` parameters; ``S = prompts_per_step x n`` sequences; ``Lp`` / ``Lr`` mean
prompt / response tokens (``--prompt-tokens``, ``--response-tokens``); ``Lmax =
rollout.max_new_tokens``; ``T = S (Lp + Lr)`` tokens; ``F`` peak bf16 FLOP/s per GPU;
``M`` HBM bytes/s; ``X`` interconnect bytes/s per GPU; ``G`` GPUs; rollout replicas
``R = G / tp`` (vLLM shares the trainer's TP), ``B = S / R`` sequences per replica;
``kv`` = 2 x layers x KV heads x head_dim x 2 bytes per token. Efficiencies:
``mfu`` (training and the old-policy pass), ``prefill`` (MFU of prefill), ``mem``
(achieved share of ``M`` while decoding).

* rollout (decode-bound): each of ``Lmax`` decode steps reads the replica's weights
  (``2P / tp`` bytes per GPU) and every generated token reads its context's KV
  (average context ``Lp + Lr / 2``):
  ``t_decode = max([Lmax 2P / tp + B Lr kv (Lp + Lr/2) / tp] / (mem M), 2P B Lr / (tp F))``,
  plus prefill ``2P B Lp / (tp F prefill)``;
* old-policy pass: ``2 P T / (G F mfu)``;
* update: ``(6 + 2 [full recompute]) P T epochs / (G F mfu)`` plus the gradient
  reduction over data-parallel ranks per optimiser step, ``2 (4P / (tp pp)) (dp - 1) / dp / X``;
* weight sync (direct shard copy on the same GPU): read + write ``2P / (tp pp)`` bytes
  at ``mem M``.

Attention FLOPs, pipeline bubbles, evaluation and checkpoint writes are left out:
the estimate is a floor for an efficient implementation, not a prediction of any
particular one. Printed beside it: the Lp-Reg paper's reported compute and a
published peer figure (NeMo-RL), for scale.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lpreg.config import load_config  # noqa: E402
from megatron_lpreg.model.hf_config import load_spec, spec_from_hf_config  # noqa: E402
from megatron_lpreg.trainer.memory import param_count  # noqa: E402

# published figures, for scale (docs/training.md, "Step time on paper")
PAPER_32B = {"what": "Lp-Reg paper, Qwen2.5-32B: ~81,204 GPU-hours for ~3,000 steps on 64 GPUs",
             "s_per_step": 81_204 * 3600 / (64 * 3000)}
NEMO_RL_32B = {"what": "NeMo-RL performance summary, Qwen3-32B GRPO on-policy, 32 H100, 4,096-token sequences",
               "s_per_step": 376.0, "tokens_per_s_per_gpu": 571.0}


@dataclass
class GPU:
    tflops: float = 989.0        # H100 SXM dense bf16
    hbm_gbps: float = 3350.0
    net_gbps: float = 50.0       # 400 Gb/s InfiniBand per GPU
    mfu: float = 0.35
    prefill: float = 0.5
    mem: float = 0.6


@dataclass
class StepEstimate:
    rollout_s: float
    old_logprob_s: float
    update_s: float
    sync_s: float
    total_s: float
    generated_tokens_per_s_per_gpu: float
    tokens_per_s_per_gpu: float


def estimate_step(spec, cfg, gpus: int, gpu: GPU, *, prompt_tokens: float, response_tokens: float) -> StepEstimate:
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    dp = max(gpus // (tp * pp), 1)
    p = param_count(spec)
    f, m, x = gpu.tflops * 1e12, gpu.hbm_gbps * 1e9, gpu.net_gbps * 1e9
    s = cfg.rollout.prompts_per_step * cfg.rollout.n
    lp, lr, lmax = prompt_tokens, response_tokens, cfg.rollout.max_new_tokens
    tokens = s * (lp + lr)
    kv = 2 * spec.num_layers * spec.num_query_groups * spec.head_dim * 2
    b = s / (gpus / tp)
    decode_bytes = lmax * 2 * p / tp + b * lr * kv * (lp + lr / 2) / tp
    decode = max(decode_bytes / (gpu.mem * m), 2 * p * b * lr / (tp * f))
    prefill = 2 * p * b * lp / (tp * f * gpu.prefill)
    old = 2 * p * tokens / (gpus * f * gpu.mfu)
    flops_per_token = 6 + (2 if cfg.parallel.recompute == "full" else 0)
    steps = cfg.algo.mini_batches * cfg.algo.ppo_epochs
    reduce = steps * 2 * (4 * p / (tp * pp)) * (dp - 1) / dp / x
    upd = flops_per_token * p * tokens * cfg.algo.ppo_epochs / (gpus * f * gpu.mfu) + reduce
    sync = 2 * (2 * p / (tp * pp)) / (gpu.mem * m)
    total = decode + prefill + old + upd + sync
    return StepEstimate(decode + prefill, old, upd, sync, total, s * lr / (total * gpus), tokens / (total * gpus))


def markdown(spec, cfg, a, gpu: GPU, response_tokens: list[float], steps: int) -> str:
    """One row per mean response length, then the published figures (blank where they
    give nothing to compare)."""
    lines = [f"| {Path(a.config).stem}, {a.gpus} GPUs, {cfg.rollout.prompts_per_step} x {cfg.rollout.n} sequences, "
             f"{a.prompt_tokens:,.0f}-token prompts | rollout s | old-policy s | update s | step s "
             f"| generated tok/s/GPU | GPU-hours, {steps:,} steps |", "|---|---|---|---|---|---|---|"]
    for lr in response_tokens:
        e = estimate_step(spec, cfg, a.gpus, gpu, prompt_tokens=a.prompt_tokens, response_tokens=lr)
        lines.append(f"| mean response {lr:,.0f} tokens | {e.rollout_s:.1f} | {e.old_logprob_s:.1f} | {e.update_s:.1f} "
                     f"| {e.total_s:.1f} | {e.generated_tokens_per_s_per_gpu:.0f} | {e.total_s * a.gpus * steps / 3600:,.0f} |")
    for ref in (PAPER_32B, NEMO_RL_32B):
        tok = f"{ref['tokens_per_s_per_gpu']:.0f}" if "tokens_per_s_per_gpu" in ref else ""
        lines.append(f"| published: {ref['what']} | | | | {ref['s_per_step']:,.0f} | {tok} | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--hf-config", help="config.json (default: the config's model.hf_dir)")
    ap.add_argument("--gpus", type=int, required=True)
    ap.add_argument("--prompt-tokens", type=float, default=250.0, help="mean prompt length")
    ap.add_argument("--response-tokens", type=float, nargs="+", default=None,
                    help="mean response length (default: half of rollout.max_new_tokens); "
                         "with --markdown several, one row each")
    ap.add_argument("--steps", type=int, default=None, help="steps for the GPU-hours line (default: train.steps)")
    for field, value in asdict(GPU()).items():
        ap.add_argument(f"--{field.replace('_', '-')}", type=float, default=value)
    ap.add_argument("--json", action="store_true", help="one JSON document instead of the table")
    ap.add_argument("--markdown", action="store_true", help="a markdown table, the published figures beside")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    spec = (spec_from_hf_config(json.loads(Path(a.hf_config).read_text())) if a.hf_config
            else load_spec(cfg.model.hf_dir))
    gpu = GPU(**{f: getattr(a, f) for f in asdict(GPU())})
    lrs = a.response_tokens or [cfg.rollout.max_new_tokens / 2]
    steps = a.steps or cfg.train.steps
    if a.markdown:
        print(markdown(spec, cfg, a, gpu, lrs, steps))
        return 0
    if len(lrs) > 1:
        raise SystemExit("estimate_step: several --response-tokens need --markdown")
    lr = lrs[0]
    est = estimate_step(spec, cfg, a.gpus, gpu, prompt_tokens=a.prompt_tokens, response_tokens=lr)
    out = {"estimate": asdict(est), "gpu_hours": est.total_s * a.gpus * steps / 3600, "steps": steps,
           "gpu": asdict(gpu), "published": [PAPER_32B, NEMO_RL_32B]}
    if a.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"{a.config}: {a.gpus} GPUs, TP={cfg.parallel.tp} PP={cfg.parallel.pp}, "
          f"{cfg.rollout.prompts_per_step} x {cfg.rollout.n} sequences, mean {a.prompt_tokens:.0f} + {lr:.0f} tokens")
    for name in ("rollout_s", "old_logprob_s", "update_s", "sync_s", "total_s"):
        print(f"  {name:<16} {getattr(est, name):10.1f}")
    print(f"  generated tokens/s/GPU {est.generated_tokens_per_s_per_gpu:8.0f}; all tokens/s/GPU "
          f"{est.tokens_per_s_per_gpu:.0f}; {out['gpu_hours']:,.0f} GPU-hours for {steps} steps")
    for ref in out["published"]:
        print(f"  published: {ref['what']}: {ref['s_per_step']:.0f} s/step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
