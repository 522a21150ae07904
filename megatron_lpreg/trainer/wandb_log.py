"""Weights & Biases logging (``logging.wandb``), beside metrics.jsonl and TensorBoard.

Off unless ``logging.wandb.project`` is set. One rank logs (the metrics writer's);
the run's config is the resolved run config; the W&B run id lives in the checkpoint's
``trainer_state.json`` (:class:`~megatron_lpreg.trainer.run_state.RunState`), so a
resumed run continues the same W&B run. ``wandb`` is imported only here and only when
a run turns it on (``pip install 'megatron-lpreg[wandb]'``; the CPU lock has it).

Offline (``mode: offline``, e.g. a cluster without internet) the run is written under
``<train.out_dir>/wandb/offline-run-*`` (``$WANDB_DIR`` when set); ``wandb sync
<out_dir>/wandb/offline-run-*`` uploads it later, a resumed run's pieces in order into
one run (docs/logging.md).
"""

from __future__ import annotations

import importlib.util
import math
import os
import secrets
import string
from pathlib import Path

MODES = ("online", "offline")


def enabled(cfg) -> bool:
    return bool(cfg.logging.wandb.project)


def missing_package(cfg) -> str | None:
    """The one-line error when W&B is on but ``wandb`` does not import; None otherwise."""
    if enabled(cfg) and importlib.util.find_spec("wandb") is None:
        return ("logging.wandb.project is set but the wandb package is not installed: "
                "pip install 'megatron-lpreg[wandb]' (or make setup), or unset logging.wandb.project")
    return None


def new_run_id() -> str:
    """8 characters of [a-z0-9], as W&B's own ids."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class WandbRun:
    """The W&B run of this training run: ``log`` one metrics record, ``close`` at the end."""

    def __init__(self, cfg, out_dir: str | Path, run_id: str):
        import wandb

        w = cfg.logging.wandb
        self.run = wandb.init(
            project=w.project, entity=w.entity or None, name=w.run_name or None, mode=w.mode,
            id=run_id, resume="allow", config=cfg.to_dict(),
            dir=os.environ.get("WANDB_DIR") or str(out_dir),
            # our stdout stays ours (no console capture); W&B's banner is not a run's news
            settings=wandb.Settings(console="off", silent=True),
        )
        # the x axis is the trainer's step: a resumed run re-logs the steps after its
        # checkpoint, which W&B's own monotonic step would drop
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    @property
    def location(self) -> str:
        """Where the run is: its local directory (offline) or its URL."""
        if self.run.settings.mode == "offline":
            return str(Path(self.run.dir).parent)
        return self.run.url or self.run.id

    def log(self, record: dict) -> None:
        self.run.log({k: v for k, v in record.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)})

    def close(self) -> None:
        self.run.finish()
