"""Population statistics: robust per-width summaries, width scaling, unit checks."""
import math
import warnings

import numpy as np
from scipy import stats

__all__ = ["group_stats", "width_fit", "check_currents", "OUTLIER_Z", "HUBER_K",
           "PLAUSIBLE_CURRENT", "CURRENT_RATIO"]

#: ASSUMPTION: a device is a per-width outlier when |x - median| > 5 MAD
#: (MAD scaled to the normal sd; a normal population has a 6e-7 chance).
OUTLIER_Z = 5.0
#: Huber's tuning constant (95 % efficiency at the normal).
HUBER_K = 1.345
#: ASSUMPTION: plausible range of a fitted I50, amperes (1 nA to 1 A): SOT
#: devices switch at uA to mA; a value outside suggests wrong units.
PLAUSIBLE_CURRENT = (1e-9, 1.0)
#: ASSUMPTION: a device whose I50 differs from the median of its width group by
#: more than this factor is flagged (``implausible_current``): a unit mix-up
#: (mA among A) is a factor 1000, device-to-device variation a few 10 %.
CURRENT_RATIO = 10.0

_MAD_TO_SD = 1.0 / stats.norm.ppf(0.75)


def _median_ci(v, confidence):
    """Distribution-free interval of the median (order statistics, exact binomial)."""
    m = v.size
    if m < 2:
        return [math.nan, math.nan]
    s = np.sort(v)
    lo = int(stats.binom.ppf(0.5 - 0.5 * confidence, m, 0.5))
    hi = int(stats.binom.isf(0.5 - 0.5 * confidence, m, 0.5))
    return [float(s[max(lo - 1, 0)]), float(s[min(hi, m - 1)])]


def group_stats(col, used, confidence):
    """Median, MAD, mean and sd of I50 and window per width (one group if widths unknown).

    Outliers (``*_outliers``: device labels) are devices farther than
    ``OUTLIER_Z`` MADs from their group's median.
    """
    width = col["width"]
    known = np.isfinite(width)
    keys = np.unique(width[known]) if known.all() else [None]
    out = []
    for w in keys:
        grp = (width == w) if w is not None else np.ones(width.shape, dtype=bool)
        sel = grp & used
        row = {"width_um": None if w is None else float(w), "n_devices": int(grp.sum()),
               "n_used": int(sel.sum())}
        for name in ("i50", "window"):
            v, se = col[name][sel], col[f"{name}_se"][sel]
            m = v.size
            mean = float(v.mean()) if m else math.nan
            sd = float(v.std(ddof=1)) if m > 1 else math.nan
            half = (stats.t.ppf(0.5 + 0.5 * confidence, m - 1) * sd / math.sqrt(m)
                    if m > 1 else math.nan)
            med = float(np.median(v)) if m else math.nan
            mad = float(_MAD_TO_SD * np.median(np.abs(v - med))) if m else math.nan
            # Fitted values scatter by device variation plus estimation noise;
            # subtracting the mean squared standard error estimates the former.
            if m > 1 and np.isfinite(se).all():
                intrinsic = math.sqrt(max(sd * sd - float(np.mean(se ** 2)), 0.0))
            else:
                intrinsic = math.nan
            far = np.abs(v - med) > OUTLIER_Z * mad if m > 2 and mad > 0 else np.zeros(m, bool)
            row.update({f"{name}_mean": mean, f"{name}_std": sd,
                        f"{name}_cv": sd / mean if m > 1 and mean else math.nan,
                        f"{name}_mean_ci": [mean - half, mean + half],
                        f"{name}_std_intrinsic": intrinsic,
                        f"{name}_median": med, f"{name}_mad": mad,
                        f"{name}_rcv": mad / med if m > 1 and med else math.nan,
                        f"{name}_median_ci": _median_ci(v, confidence),
                        f"{name}_outliers": list(col["device"][sel][far])})
        out.append(row)
    return out


def width_fit(w, y, confidence, labels=None):
    """Robust (Huber M-estimate) line y = slope * w + intercept over devices.

    Device-to-device spread grows with width, so each device is weighted by
    the inverse squared MAD of its width group (unweighted if some group has
    fewer than 3 devices or no spread).  Iteratively reweighted least
    squares with Huber's psi (k = 1.345) and a MAD scale; standard errors
    from Huber's sandwich formula with his small-sample correction, t
    intervals with n - 2 degrees of freedom.  ``outliers`` lists the devices
    whose standardised residual exceeds ``OUTLIER_Z``.
    """
    groups, inv = np.unique(w, return_inverse=True)
    mads = np.array([_MAD_TO_SD * np.median(np.abs(y[inv == g] - np.median(y[inv == g])))
                     if (inv == g).sum() >= 3 else np.nan for g in range(groups.size)])
    if np.all(np.isfinite(mads) & (mads > 0)):
        wt, weighting = 1.0 / mads[inv] ** 2, "Huber, inverse within-width MAD^2"
    else:
        wt, weighting = np.ones_like(y), "Huber, unweighted"
    X = np.column_stack([w, np.ones_like(w)])
    sw = np.sqrt(wt)
    Xw, yw = X * sw[:, None], y * sw
    coef = np.linalg.lstsq(Xw, yw, rcond=None)[0]
    n, p = y.size, 2
    sigma = 1.0
    for _ in range(100):
        r = yw - Xw @ coef
        sigma = max(_MAD_TO_SD * float(np.median(np.abs(r))), 1e-300)
        u = r / sigma
        h = np.minimum(1.0, HUBER_K / np.maximum(np.abs(u), 1e-300))
        new = np.linalg.lstsq(Xw * np.sqrt(h)[:, None], yw * np.sqrt(h), rcond=None)[0]
        if np.allclose(new, coef, rtol=1e-10, atol=0.0):
            coef = new
            break
        coef = new
    r = yw - Xw @ coef
    u = r / sigma
    psi = np.clip(u, -HUBER_K, HUBER_K)
    dpsi = (np.abs(u) <= HUBER_K).astype(float)
    m1 = max(dpsi.mean(), 1.0 / n)
    corr = 1.0 + p / n * dpsi.var() / m1 ** 2
    dof = n - p
    cov = (corr ** 2 * sigma ** 2 * (psi ** 2).sum() / dof / m1 ** 2
           * np.linalg.inv(Xw.T @ Xw))
    se = np.sqrt(np.diag(cov))
    tq = stats.t.ppf(0.5 + 0.5 * confidence, dof)
    resid = y - X @ coef
    ybar = np.sum(wt * y) / np.sum(wt)
    r2 = 1.0 - np.sum(wt * resid ** 2) / np.sum(wt * (y - ybar) ** 2)
    far = np.abs(u) > OUTLIER_Z
    return {"slope": float(coef[0]), "intercept": float(coef[1]),
            "slope_se": float(se[0]), "intercept_se": float(se[1]),
            "slope_ci": [float(coef[0] - tq * se[0]), float(coef[0] + tq * se[0])],
            "intercept_ci": [float(coef[1] - tq * se[1]), float(coef[1] + tq * se[1])],
            "slope_intercept_cov": float(cov[0, 1]),
            "r2": float(r2), "n_devices": int(n), "n_widths": int(groups.size),
            "weighting": weighting,
            "outliers": [] if labels is None else list(np.asarray(labels)[far])}


def check_currents(col, source):
    """Flag (and warn about) fitted I50 values that suggest wrong units.

    A device is flagged when its |I50| lies outside ``PLAUSIBLE_CURRENT`` or
    differs from the median |I50| of its width group by more than
    ``CURRENT_RATIO``; one warning lists the flagged devices.
    """
    i50 = col["i50"]
    mag = np.abs(i50)   # either polarity
    fitted = np.isfinite(i50)
    bad = fitted & ((mag < PLAUSIBLE_CURRENT[0]) | (mag > PLAUSIBLE_CURRENT[1]))
    width = col["width"]
    keys = np.where(np.isfinite(width), width, -1.0)
    for g in np.unique(keys):
        sel = fitted & (keys == g) & (mag > 0)
        if sel.sum() >= 3:
            med = np.median(mag[sel])
            ratio = np.where(sel, mag / med, 1.0)
            bad |= sel & ((ratio > CURRENT_RATIO) | (ratio < 1.0 / CURRENT_RATIO))
    if bad.any():
        idx = np.flatnonzero(bad)
        desc = ", ".join(f"{col['device'][d]!r} (I50 = {i50[d]:.4g} A)" for d in idx[:5])
        more = f" and {idx.size - 5} more" if idx.size > 5 else ""
        warnings.warn(f"{source}: implausible fitted current(s) for {idx.size} device(s): "
                      f"{desc}{more}; outside {PLAUSIBLE_CURRENT[0]:g}..{PLAUSIBLE_CURRENT[1]:g}"
                      f" A or more than {CURRENT_RATIO:g}x from the median of their width "
                      f"(currents must be in amperes; a file in mA?)", UserWarning,
                      stacklevel=3)
    return bad
