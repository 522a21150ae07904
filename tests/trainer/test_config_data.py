"""Config loading, dataset reading, resumable order, sequence packing, plotting."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_lpreg.config import ConfigError, load_config, parse_override
from megatron_lpreg.data.prompts import DataError, ShuffledOrder, get_path, read_rows
from megatron_lpreg.data.template import encode_prompt
from megatron_lpreg.trainer.batching import pack_sequences, token_budget_micro_batches
from tests.trainer.runs import CONFIG


def test_example_config_loads_with_typed_overrides():
    cfg = load_config(CONFIG, ["algo.loss=grpo", "train.steps=7", "algo.kl_coef=0.5", "train.tensorboard=false"])
    assert (cfg.algo.loss, cfg.train.steps, cfg.algo.kl_coef, cfg.train.tensorboard) == ("grpo", 7, 0.5, False)
    assert cfg.algo.selection_scope == "global"  # the project's default for Lp-Reg


@pytest.mark.parametrize("override,msg", [
    ("algo.lossy=grpo", "unknown config key 'algo.lossy'"),
    ("train.steps=ten", "expected int"),
    ("train.steps=1.5", "expected an integer"),
    ("algo.loss=nope", "is not one of"),
    ("algo=3", "is a section"),
    ("train.steps", "not key=value"),
    ("algo.entropy_coef=0.01", "only acts with algo.entropy_control=bonus"),
    ("algo.entropy_control=bonuss", "algo.entropy_control='bonuss' is not one of"),
    ("algo.tis_cap=0", r"algo.tis_cap=0.0 is out of range: allowed \(0, inf\)"),
    ("algo.selection_scope=everywhere", "is not one of"),
    ("algo.loss_agg_mode=token-sum", "is not one of"),
    ("reward.overlong_buffer_tokens=9", "must be in"),
    ("rollout.max_sampling_rounds=0", r"allowed \[1, inf\)"),
])
def test_bad_config_is_an_error(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(CONFIG, [override])


def test_values_that_look_like_yaml11_numbers_stay_strings(tmp_path):
    cfg = load_config(CONFIG, ["algo.entropy_control=80_20", "train.steps=1_000", "optim.lr=1e-6"])
    assert (cfg.algo.entropy_control, cfg.train.steps, cfg.optim.lr) == ("80_20", 1000, 1e-6)
    path = tmp_path / "c.yaml"
    path.write_text("algo:\n  entropy_control: 80_20\n")
    assert load_config(path).algo.entropy_control == "80_20"


def test_aer_pieces_are_checked_by_name():
    cfg = load_config(CONFIG, ["algo.entropy_control=aer", "algo.aer_allocation=uniform"])
    assert cfg.algo.aer_allocation == "uniform"
    with pytest.raises(ConfigError, match="aer_allocation='hardness' is not one of"):
        load_config(CONFIG, ["algo.entropy_control=aer", "algo.aer_allocation=hardness"])
    with pytest.raises(ConfigError, match="target_ratio"):
        load_config(CONFIG, ["algo.entropy_control=aer", "algo.aer_target_ratio=1.5"])


def test_parse_override_nests():
    assert parse_override("a.b.c=0.5") == {"a": {"b": {"c": 0.5}}}
    # YAML reads 1e-3 as a string; the typed field still gets a float
    assert load_config(CONFIG, ["optim.lr=1e-3"]).optim.lr == 1e-3


def test_rows_from_jsonl_and_parquet(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "1+1"}], "reward_model": {"ground_truth": "2"}}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.parquet"):
        got = read_rows(tmp_path / name)
        assert get_path(got[0], "reward_model.ground_truth") == "2"
    with pytest.raises(DataError, match="no field"):
        get_path(rows[0], "reward_model.answer")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="bad.jsonl:1"):
        read_rows(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="never downloaded"):
        read_rows(tmp_path / "missing.jsonl")


class _Tok:
    chat_template = "(fake)"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "".join(chr(100 + i) for i in range(10 * len(messages)))

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_prompts_are_left_truncated():
    ids = encode_prompt(_Tok(), "x", template="chat", max_tokens=4)
    assert ids == [106, 107, 108, 109]  # the end (next to the generation prompt) survives


def test_order_resumes_exactly_across_epochs():
    a = ShuffledOrder(7, seed=3)
    first = a.take(5)
    b = ShuffledOrder(7, seed=3)
    b.load_state_dict(a.state_dict())
    assert a.take(12) == b.take(12)
    assert sorted(first + ShuffledOrder(7, 3).take(7)[5:]) == list(range(7))  # an epoch is a permutation
    with pytest.raises(DataError):
        ShuffledOrder(8, 3).load_state_dict(a.state_dict())


def test_pack_sequences_layout():
    s = pack_sequences([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0)
    assert s.tokens.tolist() == [[5, 6, 7, 1, 2], [8, 3, 4, 9, 0]]
    # position t predicts token t+1; the mask marks response targets only
    assert s.targets.tolist() == [[6, 7, 1, 2, 0], [3, 4, 9, 0, 0]]
    assert s.mask.tolist() == [[0, 0, 1, 1, 0], [1, 1, 1, 0, 0]]
    sub = s.rows([1])
    assert sub.tokens.shape == (1, 4) and sub.mask.sum() == 3


def test_token_budget_micro_batches():
    lengths = torch.tensor([10, 3, 9, 4, 30])
    mbs = token_budget_micro_batches(lengths, 20)
    assert sorted(i for m in mbs for i in m) == list(range(5))
    for m in mbs:
        assert len(m) == 1 or max(int(lengths[i]) for i in m) * len(m) <= 20
    assert [4] in mbs  # longer than the budget: alone


def test_plot_run_writes_png_and_summary(tmp_path, capsys):
    from tools.plot_run import main

    for name, slope in (("a", 0.01), ("b", 0.02)):
        d = tmp_path / name
        d.mkdir()
        recs = [{"step": i, "reward/mean": slope * i, "actor/entropy": 1 - slope * i} for i in range(1, 21)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "cmp.png"
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--summary", "--window", "5"]) == 0
    assert out.stat().st_size > 5000 and out.read_bytes()[:4] == b"\x89PNG"
    text = capsys.readouterr().out
    assert "| b | reward/mean | 0.0600 | 0.3600 |" in text


@pytest.mark.parametrize("name,model,params_b", [
    ("qwen3_14b_lpreg_onpolicy", "qwen3_14b_base", 14.77),
    ("qwen3_14b_lpreg_offpolicy", "qwen3_14b_base", 14.77),
    ("qwen25_32b_lpreg_onpolicy", "qwen25_32b_base", 32.76),
    ("qwen25_32b_lpreg_offpolicy", "qwen25_32b_base", 32.76),
])
def test_published_configs_fit_80gb_gpus(name, model, params_b):
    from megatron_lpreg.model.hf_config import spec_from_hf_config
    from megatron_lpreg.trainer.memory import estimate

    cfg = load_config(CONFIG.parent / f"{name}.yaml")
    spec = spec_from_hf_config(json.loads((CONFIG.parent / "model_configs" / f"{model}.json").read_text()))
    spec.check_parallel(cfg.parallel.tp, cfg.parallel.pp)
    est = estimate(spec, cfg, world_size=64)
    assert abs(est.params / 1e9 - params_b) < 0.01  # the published model sizes
    assert est.training_gb < 80 and est.rollout_gb < 80
    # the fused output layer replaces tokens x vocab/tp logits (+ grad) by one chunk + the W gradient
    assert cfg.model.fused_output
    vocab_here = spec.padded_vocab_size(cfg.parallel.tp) / cfg.parallel.tp
    chunk = cfg.model.fused_chunk_tokens * vocab_here * 2 + vocab_here * spec.hidden_size * 4
    assert est.logits_gb == pytest.approx(chunk / 1e9)
    cfg.model.fused_output = False
    unfused = estimate(spec, cfg, world_size=64)
    assert unfused.logits_gb == pytest.approx(cfg.algo.micro_token_budget * vocab_here * 2 * 2 / 1e9)
    assert (cfg.algo.clip_low, cfg.algo.clip_high, cfg.algo.proxy_threshold, cfg.algo.kl_coef) == (1.0, 9.0, 0.02, 1.0)


def test_per_benchmark_sampling_from_yaml_and_overrides(tmp_path):
    from megatron_lpreg.config import ConfigError, load_config
    from megatron_lpreg.eval.run import benchmark_sampling

    path = tmp_path / "c.yaml"
    path.write_text("eval:\n  k: 2\n  per_benchmark:\n    aime24: {temperature: 0.6}\n")
    cfg = load_config(path, ["eval.per_benchmark.aime24.k=16", "eval.per_benchmark.amc.top_p=0.9"])
    assert benchmark_sampling(cfg.eval, "aime24") == (0.6, 1.0, 16)
    assert benchmark_sampling(cfg.eval, "amc") == (0.0, 0.9, 2)
    assert benchmark_sampling(cfg.eval, "math500") == (0.0, 1.0, 2)
    with pytest.raises(ConfigError, match="eval.per_benchmark.aime24.kk"):
        load_config(path, ["eval.per_benchmark.aime24.kk=3"])
    with pytest.raises(ConfigError, match="is a mapping of names"):
        load_config(path, ["eval.per_benchmark=3"])
    cfg.eval.per_benchmark["aime42"] = cfg.eval.per_benchmark["aime24"]
    with pytest.raises(ValueError, match="unknown benchmarks"):
        benchmark_sampling(cfg.eval, "aime24")
