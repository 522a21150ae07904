"""The run's bookkeeping: what a checkpoint holds besides weights and optimiser
(:class:`RunState`), and when to evaluate, save and stop (:class:`Intervals`)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_lpreg.data.prompts import ShuffledOrder
from megatron_lpreg.loss.aer import AERController


class TooManyBadSteps(RuntimeError):
    pass


@dataclass
class RunState:
    """Steps done, the policy version (updates applied), bad-step counts, the data
    order's position, the AER controller (when the run uses it) and the W&B run id (when
    it logs there: a resumed run continues that W&B run). ``state_dict`` is the
    checkpoint's ``trainer_state.json``."""

    order: ShuffledOrder
    aer: AERController | None = None
    step: int = 0
    version: int = 0
    bad_in_row: int = 0
    bad_total: int = 0
    wandb_run_id: str = ""

    def record_update(self, applied: bool) -> None:
        """After a step's optimiser steps: ``applied`` when at least one was not skipped."""
        if applied:
            self.version += 1
            self.bad_in_row = 0
        else:
            self.bad_in_row += 1
            self.bad_total += 1
        self.step += 1

    def state_dict(self) -> dict:
        out = {"step": self.step, "version": self.version, "bad_in_row": self.bad_in_row,
               "bad_total": self.bad_total, "data": self.order.state_dict()}
        if self.aer is not None:
            out["aer"] = self.aer.state_dict()
        if self.wandb_run_id:
            out["wandb_run_id"] = self.wandb_run_id
        return out

    def load_state_dict(self, state: dict) -> None:
        self.step, self.version = state["step"], state["version"]
        self.bad_in_row, self.bad_total = state["bad_in_row"], state["bad_total"]
        self.order.load_state_dict(state["data"])
        # a run that turned W&B on after its last checkpoint keeps the id it was given
        self.wandb_run_id = state.get("wandb_run_id") or self.wandb_run_id
        if self.aer is not None:
            if "aer" not in state:
                raise ValueError("this run uses algo.entropy_control=aer but its checkpoint has no AER state "
                                 "(it was written by a run without AER)")
            self.aer.load_state_dict(state["aer"])


@dataclass(frozen=True)
class Intervals:
    """The save, evaluation and stop rules, all in terms of steps done."""

    total_steps: int
    save_every: int
    eval_every: int
    max_bad_steps: int

    @classmethod
    def from_config(cls, cfg) -> Intervals:
        return cls(cfg.train.steps, cfg.train.save_every, cfg.eval.every_n_steps, cfg.train.max_bad_steps)

    def eval_due(self, done: int) -> bool:
        return bool(self.eval_every) and done % self.eval_every == 0

    def too_bad(self, state: RunState) -> bool:
        return state.bad_in_row > self.max_bad_steps

    def save_due(self, done: int, *, stopping: bool, too_bad: bool) -> bool:
        return done == self.total_steps or too_bad or stopping or done % self.save_every == 0
