"""tools/estimate_step.py: each term against its formula, recomputed by hand for a
small config, and the command line on a paper config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tools.estimate_step import GPU, estimate_step  # noqa: E402


def test_terms_follow_the_docstring_formulas():
    from megatron_lpreg.config import RunConfig
    from megatron_lpreg.model.hf_config import spec_from_hf_config
    from megatron_lpreg.trainer.memory import param_count

    spec = spec_from_hf_config(dict(model_type="qwen3", vocab_size=1000, hidden_size=256, intermediate_size=512,
                                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                    max_position_embeddings=4096, architectures=["Qwen3ForCausalLM"]))
    cfg = RunConfig()
    cfg.parallel.tp, cfg.parallel.recompute = 2, "full"
    cfg.rollout.prompts_per_step, cfg.rollout.n, cfg.rollout.max_new_tokens = 4, 2, 100
    cfg.algo.mini_batches = 2
    gpu = GPU(tflops=1.0, hbm_gbps=1.0, net_gbps=1.0, mfu=0.5, prefill=0.25, mem=0.5)
    e = estimate_step(spec, cfg, 4, gpu, prompt_tokens=10, response_tokens=40)
    p = param_count(spec)
    s, tokens, b = 8, 8 * 50, 8 / 2          # 4 GPUs / TP 2 = 2 replicas
    kv = 2 * 4 * 2 * 64 * 2
    decode = max((100 * 2 * p / 2 + b * 40 * kv * (10 + 20) / 2) / 0.5e9, 2 * p * b * 40 / (2 * 1e12))
    prefill = 2 * p * b * 10 / (2 * 1e12 * 0.25)
    assert e.rollout_s == pytest.approx(decode + prefill)
    assert e.old_logprob_s == pytest.approx(2 * p * tokens / (4 * 1e12 * 0.5))
    dp = 2
    reduce = 2 * 2 * (4 * p / 2) * (dp - 1) / dp / 1e9
    assert e.update_s == pytest.approx(8 * p * tokens / (4 * 1e12 * 0.5) + reduce)
    assert e.sync_s == pytest.approx(2 * (2 * p / 2) / 0.5e9)
    assert e.total_s == pytest.approx(e.rollout_s + e.old_logprob_s + e.update_s + e.sync_s)
    assert e.generated_tokens_per_s_per_gpu == pytest.approx(s * 40 / (e.total_s * 4))


def test_command_line_on_the_32b_recipe():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "estimate_step.py"), "--config",
                          str(ROOT / "examples" / "qwen25_32b_lpreg_onpolicy.yaml"), "--hf-config",
                          str(ROOT / "examples" / "model_configs" / "qwen25_32b_base.json"), "--gpus", "64",
                          "--response-tokens", "4096", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert 0 < d["estimate"]["total_s"] < d["published"][0]["s_per_step"]  # a floor, below the paper's
    assert d["published"][0]["s_per_step"] == pytest.approx(1522.6, abs=0.1) and d["steps"] == 3000
