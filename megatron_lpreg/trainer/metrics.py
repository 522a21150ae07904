"""Per-step metrics: a JSONL file (the record of a run) plus TensorBoard scalars and,
when the run turns it on, a W&B run (:mod:`megatron_lpreg.trainer.wandb_log`).

One rank writes (the last pipeline stage's first TP/DP rank, where the losses
live); others hold a writer that drops everything.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_lpreg.collectives import all_reduce
from megatron_lpreg.ops.vocab_parallel import PROXY_SENTINEL


def response_token_stats(old_logprob: torch.Tensor, old_entropy: torch.Tensor, rollout_logprob: torch.Tensor,
                         mask: torch.Tensor, group=None) -> dict[str, float]:
    """Sums over the response tokens (``[N, L]`` tensors of this rank's rows, ``mask`` 1
    on them) of every rank of ``group`` (the data-parallel group; every rank of it must
    call); divide by ``tokens``. "Sparks": sampled tokens the policy gave p < 0.1 / p < 0.01."""
    m = mask > 0
    lp = old_logprob[m].double()
    diff = (lp - rollout_logprob[m].double()).abs()
    sums = {
        "tokens": m.sum(),
        "entropy": old_entropy[m].double().sum(),
        "spark_p_lt_0.1": (lp < math.log(0.1)).sum(),
        "spark_p_lt_0.01": (lp < math.log(0.01)).sum(),
        "mismatch_abs": diff.sum(),
        "mismatch_gt_0.1": (diff > 0.1).sum(),
    }
    t = torch.stack([v.double() for v in sums.values()])
    if group is not None:
        all_reduce(t, dist.ReduceOp.SUM, group)
    return dict(zip(sums, t.tolist(), strict=True))


def precondition_stats(old_logprob: torch.Tensor, proxy_logprob: torch.Tensor, advantages: torch.Tensor,
                       mask: torch.Tensor, *, neg_percent: float, group=None) -> dict[str, float]:
    """Whether Lp-Reg's precondition holds in this step's samples (``[N, L]`` tensors of
    this rank's rows; sums over ``group``, the data-parallel group, whose every rank must
    call), measured the same way whatever the method:

    * ``in_proxy_lt_0.1``: sampled tokens inside the proxy (``min-p``/``fixed``: a proxy
      log-prob above the op's sentinel) with p < 0.1, the low-probability tokens the
      regulariser can protect;
    * ``lowest_neg`` / ``lowest_neg_in_proxy``: the ``neg_percent`` negative-advantage
      tokens of lowest old log-prob over the whole step (as ``global`` selection picks
      them), and how many of them lie inside the proxy (the ones Lp-Reg regularises).
    """
    from megatron_lpreg.loss.lp_reg import global_thresholds

    m = mask > 0
    inside = proxy_logprob > PROXY_SENTINEL / 2
    thr, _ = global_thresholds([old_logprob], [advantages], [mask], neg_percent=neg_percent, group=group)
    lowest = m & (advantages < 0) & (old_logprob <= thr) if thr is not None else torch.zeros_like(m)
    t = torch.stack([(m & inside & (old_logprob < math.log(0.1))).sum(), lowest.sum(), (lowest & inside).sum()])
    t = t.double()
    if group is not None:
        all_reduce(t, dist.ReduceOp.SUM, group)
    return dict(zip(("in_proxy_lt_0.1", "lowest_neg", "lowest_neg_in_proxy"), t.tolist(), strict=True))


class MetricsWriter:
    def __init__(self, out_dir: str | Path | None, *, tensorboard: bool = True, wandb=None):
        self.enabled = out_dir is not None
        self.path = None
        self.tb = None
        self.wandb = wandb  # a trainer.wandb_log.WandbRun, or None
        if not self.enabled:
            return
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:  # tensorboard is a dependency, but a missing one must not stop training
                self.tb = None

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps after the checkpoint (they will be redone)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", -1) <= step]
        self.path.write_text("".join(k + "\n" for k in keep))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(record)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.close()


def read_metrics(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# what a clock or the GPU's allocator measured: it differs between two runs of the same steps
_MEASURED_PREFIXES = ("time/", "perf/", "memory/")
_MEASURED_KEYS = ("rollout/tokens_per_s",)


def deterministic(record: dict) -> dict:
    """A metrics record without wall-clock measurements (``time/``, the ranks' ``perf/``,
    tokens per second) and the GPU's memory readings (``memory/``): what the run
    computed, equal between two runs of the same steps on one machine."""
    return {k: v for k, v in record.items() if not k.startswith(_MEASURED_PREFIXES) and k not in _MEASURED_KEYS}
