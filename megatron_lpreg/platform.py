"""Run megatron-core on a machine without a GPU.

megatron-core hard-codes CUDA in a few places that matter at toy size:
``torch.cuda.current_device()`` as a tensor-factory device, the CUDA RNG state
functions of its RNG tracker, ``device="cuda"`` factories and ``.cuda()`` calls
in the pipeline schedules, ``torch.cuda.synchronize()`` around p2p
communication, and ``Tensor.type() == 'torch.cuda.FloatTensor'`` assertions in
its optimiser. :func:`install_cpu_shims` redirects exactly those to the CPU.

It is a no-op when CUDA is available, so the same code runs unchanged on GPU
machines. It touches process-wide state (``torch.cuda`` attributes, one
function mode on the calling thread), so it is installed once per process at
start-up, never implicitly on import. Spawned subprocesses start without it:
every entry point that spawns workers must call it again in the worker.

The "CUDA" RNG of megatron's tracker is mapped onto the default CPU generator,
so forking the tracker really changes the stream CPU dropout draws from (the
tensor-parallel region gets its per-rank seed as on GPU).
"""

from __future__ import annotations

import functools
import threading

import torch
from torch.overrides import TorchFunctionMode

_installed = False
_lock = threading.Lock()


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaFactoriesToCpu(TorchFunctionMode):
    """Maps ``device="cuda"``/``cuda:N`` and ``Tensor.cuda()`` onto the CPU, and
    makes ``Tensor.type()`` (no argument) name CPU tensors as CUDA ones: megatron's
    optimiser and grad clipping assert ``param.type() == 'torch.cuda.FloatTensor'``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _cpu_get_rng_state(*_args, **_kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, *_args, **_kwargs) -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all in turn.
    torch.default_generator.manual_seed(int(seed))


@functools.lru_cache(maxsize=32)
def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()


def cuda_available() -> bool:
    return torch.cuda.is_available()


def install_cpu_shims() -> bool:
    """Redirect megatron-core's CUDA calls to the CPU when there is no GPU.

    Returns True if the shims are (now) active, False on a CUDA machine where
    nothing was changed. Idempotent.
    """
    global _installed
    if cuda_available():
        return False
    with _lock:
        if _installed:
            return True
        torch.cuda.current_device = lambda: "cpu"
        torch.cuda.synchronize = lambda *a, **k: None
        torch.cuda.get_rng_state = _cpu_get_rng_state
        torch.cuda.set_rng_state = _cpu_set_rng_state
        torch.cuda.manual_seed = _cpu_manual_seed

        from megatron.core.tensor_parallel import random as mcore_random

        mcore_random._get_cuda_rng_state = _cpu_get_rng_state
        mcore_random._set_cuda_rng_state = _cpu_set_rng_state

        # Activation recomputation re-runs the forward inside autograd's backward,
        # where the function mode below is not on the stack: the one CUDA factory
        # on that path (the default causal mask) is replaced directly.
        from megatron.core.fusions import fused_softmax
        from megatron.core.transformer import utils as mcore_utils

        mcore_utils.get_default_causal_mask = _cpu_causal_mask
        fused_softmax.get_default_causal_mask = _cpu_causal_mask

        # Entered and never exited: the mode stays on this thread's stack for
        # the life of the process. CPU autograd runs backward on the calling
        # thread, so it is covered too.
        _CudaFactoriesToCpu().__enter__()
        _installed = True
    return True


def default_backend() -> str:
    """torch.distributed backend for this machine: nccl on GPUs, gloo otherwise."""
    return "nccl" if cuda_available() else "gloo"
