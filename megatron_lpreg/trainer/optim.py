"""The optimiser (megatron-core's, distributed where it can be) and the learning-rate schedule."""

from __future__ import annotations

import math

from megatron_lpreg.config import OptimConfig


def distributed_optimizer(optim: OptimConfig) -> bool:
    """megatron's DistributedOptimizer only accepts CUDA tensors (it checks type
    names); on CPU the plain (replicated-state) optimiser is used instead."""
    from megatron_lpreg import platform

    return optim.use_distributed_optimizer and platform.cuda_available()


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
