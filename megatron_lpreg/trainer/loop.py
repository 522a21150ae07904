"""The RLVR loop, top to bottom:

    rollout (vLLM) -> reward -> advantages -> old-policy pass (log-probs + proxy)
    -> PPO epochs over mini-batches -> weight sync (next step) -> metrics -> checkpoint

Every rank runs this function; the job's ``torch.distributed`` world and
megatron's parallel state are set up by the caller (:mod:`megatron_lpreg.train`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_lpreg.algo.advantages import grpo_advantages
from megatron_lpreg.config import (
    RunConfig,
    eval_max_new_tokens,
    save_config,
    uses_reference_batching,
)
from megatron_lpreg.data.prompts import ShuffledOrder, load_examples
from megatron_lpreg.data.template import end_token_ids
from megatron_lpreg.eval.run import evaluate
from megatron_lpreg.job import broadcast_object
from megatron_lpreg.model.builder import build_gpt, load_hf_weights
from megatron_lpreg.model.convert import HFShards
from megatron_lpreg.model.hf_config import load_spec
from megatron_lpreg.rollout.engine import SamplingConfig
from megatron_lpreg.rollout.weight_sync import WeightSync
from megatron_lpreg.trainer.batching import (
    data_parallel_rows,
    mini_batch_positions,
    pack_sequences,
    token_budget_micro_batches,
)
from megatron_lpreg.trainer.head import OutputHead
from megatron_lpreg.trainer.logprobs import StatsConfig, sequence_stats
from megatron_lpreg.trainer.memory import estimate
from megatron_lpreg.trainer.metrics import MetricsWriter, response_token_stats
from megatron_lpreg.trainer.setup import (
    StopRequest,
    is_logging_rank,
    make_engine,
    make_optimizer,
    model_overrides,
    set_lr,
    wrap_ddp,
)
from megatron_lpreg.trainer.state import latest_checkpoint, load_checkpoint, save_checkpoint
from megatron_lpreg.trainer.update import UpdateBatch, policy_update
from megatron_lpreg.trainer.warm_start import warm_start


class TooManyBadSteps(RuntimeError):
    pass


FINISHED = "FINISHED"  # written to out_dir when every step is done (launch/ scripts read it)


def _log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(f"[train] {msg}", flush=True)


def train(cfg: RunConfig) -> list[dict]:
    """Run (or resume) ``cfg``; returns the metrics records written by this run."""
    import transformers
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    out = Path(cfg.train.out_dir)
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    torch.manual_seed(cfg.train.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)

    spec = load_spec(cfg.model.hf_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.model.tokenizer_dir or cfg.model.hf_dir)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.params_dtype]
    _log(f"memory estimate per GPU (see megatron_lpreg/trainer/memory.py):\n"
         f"{estimate(spec, cfg, world_size=dist.get_world_size()).table()}")
    gpt = build_gpt(spec, params_dtype=dtype, **model_overrides(cfg.parallel))
    load_hf_weights(gpt, spec, HFShards(cfg.model.hf_dir).get)
    head = OutputHead(gpt, fused=cfg.model.fused_output, vocab_size=spec.vocab_size,
                      tp_group=ps.get_tensor_model_parallel_group(), chunk_tokens=cfg.model.fused_chunk_tokens)
    examples = load_examples(cfg.data.train_path, tokenizer, prompt_key=cfg.data.prompt_key,
                             answer_key=cfg.data.answer_key, prompt_template=cfg.data.prompt_template,
                             max_prompt_tokens=cfg.data.max_prompt_tokens)
    order = ShuffledOrder(len(examples), cfg.data.shuffle_seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stop_ids = end_token_ids(tokenizer, cfg.model.hf_dir)

    model = wrap_ddp(gpt, cfg)
    state = {"step": 0, "version": 0, "bad_in_row": 0, "bad_total": 0}
    ckpt = latest_checkpoint(out)
    if ckpt is None and cfg.warm_start.steps > 0:  # a checkpoint (step 0 included) comes after it
        warm_start(model, cfg, examples, tokenizer, head)
    optimizer = make_optimizer(model, cfg.optim)
    if ckpt is not None:
        _log(f"resuming from {ckpt}")
        state = load_checkpoint(ckpt, model, optimizer)
        if dist.get_rank() == 0:  # an audit trail of restarts (requeues, resubmissions)
            with open(out / "resume_log.jsonl", "a") as f:
                f.write(json.dumps({"from_step": state["step"], "checkpoint": ckpt.name, "time": time.time()}) + "\n")
        order.load_state_dict(state.pop("data"))
    else:
        save_checkpoint(out, 0, model, optimizer, dict(state, data=order.state_dict()),
                        keep_last=cfg.train.keep_last)

    engine = make_engine(cfg, model, spec, head)
    show_progress = cfg.train.progress and dist.get_rank() == 0
    engine.progress = show_progress
    sync = WeightSync(model, spec, engine, bucket_bytes=cfg.rollout.sync_bucket_mb << 20)
    pool = None
    if dist.get_rank() == 0:
        from megatron_lpreg.reward.pool import VerifierPool

        pool = VerifierPool(cfg.reward.workers, timeout_s=cfg.reward.timeout_s, memory_mb=cfg.reward.memory_mb,
                            answer_format=cfg.reward.answer_format)
    stop = StopRequest(cfg.train.stop_file)
    writer = MetricsWriter(out if is_logging_rank() else None, tensorboard=cfg.train.tensorboard)
    writer.truncate_after(state["step"])
    records = []
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    stats_cfg = StatsConfig(cfg.rollout.temperature, cfg.algo.proxy, cfg.algo.proxy_threshold)
    try:
        for step in range(state["step"], cfg.train.steps):
            t0 = time.perf_counter()
            timing = {}
            # ---- rollout
            picked = order.take(cfg.rollout.prompts_per_step)
            prompts = [examples[i].prompt_ids for i in picked]
            engine.wake_up()
            sync_stats = sync.sync(state["version"]) if engine.weights_version != state["version"] else None
            timing["time/sync_s"] = sync_stats.seconds if sync_stats else 0.0
            # which path the sync took: shard-to-shard copies vs full tensors through the stream
            timing["rollout/sync_direct_mb"] = sync_stats.direct_bytes / 2**20 if sync_stats else 0.0
            timing["rollout/sync_streamed_mb"] = sync_stats.bytes / 2**20 if sync_stats else 0.0
            sampling = SamplingConfig(
                n=cfg.rollout.n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                top_k=cfg.rollout.top_k, max_new_tokens=cfg.rollout.max_new_tokens,
                stop_token_ids=stop_ids, seed=cfg.train.seed * 100_003 + step,
            )
            t = time.perf_counter()
            batch = engine.generate(prompts, sampling, expected_version=state["version"])
            engine.sleep()
            timing["time/rollout_s"] = time.perf_counter() - t

            # ---- reward (rank 0 grades, every rank receives)
            t = time.perf_counter()
            graded = None
            if pool is not None:
                texts = [tokenizer.decode(r, skip_special_tokens=True) for r in batch.responses]
                truths = [examples[picked[i]].answer for i in batch.prompt_index]
                graded = [(g.score, g.reason) for g in pool.score(texts, truths)]
            graded = broadcast_object(graded)
            timing["time/reward_s"] = time.perf_counter() - t
            scores = torch.tensor([g[0] for g in graded], dtype=torch.float32)

            # ---- advantages and the old-policy pass (this DP rank's rows)
            seqs = pack_sequences(batch.prompts, batch.responses, pad_id)
            adv = grpo_advantages(scores, torch.tensor(batch.prompt_index), seqs.mask,
                                  norm_by_std=cfg.algo.norm_adv_by_std)
            reference = uses_reference_batching(cfg.algo)
            mine = data_parallel_rows(seqs.lengths, dp, dp_rank, reference=reference)
            my = seqs.rows(mine)
            t = time.perf_counter()
            model.eval()
            old = sequence_stats(model, my, token_budget_micro_batches(my.lengths, cfg.algo.micro_token_budget),
                                 head, stats_cfg)
            model.train()
            timing["time/old_logprob_s"] = time.perf_counter() - t
            rollout_lp = torch.zeros_like(my.mask)
            for r, i in enumerate(mine):
                p = len(batch.prompts[i])
                rollout_lp[r, p - 1 : p - 1 + len(batch.responses[i])] = torch.tensor(batch.logprobs[i])

            # ---- update
            t = time.perf_counter()
            lr = set_lr(optimizer, cfg.optim, step, cfg.train.steps)
            # earlier pipeline stages have no statistics (no logits): they run the same
            # schedule on placeholders that their loss never reads
            per_token = old or dict.fromkeys(("logprob", "entropy", "proxy_logprob"), torch.zeros_like(my.mask))
            ub = UpdateBatch(my, adv[mine], per_token["logprob"], per_token["entropy"], per_token["proxy_logprob"],
                             rollout_lp)
            chunks = mini_batch_positions(len(mine), cfg.algo.mini_batches, reference=reference)
            steps = [(e, c) for e in range(cfg.algo.ppo_epochs) for c in chunks]
            upd = []
            for _, chunk in tqdm(steps, desc="update", leave=False, disable=not show_progress):
                upd += policy_update(model, optimizer, ub, cfg.algo, head=head,
                                     temperature=cfg.rollout.temperature, mini_batch_rows=[chunk])
            timing["time/update_s"] = time.perf_counter() - t
            # skips are decided collectively (one all-reduce), so every rank counts the same
            if any(not r["skipped"] for r in upd):
                state["version"] += 1
                state["bad_in_row"] = 0
            else:
                state["bad_in_row"] += 1
                state["bad_total"] += 1
            state["step"] = step + 1

            # ---- periodic evaluation (the weights reach the engine first)
            eval_rec = {}
            if cfg.eval.every_n_steps and (step + 1) % cfg.eval.every_n_steps == 0:
                t = time.perf_counter()
                engine.wake_up()
                if engine.weights_version != state["version"]:
                    sync.sync(state["version"])
                max_new = eval_max_new_tokens(cfg)
                max_prompt = max(1, spec.max_position_embeddings - max_new)
                res = evaluate(engine, tokenizer, cfg.eval, pool, version=state["version"],
                               max_prompt_tokens=min(max_prompt, cfg.data.max_prompt_tokens),
                               max_new_tokens=max_new, prompt_template=cfg.data.prompt_template,
                               stop_ids=stop_ids, seed=cfg.train.seed)
                engine.sleep()
                eval_rec = {f"eval/{n}/{m}": r[m] for n, r in res.items() if n != "average"
                            for m in ("avg@k", "pass@k")}
                eval_rec["eval/average"] = res.get("average", float("nan"))
                eval_rec["time/eval_s"] = time.perf_counter() - t

            # ---- metrics
            rec = _step_record(step, batch, scores, graded, old, rollout_lp, my, upd, timing, lr, state)
            rec.update(eval_rec)
            rec["time/step_s"] = time.perf_counter() - t0
            rec["rollout/tokens_per_s"] = batch.num_tokens / max(timing["time/rollout_s"], 1e-9)
            if is_logging_rank():
                writer.write(rec)
                records.append(rec)
                _log(_summary(rec, cfg.train.steps))

            # ---- checkpoint
            last = step + 1 == cfg.train.steps
            too_bad = state["bad_in_row"] > cfg.train.max_bad_steps
            stopping = stop.requested()
            if last or too_bad or stopping or (step + 1) % cfg.train.save_every == 0:
                save_checkpoint(out, step + 1, model, optimizer, dict(state, data=order.state_dict()),
                                keep_last=cfg.train.keep_last)
            if stopping and not last:
                _log(f"stop requested: checkpointed step {step + 1}; resubmit (or requeue) to continue")
                break
            if too_bad:
                raise TooManyBadSteps(
                    f"{state['bad_in_row']} steps in a row had non-finite loss or gradients "
                    f"(limit train.max_bad_steps={cfg.train.max_bad_steps}); the last good weights are "
                    f"checkpointed at step {step + 1} in {out / 'checkpoints'}"
                )
        else:
            if dist.get_rank() == 0:
                (out / FINISHED).write_text(f"{cfg.train.steps}\n")
    finally:
        stop.restore()
        writer.close()
        if pool is not None:
            pool.close()
        if hasattr(engine, "close"):
            engine.close()
    return records


def _step_record(step, batch, scores, graded, old, rollout_lp, my, upd, timing, lr, state) -> dict:
    from collections import Counter

    lengths = [len(r) for r in batch.responses]
    rec = {
        "step": step + 1,
        "policy_version": state["version"],
        "lr": lr,
        "reward/mean": float(scores.mean()),
        "reward/accuracy": float((scores > 0.5).float().mean()),
        "response/length_mean": sum(lengths) / len(lengths),
        "response/clip_ratio": sum(f == "length" for f in batch.finish_reasons) / len(batch),
        "train/skipped_steps": sum(r.get("skipped", 0) for r in upd),
        "train/bad_steps_total": state["bad_total"],
        **timing,
    }
    for reason, n in Counter(g[1] for g in graded).items():
        rec[f"reward/reason/{reason}"] = n / len(graded)
    if old is not None:
        st = response_token_stats(old["logprob"], old["entropy"], rollout_lp, my.mask)
        n = max(st.pop("tokens"), 1.0)
        rec["actor/entropy"] = st["entropy"] / n
        rec["sparks/p_lt_0.1"] = st["spark_p_lt_0.1"] / n
        rec["sparks/p_lt_0.01"] = st["spark_p_lt_0.01"] / n
        rec["rollout/mismatch_abs_mean"] = st["mismatch_abs"] / n
        rec["rollout/mismatch_gt_0.1"] = st["mismatch_gt_0.1"] / n
    if upd:
        for key in upd[0]:
            vals = [r[key] for r in upd if isinstance(r.get(key), (int, float))]
            if vals:
                # the losses' own "entropy" is over their loss mask (80/20: the top 20% only);
                # actor/entropy stays the policy's entropy over every sampled token
                name = "actor/entropy_in_loss" if key == "entropy" else f"actor/{key}"
                rec[name] = sum(vals) / len(vals)
    return rec


def _summary(rec: dict, total: int) -> str:
    def g(k, fmt="{:.3f}"):
        v = rec.get(k)
        return fmt.format(v) if isinstance(v, (int, float)) and math.isfinite(v) else "-"

    return (f"step {rec['step']}/{total} reward {g('reward/mean')} acc {g('reward/accuracy')} "
            f"entropy {g('actor/entropy')} len {g('response/length_mean', '{:.1f}')} "
            f"lp_reg {g('actor/lp_reg/regularised_share', '{:.4f}')} "
            f"tok/s {g('rollout/tokens_per_s', '{:.0f}')} {g('time/step_s', '{:.1f}')}s")
