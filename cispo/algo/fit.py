"""Compute-performance fits of ScaleRL (Khatri et al. 2025, arXiv 2510.13786): a run's validation pass rate
against training compute, fitted with a sigmoid, read for its asymptote A and efficiency B, and extrapolated.

    sigmoid:    R(C) = R0 + (A - R0) / (1 + (C_mid / C)^B)
    power law:  R(C) = A - D * C^(-B)          (D > 0, B > 0; for comparison)

Compute axis. The module never looks at units: C is whatever cumulative compute the caller measured at each
evaluation (samples = prompts x responses, generated + trained tokens, or trainer FLOPs), with C = 0 for the
evaluation before the first update. The sigmoid is a logistic in log C, so A and B do not depend on the unit
and C_mid is in the caller's unit; D of the power law does depend on it.

Deviations from the paper:
- R0 is not fitted: it is the mean score at the smallest compute in the data (the step-0 evaluation) unless the
  caller passes r0. Fitted past a burn-in, R0 is barely constrained and would trade off against A and B.
- The burn-in (the paper drops the first ~1.5k GPU-hours) is `min_compute`, in the caller's unit.
- The fit is bounded: a_bounds for A (pass rates: [0, 1]), B in b_bounds, C_mid within a factor 1e3 of the
  fitted compute range. It is least squares by Levenberg-Marquardt, projected on the bounds, started from the
  best cells of a grid over (B, C_mid), with A solved in closed form in each cell; numpy only.
- The paper sizes the error on A from repeated runs; `bootstrap` resamples seeds and widens the percentile
  intervals for the few seeds a study affords (see `_widen`); `identified` says when those intervals are too
  wide, or C_mid not yet reached, to read A.
- The power-law form A - D C^(-B) is the usual saturating one; the paper's comparison form may differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

_C_MID_RANGE = np.log(1e3)  # C_mid may lie this far (in log C) beyond the fitted compute range


@dataclass(frozen=True)
class SigmoidFit:
    A: float  # asymptotic score
    B: float  # efficiency exponent (steepness in log compute)
    C_mid: float  # compute at half the gain A - R0
    R0: float  # score at zero compute
    rss: float  # residual sum of squares over the fitted points
    n: int  # fitted points

    def predict(self, C: np.ndarray) -> np.ndarray:
        return sigmoid(C, self.A, self.B, self.C_mid, self.R0)


@dataclass(frozen=True)
class PowerLawFit:
    A: float
    D: float
    B: float
    rss: float
    n: int

    def predict(self, C: np.ndarray) -> np.ndarray:
        return power_law(C, self.A, self.D, self.B)


@dataclass(frozen=True)
class Interval:
    lo: float
    hi: float

    @property
    def width(self) -> float:
        return self.hi - self.lo


@dataclass(frozen=True)
class BootstrapFit:
    fit: SigmoidFit  # on all runs pooled
    A: Interval
    B: Interval
    C_mid: Interval
    max_compute: float  # the largest compute in the runs
    n_boot: int


@dataclass(frozen=True)
class LatePrediction:
    fit: SigmoidFit  # on the points with compute <= cutoff
    cutoff: float
    compute: np.ndarray  # [M] the late points' compute (> cutoff)
    predicted: np.ndarray  # [M]
    observed: np.ndarray  # [M]
    mae: float  # mean |predicted - observed| over the late points


def sigmoid(C: np.ndarray, A: float, B: float, C_mid: float, R0: float) -> np.ndarray:
    """C [...] -> R [...]; R(0) = R0, R(C_mid) = (A + R0) / 2, R(inf) = A."""
    C = np.asarray(C, dtype=float)
    with np.errstate(divide="ignore", over="ignore"):
        return R0 + (A - R0) / (1.0 + (C_mid / C) ** B)


def power_law(C: np.ndarray, A: float, D: float, B: float) -> np.ndarray:
    """C [...] (> 0) -> R [...] = A - D * C^(-B)."""
    return A - D * np.asarray(C, dtype=float) ** (-B)


def _lm(model, theta: np.ndarray, lo: np.ndarray, hi: np.ndarray, iters: int = 200) -> tuple[np.ndarray, float]:
    """Levenberg-Marquardt projected on the box [lo, hi]; model(theta [P]) -> (residuals [N], jacobian [N, P])."""
    r, J = model(theta)
    f = float(r @ r)
    lam = 1e-3
    for _ in range(iters):
        g, H = J.T @ r, J.T @ J
        while lam < 1e10:
            step = np.linalg.solve(H + lam * np.diag(np.diag(H) + 1e-12), -g)
            new = np.clip(theta + step, lo, hi)
            r_new, J_new = model(new)
            f_new = float(r_new @ r_new)
            if f_new < f:
                break
            lam *= 4.0
        else:
            break
        converged, lam = f - f_new <= 1e-10 * f + 1e-30, lam / 3.0
        theta, r, J, f = new, r_new, J_new, f_new
        if converged:
            break
    return theta, f


def _arrays(compute, score) -> tuple[np.ndarray, np.ndarray]:
    C, y = np.asarray(compute, dtype=float).ravel(), np.asarray(score, dtype=float).ravel()
    if C.shape != y.shape:
        raise ValueError(f"compute {C.shape} and score {y.shape} differ in length")
    return C, y


def _points(C: np.ndarray, y: np.ndarray, min_compute: float) -> tuple[np.ndarray, np.ndarray]:
    """C [N], y [N] -> the points past the burn-in with C > 0, as (log C [M], y [M])."""
    keep = (C > 0) & (C >= min_compute)
    if keep.sum() < 4:
        raise ValueError(f"{int(keep.sum())} points past min_compute={min_compute}; a fit needs at least 4")
    return np.log(C[keep]), y[keep]


def fit_sigmoid(compute, score, *, r0: float | None = None, min_compute: float = 0.0,
                a_bounds: tuple[float, float] = (0.0, 1.0), b_bounds: tuple[float, float] = (0.05, 20.0),
                n_starts: int = 4) -> SigmoidFit:
    """compute [N], score [N] -> SigmoidFit. Points of several seeds may be pooled (concatenated).

    R0 = r0, or the mean score at the smallest compute. Fits A, B, C_mid by least squares on the points with
    compute >= min_compute and > 0, from the n_starts best cells of a 12 x 16 grid over (log B, log C_mid).
    """
    C, y = _arrays(compute, score)
    R0 = float(y[C == C.min()].mean()) if r0 is None else float(r0)
    l, y = _points(C, y, min_compute)
    l0 = l.mean()
    l = l - l0  # theta = (A, log B, log C_mid - l0): all of order one
    lo = np.array([a_bounds[0], np.log(b_bounds[0]), l.min() - _C_MID_RANGE])
    hi = np.array([a_bounds[1], np.log(b_bounds[1]), l.max() + _C_MID_RANGE])

    def model(theta):
        A, B, c = theta[0], np.exp(theta[1]), theta[2]
        with np.errstate(over="ignore"):
            s = 1.0 / (1.0 + np.exp(B * (c - l)))
        ds = s * (1.0 - s) * B * (A - R0)
        return R0 + (A - R0) * s - y, np.column_stack([s, ds * (l - c), -ds])

    b_grid, c_grid = np.meshgrid(np.linspace(lo[1], hi[1], 12), np.linspace(lo[2], hi[2], 16), indexing="ij")
    with np.errstate(over="ignore"):
        S = 1.0 / (1.0 + np.exp(np.exp(b_grid)[..., None] * (c_grid[..., None] - l)))  # [12, 16, N]
    gain = (S * (y - R0)).sum(-1) / np.maximum((S * S).sum(-1), 1e-300)
    A_grid = np.clip(R0 + gain, *a_bounds)
    rss_grid = (((A_grid - R0)[..., None] * S + R0 - y) ** 2).sum(-1)
    cells = np.argsort(rss_grid, axis=None)[:n_starts]
    starts = [np.array([A_grid.flat[i], b_grid.flat[i], c_grid.flat[i]]) for i in cells]
    theta, rss = min((_lm(model, s, lo, hi) for s in starts), key=lambda t: t[1])
    return SigmoidFit(float(theta[0]), float(np.exp(theta[1])), float(np.exp(theta[2] + l0)), R0, rss, len(y))


def fit_power_law(compute, score, *, min_compute: float = 0.0, a_bounds: tuple[float, float] = (0.0, 1.0),
                  b_bounds: tuple[float, float] = (0.01, 5.0), n_starts: int = 3) -> PowerLawFit:
    """compute [N], score [N] -> PowerLawFit of R = A - D C^(-B), on the points with compute >= min_compute and
    > 0, from the n_starts best of 24 values of log B, with (A, D) solved by linear least squares for each."""
    l, y = _points(*_arrays(compute, score), min_compute)
    l0 = l.mean()
    l = l - l0  # theta = (A, log D', log B) with D' = D exp(-B l0): D' is of order one
    lo = np.array([a_bounds[0], -30.0, np.log(b_bounds[0])])
    hi = np.array([a_bounds[1], 30.0, np.log(b_bounds[1])])

    def model(theta):
        A, D, B = theta[0], np.exp(theta[1]), np.exp(theta[2])
        x = D * np.exp(-B * l)
        return A - x - y, np.column_stack([np.ones_like(x), -x, x * B * l])

    starts = []
    for b in np.linspace(lo[2], hi[2], 24):
        x = np.exp(-np.exp(b) * l)
        (A, D), *_ = np.linalg.lstsq(np.column_stack([np.ones_like(x), -x]), y, rcond=None)
        theta = np.clip([A, np.log(max(D, 1e-12)), b], lo, hi)
        starts.append((float((model(theta)[0] ** 2).sum()), theta))
    starts = [t for _, t in sorted(starts, key=lambda p: p[0])[:n_starts]]
    theta, rss = min((_lm(model, s, lo, hi) for s in starts), key=lambda t: t[1])
    B = float(np.exp(theta[2]))
    return PowerLawFit(float(theta[0]), float(np.exp(theta[1] + B * l0)), B, rss, len(y))


def _widen(K: int, level: float) -> float:
    """sqrt(K / (K - 1)) * t_{K-1} / z at two-sided `level`: resampling K seeds gives a spread too small by
    sqrt((K - 1) / K), and K seeds leave the spread itself uncertain (Student's t with K - 1 degrees of freedom).
    The t quantile comes from T = sqrt(nu) tan(theta), whose density in theta is proportional to
    cos(theta)^(nu - 1)."""
    nu = K - 1
    theta = np.linspace(0.0, np.pi / 2, 20001)
    w = np.cos(theta) ** (nu - 1)
    cdf = np.concatenate([[0.0], np.cumsum(w[1:] + w[:-1])])
    t = np.sqrt(nu) * np.tan(np.interp(level, cdf / cdf[-1], theta))
    return float(np.sqrt(K / nu) * t / NormalDist().inv_cdf((1 + level) / 2))


def bootstrap(runs: list[tuple[np.ndarray, np.ndarray]], n_boot: int = 200, seed: int = 0, *,
              level: float = 0.95, **fit_kw) -> BootstrapFit:
    """runs: K seeds' (compute [N_k], score [N_k]) -> intervals at `level` for A, B and C_mid.

    Each of n_boot replicates draws K runs with replacement, pools their points and refits (fit_sigmoid with
    fit_kw). Whole runs are resampled, not points: the evaluations of one run share its seed's trajectory, so
    they are not independent, and resampling points would understate the spread between seeds. The percentile
    interval is then widened about the all-runs estimate by _widen(K, level) (for B and C_mid in log space): in
    simulation with 5 seeds, plain percentiles at level 0.95 cover the true A ~82% of the time, widened ~90%.
    """
    K = len(runs)
    if K < 2:
        raise ValueError("bootstrap needs at least 2 runs (seeds)")
    rng = np.random.default_rng(seed)

    def pooled(idx):
        return fit_sigmoid(np.concatenate([runs[i][0] for i in idx]),
                           np.concatenate([runs[i][1] for i in idx]), **fit_kw)

    fit = pooled(range(K))
    fits = [pooled(rng.integers(0, K, K)) for _ in range(n_boot)]
    q, k = 100 * np.array([(1 - level) / 2, (1 + level) / 2]), _widen(K, level)

    def interval(name, log=False):
        f = np.log if log else np.asarray
        est = f(getattr(fit, name))
        lo, hi = est + k * (np.percentile(f([getattr(b, name) for b in fits]), q) - est)
        return Interval(*(float(v) for v in (np.exp([lo, hi]) if log else (lo, hi))))

    return BootstrapFit(fit, interval("A"), interval("B", log=True), interval("C_mid", log=True),
                        float(max(np.max(c) for c, _ in runs)), n_boot)


def predict_late(compute, score, fit_frac: float, **fit_kw) -> LatePrediction:
    """compute [N], score [N] -> fit on the points with compute <= fit_frac * max compute, predict the rest.

    fit_kw go to fit_sigmoid (with r0 unset, R0 comes from the early points, which hold the smallest compute).
    """
    C, y = _arrays(compute, score)
    cutoff = fit_frac * C.max()
    early, late = C <= cutoff, C > cutoff
    if not late.any():
        raise ValueError(f"no points past the cutoff {cutoff} (fit_frac={fit_frac})")
    fit = fit_sigmoid(C[early], y[early], **fit_kw)
    predicted = fit.predict(C[late])
    return LatePrediction(fit, float(cutoff), C[late], predicted, y[late],
                          float(np.abs(predicted - y[late]).mean()))


def identified(boot: BootstrapFit, *, max_width: float = 0.05) -> bool:
    """Whether A can be read from these runs: its interval is at most max_width wide and the runs reach past
    the upper end of C_mid's interval. False means the runs are too short (or too few) to quote A."""
    return boot.A.width <= max_width and boot.max_compute >= boot.C_mid.hi
