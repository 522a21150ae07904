"""Per-GPU memory estimate of a run config (what the trainer prints at start-up).

    python tools/estimate_memory.py --config examples/qwen3_14b_lpreg_onpolicy.yaml \
        --hf-config examples/model_configs/qwen3_14b_base.json --gpus 64
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lpreg.config import load_config  # noqa: E402
from megatron_lpreg.model.hf_config import load_spec, spec_from_hf_config  # noqa: E402
from megatron_lpreg.trainer.memory import estimate  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--hf-config", help="config.json (default: the config's model.hf_dir)")
    ap.add_argument("--gpus", type=int, required=True, help="total GPUs of the job")
    ap.add_argument("--gpu-gb", type=float, default=80.0)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    if a.hf_config:
        spec = spec_from_hf_config(json.loads(Path(a.hf_config).read_text()))
    else:
        spec = load_spec(cfg.model.hf_dir)
    est = estimate(spec, cfg, world_size=a.gpus, gpu_gb=a.gpu_gb)
    print(f"TP={cfg.parallel.tp} PP={cfg.parallel.pp} DP={a.gpus // (cfg.parallel.tp * cfg.parallel.pp)}, "
          f"{a.gpu_gb:.0f} GB GPUs")
    print(est.table())
    return 0 if max(est.training_gb, est.rollout_gb) <= a.gpu_gb else 1


if __name__ == "__main__":
    sys.exit(main())
