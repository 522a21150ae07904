"""One step's samples: rollout, grading, DAPO's overlong penalty and (optionally)
DAPO's dynamic sampling, which keeps drawing prompts until the step holds
``rollout.prompts_per_step`` groups whose rewards differ.

Every rank calls :func:`sample_step` (the engine's collectives); rank 0 grades and
broadcasts, so every rank keeps the same groups. Every prompt drawn moves the
data order, kept or not, so a resumed run draws exactly what the uninterrupted
one would have.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from megatron_lpreg.algo.dynamic_sampling import Group, collect_informative_groups
from megatron_lpreg.algo.shaping import overlong_penalty
from megatron_lpreg.collectives import broadcast_object
from megatron_lpreg.config import RunConfig
from megatron_lpreg.rollout.engine import SamplingConfig


@dataclass
class StepSamples:
    """The step's samples, prompt-major (a group's samples contiguous). ``group[i]``: the
    group (0..G-1) of sample ``i``; ``answers[g]``: group ``g``'s ground truth; ``scores``
    ``[N]`` fp32: the reward after shaping; ``correct [N]``: the grader's score alone;
    ``metrics``: sampling counts, shaping and the seconds spent generating and grading."""

    group: list[int]
    prompts: list[list[int]]
    responses: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[str]
    scores: torch.Tensor
    correct: torch.Tensor
    reasons: list[str]
    metrics: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.responses)

    @property
    def num_tokens(self) -> int:
        return sum(len(r) for r in self.responses)

    def group_accuracy(self) -> torch.Tensor:
        """``[N]``: the share of correct samples in each sample's group."""
        g = torch.tensor(self.group)
        acc = torch.zeros(int(g.max()) + 1).index_add_(0, g, (self.correct > 0.5).float())
        return (acc / torch.bincount(g).float())[g]


class GraderBroken(RuntimeError):
    pass


def _grader_failed(reason: str) -> bool:
    """The grader itself failed (its worker died or raised), as opposed to judging an answer."""
    return reason == "crashed" or reason.startswith("error:")


def _grade(pool, tokenizer, responses, truths) -> list[tuple[float, str]]:
    graded = None
    if pool is not None:
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        graded = [(g.score, g.reason) for g in pool.score(texts, truths)]
    graded = broadcast_object(graded)
    if graded and all(_grader_failed(r) for _, r in graded):
        # zero rewards from a broken grader would train the policy on noise: stop instead
        reasons = Counter(r for _, r in graded).most_common(2)
        raise GraderBroken(f"the grader failed on every one of {len(graded)} samples ({reasons}); "
                           "fix the reward function (reward.*) and resume from the last checkpoint")
    return graded


def sample_step(cfg: RunConfig, engine, tokenizer, examples, order, pool, *, step: int, version: int,
                stop_ids: tuple[int, ...], beat: Callable[[str], None] | None = None) -> StepSamples:
    """Draw, generate, grade and shape the step's samples (see the module docstring).
    ``beat(phase)``: called as each round's rollout and grading begin (the hang watchdog)."""
    beat = beat or (lambda phase: None)
    ro, rw = cfg.rollout, cfg.reward
    drawn = 0
    seconds = {"time/rollout_s": 0.0, "time/reward_s": 0.0}

    def one_round(round_: int) -> list[Group]:
        nonlocal drawn
        picked = order.take(ro.prompts_per_step)
        drawn += len(picked)
        sampling = SamplingConfig(n=ro.n, temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k,
                                  max_new_tokens=ro.max_new_tokens, stop_token_ids=stop_ids,
                                  seed=cfg.train.seed * 100_003 + step + round_ * 7_919)
        t0 = time.perf_counter()
        beat("rollout")
        batch = engine.generate([examples[i].prompt_ids for i in picked], sampling, expected_version=version)
        t1 = time.perf_counter()
        beat("grading")
        graded = _grade(pool, tokenizer, batch.responses, [examples[picked[i]].answer for i in batch.prompt_index])
        seconds["time/rollout_s"] += t1 - t0
        seconds["time/reward_s"] += time.perf_counter() - t1
        by_prompt: dict[int, list[int]] = {}
        for i, p in enumerate(batch.prompt_index):
            by_prompt.setdefault(p, []).append(i)
        return [Group([graded[i][0] for i in rows], payload=(batch, graded, rows)) for rows in by_prompt.values()]

    if ro.dynamic_sampling:
        rounds = iter(range(1 << 30))
        groups, stats = collect_informative_groups(lambda: one_round(next(rounds)), ro.prompts_per_step,
                                                   max_rounds=ro.max_sampling_rounds)
        # dropped: all rewards equal; surplus: informative, beyond what the step takes (DAPO drops them too)
        metrics = {"rollout/sampling_rounds": stats.rounds, "rollout/prompts_drawn": drawn,
                   "rollout/groups_dropped": stats.groups_dropped, "rollout/groups_kept": len(groups),
                   "rollout/groups_surplus": stats.groups_seen - stats.groups_dropped - len(groups)}
    else:
        groups, metrics = one_round(0), {}
    if not groups:
        raise RuntimeError(f"dynamic sampling kept no informative group in {ro.max_sampling_rounds} rounds "
                           f"({drawn} prompts drawn): every group's rewards were equal; the task may be too easy "
                           "or too hard for the policy (raise rollout.max_sampling_rounds or check the data)")

    out = StepSamples([], [], [], [], [], torch.empty(0), torch.empty(0), [], {**metrics, **seconds})
    for g, group in enumerate(groups):
        batch, graded, rows = group.payload
        for i in rows:
            out.group.append(g)
            out.prompts.append(batch.prompts[i])
            out.responses.append(batch.responses[i])
            out.logprobs.append(batch.logprobs[i])
            out.finish_reasons.append(batch.finish_reasons[i])
            out.reasons.append(graded[i][1])
        out.correct = torch.cat([out.correct, torch.tensor([graded[i][0] for i in rows], dtype=torch.float32)])
    out.scores = out.correct.clone()
    if rw.overlong_buffer_tokens > 0:
        penalty = overlong_penalty(torch.tensor([len(r) for r in out.responses]),
                                   max_response_length=ro.max_new_tokens, buffer_length=rw.overlong_buffer_tokens,
                                   penalty_factor=rw.overlong_penalty)
        out.scores = out.scores + penalty
        out.metrics["reward/overlong_penalty_mean"] = float(penalty.mean())
        out.metrics["reward/overlong_penalised_share"] = float((penalty < 0).float().mean())
    for reason, n in Counter(out.reasons).items():
        out.metrics[f"reward/reason/{reason}"] = n / len(out)
    return out
