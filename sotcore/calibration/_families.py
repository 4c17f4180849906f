"""Parametric switching-curve families, their binomial maximum-likelihood fit and tables.

Every parametric family is a location-scale curve with optional levels,

    P(I) = p_lo + (p_hi - p_lo) * F((I - loc) / s; c),

``F`` a distribution function and ``c`` an optional shape parameter:

``logistic``   F = expit(z)
``probit``     F = Phi(z), the normal distribution function
``thermal``    F = 1 - exp(-exp(z)): the Neel-Brown/Sun form
               ``1 - exp(-(t_p / tau0) exp(-Delta (1 - I / Ic)))`` with
               ``s = Ic / Delta`` and ``loc = Ic (1 - ln(t_p / tau0) / Delta)``
``asymmetric`` F = expit(z) ** nu, nu = exp(c) > 0 (generalised logistic,
               Richards type I; nu = 1 is the logistic, nu > 1 saturates
               faster on the upper side, nu < 1 on the lower side)

Physical parameters of a fitted curve are stored per device as rows
``(loc, s, c, p_lo, p_hi)`` in amperes (``c = 0`` where it does not apply).
"""
import math

import numpy as np
from scipy.special import expit, log_expit, log_ndtr, ndtri, xlogy

__all__ = ["PARAMETRIC", "FAMILIES", "MODELS", "family_probability", "family_derivative",
           "family_quantile", "fit_family", "loglik_log_space", "derived", "family_tables",
           "thermal_parameters",
           "from_i50_window", "SHAPE_BOUND", "DEFAULT_TAU0", "DEFAULT_PULSE_WIDTH"]

PARAMETRIC = ("logistic", "probit", "thermal", "asymmetric")
FAMILIES = PARAMETRIC + ("isotonic", "table")
MODELS = FAMILIES + ("auto",)
_N_SHAPE = {"logistic": 0, "probit": 0, "thermal": 0, "asymmetric": 1}

#: ASSUMPTION: attempt time tau0 of the Neel-Brown law, seconds (1 ns, the
#: usual order of magnitude for in-plane magnets; not measured here).
DEFAULT_TAU0 = 1e-9
#: ASSUMPTION: pulse width t_p of the measurements, seconds (10 ns).
DEFAULT_PULSE_WIDTH = 1e-8
#: Search bound on the asymmetric family's c = ln(nu): nu in [e^-4, e^4].
SHAPE_BOUND = 4.0

_CLIP_LOG = -700.0  # log P below this is treated as this (exp stays finite)


def _terms(family, z, c):
    """log F, log(1 - F), dF/dz, dF/dc of a family at z (shape c, broadcastable)."""
    with np.errstate(over="ignore", under="ignore", divide="ignore"):
        if family == "logistic":
            lf, l1f = log_expit(z), log_expit(-z)
            dz = np.exp(lf + l1f)
            dc = np.zeros_like(z)
        elif family == "probit":
            lf, l1f = log_ndtr(z), log_ndtr(-z)
            dz = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
            dc = np.zeros_like(z)
        elif family == "thermal":
            ez = np.exp(np.minimum(z, 700.0))
            l1f = -ez
            lf = np.log(-np.expm1(-ez))
            dz = np.exp(np.minimum(z, 700.0) - ez)
            dc = np.zeros_like(z)
        elif family == "asymmetric":
            nu = np.exp(c)
            ls = log_expit(z)
            lf = nu * ls
            l1f = np.log(-np.expm1(lf))
            F = np.exp(lf)
            dz = nu * F * expit(-z)
            dc = F * lf                     # dF/dc = dF/dnu * nu = F nu log expit(z)
        else:  # pragma: no cover - guarded by callers
            raise ValueError(family)
    return lf, l1f, dz, dc


def family_quantile(family, u, c=0.0):
    """z where F(z; c) = u (u in (0, 1))."""
    u = np.asarray(u, dtype=np.float64)
    if family == "logistic":
        return np.log(u) - np.log1p(-u)
    if family == "probit":
        return ndtri(u)
    if family == "thermal":
        return np.log(-np.log1p(-u))
    if family == "asymmetric":
        v = u ** (1.0 / np.exp(c))
        return np.log(v) - np.log1p(-v)
    raise ValueError(family)


def _z(params, current):
    return (current - params[..., 0]) / params[..., 1]


def family_probability(family, current, params):
    """P(I) of one family; ``params`` rows ``(loc, s, c, p_lo, p_hi)`` broadcast against current."""
    params = np.asarray(params, dtype=np.float64)
    z = _z(params, np.asarray(current, dtype=np.float64))
    lf = _terms(family, z, params[..., 2])[0]
    return params[..., 3] + (params[..., 4] - params[..., 3]) * np.exp(lf)


def family_derivative(family, current, params):
    """dP/dI (1/A) of one family, same conventions as :func:`family_probability`."""
    params = np.asarray(params, dtype=np.float64)
    z = _z(params, np.asarray(current, dtype=np.float64))
    dz = _terms(family, z, params[..., 2])[2]
    return (params[..., 4] - params[..., 3]) * dz / params[..., 1]


def from_i50_window(family, i50, window, c=0.0):
    """(loc, s) of a family curve with the given I50 and programming window."""
    q10, q50, q90 = (family_quantile(family, u, c) for u in (0.1, 0.5, 0.9))
    s = np.asarray(window, dtype=np.float64) / (q90 - q10)
    return np.asarray(i50, dtype=np.float64) - s * q50, s


def thermal_parameters(loc, s, tau0=DEFAULT_TAU0, pulse_width=DEFAULT_PULSE_WIDTH):
    """(Ic, Delta) of the Neel-Brown/Sun curve with location ``loc`` and scale ``s``."""
    r = math.log(pulse_width / tau0)
    return loc + r * s, r + loc / s


# ----------------------------------------------------------------------------------------
# maximum-likelihood fit (Fisher scoring, all devices at once)
# ----------------------------------------------------------------------------------------
def _unpack(theta, family, fit_levels, lo_fixed, hi_fixed):
    nsh = _N_SHAPE[family]
    a, b = theta[:, 0:1], theta[:, 1:2]
    c = theta[:, 2:3] if nsh else np.zeros_like(a)
    if fit_levels:
        lo, hi = theta[:, 2 + nsh:3 + nsh], theta[:, 3 + nsh:4 + nsh]
    else:
        lo, hi = np.full_like(a, lo_fixed), np.full_like(a, hi_fixed)
    return a, b, c, lo, hi


def _evaluate(family, x, n, k, theta, fit_levels, lo_fixed, hi_fixed, need_info=True):
    """Log-likelihood per device and, if asked, score and expected information."""
    a, b, c, lo, hi = _unpack(theta, family, fit_levels, lo_fixed, hi_fixed)
    e = np.exp(-b)
    z = (x - a) * e
    lf, l1f, dz, dc = _terms(family, z, c)
    with np.errstate(divide="ignore"):
        llo, lhi, l1lo, l1hi = np.log(lo), np.log(hi), np.log1p(-lo), np.log1p(-hi)
    # P = lo (1 - F) + hi F and 1 - P, in log space so P -> 0 or 1 keeps its precision.
    logP = np.maximum(np.logaddexp(llo + l1f, lhi + lf), _CLIP_LOG)
    logQ = np.maximum(np.logaddexp(l1lo + l1f, l1hi + lf), _CLIP_LOG)
    nk = n - k
    ll = (np.where(k > 0, k * logP, 0.0) + np.where(nk > 0, nk * logQ, 0.0)).sum(1)
    if not need_info:
        return ll
    d = hi - lo
    cols = [-d * dz * e, -d * dz * z]
    if _N_SHAPE[family]:
        cols.append(d * dc)
    if fit_levels:
        F = np.exp(lf)
        cols += [1.0 - F, F]
    J = np.stack(np.broadcast_arrays(*cols), axis=2)            # dP/dtheta, (D, M, p)
    r = k * np.exp(-logP) - nk * np.exp(-logQ)                   # dl/dP
    score = np.einsum("dm,dmp->dp", r, J)
    w = n * np.exp(-logP - logQ)                                 # n / (P (1 - P))
    info = np.einsum("dm,dmp,dmq->dpq", w, J, J)
    return ll, score, info


def loglik_log_space(family, x, n, k, theta, fit_levels, lo_fixed, hi_fixed):
    """Binomial log-likelihood per device, computed in log space (exact in the tails)."""
    return _evaluate(family, x, n, k, theta, fit_levels, lo_fixed, hi_fixed, False)


def bounds(family, fit_levels, a_bound, log_scale_bounds, level_eps):
    """Lower and upper search bounds of the normalised parameters."""
    lo = [-a_bound, log_scale_bounds[0]] + [-SHAPE_BOUND] * _N_SHAPE[family]
    hi = [a_bound, log_scale_bounds[1]] + [SHAPE_BOUND] * _N_SHAPE[family]
    if fit_levels:
        lo += [level_eps, level_eps]
        hi += [1.0 - level_eps, 1.0 - level_eps]
    return np.array(lo), np.array(hi)


def free_mask(theta, lower, upper):
    """Parameters strictly inside their search box (n_devices, p)."""
    span = upper - lower
    return (theta > lower + 1e-9 * span) & (theta < upper - 1e-9 * span)


def _solve(info, score, free):
    """Newton step and decrement on the free parameters; inf decrement if singular."""
    p = info.shape[1]
    H = np.where(free[:, :, None] & free[:, None, :], info, np.eye(p)[None])
    g = np.where(free, score, 0.0)
    step = np.zeros_like(g)
    dec = np.full(g.shape[0], np.inf)
    ok = np.all(np.isfinite(H), axis=(1, 2)) & np.all(np.isfinite(g), axis=1)
    if ok.any():
        ev = np.linalg.eigvalsh(H[ok])
        good = ev.min(1) > 1e-12 * np.maximum(ev.max(1), 1e-300)
        idx = np.flatnonzero(ok)[good]
        if idx.size:
            step[idx] = np.linalg.solve(H[idx], g[idx][:, :, None])[:, :, 0]
            dec[idx] = np.einsum("ij,ij->i", g[idx], step[idx])
    return step, dec


def fit_family(family, x, n, k, theta0, fit_levels, lo_fixed, hi_fixed, lower, upper, *,
               tol=1e-8, max_iter=200):
    """Binomial ML fit of one family for all devices (rows of x, n, k).

    Fisher scoring with step halving, projected on the search box;
    returns (theta, loglik, converged).
    """
    theta = np.clip(theta0, lower, upper)
    ll = _evaluate(family, x, n, k, theta, fit_levels, lo_fixed, hi_fixed, False)
    converged = np.zeros(theta.shape[0], dtype=bool)
    active = np.flatnonzero(np.isfinite(ll))
    for _ in range(max_iter):
        if active.size == 0:
            break
        th = theta[active]
        _, score, info = _evaluate(family, x[active], n[active], k[active], th, fit_levels,
                                   lo_fixed, hi_fixed)
        # A parameter on its bound whose score pushes outward stays there.
        free = free_mask(th, lower, upper) | (
            ((th <= lower) & (score > 0)) | ((th >= upper) & (score < 0)))
        step, dec = _solve(info, score, free)
        done = dec < tol
        converged[active[done]] = True
        keep = ~done & np.isfinite(dec)
        active, th, step = active[keep], th[keep], step[keep]
        if active.size == 0:
            break
        t = np.ones(active.size)
        old = ll[active]
        moved = np.zeros(active.size, dtype=bool)
        pending = np.arange(active.size)
        for _ in range(40):
            trial = np.clip(th[pending] + t[pending, None] * step[pending], lower, upper)
            new = _evaluate(family, x[active[pending]], n[active[pending]],
                            k[active[pending]], trial, fit_levels, lo_fixed, hi_fixed, False)
            better = np.isfinite(new) & (new >= old[pending] - 1e-12 * np.abs(old[pending]))
            acc = pending[better]
            theta[active[acc]] = trial[better]
            ll[active[acc]] = new[better]
            moved[acc] = True
            pending = pending[~better]
            if pending.size == 0:
                break
            t[pending] *= 0.5
        # No ascent step exists within 2^-40 of the Newton step: at the optimum to
        # rounding precision.
        converged[active[~moved]] = True
        active = active[moved]
    return theta, ll, converged


def fisher_covariance(family, x, n, k, theta, fit_levels, lo_fixed, hi_fixed, free):
    """Inverse expected information on the free parameters (NaN rows/cols elsewhere)."""
    _, _, info = _evaluate(family, x, n, k, theta, fit_levels, lo_fixed, hi_fixed)
    p = info.shape[1]
    H = np.where(free[:, :, None] & free[:, None, :], info, np.eye(p)[None])
    cov = np.full_like(H, np.nan)
    ok = np.all(np.isfinite(H), axis=(1, 2))
    if ok.any():
        ev = np.linalg.eigvalsh(H[ok])
        good = ev.min(1) > 1e-12 * np.maximum(ev.max(1), 1e-300)
        idx = np.flatnonzero(ok)[good]
        cov[idx] = np.linalg.inv(H[idx])
    mask = free[:, :, None] & free[:, None, :]
    return np.where(mask, cov, np.nan)


def derived(family, theta, cov, centre, half, fit_levels, lo_fixed, hi_fixed):
    """Physical parameters, I50, window and their standard errors (delta method).

    Returns a dict of per-device arrays: ``params`` (D, 5) rows
    ``(loc, s, c, p_lo, p_hi)``, ``i50``, ``i50_se``, ``window``,
    ``window_se``, ``shape`` (nu; NaN unless asymmetric), ``shape_se``,
    ``p_lo_se``, ``p_hi_se``.
    """
    D = theta.shape[0]
    nsh = _N_SHAPE[family]
    a, b, c, lo, hi = (v[:, 0] for v in _unpack(theta, family, fit_levels, lo_fixed, hi_fixed))
    loc, s = centre + half * a, half * np.exp(b)
    q = {u: family_quantile(family, u, c) for u in (0.1, 0.5, 0.9)}
    i50 = loc + s * q[0.5]
    width_q = q[0.9] - q[0.1]
    window = s * width_q
    p = theta.shape[1]
    g_i50 = np.zeros((D, p))
    g_win = np.zeros((D, p))
    g_i50[:, 0], g_i50[:, 1] = half, s * q[0.5]
    g_win[:, 1] = window
    if nsh:
        h = 1e-5
        dq = {u: (family_quantile(family, u, c + h) - family_quantile(family, u, c - h))
              / (2 * h) for u in (0.1, 0.5, 0.9)}
        g_i50[:, 2] = s * dq[0.5]
        g_win[:, 2] = s * (dq[0.9] - dq[0.1])
    cz = np.where(np.isfinite(cov), cov, 0.0)
    nanrow = ~np.isfinite(np.einsum("ijj->ij", cov))

    def se(g):
        v = np.einsum("ip,ipq,iq->i", g, cz, g)
        bad = (nanrow & (g != 0)).any(1)
        return np.where(bad, np.nan, np.sqrt(np.maximum(v, 0.0)))

    var = np.einsum("ijj->ij", cov)
    out = {"params": np.column_stack([loc, s, c, lo, hi]), "i50": i50, "i50_se": se(g_i50),
           "window": window, "window_se": se(g_win),
           "shape": np.exp(c) if nsh else np.full(D, np.nan),
           "shape_se": np.exp(c) * np.sqrt(var[:, 2]) if nsh else np.full(D, np.nan),
           "p_lo_se": np.sqrt(var[:, 2 + nsh]) if fit_levels else np.full(D, np.nan),
           "p_hi_se": np.sqrt(var[:, 3 + nsh]) if fit_levels else np.full(D, np.nan),
           "cov": cov}
    return out


def family_tables(family, params, G, tail=1e-10):
    """Sampling tables (grid_lo, grid_hi, probs) of fitted curves.

    The grid spans F = ``tail`` to ``1 - tail`` of each curve (clamped to
    its end values beyond), so the table differs from the curve by at most
    ``tail`` outside it (below the sampler's 2**-32 resolution for the
    default) plus the linear-interpolation error inside (~2e-5 with 1024
    points).
    """
    loc, s, c = params[:, 0], params[:, 1], params[:, 2]
    glo = loc + s * family_quantile(family, tail, c)
    ghi = loc + s * family_quantile(family, 1.0 - tail, c)
    u = np.linspace(0.0, 1.0, G)
    grid = glo[:, None] + (ghi - glo)[:, None] * u[None, :]
    probs = np.clip(family_probability(family, grid, params[:, None, :]), 0.0, 1.0)
    return glo, ghi, probs


def information_criteria(ll, n_params, n_pulses):
    """AIC = 2 p - 2 ll and BIC = p ln(pulses) - 2 ll (each pulse one Bernoulli trial)."""
    return 2.0 * n_params - 2.0 * ll, n_params * np.log(np.maximum(n_pulses, 1)) - 2.0 * ll


def n_params(family, fit_levels):
    return 2 + _N_SHAPE[family] + (2 if fit_levels else 0)


def saturated_start(family, i50, window, lo, hi, centre, half, fit_levels):
    """Normalised starting parameters matching a logistic fit's I50 and window."""
    loc, s = from_i50_window(family, i50, window)
    cols = [(loc - centre) / half, np.log(s / half)]
    if _N_SHAPE[family]:
        cols.append(np.zeros_like(loc))
    if fit_levels:
        cols += [lo, hi]
    return np.column_stack(cols)


def deviance_residuals(k, n, P):
    """Standardised (Pearson) residuals (k - n P) / sqrt(n P (1 - P))."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (k - n * P) / np.sqrt(np.maximum(n * P * (1.0 - P), 1e-300))


def loglik_at(k, n, P):
    return (xlogy(k, P) + xlogy(n - k, 1.0 - P)).sum(-1)

