"""The phase-diagram study (``tools/phase_diagram.py``, ``docs/phase_diagram.md``): its batched
selection equals the trainer's, and a smoke version of the study runs and keeps the
properties every cell must have (``pytest -k phase_diagram``)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import phase_diagram as pd  # noqa: E402

from megatron_lpreg.loss.lp_reg import global_thresholds  # noqa: E402


@pytest.mark.parametrize("tokens", [1, 3, 100])
def test_phase_diagram_thresholds_equal_global_thresholds(tokens):
    """Per run, the batched threshold is the trainer's ``global_thresholds`` over the full
    ``[rows, tokens]`` tensors (decision column + settled positions at log 0.1)."""
    g = torch.Generator().manual_seed(tokens)
    R, b = 40, 24
    fill = torch.tensor(math.log(pd.FILLER_P))
    dec = -torch.rand(R, b, generator=g) * 6
    dec[:, :3] = fill                                # ties with the settled positions
    dec[0] = fill                                    # every decision at the fill value
    neg = torch.rand(R, b, generator=g) < torch.linspace(0.0, 0.9, R)[:, None]
    rho = 0.01 if tokens == 100 else 0.2
    got = pd.thresholds(dec, neg, tokens, rho)
    compared = 0
    for r in range(R):
        lp = torch.cat([dec[r][:, None], fill.expand(b, tokens - 1)], 1)
        adv = torch.where(neg[r], -1.0, 1.0)[:, None].expand(b, tokens)
        thr, _ = global_thresholds([lp], [adv], [torch.ones(b, tokens)], neg_percent=rho)
        if thr is None:
            assert got[r] == -math.inf, r
        else:
            assert float(got[r]) == pytest.approx(thr, abs=0), r
            compared += 1
    assert compared >= 10


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("pd") / "pd.json"
    assert pd.main(["--smoke", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_phase_diagram_smoke_runs_every_arm_and_method(smoke):
    arms = {k.split("|")[0] for k in smoke["results"]}
    assert arms == {"on-policy", "off-policy x8", "off-policy x8, empty selection"}
    for runs in smoke["results"].values():
        assert set(runs) == set(pd.METHODS) and all(len(v) == 2 for v in runs.values())
        for rs in runs.values():
            for r in rs:
                assert 0 <= r["spark_alive"] <= 1 and 0 < r["expected_reward"] < 2 and 0 < r["noise_mass"] < 1


def test_phase_diagram_smoke_checks_that_must_hold(smoke):
    for key, runs in smoke["results"].items():
        grpo = runs["grpo"]
        if key.startswith("off-policy x8, empty selection"):
            # int(n rho) <= 1 in every mini-batch: Lp-Reg is GRPO token by token
            for m in ("lp_reg", "lp_reg_no_filter"):
                assert [r["empty_selection_share"] for r in runs[m]] == [1.0, 1.0]
                assert [r["expected_reward"] for r in runs[m]] == [r["expected_reward"] for r in grpo]
        if key.startswith("on-policy"):
            # the precondition: the selection reaches the spark's negative samples
            assert all(r["spark_neg_regularised_share"] > 0.9 for r in runs["lp_reg"])
            assert all(r["empty_selection_share"] == 0 for r in runs["lp_reg"])
            # on-policy pull = 1/S_K - 1 = 1 at S_K 0.5 (while the spark sits where it started)
            assert all(abs(r["pull_over_adv_first20"] - 1 / 0.6) < 1.5 for r in runs["lp_reg"])
            # kappa -> 0: the proxy is the policy itself, nothing regularised, GRPO's outcome
            for a, b in zip(runs["lp_reg_no_filter"], grpo, strict=True):
                assert a["regularised_per_step"] == 0
                assert a["expected_reward"] == pytest.approx(b["expected_reward"], abs=1e-6)


def test_phase_diagram_summary_table_from_the_json(smoke, tmp_path):
    table = pd.markdown(smoke)
    assert table.count("\n") == 2 + len(smoke["results"])
    (tmp_path / "pd.json").write_text(json.dumps(smoke))
    paths = pd.heatmaps(smoke, tmp_path)
    assert len(paths) == 2 and all(p.stat().st_size > 0 for p in paths)
