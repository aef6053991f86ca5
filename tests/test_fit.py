"""cispo/algo/fit.py on synthetic runs: parameter recovery, bootstrap coverage, fit early / predict late, sigmoid
against power law, and when A counts as identified."""

import numpy as np
import pytest

from cispo.algo.fit import (bootstrap, fit_power_law, fit_sigmoid, identified, power_law, predict_late, sigmoid)


def _runs(A, B, C_mid, R0, *, seeds=5, c_max=None, n_evals=41, noise=0.01, seed_sd=0.0, rng):
    """`seeds` runs evaluated at n_evals evenly spaced computes from 0 to c_max (10 C_mid by default): the true
    curve with A shifted per seed by N(0, seed_sd), plus N(0, noise) per evaluation."""
    C = np.linspace(0.0, 10 * C_mid if c_max is None else c_max, n_evals)
    return [(C, sigmoid(C, A + rng.normal(0, seed_sd), B, C_mid, R0) + rng.normal(0, noise, C.shape))
            for _ in range(seeds)]


def _pool(runs):
    return np.concatenate([c for c, _ in runs]), np.concatenate([s for _, s in runs])


def test_sigmoid_and_power_law_values():
    C = np.array([0.0, 2000.0, 1e12])
    np.testing.assert_allclose(sigmoid(C, 0.7, 1.5, 2000.0, 0.1), [0.1, 0.4, 0.7], atol=1e-9)
    np.testing.assert_allclose(power_law(np.array([1.0, 100.0]), 0.8, 0.5, 0.5), [0.3, 0.75])


# the last set is on a trainer-FLOPs scale: the fit does not care about the unit of compute
@pytest.mark.parametrize("A,B,C_mid,R0", [(0.6, 1.5, 2e3, 0.1), (0.85, 2.5, 3e4, 0.3), (0.45, 1.0, 1e3, 0.05),
                                          (0.95, 3.0, 5e18, 0.5)])
def test_fit_recovers_parameters(A, B, C_mid, R0):
    C, y = _pool(_runs(A, B, C_mid, R0, rng=np.random.default_rng(0)))
    fit = fit_sigmoid(C, y, min_compute=C_mid / 4)
    assert abs(fit.A - A) < 0.02
    assert abs(fit.B / B - 1) < 0.15
    assert abs(fit.C_mid / C_mid - 1) < 0.1
    assert abs(fit.R0 - R0) < 0.02  # the mean of the five step-0 evaluations
    assert fit.n == int((C >= C_mid / 4).sum())


def test_fit_skips_the_burn_in():
    # the first evaluations after step 0 sit 0.15 below the curve (an early regime the sigmoid does not describe)
    runs = _runs(0.6, 1.5, 2e3, 0.1, rng=np.random.default_rng(1))
    runs = [(C, np.where((C > 0) & (C <= 1500), y - 0.15, y)) for C, y in runs]
    C, y = _pool(runs)
    skipped, kept = fit_sigmoid(C, y, min_compute=1600), fit_sigmoid(C, y)
    assert abs(skipped.B / 1.5 - 1) < 0.15 and abs(skipped.C_mid / 2e3 - 1) < 0.1
    assert abs(kept.B / 1.5 - 1) > 0.3  # the same data with the burn-in kept


def test_fit_keeps_A_in_its_bounds():
    # runs heading for a pass rate of 1, stopped at 2 C_mid: with these draws the extrapolation passes 1
    C, y = _pool(_runs(1.0, 1.0, 2e3, 0.2, c_max=4e3, noise=0.03, rng=np.random.default_rng(0)))
    assert fit_sigmoid(C, y, a_bounds=(0.0, np.inf)).A > 1.05
    assert fit_sigmoid(C, y).A == 1.0


def test_bootstrap_covers_the_true_asymptote():
    # 50 experiments of 5 seeds; each seed's asymptote is off by N(0, 0.02), each evaluation by N(0, 0.02)
    A, B, C_mid, R0 = 0.6, 1.5, 2e3, 0.1
    rng = np.random.default_rng(0)
    covered, widths = [], []
    for e in range(50):
        runs = _runs(A, B, C_mid, R0, n_evals=21, noise=0.02, seed_sd=0.02, rng=rng)
        boot = bootstrap(runs, n_boot=60, seed=e, min_compute=500)
        covered.append([boot.A.lo <= A <= boot.A.hi, boot.B.lo <= B <= boot.B.hi,
                        boot.C_mid.lo <= C_mid <= boot.C_mid.hi])
        widths.append(boot.A.width)
    coverage = np.mean(covered, axis=0)
    assert (coverage >= 0.8).all(), coverage  # nominal 0.95
    assert np.mean(widths) < 0.1  # and the intervals say something


def test_predict_late_on_a_sigmoid_and_on_a_late_collapse():
    C, y = _pool(_runs(0.7, 2.0, 2e3, 0.1, rng=np.random.default_rng(3)))
    good = predict_late(C, y, 0.5, min_compute=500)
    assert good.cutoff == 1e4 and good.fit.n == int(((C >= 500) & (C <= 1e4)).sum())
    assert good.mae < 0.015  # the evaluation noise alone gives 0.008
    # the same runs, collapsing linearly by 0.3 from 70% of the compute on
    collapsed = y - 0.3 * np.clip((C - 1.4e4) / 6e3, 0.0, 1.0)
    assert predict_late(C, collapsed, 0.5, min_compute=500).mae > 0.05


def test_each_form_fits_its_own_curve_better():
    C = np.linspace(250.0, 1e4, 40)
    y = power_law(C, 0.8, 3.0, 0.4)
    law = fit_power_law(C, y)
    np.testing.assert_allclose([law.A, law.D, law.B], [0.8, 3.0, 0.4], rtol=1e-4)
    assert law.rss < 1e-10 < 1e-6 < fit_sigmoid(C, y, r0=0.0).rss
    # a sigmoid whose lower plateau is in the data: a power law cannot flatten out at low compute
    C, y = _pool(_runs(0.7, 1.5, 2e3, 0.1, rng=np.random.default_rng(4)))
    assert fit_power_law(C, y, min_compute=500).rss > 2 * fit_sigmoid(C, y, min_compute=500).rss


def test_identified_needs_narrow_intervals_and_the_midpoint_reached():
    rng = np.random.default_rng(5)
    full = bootstrap(_runs(0.7, 2.0, 2e3, 0.1, rng=rng), n_boot=40, min_compute=500)
    assert identified(full)
    # the same curve stopped at 0.6 C_mid: A is an extrapolation
    short = bootstrap(_runs(0.7, 2.0, 2e3, 0.1, c_max=1.2e3, rng=rng), n_boot=40, min_compute=300)
    assert not identified(short)
    assert not identified(short, max_width=1.0)  # however wide an interval is accepted
    assert not identified(full, max_width=full.A.width / 2)
