"""Binomial maximum-likelihood fit of the logistic switching curve (analytic gradients)."""
__all__ = ["A_BOUND", "LOG_SCALE_BOUNDS", "LEVEL_EPS", "NEWTON_TOL", "fit_logistic", "information",
           "objective", "newton_decrement", "free_mask", "snap_levels", "curve_terms", "xlog"]
import math

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_expit

# Search box of the sigmoid fit, in each device's normalised units
# (centre and half-range of its own sweep): I50 within 20 half-ranges of the
# sweep centre, scale from 1/1000 to 100 half-ranges.  Hitting it means the
# data do not resolve the curve (flag ``at_bound``).
A_BOUND = 20.0
LOG_SCALE_BOUNDS = (math.log(1e-3), math.log(1e2))
# Fitted levels are searched in [eps, 1 - eps] so the likelihood stays finite
# everywhere in the box (L-BFGS-B cannot recover from an infinite trial
# point); estimates on these bounds are reported as exactly 0 and 1.
LEVEL_EPS = 1e-9
# Devices per optimiser call.  The problem is separable, but one joint L-BFGS
# run takes as many iterations as its worst-conditioned device needs, so small
# chunks keep messy data (e.g. pulses recorded during training) fast: 32 gives
# 0.18 s for a clean 1000 x 25 sweep and 3.6x faster re-fits of recorded
# pulses than 1024.  Fixed, independent of the machine.
_FIT_CHUNK = 32
# Newton decrement g' H^-1 g (~ twice the log-likelihood still to gain) below
# which a device counts as converged; 1e-6 puts the estimate within ~0.001 SE
# of the optimum.
NEWTON_TOL = 1e-6


# ----------------------------------------------------------------------------------------
# sigmoid maximum-likelihood fit
# ----------------------------------------------------------------------------------------
def xlog(c, logp):
    """c * log p with 0 * log 0 = 0."""
    with np.errstate(invalid="ignore"):
        return np.where(c > 0, c * logp, 0.0)


def _col(v):
    """A per-device vector as a column (scalars pass through)."""
    v = np.asarray(v, dtype=np.float64)
    return v[:, None] if v.ndim else v


def _log_levels(lo, hi):
    with np.errstate(divide="ignore"):
        return np.log(lo), np.log(hi), np.log1p(-lo), np.log1p(-hi)


def curve_terms(x, a, b, lo, hi):
    """z, log sigma, log(1 - sigma), log P, log(1 - P) for P = lo (1 - s) + hi s."""
    e = np.exp(-b)
    z = (x - a[:, None]) * e[:, None]
    ls, lsb = log_expit(z), log_expit(-z)
    llo, lhi, l1lo, l1hi = _log_levels(_col(lo), _col(hi))
    # P = lo (1 - s) + hi s and 1 - P = (1 - lo)(1 - s) + (1 - hi) s, in log space
    # so curves with P -> 0 or 1 keep their precision.
    logP = np.logaddexp(llo + lsb, lhi + ls)
    logQ = np.logaddexp(l1lo + lsb, l1hi + ls)
    return e, z, ls, lsb, logP, logQ


def _split(theta, d, fit_levels, lo_fixed, hi_fixed):
    a, b = theta[:d], theta[d:2 * d]
    if fit_levels:
        return a, b, theta[2 * d:3 * d], theta[3 * d:]
    return a, b, lo_fixed, hi_fixed


def objective(theta, x, n, k, fit_levels, lo_fixed, hi_fixed):
    """Summed binomial negative log-likelihood of a chunk of devices and its gradient."""
    d = x.shape[0]
    a, b, lo, hi = _split(theta, d, fit_levels, lo_fixed, hi_fixed)
    nk = n - k
    e, z, ls, lsb, logP, logQ = curve_terms(x, a, b, lo, hi)
    f = -(xlog(k, logP) + xlog(nk, logQ)).sum()
    # dl/dz = (hi - lo) * (k q/P - (n - k) q/Q) with q = s (1 - s).
    lq = ls + lsb
    g1 = _col(hi - lo) * (k * np.exp(lq - logP) - nk * np.exp(lq - logQ))
    parts = [e * g1.sum(1), (g1 * z).sum(1)]
    if fit_levels:
        parts.append(-(k * np.exp(lsb - logP) - nk * np.exp(lsb - logQ)).sum(1))
        parts.append(-(k * np.exp(ls - logP) - nk * np.exp(ls - logQ)).sum(1))
    grad = np.concatenate(parts)
    if not np.isfinite(f):
        return np.inf, np.zeros_like(theta)
    return f, np.nan_to_num(grad, nan=0.0, posinf=1e300, neginf=-1e300)


def information(x, n, k, a, b, lo, hi, fit_levels):
    """Observed Fisher information (minus the log-likelihood Hessian) per device.

    Parameters are (a, b[, lo, hi]) with ``z = (x - a) exp(-b)``; returns
    shape (n_devices, p, p) and the score (gradient of -loglik), (n_devices, p).
    """
    nk = n - k
    e, z, ls, lsb, logP, logQ = curve_terms(x, a, b, lo, hi)
    dd = _col(hi - lo)
    s = np.exp(ls)
    r1, r2 = np.exp(ls + lsb - logP), np.exp(ls + lsb - logQ)      # q/P, q/Q
    u = k * r1 - nk * r2
    g1 = dd * u                                                     # dl/dz
    g2 = -dd ** 2 * (k * r1 ** 2 + nk * r2 ** 2) + g1 * (1.0 - 2.0 * s)  # d2l/dz2
    p = 4 if fit_levels else 2
    info = np.empty((x.shape[0], p, p))
    info[:, 0, 0] = -e ** 2 * g2.sum(1)
    info[:, 0, 1] = info[:, 1, 0] = -e * (g1 + g2 * z).sum(1)
    info[:, 1, 1] = -(g2 * z * z + g1 * z).sum(1)
    score = np.empty((x.shape[0], p))
    score[:, 0] = e * g1.sum(1)
    score[:, 1] = (g1 * z).sum(1)
    if fit_levels:
        alo, blo = np.exp(lsb - logP), np.exp(lsb - logQ)           # (1-s)/P, (1-s)/Q
        ahi, bhi = np.exp(ls - logP), np.exp(ls - logQ)             # s/P, s/Q
        clo = -dd * (k * alo * r1 + nk * blo * r2) - u              # d/dlo of dl/dz
        chi = -dd * (k * ahi * r1 + nk * bhi * r2) + u
        info[:, 0, 2] = info[:, 2, 0] = e * clo.sum(1)
        info[:, 0, 3] = info[:, 3, 0] = e * chi.sum(1)
        info[:, 1, 2] = info[:, 2, 1] = (z * clo).sum(1)
        info[:, 1, 3] = info[:, 3, 1] = (z * chi).sum(1)
        info[:, 2, 2] = (k * alo ** 2 + nk * blo ** 2).sum(1)
        info[:, 2, 3] = info[:, 3, 2] = (k * alo * ahi + nk * blo * bhi).sum(1)
        info[:, 3, 3] = (k * ahi ** 2 + nk * bhi ** 2).sum(1)
        score[:, 2] = -(k * alo - nk * blo).sum(1)
        score[:, 3] = -(k * ahi - nk * bhi).sum(1)
    return info, score


def _starting_values(x, n, k, lo, hi):
    """Empirical-logit weighted least squares on the level-corrected proportions."""
    span = np.maximum(hi - lo, 1e-3)[:, None]
    kk = np.clip((k / np.where(n > 0, n, 1.0) - lo[:, None]) / span, 0.0, 1.0) * n
    y = np.log((kk + 0.5) / (n - kk + 0.5))
    w = np.where(n > 0, (kk + 0.5) * (n - kk + 0.5) / (n + 1.0), 0.0)
    sw = w.sum(1)
    mx = (w * x).sum(1) / sw
    my = (w * y).sum(1) / sw
    beta = (w * (x - mx[:, None]) * (y - my[:, None])).sum(1) / np.maximum(
        (w * (x - mx[:, None]) ** 2).sum(1), 1e-300)
    ok = beta > 0.05
    a0 = np.where(ok, mx - my / np.where(ok, beta, 1.0), 0.0)
    b0 = np.where(ok, -np.log(np.where(ok, beta, 1.0)), math.log(0.5))
    return (np.clip(a0, -A_BOUND, A_BOUND),
            np.clip(b0, LOG_SCALE_BOUNDS[0], LOG_SCALE_BOUNDS[1]))


def newton_decrement(info, score, free):
    """g' H^-1 g over the free parameters; inf where H is not positive definite."""
    p = info.shape[1]
    H = np.where(free[:, :, None] & free[:, None, :], info, np.eye(p)[None])
    g = np.where(free, score, 0.0)
    lam = np.full(info.shape[0], np.inf)
    pd = np.all(np.linalg.eigvalsh(H) > 0, axis=1)
    if pd.any():
        step = np.linalg.solve(H[pd], g[pd][:, :, None])[:, :, 0]
        lam[pd] = np.einsum("ij,ij->i", g[pd], step)
    return lam


def fit_logistic(x, n, k, lo_fixed, hi_fixed, fit_levels, bar):
    """Binomial ML fit of all devices (rows); normalised parameters (a, b, lo, hi)."""
    D = x.shape[0]
    p_emp = k / np.where(n > 0, n, 1.0)
    if fit_levels:
        lo0 = np.where(n > 0, p_emp, np.inf).min(1)
        hi0 = np.where(n > 0, p_emp, -np.inf).max(1)
        flat = hi0 - lo0 < 0.1
        lo0 = np.clip(np.where(flat, 0.0, lo0), LEVEL_EPS, 1.0 - LEVEL_EPS)
        hi0 = np.clip(np.where(flat, 1.0, hi0), LEVEL_EPS, 1.0 - LEVEL_EPS)
    else:
        lo0, hi0 = np.full(D, lo_fixed), np.full(D, hi_fixed)
    a0, b0 = _starting_values(x, n, k, lo0, hi0)
    a, b, lo, hi = a0.copy(), b0.copy(), lo0.copy(), hi0.copy()
    ok = np.ones(D, dtype=bool)
    todo = np.arange(D)
    for round_ in range(3):
        for s0 in range(0, todo.size, _FIT_CHUNK):
            idx = todo[s0:s0 + _FIT_CHUNK]
            d = idx.size
            th0 = [a[idx], b[idx]] + ([lo[idx], hi[idx]] if fit_levels else [])
            bounds = ([(-A_BOUND, A_BOUND)] * d + [LOG_SCALE_BOUNDS] * d
                      + ([(LEVEL_EPS, 1.0 - LEVEL_EPS)] * (2 * d) if fit_levels else []))
            res = minimize(objective, np.concatenate(th0), jac=True, method="L-BFGS-B",
                           bounds=bounds,
                           args=(x[idx], n[idx], k[idx], fit_levels, lo_fixed, hi_fixed),
                           options={"maxiter": 10000, "maxfun": 20000, "ftol": 1e-15,
                                    "gtol": 1e-9, "maxcor": 20})
            t = res.x
            a[idx], b[idx] = t[:d], t[d:2 * d]
            if fit_levels:
                lo[idx], hi[idx] = t[2 * d:3 * d], t[3 * d:]
            ok[idx] = np.isfinite(res.fun)
            if round_ == 0 and bar is not None:
                bar.update(d)
        info, score = information(x[todo], n[todo], k[todo], a[todo], b[todo],
                                   lo[todo] if fit_levels else np.full(todo.size, lo_fixed),
                                   hi[todo] if fit_levels else np.full(todo.size, hi_fixed),
                                   fit_levels)
        free = free_mask(a[todo], b[todo], lo[todo], hi[todo], fit_levels)
        lam = newton_decrement(info, score, free)
        todo = todo[~(lam <= NEWTON_TOL)]
        if todo.size == 0:
            break
    if not fit_levels:
        lo, hi = np.full(D, lo_fixed), np.full(D, hi_fixed)
    return a, b, lo, hi, ok


def snap_levels(v):
    """Fitted levels on the search bounds are the boundary values 0 and 1."""
    v = np.where(v <= 2 * LEVEL_EPS, 0.0, v)
    return np.where(v >= 1.0 - 2 * LEVEL_EPS, 1.0, v)


def free_mask(a, b, lo, hi, fit_levels):
    """Which parameters are away from their search bounds (n_devices, p)."""
    eps = 1e-9
    cols = [np.abs(a) < A_BOUND - eps,
            (b > LOG_SCALE_BOUNDS[0] + eps) & (b < LOG_SCALE_BOUNDS[1] - eps)]
    if fit_levels:
        e2 = 2 * LEVEL_EPS
        cols += [(lo > e2) & (lo < 1 - e2), (hi > e2) & (hi < 1 - e2)]
    return np.stack(cols, axis=1)
