"""Non-parametric switching curves: isotonic (monotone) and binned tables (any shape)."""
import numpy as np
from scipy import stats
from scipy.special import xlogy

try:  # SciPy >= 1.12: a fast PAVA without estimator overhead
    from scipy.optimize import isotonic_regression as _scipy_isotonic
except ImportError:  # pragma: no cover - older SciPy
    _scipy_isotonic = None
    from sklearn.isotonic import isotonic_regression as _sklearn_isotonic

from ..devices import WINDOW_PER_SCALE

__all__ = ["fit_isotonic", "fit_table", "saturated_loglik", "monotone_loglik", "crossing",
           "wilson_interval"]


def saturated_loglik(n, k):
    nk = n - k
    nn = np.where(n > 0, n, 1.0)
    return (xlogy(k, k / nn) + xlogy(nk, nk / nn)).sum(1)


def _pava(y, w):
    """Weighted non-decreasing least-squares fit of y (pool adjacent violators)."""
    if _scipy_isotonic is not None:
        return _scipy_isotonic(y, weights=w).x
    return _sklearn_isotonic(y, sample_weight=w)  # pragma: no cover - older SciPy


def monotone_loglik(n, k, counts):
    """Log-likelihood of the best non-decreasing switching probabilities (per device)."""
    out = np.empty(n.shape[0])
    for d in range(n.shape[0]):
        m = counts[d]
        nd, kd = n[d, :m], k[d, :m]
        y = kd / nd
        p = y if np.all(np.diff(y) >= 0) else _pava(y, nd)
        out[d] = (xlogy(kd, p) + xlogy(nd - kd, 1.0 - p)).sum()
    return out


def crossing(glo, ghi, probs, level):
    """Current where each row of a non-decreasing table first reaches ``level`` (NaN if never)."""
    K, G = probs.shape
    rows = np.arange(K)
    above = probs >= level[:, None]
    j = np.argmax(above, axis=1)
    has = above[rows, j]
    j0 = np.maximum(j - 1, 0)
    p0, p1 = probs[rows, j0], probs[rows, j]
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(p1 > p0, (level - p0) / (p1 - p0), 0.0)
    x = glo + (j0 + frac) * (ghi - glo) / (G - 1)
    return np.where(has, x, np.nan)


def fit_isotonic(cur, n, k, counts, fit, G, bar):
    """Pulse-weighted isotonic regression per device, tabulated on a uniform grid."""
    K = fit.size
    probs = np.empty((K, G))
    glo, ghi = np.empty(K), np.empty(K)
    dev, dof, lls = np.empty(K), np.empty(K, dtype=np.int64), np.empty(K)
    u = np.linspace(0.0, 1.0, G)
    for j, d in enumerate(fit):
        m = counts[d]
        I, nd, kd = cur[d, :m], n[d, :m], k[d, :m]
        # Currents are distinct and ascending, so the fit is PAVA on the
        # proportions and its prediction linear interpolation, flat beyond
        # (what IsotonicRegression(out_of_bounds="clip") does, ~10x faster).
        pf = np.clip(_pava(kd / nd, nd), 0.0, 1.0)
        glo[j], ghi[j] = I[0], I[-1]
        q = (G - 1) // (m - 1)
        step = np.diff(I)
        if q >= 1 and np.allclose(step, step[0], rtol=1e-6, atol=0.0):
            # Uniform sweep: stretch the grid so every measured current is a
            # grid point and the table equals the fit there (flat beyond).
            ghi[j] = I[0] + (I[-1] - I[0]) * (G - 1) / (q * (m - 1))
        probs[j] = np.interp(glo[j] + (ghi[j] - glo[j]) * u, I, pf)
        ll = (xlogy(kd, pf) + xlogy(nd - kd, 1.0 - pf)).sum()
        sat = (xlogy(kd, kd / nd) + xlogy(nd - kd, (nd - kd) / nd)).sum()
        dev[j] = max(2.0 * (sat - ll), 0.0)
        lls[j] = ll
        dof[j] = m - np.unique(pf).size
        if bar is not None and (j + 1) % 256 == 0:
            bar.update(256)
    if bar is not None:
        bar.update(K % 256)
    i50, scale, lo, hi = _summaries(glo, ghi, probs)   # monotone: max = last value
    with np.errstate(invalid="ignore"):
        pvalue = np.where(dof > 0, stats.chi2.sf(dev, np.maximum(dof, 1)), np.nan)
    summary = {"i50": i50, "scale": scale, "p_lo": lo, "p_hi": hi, "deviance": dev,
               "dof": dof, "pvalue": pvalue, "loglik": lls}
    return (glo, ghi, probs), summary



def wilson_interval(k, n, confidence=None, *, z=None):
    """Wilson score interval of a binomial proportion (arrays; n > 0).

    ``z`` (normal quantile, broadcastable) overrides ``confidence``.
    """
    if z is None:
        z = stats.norm.ppf(0.5 + 0.5 * confidence)
    p = k / n
    den = 1.0 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    # Exact ends: no switch (all switched) has lower (upper) limit 0 (1).
    return (np.where(k <= 0, 0.0, np.clip(mid - half, 0.0, 1.0)),
            np.where(k >= n, 1.0, np.clip(mid + half, 0.0, 1.0)))


def _summaries(glo, ghi, probs):
    """I50 and scale of tabulated curves: first crossings of 10/50/90 % of the rise.

    The rise runs from the curve's value at the lowest current to its
    maximum, so a curve that falls again at high current (over-drive) is
    summarised by its switching edge.
    """
    G = probs.shape[1]
    lo, hi = probs[:, 0], probs.max(1)
    rng_ = hi - lo
    flat = rng_ < 1e-9
    c10 = crossing(glo, ghi, probs, lo + 0.1 * rng_)
    c50 = crossing(glo, ghi, probs, lo + 0.5 * rng_)
    c90 = crossing(glo, ghi, probs, lo + 0.9 * rng_)
    window = np.maximum(c90 - c10, 1e-3 * (ghi - glo) / (G - 1))
    return (np.where(flat, np.nan, c50), np.where(flat, np.nan, window / WINDOW_PER_SCALE),
            lo, probs[:, -1])


# A device's smoothed table is kept unless its deviance p-value is below this.
_SMOOTH_PVALUE = 1e-3


def _smooth(nb, kb, h):
    """Pulse-weighted triangular-kernel bin probabilities and their effective dof."""
    B = nb.size
    offs = np.arange(-h, h + 1)
    kern = h + 1.0 - np.abs(offs)
    pos = np.arange(B)[:, None] + offs[None, :]
    inside = (pos >= 0) & (pos < B)
    pc = np.clip(pos, 0, B - 1)
    wn = np.where(inside, kern * nb[pc], 0.0)
    ps = np.where(inside, kern * kb[pc], 0.0).sum(1) / wn.sum(1)
    return ps, float((kern[h] * nb / wn.sum(1)).sum())


def fit_table(cur, n, k, counts, fit, G, max_bins, smoothing, confidence):
    """Binned, smoothed switching probabilities (any shape) tabulated on a uniform grid.

    Currents of a device are pooled into at most ``max_bins`` bins of
    consecutive currents with about equal pulse totals (every distinct
    current is its own bin when there are few enough); each bin's
    probability is a pulse-weighted triangular kernel average over
    ``smoothing`` neighbouring bins on each side (0: none); a device whose
    data reject the smoothed curve (deviance p < 1e-3) keeps its raw bins.  The table
    interpolates linearly between bin currents (pulse-weighted means) and is
    flat beyond them.

    Returns (tables, summary, bins): ``bins[j]`` holds the bin currents,
    pulses, switches, raw and smoothed probabilities and Wilson intervals of
    device ``fit[j]``.
    """
    K = fit.size
    probs = np.empty((K, G))
    glo, ghi = np.empty(K), np.empty(K)
    dev, dof, ll = np.empty(K), np.empty(K), np.empty(K)
    bins = []
    u = np.linspace(0.0, 1.0, G)
    for j, d in enumerate(fit):
        m = counts[d]
        I, nd, kd = cur[d, :m], n[d, :m], k[d, :m]
        if m > max_bins:
            before = np.cumsum(nd) - nd
            b = np.minimum((before / nd.sum() * max_bins).astype(np.intp), max_bins - 1)
            b = np.unique(b, return_inverse=True)[1]
            nb, kb = np.bincount(b, nd), np.bincount(b, kd)
            ib = np.bincount(b, nd * I) / nb
        else:
            b = np.arange(m)
            nb, kb, ib = nd, kd, I
        sat = (xlogy(kd, kd / nd) + xlogy(nd - kd, (nd - kd) / nd)).sum()
        for h in ((smoothing, 0) if smoothing else (0,)):
            ps, edf = _smooth(nb, kb, h)
            pf = np.clip(np.interp(I, ib, ps), 0.0, 1.0)
            ll[j] = (xlogy(kd, pf) + xlogy(nd - kd, 1.0 - pf)).sum()
            dev[j] = max(2.0 * (sat - ll[j]), 0.0)
            # Smoothing that the data reject (it blurs a sharp edge of a coarse
            # sweep) is dropped for this device: raw bins instead.
            if h == 0 or stats.chi2.sf(dev[j], max(m - edf, 0.5)) > _SMOOTH_PVALUE:
                break
        dof[j] = m - edf
        glo[j], ghi[j] = ib[0], ib[-1]
        probs[j] = np.interp(glo[j] + (ghi[j] - glo[j]) * u, ib, ps)
        wl, wh = wilson_interval(kb, nb, confidence)
        bins.append({"current": ib, "pulses": nb, "switched": kb, "p": kb / nb,
                     "p_smooth": ps, "ci_low": wl, "ci_high": wh, "edf": edf})
    i50, scale, lo, hi = _summaries(glo, ghi, probs)
    with np.errstate(invalid="ignore"):
        pvalue = np.where(dof > 0.5, stats.chi2.sf(dev, np.maximum(dof, 0.5)), np.nan)
    summary = {"i50": i50, "scale": scale, "p_lo": lo, "p_hi": hi, "deviance": dev,
               "dof": dof, "pvalue": pvalue, "loglik": ll,
               "edf": np.array([bb["edf"] for bb in bins])}
    return (glo, ghi, probs), summary, bins
