"""The model for training: parallel TransformerConfig overrides and the DDP wrapper
(applied from outside the plain GPTModel)."""

from __future__ import annotations

from megatron_lpreg.config import RunConfig
from megatron_lpreg.trainer.optim import distributed_optimizer


def model_overrides(par) -> dict:
    """TransformerConfig overrides from ``parallel.*``. Sequence parallelism needs
    Transformer Engine's norms (megatron's torch norm refuses it), so GPU only."""
    from megatron_lpreg.model.attention import te_available

    sp = par.sequence_parallel and par.tp > 1
    if sp and not te_available():
        raise ValueError("parallel.sequence_parallel needs Transformer Engine (a GPU install); "
                         "set parallel.sequence_parallel=false here")
    kw = {"sequence_parallel": sp}
    if par.recompute == "full":
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return kw


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
