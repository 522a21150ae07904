"""Building the trainer's pieces: DDP wrapper, optimiser, LR schedule, rollout engine."""

from __future__ import annotations

import math

import torch.distributed as dist

from megatron_lpreg.config import OptimConfig, RunConfig


class StopRequest:
    """A stop asked from outside: SIGTERM / SIGUSR1 to any rank, or ``stop_file``
    appearing. :meth:`requested` is collective (every rank calls it at the same point
    of the step) so all ranks stop after the same step."""

    def __init__(self, stop_file: str = ""):
        import signal

        self.stop_file = stop_file
        self.flag = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def requested(self) -> bool:
        import os

        import torch

        local = self.flag or bool(self.stop_file and os.path.exists(self.stop_file))
        t = torch.tensor([1.0 if local else 0.0])
        if torch.cuda.is_available():
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def restore(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def is_logging_rank() -> bool:
    from megatron.core import parallel_state as ps

    return (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_data_parallel_rank() == 0)


def model_overrides(par) -> dict:
    """TransformerConfig overrides from ``parallel.*``. Sequence parallelism needs
    Transformer Engine's norms (megatron's torch norm refuses it), so GPU only."""
    from megatron_lpreg.model.builder import te_available

    sp = par.sequence_parallel and par.tp > 1
    if sp and not te_available():
        raise ValueError("parallel.sequence_parallel needs Transformer Engine (a GPU install); "
                         "set parallel.sequence_parallel=false here")
    kw = {"sequence_parallel": sp}
    if par.recompute == "full":
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return kw


def distributed_optimizer(optim: OptimConfig) -> bool:
    """megatron's DistributedOptimizer only accepts CUDA tensors (it checks type
    names); on CPU the plain (replicated-state) optimiser is used instead."""
    from megatron_lpreg import platform

    return optim.use_distributed_optimizer and platform.cuda_available()


def wrap_ddp(gpt, cfg: RunConfig):
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=distributed_optimizer(cfg.optim),
    )
    model = DistributedDataParallel(config=gpt.config, ddp_config=ddp_cfg, module=gpt)
    gpt.config.no_sync_func = model.no_sync
    gpt.config.finalize_model_grads_func = finalize_model_grads
    return model


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


def make_engine(cfg: RunConfig, model, spec, head=None):
    """The configured rollout engine; vLLM joins this job's ranks (see VLLMEngine)."""
    if cfg.rollout.engine == "torch":
        from megatron_lpreg.rollout.torch_engine import TorchEngine

        return TorchEngine(model, spec.vocab_size, head=head)
    from megatron_lpreg.rollout.vllm_engine import VLLMEngine, vllm_available

    if not vllm_available():
        raise RuntimeError("rollout.engine=vllm but vllm is not installed (run `make setup`, "
                           "or set rollout.engine=torch)")
    dtype = {"float32": "float32", "bfloat16": "bfloat16"}[cfg.model.params_dtype]
    return VLLMEngine(cfg.model.hf_dir, tensor_parallel_size=cfg.parallel.tp, dtype=dtype,
                      seed=cfg.train.seed, gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                      cpu_plain_weights=cfg.rollout.cpu_plain_weights)



