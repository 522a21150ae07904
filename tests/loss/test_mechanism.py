"""The Lp-Reg mechanism on one decision (``tools/mechanism.py``): real op, real losses.

Margins are from 8 seeds measured once with the scenario fixed beforehand (docs/studies.md,
"Does Lp-Reg do what the paper says"): GRPO's spark ends at 0.0019-0.0048, Lp-Reg's at
0.0161-0.0250; the no-filter run's noise mass is 1.26-1.86x Lp-Reg's.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import mechanism  # noqa: E402

SEEDS = range(8)


@pytest.fixture(scope="module")
def curves():
    return {m: [mechanism.run(m, s) for s in SEEDS] for m in mechanism.METHODS}


def _negative(curves, method):
    return [c for c in curves[method] if c.spark_advantage < 0]


def test_mechanism_precondition_spark_is_in_proxy_and_sampled_negative(curves):
    sc = mechanism.SCENARIO
    assert sc.p_spark >= sc.kappa * sc.p_majority  # inside the min-p proxy at the start
    noise_each = (1 - sc.p_majority - 4 * sc.p_alternative - sc.p_spark) / (sc.vocab - mechanism.SPARK - 1)
    assert noise_each < sc.kappa * sc.p_majority  # noise starts outside it
    # the scenario needs the spark's samples to carry negative advantage in most batches
    assert len(_negative(curves, "grpo")) >= 6
    assert all(c.spark_samples > 0 for c in curves["grpo"])


def test_mechanism_grpo_drives_spark_out_of_proxy_lp_reg_keeps_it(curves):
    for grpo, lp in zip(_negative(curves, "grpo"), _negative(curves, "lp_reg"), strict=True):
        assert grpo.spark[-1] < 0.008, grpo.spark[-1]
        assert grpo.spark[-1] < grpo.proxy_edge[-1]  # fell out of the proxy
        assert lp.spark[-1] > 0.012, lp.spark[-1]
        assert lp.spark[-1] > lp.proxy_edge[-1]  # still inside it
        assert min(lp.spark) > 0.5 * mechanism.SCENARIO.p_spark  # never fell far on the way


def test_mechanism_without_filter_noise_gains(curves):
    for lp, nf in zip(_negative(curves, "lp_reg"), _negative(curves, "lp_reg_no_filter"), strict=True):
        assert nf.noise[-1] > 1.1 * lp.noise[-1], (nf.noise[-1], lp.noise[-1])


def test_mechanism_needs_the_kl_term(monkeypatch):
    """Without beta the regularised tokens get the unclipped surrogate, which with
    the paper's clip_low = 1.0 is GRPO's: the spark falls as under GRPO."""
    real = mechanism.lp_reg_loss
    monkeypatch.setattr(mechanism, "lp_reg_loss", lambda *a, **k: real(*a, **{**k, "kl_coef": 0.0}))
    for s in (0, 1):
        assert mechanism.run("lp_reg", s).spark[-1] == pytest.approx(mechanism.run("grpo", s).spark[-1], rel=1e-4)


def test_mechanism_on_policy_without_filter_is_grpo():
    """One update per batch: with kappa -> 0 the proxy is the old policy itself, so
    nothing lies below it and Lp-Reg's gradient is GRPO's."""
    sc = replace(mechanism.SCENARIO, updates=1)
    for s in SEEDS:
        a, b = mechanism.run("grpo", s, sc), mechanism.run("lp_reg_no_filter", s, sc)
        torch.testing.assert_close(torch.tensor(a.spark + a.noise), torch.tensor(b.spark + b.noise), rtol=1e-5, atol=0)


def test_mechanism_docs_table_is_what_the_scenario_gives_today(curves):
    """docs/studies.md's table is ``tools/mechanism.py --from docs/results/mechanism.json
    --markdown`` (checked by tests/test_docs_tables.py); the scenario run here prints the
    same table, so the committed run is today's."""
    committed = json.loads((Path(__file__).resolve().parents[2] / "docs/results/mechanism.json").read_text())
    fresh = json.loads(json.dumps(mechanism.table(list(SEEDS), runs=curves)))
    assert fresh["scenario"] == committed["scenario"]
    assert mechanism.markdown(fresh) == mechanism.markdown(committed)
