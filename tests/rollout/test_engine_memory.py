"""Colocated vLLM on a GPU, checked without one: the engine's arguments (against vLLM's
own ``EngineArgs``), sleep level 2 with the weights reported gone, waking weights before
the KV cache with the allocator's cache emptied first, and the trainer's order of calls
around a rollout. A stand-in replaces ``vllm.LLM``; the CUDA switch is forced on."""

from __future__ import annotations

import dataclasses
import types

import pytest

pytest.importorskip("vllm")

from megatron_lpreg.rollout import vllm_engine  # noqa: E402


class FakeLLM:
    def __init__(self, log, **kw):
        self.log, self.kw = log, kw
        sleep_mode = kw["enable_sleep_mode"]
        model_config = types.SimpleNamespace(enable_sleep_mode=sleep_mode)
        self.llm_engine = types.SimpleNamespace(vllm_config=types.SimpleNamespace(model_config=model_config))
        log.append("LLM()")

    def sleep(self, level):
        self.log.append(f"sleep({level})")

    def wake_up(self, tags=None):
        self.log.append(f"wake_up({','.join(tags)})")


@pytest.fixture
def gpu_engine(monkeypatch):
    import vllm

    log: list[str] = []
    monkeypatch.setattr(vllm, "LLM", lambda **kw: FakeLLM(log, **kw))
    monkeypatch.setattr(vllm_engine.platform, "cuda_available", lambda: True)
    monkeypatch.setattr(vllm_engine.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(vllm_engine.dist, "get_world_size", lambda group=None: 1)
    monkeypatch.setattr(vllm_engine, "free_cached_memory", lambda: log.append("empty_cache"))

    def make(**kw):
        engine = vllm_engine.VLLMEngine("/models/m", gpu_memory_utilization=0.6, max_model_len=9216, **kw)
        return engine, log

    return make


def test_engine_arguments_are_vllms(gpu_engine):
    from vllm.engine.arg_utils import EngineArgs

    engine, log = gpu_engine()
    kw = engine.llm.kw
    assert set(kw) - {f.name for f in dataclasses.fields(EngineArgs)} == set()  # every one a real engine arg
    assert kw["enable_sleep_mode"] is True and kw["max_model_len"] == 9216 and kw["gpu_memory_utilization"] == 0.6
    assert "kv_cache_memory_bytes" not in kw  # on a GPU the share of memory decides
    assert log == ["empty_cache", "LLM()"]  # the trainer's cached blocks are free before vLLM profiles


def test_sleep_level_2_discards_weights_and_wakes_weights_first(gpu_engine):
    engine, log = gpu_engine()
    engine.set_version(3)
    log.clear()
    engine.sleep()
    assert engine.weights_version == -1  # discarded: the trainer must sync before sampling
    engine.sleep()  # idempotent
    engine.wake_up("weights")
    engine.wake_up("weights")  # already awake: nothing
    engine.wake_up("kv_cache")
    assert log == ["sleep(2)", "empty_cache", "wake_up(weights)", "empty_cache", "wake_up(kv_cache)"]


def test_sleep_level_1_keeps_the_weights(gpu_engine):
    engine, log = gpu_engine(sleep_level=1)
    engine.set_version(3)
    engine.sleep()
    engine.wake_up()
    assert engine.weights_version == 3 and log[-3:] == ["sleep(1)", "empty_cache", "wake_up(weights,kv_cache)"]
    with pytest.raises(ValueError, match="sleep_level"):
        gpu_engine(sleep_level=3)


def test_trainer_wakes_weights_syncs_then_wakes_the_cache(monkeypatch):
    from megatron_lpreg.trainer import loop
    from megatron_lpreg.trainer.gpu_memory import PhaseMemory

    log: list[str] = []

    class Engine:
        weights_version = -1  # slept at level 2

        def wake_up(self, what="all"):
            log.append(f"wake_up({what})")

        def sleep(self):
            log.append("sleep")

    class Sync:
        def sync(self, version):
            log.append(f"sync({version})")
            return types.SimpleNamespace(direct_bytes=0, bytes=0)

    monkeypatch.setattr(loop, "release_trainer_cache", lambda: log.append("release_trainer_cache"))
    monkeypatch.setattr(loop, "sample_step", lambda *a, **k: log.append("rollout") or types.SimpleNamespace(metrics={}))
    t = types.SimpleNamespace(engine=Engine(), sync=Sync(), state=types.SimpleNamespace(version=4, order=None),
                              memory=PhaseMemory(), heartbeat=types.SimpleNamespace(beat=lambda phase: None),
                              cfg=None, tokenizer=None, examples=None, pool=None, stop_ids=())
    loop.sample(t, 0, {})
    assert log == ["release_trainer_cache", "wake_up(weights)", "sync(4)", "wake_up(kv_cache)", "rollout", "sleep"]


def test_max_model_len_covers_prompt_and_the_longer_response():
    from megatron_lpreg.config import RunConfig
    from megatron_lpreg.rollout.factory import max_model_len

    cfg = RunConfig()
    cfg.data.max_prompt_tokens, cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens = 1024, 8192, 0
    spec = types.SimpleNamespace(max_position_embeddings=40960)
    assert max_model_len(cfg, spec) == 9216
    cfg.eval.max_new_tokens = 16384
    assert max_model_len(cfg, spec) == 1024 + 16384
    spec.max_position_embeddings = 4096
    assert max_model_len(cfg, spec) == 4096
