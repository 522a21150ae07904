"""The RLVR loop. One step is a short sequence of phases::

    sample (rollout, grading, shaping, refill) -> advantages -> old-policy pass
    -> update (epochs x mini-batches) -> evaluation -> metrics -> checkpoint

Every rank runs :func:`train`; the job's ``torch.distributed`` world, megatron's
parallel state and the process groups (:class:`megatron_lpreg.job.Groups`) are set
up by the caller (:mod:`megatron_lpreg.train`). The pieces a step uses are built
once (:func:`build`); each phase is a function one call below.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_lpreg import collectives
from megatron_lpreg.algo.advantages import grpo_advantages
from megatron_lpreg.collectives import broadcast_object
from megatron_lpreg.config import RunConfig, eval_max_new_tokens, save_config
from megatron_lpreg.data.prompts import ShuffledOrder, load_examples
from megatron_lpreg.data.template import end_token_ids
from megatron_lpreg.eval.run import evaluate
from megatron_lpreg.job import Groups
from megatron_lpreg.loss.aer import AERController
from megatron_lpreg.model.builder import build_gpt, load_hf_weights
from megatron_lpreg.model.hf_config import load_spec
from megatron_lpreg.model.hf_shards import HFShards
from megatron_lpreg.rollout.factory import make_engine
from megatron_lpreg.rollout.weight_sync import WeightSync
from megatron_lpreg.trainer import wandb_log
from megatron_lpreg.trainer.batching import (
    data_parallel_rows,
    mini_batch_positions,
    pack_sequences,
    token_budget_micro_batches,
    token_imbalance,
)
from megatron_lpreg.trainer.gpu_memory import PhaseMemory, release_trainer_cache
from megatron_lpreg.trainer.head import OutputHead
from megatron_lpreg.trainer.logprobs import StatsConfig, sequence_stats
from megatron_lpreg.trainer.memory import estimate
from megatron_lpreg.trainer.metrics import MetricsWriter, precondition_stats, response_token_stats
from megatron_lpreg.trainer.optim import make_optimizer, set_lr
from megatron_lpreg.trainer.parallelize import model_overrides, wrap_ddp
from megatron_lpreg.trainer.perf import straggler_stats
from megatron_lpreg.trainer.reference_batching import uses_reference_batching
from megatron_lpreg.trainer.restarts import record_start, torchrun_restarts
from megatron_lpreg.trainer.run_state import Intervals, RunState, TooManyBadSteps
from megatron_lpreg.trainer.sampling import StepSamples, sample_step
from megatron_lpreg.trainer.state import load_checkpoint, resumable_checkpoint, save_checkpoint
from megatron_lpreg.trainer.stop import StopRequest
from megatron_lpreg.trainer.update import UpdateBatch, policy_update
from megatron_lpreg.trainer.warm_start import warm_start
from megatron_lpreg.trainer.watchdog import Heartbeat

__all__ = ["FINISHED", "TooManyBadSteps", "train"]

FINISHED = "FINISHED"  # written to out_dir when every step is done (launch/ scripts read it)


def train(cfg: RunConfig, groups: Groups | None = None) -> list[dict]:
    """Run (or resume) ``cfg``; returns the metrics records written by this run."""
    t = build(cfg, groups or Groups.from_parallel_state())
    records = []
    t.heartbeat.start()  # from here a rank whose phases stop advancing reports and exits
    try:
        for step in range(t.state.step, cfg.train.steps):
            t.heartbeat.new_step(step)
            timing = {}
            with clock(timing, "step"):
                samples = sample(t, step, timing)
                batch = prepare_update(t, samples, timing)
                updates, lr = update(t, batch, step, timing)
                t.state.record_update(applied=any(not r["skipped"] for r in updates))
                evals = evaluate_if_due(t, timing)
            t.heartbeat.beat("metrics")
            rec = step_record(t, samples, batch, updates, lr, evals, timing)
            if t.state.aer is not None:
                rec.update(aer_step(t, batch, rec.get("actor/entropy")))
            if t.groups.logging_rank:
                t.writer.write(rec)
                records.append(rec)
                log(summary(rec, cfg.train.steps))
            if checkpoint_if_due(t):
                break
        else:
            if dist.get_rank() == 0:
                (t.out / FINISHED).write_text(f"{cfg.train.steps}\n")
    finally:
        t.close()
    return records


# ---------------------------------------------------------------------------- set-up


@dataclass
class Trainer:
    """What the phases use, built once by :func:`build`."""

    cfg: RunConfig
    groups: Groups
    out: Path
    spec: object
    tokenizer: object
    model: object
    head: OutputHead
    optimizer: object
    engine: object
    sync: WeightSync
    pool: object            # reward workers on rank 0, None elsewhere
    examples: list
    stop_ids: tuple[int, ...]
    state: RunState
    intervals: Intervals
    stop: StopRequest
    writer: MetricsWriter
    heartbeat: Heartbeat    # advanced by every phase; started by train()
    memory: PhaseMemory = field(default_factory=PhaseMemory)  # peak GPU memory per phase (CUDA only)

    def close(self) -> None:
        self.heartbeat.close()
        self.stop.restore()
        self.writer.close()
        if self.pool is not None:
            self.pool.close()
        if hasattr(self.engine, "close"):
            self.engine.close()


def build(cfg: RunConfig, groups: Groups, *, initial_checkpoint: bool = True) -> Trainer:
    """Model, weights, data, optimiser, rollout engine, reward workers; resumes from the
    newest checkpoint in ``train.out_dir`` or writes step 0 (after the warm start), unless
    ``initial_checkpoint`` is false (``megatron_lpreg.diagnose``: nothing is ever saved)."""
    import transformers
    from megatron.core import tensor_parallel

    out = Path(cfg.train.out_dir)
    # an in-place restart by torchrun (launch/) is logged with its cause; the nodes count
    # restarts differently, so any rank's count decides
    restarts = collectives.all_reduce(torch.tensor([torchrun_restarts()]), collectives.ReduceOp.MAX, groups.world)
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        record_start(out, restarted=int(restarts.item()) > 0)
        save_config(cfg, out / "config.yaml")
    torch.manual_seed(cfg.train.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)

    spec = load_spec(cfg.model.hf_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.model.tokenizer_dir or cfg.model.hf_dir)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.params_dtype]
    log(f"memory estimate per GPU (see megatron_lpreg/trainer/memory.py):\n"
        f"{estimate(spec, cfg, world_size=dist.get_world_size()).table()}")
    gpt = build_gpt(spec, params_dtype=dtype, attention=cfg.model.attention, **model_overrides(cfg.parallel))
    load_hf_weights(gpt, spec, HFShards(cfg.model.hf_dir).get)
    head = OutputHead(gpt, fused=cfg.model.fused_output, vocab_size=spec.vocab_size, tp_group=groups.tp,
                      chunk_tokens=cfg.model.fused_chunk_tokens, backend=cfg.ops.backend)
    examples = load_examples(cfg.data.train_path, tokenizer, prompt_key=cfg.data.prompt_key,
                             answer_key=cfg.data.answer_key, prompt_template=cfg.data.prompt_template,
                             max_prompt_tokens=cfg.data.max_prompt_tokens)
    aer = AERController.from_config(cfg.algo) if cfg.algo.entropy_control == "aer" else None
    state = RunState(ShuffledOrder(len(examples), cfg.data.shuffle_seed), aer)
    if wandb_log.enabled(cfg):  # a new W&B run's id; a checkpoint's, when resuming, replaces it
        state.wandb_run_id = broadcast_object(wandb_log.new_run_id() if dist.get_rank() == 0 else None)

    model = wrap_ddp(gpt, cfg)
    ckpt = resumable_checkpoint(out, cfg.train.verify_checkpoint, log=log)
    if ckpt is None and cfg.warm_start.steps > 0:  # a checkpoint (step 0 included) comes after it
        warm_start(model, cfg, examples, tokenizer, head, groups)
    optimizer = make_optimizer(model, cfg.optim)
    if ckpt is not None:
        log(f"resuming from {ckpt}")
        state.load_state_dict(load_checkpoint(ckpt, model, optimizer))
        if dist.get_rank() == 0:  # an audit trail of restarts (requeues, resubmissions)
            with open(out / "resume_log.jsonl", "a") as f:
                f.write(json.dumps({"from_step": state.step, "checkpoint": ckpt.name, "time": time.time()}) + "\n")
    elif initial_checkpoint:
        save_checkpoint(out, 0, model, optimizer, state.state_dict(), keep_last=cfg.train.keep_last)

    engine = make_engine(cfg, model, spec, head)
    engine.progress = show_progress(cfg)
    pool = None
    if dist.get_rank() == 0:
        from megatron_lpreg.reward.pool import VerifierPool, grader_function

        pool = VerifierPool(cfg.reward.workers, timeout_s=cfg.reward.timeout_s, memory_mb=cfg.reward.memory_mb,
                            grade_fn=grader_function(cfg.reward.grader, cfg.reward.answer_format))
    wandb_run = None
    if groups.logging_rank and wandb_log.enabled(cfg):
        wandb_run = wandb_log.WandbRun(cfg, out, state.wandb_run_id)
        print(f"[train] W&B run {state.wandb_run_id}: {wandb_run.location}", flush=True)
    writer = MetricsWriter(out if groups.logging_rank else None, tensorboard=cfg.train.tensorboard, wandb=wandb_run)
    writer.truncate_after(state.step)
    return Trainer(cfg, groups, out, spec, tokenizer, model, head, optimizer, engine,
                   WeightSync(model, spec, engine, bucket_bytes=cfg.rollout.sync_bucket_mb << 20, groups=groups),
                   pool, examples, end_token_ids(tokenizer, cfg.model.hf_dir), state, Intervals.from_config(cfg),
                   StopRequest(cfg.train.stop_file), writer,
                   Heartbeat.for_run(cfg.train.hang_timeout_s, out, dist.get_rank()))


# ---------------------------------------------------------------------------- phases


def sample(t: Trainer, step: int, timing: dict) -> StepSamples:
    """Rollout with the current weights (synced first), graded and shaped; with
    ``rollout.dynamic_sampling`` refilled until enough groups are informative."""
    release_trainer_cache()
    t.engine.wake_up("weights")  # before the KV cache: a sync and the cache never peak together
    with clock(timing, "sync", t.heartbeat, t.memory):
        stats = t.sync.sync(t.state.version) if t.engine.weights_version != t.state.version else None
    t.engine.wake_up("kv_cache")
    # which path the sync took: shard-to-shard copies vs full tensors through the stream
    timing["rollout/sync_direct_mb"] = stats.direct_bytes / 2**20 if stats else 0.0
    timing["rollout/sync_streamed_mb"] = stats.bytes / 2**20 if stats else 0.0
    with t.memory.phase(timing, "rollout"):
        samples = sample_step(t.cfg, t.engine, t.tokenizer, t.examples, t.state.order, t.pool, step=step,
                              version=t.state.version, stop_ids=t.stop_ids, beat=t.heartbeat.beat)
    t.engine.sleep()
    timing.update((k, v) for k, v in samples.metrics.items() if k.startswith("time/"))
    return samples


def prepare_update(t: Trainer, samples: StepSamples, timing: dict) -> UpdateBatch:
    """Advantages over the step, this DP rank's rows, and their old-policy pass
    (log-prob, entropy, Lp-Reg proxy) on the ``[N, L]`` grid."""
    cfg = t.cfg
    pad_id = t.tokenizer.pad_token_id if t.tokenizer.pad_token_id is not None else 0
    seqs = pack_sequences(samples.prompts, samples.responses, pad_id)
    adv = grpo_advantages(samples.scores, torch.tensor(samples.group), seqs.mask, norm_by_std=cfg.algo.norm_adv_by_std)
    parts = data_parallel_rows(seqs.lengths, t.groups.dp_size)
    mine = parts[t.groups.dp_rank]
    timing["train/dp_token_imbalance"] = token_imbalance(seqs.lengths, parts)
    my = seqs.rows(mine)
    with clock(timing, "old_logprob", t.heartbeat, t.memory):
        t.model.eval()
        old = sequence_stats(t.model, my, token_budget_micro_batches(my.lengths, cfg.algo.micro_token_budget),
                             t.head, StatsConfig(cfg.rollout.temperature, cfg.algo.proxy, cfg.algo.proxy_threshold))
        t.model.train()
    rollout_lp = torch.zeros_like(my.mask)
    for r, i in enumerate(mine):
        p = len(samples.prompts[i])
        rollout_lp[r, p - 1 : p - 1 + len(samples.responses[i])] = torch.tensor(samples.logprobs[i])
    # earlier pipeline stages have no statistics (no logits): they run the same
    # schedule on placeholders that their loss never reads
    per_token = old or dict.fromkeys(("logprob", "entropy", "proxy_logprob"), torch.zeros_like(my.mask))
    weights = t.state.aer.weights(samples.group_accuracy())[mine] if t.state.aer is not None else None
    # this rank's rows are trimmed to their own longest row (seqs.rows); so are their advantages
    return UpdateBatch(my, adv[mine, : my.mask.shape[1]], per_token["logprob"], per_token["entropy"],
                       per_token["proxy_logprob"], rollout_lp, weights)


def update(t: Trainer, batch: UpdateBatch, step: int, timing: dict) -> tuple[list[dict], float]:
    """``algo.ppo_epochs`` x ``algo.mini_batches`` optimiser steps, then AER's coefficient
    update from the step's entropy. Returns the per-step records and the learning rate."""
    cfg = t.cfg
    lr = set_lr(t.optimizer, cfg.optim, step, cfg.train.steps)
    alpha = t.state.aer.alpha if t.state.aer is not None else 0.0
    minis = mini_batch_positions(len(batch.seqs.lengths), cfg.algo.mini_batches,
                                 reference=uses_reference_batching(cfg.algo))
    steps = [rows for _ in range(cfg.algo.ppo_epochs) for rows in minis]
    records = []
    with clock(timing, "update", memory=t.memory):
        for rows in tqdm(steps, desc="update", leave=False, disable=not show_progress(cfg)):
            t.heartbeat.beat("update")
            records.append(policy_update(t.model, t.optimizer, batch, rows, cfg.algo, head=t.head, groups=t.groups,
                                         temperature=cfg.rollout.temperature, aer_alpha=alpha))
    return records, lr


def evaluate_if_due(t: Trainer, timing: dict) -> dict:
    """The benchmarks (``eval.*``) when the interval says so; the weights reach the engine first."""
    if not t.intervals.eval_due(t.state.step):
        return {}
    cfg = t.cfg
    with clock(timing, "eval", t.heartbeat, t.memory):
        release_trainer_cache()
        t.engine.wake_up("weights")
        if t.engine.weights_version != t.state.version:
            t.sync.sync(t.state.version)
        t.engine.wake_up("kv_cache")
        max_new = eval_max_new_tokens(cfg)
        max_prompt = max(1, t.spec.max_position_embeddings - max_new)
        res = evaluate(t.engine, t.tokenizer, cfg.eval, t.pool, version=t.state.version,
                       max_prompt_tokens=min(max_prompt, cfg.data.max_prompt_tokens), max_new_tokens=max_new,
                       prompt_template=cfg.data.prompt_template, stop_ids=t.stop_ids, seed=cfg.train.seed)
        t.engine.sleep()
    out = {f"eval/{n}/{m}": r[m] for n, r in res.items() if n != "average"
           for m in ("avg@k", "pass@k", "distinct_first_tokens", "strategies") if m in r}
    out["eval/average"] = res.get("average", float("nan"))
    return out


def step_record(t: Trainer, samples: StepSamples, batch: UpdateBatch, updates: list[dict], lr: float,
                evals: dict, timing: dict) -> dict:
    """The step's metrics; token statistics summed over the DP ranks' rows; each phase's
    slowest and fastest rank (``perf/``, one all-gather of every rank's times)."""
    lengths = [len(r) for r in samples.responses]
    rec = {
        "step": t.state.step,
        "policy_version": t.state.version,
        "lr": lr,
        "reward/mean": float(samples.scores.mean()),
        "reward/accuracy": float((samples.correct > 0.5).float().mean()),
        "response/length_mean": sum(lengths) / len(lengths),
        "response/clip_ratio": sum(f == "length" for f in samples.finish_reasons) / len(samples),
        "train/skipped_steps": sum(r.get("skipped", 0) for r in updates),
        "train/bad_steps_total": t.state.bad_total,
        **{k: v for k, v in samples.metrics.items() if not k.startswith("time/")},
        **timing,
        **evals,
        **straggler_stats(timing, t.groups.world),
    }
    rec["rollout/tokens_per_s"] = samples.num_tokens / max(timing["time/rollout_s"], 1e-9)
    if t.groups.last_stage:
        st = response_token_stats(batch.old_logprob, batch.old_entropy, batch.rollout_logprob, batch.seqs.mask,
                                  group=t.groups.dp)
        n = max(st.pop("tokens"), 1.0)
        rec["actor/entropy"] = st["entropy"] / n
        rec["sparks/p_lt_0.1"] = st["spark_p_lt_0.1"] / n
        rec["sparks/p_lt_0.01"] = st["spark_p_lt_0.01"] / n
        rec["rollout/mismatch_abs_mean"] = st["mismatch_abs"] / n
        rec["rollout/mismatch_gt_0.1"] = st["mismatch_gt_0.1"] / n
        pre = precondition_stats(batch.old_logprob, batch.proxy_logprob, batch.advantages, batch.seqs.mask,
                                 neg_percent=t.cfg.algo.neg_percent, group=t.groups.dp)
        rec["sparks/in_proxy_lt_0.1"] = pre["in_proxy_lt_0.1"] / n
        rec["sparks/lowest_neg_in_proxy"] = pre["lowest_neg_in_proxy"] / max(pre["lowest_neg"], 1.0)
    def total(key):
        return sum(r.get(key, 0.0) for r in updates)

    if updates and "lp_reg/selected_tokens" in updates[0]:
        # over the step's mini-batches: what share of the selection Lp-Reg regularised, and how
        # hard it pulled those tokens up against the advantage pushing them down
        n_reg, n_sel = total("lp_reg/regularised_tokens"), total("lp_reg/selected_tokens")
        if n_sel:
            rec["actor/lp_reg/regularised_of_selected"] = n_reg / n_sel
        if n_reg:
            rec["actor/lp_reg/pull_mean"] = total("lp_reg/pull_sum") / n_reg
            rec["actor/lp_reg/adv_abs_on_regularised"] = total("lp_reg/adv_abs_on_regularised_sum") / n_reg
    for key in updates[0] if updates else ():
        if key.endswith("_sum"):
            continue
        vals = [r[key] for r in updates if isinstance(r.get(key), (int, float))]
        if vals:
            # the losses' own "entropy" is over their loss mask (80/20: the top 20% only);
            # actor/entropy stays the policy's entropy over every sampled token
            name = "actor/entropy_in_loss" if key == "entropy" else f"actor/{key}"
            rec[name] = sum(vals) / len(vals)
    return rec


def aer_step(t: Trainer, batch: UpdateBatch, entropy: float | None) -> dict:
    """AER's coefficient for the next step from this step's entropy (measured on the last
    stage, shared with every rank so all keep the same controller)."""
    value = torch.tensor([entropy if entropy is not None else 0.0], dtype=torch.float64)
    if t.groups.pp_size > 1:  # a host value: collectives puts it where the backend wants it
        collectives.broadcast(value, src=dist.get_process_group_ranks(t.groups.pp)[-1], group=t.groups.pp)
    aer = t.state.aer
    used = aer.alpha
    aer.update(float(value))
    w = batch.row_weights
    return {"aer/alpha": used, "aer/next_alpha": aer.alpha, "aer/target_entropy": aer.target,
            "aer/weight_std": float(w.std()) if w is not None and len(w) > 1 else 0.0}


def checkpoint_if_due(t: Trainer) -> bool:
    """Save when the intervals say so; returns True when the run must stop now."""
    t.heartbeat.beat("checkpoint")
    done = t.state.step
    too_bad = t.intervals.too_bad(t.state)
    stopping = t.stop.requested()
    if t.intervals.save_due(done, stopping=stopping, too_bad=too_bad):
        save_checkpoint(t.out, done, t.model, t.optimizer, t.state.state_dict(), keep_last=t.cfg.train.keep_last)
    if too_bad:
        raise TooManyBadSteps(
            f"{t.state.bad_in_row} steps in a row had non-finite loss or gradients (limit "
            f"train.max_bad_steps={t.cfg.train.max_bad_steps}); the last good weights are checkpointed at "
            f"step {done} in {t.out / 'checkpoints'}")
    if stopping and done < t.cfg.train.steps:
        log(f"stop requested: checkpointed step {done}; resubmit (or requeue) to continue")
        return True
    return False


# ---------------------------------------------------------------------------- small helpers


@contextmanager
def clock(timing: dict, name: str, heartbeat: Heartbeat | None = None, memory: PhaseMemory | None = None):
    """Adds the block's seconds to ``timing["time/<name>_s"]``; with a heartbeat, the
    phase ``name`` begins (hang detection); with ``memory``, its peak GPU memory is
    recorded (``memory/<name>_peak_gib``)."""
    t0 = time.perf_counter()
    try:
        if heartbeat is not None:
            heartbeat.beat(name)
        with memory.phase(timing, name) if memory is not None else nullcontext():
            yield
    finally:
        timing[f"time/{name}_s"] = timing.get(f"time/{name}_s", 0.0) + time.perf_counter() - t0


def show_progress(cfg: RunConfig) -> bool:
    """Progress bars on rank 0, and only on a terminal (a log file gets the step lines)."""
    return cfg.train.progress and dist.get_rank() == 0 and sys.stdout.isatty()


def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(f"[train] {msg}", flush=True)


def summary(rec: dict, total: int) -> str:
    def g(k, fmt="{:.3f}"):
        v = rec.get(k)
        return fmt.format(v) if isinstance(v, (int, float)) and math.isfinite(v) else "-"

    return (f"step {rec['step']}/{total} reward {g('reward/mean')} acc {g('reward/accuracy')} "
            f"entropy {g('actor/entropy')} len {g('response/length_mean', '{:.1f}')} "
            f"lp_reg {g('actor/lp_reg/regularised_share', '{:.4f}')} "
            f"tok/s {g('rollout/tokens_per_s', '{:.0f}')} {g('time/step_s', '{:.1f}')}s")
