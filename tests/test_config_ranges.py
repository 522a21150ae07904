"""Every numeric config key declares its allowed range (``num(default, "[lo, hi]")`` in
megatron_lpreg/config.py) and a value outside it is one error naming key, value and
range; the rules between keys too. The keys are found by walking the dataclasses, so a
new numeric key without a range fails here."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from megatron_lpreg.config import ConfigError, RunConfig, load_config
from tests.trainer.runs import CONFIG


def numeric_keys(cls=RunConfig, prefix: str = ""):
    """``(key, field, type)`` of every int / float field under ``cls`` (optional ones too);
    a name -> section mapping (eval.per_benchmark) is entered under the name ``aime24``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if dataclasses.is_dataclass(tp):
            yield from numeric_keys(tp, f"{prefix}{f.name}.")
        elif typing.get_origin(tp) is dict:
            yield from numeric_keys(args[1], f"{prefix}{f.name}.aime24.")
        elif tp in (int, float) or (len(args) == 1 and args[0] in (int, float)):
            yield f"{prefix}{f.name}", f, (tp if tp in (int, float) else args[0])


KEYS = list(numeric_keys())


def outside(rng, tp) -> int | float:
    """A value just outside ``rng`` (below it where it has a lower bound)."""
    lo, hi, lo_open, hi_open = rng.bounds()
    step = 1 if tp is int else 0.5
    if math.isfinite(lo):
        value = lo if lo_open else lo - step
        while value in rng.also:
            value -= step
    else:
        value = hi if hi_open else hi + step
    return int(value) if tp is int else value


def test_the_walk_finds_the_keys():
    names = {k for k, _, _ in KEYS}
    assert {"algo.neg_percent", "rollout.n", "rollout.temperature", "optim.lr",
            "eval.per_benchmark.aime24.k", "algo.tis_cap"} <= names
    assert len(names) >= 60  # 60 when written; more as keys are added


@pytest.mark.parametrize("key", [k for k, _, _ in KEYS])
def test_every_numeric_key_declares_a_range(key):
    field = dict((k, f) for k, f, _ in KEYS)[key]
    assert "range" in field.metadata, (f"{key} has no allowed range: declare it with num(default, '[lo, hi]') "
                                       "in megatron_lpreg/config.py")


@pytest.mark.parametrize("key,field,tp", KEYS, ids=[k for k, _, _ in KEYS])
def test_a_value_outside_the_range_is_refused_naming_key_value_and_range(key, field, tp):
    rng = field.metadata["range"]
    bad = outside(rng, tp)
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG, [f"{key}={bad}"])
    assert str(e.value) == f"{key}={tp(bad)} is out of range: allowed {rng}"


@pytest.mark.parametrize("override,msg", [
    ("algo.neg_percent=-0.5", "algo.neg_percent=-0.5 is out of range: allowed [0, 1]"),
    ("rollout.n=1", "rollout.n=1 is out of range: allowed [2, inf) (advantages are normalised"),
    ("rollout.temperature=0", "rollout.temperature=0.0 is out of range: allowed (0, inf) (greedy (0)"),
    ("algo.proxy_threshold=0", "algo.proxy_threshold=0.0 is out of range: allowed (0, 1]"),
    ("rollout.gpu_memory_utilization=1.5", "rollout.gpu_memory_utilization=1.5 is out of range: allowed (0, 1]"),
    ("optim.lr=nan", "optim.lr=nan is out of range: allowed (0, inf)"),
    ("optim.min_lr=1", "optim.min_lr=1.0 must be <= optim.lr="),
    ("eval.every_n_steps=5 eval.k=4", "eval: temperature=0 is greedy (one response per problem) but k=4"),
    ("eval.every_n_steps=5 eval.per_benchmark.aime24.k=4", "eval.per_benchmark.aime24: temperature=0 is greedy"),
    ("logging.wandb.mode=cloud", "logging.wandb.mode='cloud' is not one of ('online', 'offline')"),
])
def test_named_rules(override, msg):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG, [*override.split(), "eval.benchmarks=aime24"])
    assert str(e.value).startswith(msg), str(e.value)


@pytest.mark.parametrize("overrides", [
    ["rollout.top_k=-1"], ["rollout.top_k=0"], ["rollout.top_k=20"], ["algo.clip_low=1.0"], ["algo.tis_cap=null"],
    ["train.hang_timeout_s=0"], ["eval.k=8", "eval.temperature=0.6", "eval.every_n_steps=5"],
    ["eval.k=8"],  # greedy with k > 1 is only refused where the run evaluates
    ["eval.benchmarks=aime24", "eval.k=8", "eval.per_benchmark.aime24.temperature=0.6", "eval.every_n_steps=5"],
])
def test_edge_values_inside_the_ranges_load(overrides):
    load_config(CONFIG, overrides)


def test_the_launcher_checks_ranges_without_the_registries():
    with pytest.raises(ConfigError, match="rollout.n=1 is out of range"):
        load_config(CONFIG, ["rollout.n=1"], check_values=False)
