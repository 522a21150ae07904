"""The optimiser (megatron-core's, distributed where it can be) and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from megatron_lpreg.config import OptimConfig


def distributed_optimizer(optim: OptimConfig) -> bool:
    """Whether to use megatron's DistributedOptimizer (optimiser state sharded over DP).
    It runs on CPU ranks too (gloo; its CUDA type-name checks pass through
    :mod:`megatron_lpreg.platform`), so the CPU tests exercise the path GPU runs take."""
    return optim.use_distributed_optimizer


def make_optimizer(model, optim: OptimConfig, lr: float | None = None):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    cfg = model.module.config
    oc = OptimizerConfig(
        optimizer="adam", lr=optim.lr if lr is None else lr, min_lr=optim.min_lr,
        weight_decay=optim.weight_decay, adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2,
        clip_grad=optim.grad_clip, bf16=cfg.bf16, fp16=False, params_dtype=cfg.params_dtype,
        use_distributed_optimizer=distributed_optimizer(optim),
    )
    return get_megatron_optimizer(oc, [model])


def chained(optimizer) -> list:
    """megatron's optimisers inside ``optimizer`` (a ChainedOptimizer holds one per parameter group)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def has_state(optimizer) -> bool:
    """Whether Adam holds its moments: after the first applied update, never before."""
    return any(o.optimizer.state for o in chained(optimizer))


def is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in chained(optimizer))


# The DistributedOptimizer's checkpoint layout. megatron-core's default
# ("fully_sharded_model_space") writes flattened ranges, which its own torch_dist
# strategy refuses ("ShardedTensor.flattened_range is not supported"); dp_reshardable
# (Megatron-LM's default) writes each rank's buffers as they are: no gather, and a
# resume needs the same data-parallel size.
DIST_OPTIM_SHARDING = "dp_reshardable"


def checkpoint_metadata(optimizer) -> dict | None:
    """The ``metadata`` megatron's ``sharded_state_dict`` calls take, the same for save and load."""
    return {"distrib_optim_sharding_type": DIST_OPTIM_SHARDING} if is_distributed(optimizer) else None


@torch.no_grad()
def prime_state(optimizer) -> None:
    """Give each distributed optimiser without state a zero-filled one, weights untouched.

    Without Transformer Engine or apex, megatron's DistributedOptimizer wraps torch's Adam
    and its ``state_dict()`` asserts that the state holds exactly one step count; the
    loading template is built through it, so a fresh optimiser cannot load a checkpoint.
    One step on zero gradients at learning rate 0 creates the state (moments, step) and
    moves no weight (Adam's update and AdamW's decay both scale with the rate); the
    checkpoint's values then replace it."""
    for o in chained(optimizer):
        inner = o.optimizer
        if inner.state or not is_distributed(o):
            continue
        lrs = [g["lr"] for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"] = 0.0
            for p in g["params"]:
                p.grad = torch.zeros_like(p)
        inner.step()
        for g, lr in zip(inner.param_groups, lrs, strict=True):
            g["lr"] = lr
            for p in g["params"]:
                p.grad = None


@torch.no_grad()
def restore_step_counts(optimizer, loaded) -> None:
    """After ``optimizer.load_state_dict(loaded)``: Adam's step count from the checkpoint.

    megatron-core 0.16's DistributedOptimizer without TE or apex (torch's Adam keeps a step
    per parameter) first sets the step from the checkpoint's parameter groups, then copies
    over it the step of the state its loading template was built from, a fresh
    optimiser's (measured: 1 after a checkpoint of 2 updates). The bias correction would
    then restart. The parameter groups hold the right count: put it back."""
    subs = chained(optimizer)
    parts = [loaded] if len(subs) == 1 else [loaded[i] for i in range(len(subs))]
    for o, part in zip(subs, parts, strict=True):
        if not is_distributed(o):
            continue
        steps = {g["step"] for g in part["optimizer"]["param_groups"] if g.get("step") is not None}
        if len(steps) != 1:
            continue  # TE's / apex's FusedAdam keep the step in the groups themselves
        step = float(steps.pop())
        for state in o.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = torch.full_like(state["step"], step)


def lr_at(optim: OptimConfig, step: int, total: int) -> float:
    if optim.warmup_steps and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "cosine":
        span = max(total - optim.warmup_steps, 1)
        frac = min(max(step - optim.warmup_steps, 0) / span, 1.0)
        return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * frac))
    return optim.lr


def set_lr(optimizer, optim: OptimConfig, step: int, total: int) -> float:
    lr = lr_at(optim, step, total)
    for g in optimizer.param_groups:
        g["lr"] = lr
    return lr
