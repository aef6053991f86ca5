"""rollout.metrics: pure functions of a Rollout (no engine needed)."""

import logging

import pytest

from rollout.base import Completion, Rollout
from rollout.metrics import rollout_metrics


def _rollout(lengths_reasons, seconds=2.0):
    return Rollout([Completion(0, [5] * n, [0.0] * n, r, "") for n, r in lengths_reasons], seconds)


def test_rollout_metrics_values():
    r = _rollout([(10, "stop"), (20, "length"), (30, "early_stop"), (40, "stop")], seconds=4.0)
    m = rollout_metrics(r)
    assert m["rollout/tokens_per_s"] == pytest.approx(100 / 4.0)
    assert m["rollout/len_mean"] == pytest.approx(25.0)
    assert m["rollout/len_p50"] == pytest.approx(25.0)  # numpy-style linear interpolation
    assert m["rollout/len_p99"] == pytest.approx(30 + 0.97 * 10)
    assert m["rollout/len_max"] == 40
    assert m["rollout/truncation_rate"] == pytest.approx(0.25)
    assert m["rollout/early_stop_rate"] == pytest.approx(0.25)


def test_rollout_metrics_warns_on_truncation(caplog):
    with caplog.at_level(logging.WARNING, logger="rollout.metrics"):
        rollout_metrics(_rollout([(8, "length")] + [(4, "stop")] * 9))  # exactly 10%: no warning
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="rollout.metrics"):
        rollout_metrics(_rollout([(8, "length")] * 2 + [(4, "stop")] * 8))
    assert any("raise rollout.max_tokens" in rec.getMessage() for rec in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rollout.metrics"):  # a trajectory's budget is another knob
        rollout_metrics(_rollout([(8, "length")] * 2 + [(4, "stop")] * 8), advice="raise env.token_budget")
    assert any("raise env.token_budget" in rec.getMessage() for rec in caplog.records)


def test_rollout_metrics_empty():
    assert rollout_metrics(Rollout([], 0.0))["rollout/len_max"] == 0.0
