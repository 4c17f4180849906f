"""calibrate(): measured pulse data -> per-device switching curves of any family."""
import math
import time

import numpy as np
from scipy import stats

from ..devices import DEFAULT_TABLE_POINTS, WINDOW_PER_SCALE, DevicePopulation
from .._utils import check_scalar_arg as _check_scalar
from .._threads import blas_limit
from ..exceptions import InvalidInputError
from . import _families as fam
from . import _logistic as lg
from . import _nonparametric as npm
from ._measurements import load_measurements
from ._population import check_currents
from .result import CalibrationResult, json_label

__all__ = ["calibrate", "POOR_FIT_PVALUE", "NONMONOTONE_PVALUE", "MAX_ERROR_TOLERANCE",
           "DEFAULT_TABLE_BINS", "DEFAULT_TABLE_SMOOTHING"]

#: ASSUMPTION: deviance p-value below which a fit is ``rejected`` (alias ``poor_fit``).
POOR_FIT_PVALUE = 1e-3
#: ASSUMPTION: p-value of the monotonicity test below which data are flagged non-monotone.
NONMONOTONE_PVALUE = 1e-3
#: ASSUMPTION: largest tolerated |fitted - true| switching probability; a device
#: whose misfit is above it with confidence is ``unusable``.
MAX_ERROR_TOLERANCE = 0.05
#: Most bins of a ``table`` curve per device; smoothing half-width in bins.
DEFAULT_TABLE_BINS = 64
DEFAULT_TABLE_SMOOTHING = 1
_PROGRESS_MIN_DEVICES = 10000
_LEGACY = {"sigmoid": "logistic", "isotonic": "isotonic"}
def _resolve_model(model, method):
    if method is not None:
        if not isinstance(method, str) or method not in _LEGACY:
            raise InvalidInputError(f"method must be 'sigmoid' or 'isotonic' (alias of model=), "
                             f"got {method!r}")
        if model is not None and model != _LEGACY[method]:
            raise InvalidInputError(
                f"method={method!r} and model={model!r} disagree; pass model= only")
        return _LEGACY[method]
    if model is None:
        return "logistic"
    if not isinstance(model, str) or model not in fam.MODELS:
        raise InvalidInputError(f"model must be one of {', '.join(map(repr, fam.MODELS))}; "
                         f"got {model!r}")
    return model


def _fit_logistic(x, n, k, counts, centre, half, lo_fixed, hi_fixed, fit_levels, bar):
    """The analytic logistic fit as a family record (see :func:`_fit_generic`)."""
    a, b, lo, hi, ok = lg.fit_logistic(x, n, k, lo_fixed, hi_fixed, fit_levels, bar)
    info, score = lg.information(x, n, k, a, b, lo, hi, fit_levels)
    free = lg.free_mask(a, b, lo, hi, fit_levels)
    lam = lg.newton_decrement(info, score, free)
    if fit_levels:
        lo, hi = lg.snap_levels(lo), lg.snap_levels(hi)
    p = info.shape[1]
    H = np.where(free[:, :, None] & free[:, None, :], info, np.eye(p)[None])
    pd = np.all(np.linalg.eigvalsh(H) > 0, axis=1)
    cov = np.full_like(H, np.nan)
    if pd.any():
        cov[pd] = np.linalg.inv(H[pd])
    se = np.sqrt(np.where(free, np.einsum("ijj->ij", cov), np.nan))
    _, _, _, _, logP, logQ = lg.curve_terms(x, a, b, lo, hi)
    scale = half * np.exp(b)
    at_bound = ~free[:, :2].all(1)
    converged = ok & ((lam <= lg.NEWTON_TOL) | at_bound) & pd
    nan = np.full(a.size, np.nan)
    rec = {"params": np.column_stack([centre + half * a, scale, np.zeros_like(a), lo, hi]),
           "i50": centre + half * a, "i50_se": half * se[:, 0],
           "window": WINDOW_PER_SCALE * scale, "window_se": WINDOW_PER_SCALE * scale * se[:, 1],
           "shape": nan, "shape_se": nan,
           "p_lo_se": se[:, 2] if fit_levels else nan, "p_hi_se": se[:, 3] if fit_levels else nan,
           "P": np.exp(logP), "converged": converged, "at_bound": at_bound,
           "loglik": (lg.xlog(k, logP) + lg.xlog(n - k, logQ)).sum(1)}
    rec["identified"] = converged & ~at_bound & np.isfinite(se[:, :2]).all(1)
    return rec


def _fit_generic(family, x, cur, n, k, centre, half, start, lo_fixed, hi_fixed, fit_levels):
    """Fit one parametric family to all devices; a dict of per-device results."""
    theta0 = fam.saturated_start(family, start["i50"], start["window"], start["params"][:, 3],
                                 start["params"][:, 4], centre, half, fit_levels)
    theta0 = np.where(np.isfinite(theta0), theta0, 0.0)
    lower, upper = fam.bounds(family, fit_levels, lg.A_BOUND, lg.LOG_SCALE_BOUNDS,
                              lg.LEVEL_EPS)
    theta, ll, conv = fam.fit_family(family, x, n, k, theta0, fit_levels, lo_fixed, hi_fixed,
                                     lower, upper)
    free = fam.free_mask(theta, lower, upper)
    if fit_levels:
        p = theta.shape[1]
        theta[:, p - 2:] = lg.snap_levels(theta[:, p - 2:])
    cov = fam.fisher_covariance(family, x, n, k, theta, fit_levels, lo_fixed, hi_fixed, free)
    rec = fam.derived(family, theta, cov, centre, half, fit_levels, lo_fixed, hi_fixed)
    rec["loglik"] = fam.loglik_log_space(family, x, n, k, theta, fit_levels, lo_fixed, hi_fixed)
    shape_free = free[:, :2 + (family == "asymmetric")].all(1)
    at_bound = ~free[:, :2].all(1)
    rec["P"] = fam.family_probability(family, cur, rec["params"][:, None, :])
    rec["converged"] = conv & np.isfinite(ll)
    rec["at_bound"] = at_bound
    rec["identified"] = (rec["converged"] & shape_free & np.isfinite(rec["i50_se"])
                         & np.isfinite(rec["window_se"]))
    return rec


def _nonparametric_record(tables, summary, cur, n):
    """Family record of tabulated curves (P at the measured currents from the tables)."""
    glo, ghi, probs = tables
    K = glo.size
    tmp = DevicePopulation(np.zeros(K), np.ones(K), tables=tables)
    P = np.clip(tmp.probability(cur.T).T, 0.0, 1.0)
    nan = np.full(K, np.nan)
    window = WINDOW_PER_SCALE * summary["scale"]
    return {"params": None, "tables": tables, "i50": summary["i50"], "i50_se": nan,
            "window": window, "window_se": nan, "shape": nan, "shape_se": nan,
            "p_lo_se": nan, "p_hi_se": nan, "P": P, "converged": np.ones(K, dtype=bool),
            "at_bound": np.zeros(K, dtype=bool), "identified": np.isfinite(summary["i50"]),
            "loglik": summary["loglik"], "p_lo": summary["p_lo"], "p_hi": summary["p_hi"]}


def calibrate(measurements, *, model=None, method=None, levels=(0.0, 1.0), width=None,
              confidence=0.95, min_currents=3, skip_invalid=False, selection="aic",
              tau0=fam.DEFAULT_TAU0, pulse_width=fam.DEFAULT_PULSE_WIDTH,
              poor_fit_pvalue=POOR_FIT_PVALUE, nonmonotone_pvalue=NONMONOTONE_PVALUE,
              max_error_tolerance=MAX_ERROR_TOLERANCE, table_bins=DEFAULT_TABLE_BINS,
              table_smoothing=DEFAULT_TABLE_SMOOTHING, table_points=DEFAULT_TABLE_POINTS,
              progress=None):
    """Fit switching curves of one or several families to measured pulse data.

    Parameters
    ----------
    measurements : str, path, DataFrame, structured array or dict of columns
        Columns ``device, current, pulses, switched`` and optional ``width``,
        or raw per-pulse records ``device, current, switched`` (0/1); see
        :mod:`sotcore.calibration._measurements` for aliases and rules.  Currents in
        amperes, widths in micrometres.
    model : str, default "logistic"
        ``"logistic"``, ``"probit"``, ``"thermal"``, ``"asymmetric"`` (binomial
        maximum-likelihood fits of ``P = p_lo + (p_hi - p_lo) F``, see
        :mod:`sotcore.calibration._families`), ``"isotonic"`` (monotone,
        non-parametric), ``"table"`` (binned, smoothed, any shape: devices
        in over-drive that switch less again), or ``"auto"``: per device the
        parametric family with the lowest ``selection`` criterion (devices
        flagged ``nonmonotone`` may also choose ``"table"``).
    method : {"sigmoid", "isotonic"}, optional
        Former name: ``"sigmoid"`` is ``model="logistic"``.
    levels : (float, float) or "fit", default (0.0, 1.0)
        Parametric families: fixed ``(p_lo, p_hi)``, ``0 <= p_lo < p_hi <= 1``,
        or ``"fit"`` to estimate them per device.
    width : float, optional
        Width in micrometres of every device, for tables without a ``width`` column.
    confidence : float, default 0.95
        Level of the confidence intervals (and of the ``unusable`` bound).
    min_currents : int, default 3
        Distinct currents a device needs; fewer is an error (or a skip).
    skip_invalid : bool, default False
        Skip devices with too few distinct currents instead of raising.
    selection : {"aic", "bic"}, default "aic"
        Criterion of ``model="auto"`` (BIC counts every pulse as a trial).
    tau0, pulse_width : float, default 1e-9 and 1e-8 s
        ASSUMPTIONS of the thermal family: attempt time and pulse width
        (only ``ln(pulse_width / tau0)`` matters; it sets Ic and Delta, not the curve).
    poor_fit_pvalue : float, default 1e-3
        ASSUMPTION: ``rejected`` (alias ``poor_fit``) when the chi-square
        p-value of the deviance is below this: the data can tell the curve
        from the truth, which with enough pulses is true of any model.
    nonmonotone_pvalue : float, default 1e-3
        ASSUMPTION: ``nonmonotone`` when the likelihood-ratio test of the data
        against the best non-decreasing curve has a p-value below this
        (chi-square with ``n_currents - 1`` degrees of freedom, conservative).
    max_error_tolerance : float, default 0.05
        ASSUMPTION: ``unusable`` when, with confidence ``confidence``
        (Bonferroni over the device's currents), the fitted curve misses the
        true switching probability by more than this at some measured current.
    table_bins, table_smoothing : int, default 64 and 1
        ``"table"`` model: most bins per device, kernel half-width in bins.
    table_points : int, default 1024
        Grid points of the tables handed to the population.
    progress : bool or None
        Show a tqdm progress bar; None shows one for 10,000 devices or more.

    Returns
    -------
    CalibrationResult

    Raises
    ------
    ValueError
        Broken input (naming the file or "measurements", the line or row and
        the column), unknown ``model``, bad arguments.
    FileNotFoundError
        ``measurements`` names a file that does not exist.

    Notes
    -----
    Per device the summary gives the chosen ``family``, I50 (P halfway up the
    ``F`` part) and the programming window (F 0.1 -> 0.9) with standard
    errors (delta method on the inverse Fisher information: observed for the
    logistic, expected for the other families) and Wald intervals (log scale
    for window and scale); ``scale = window / (2 ln 9)`` for every family.
    Parameters at a search bound are held fixed for the others' errors.  A
    family whose parameters the data cannot identify (too few currents,
    parameters at a bound, singular information) sets ``unidentified`` and
    the device falls back to the logistic (``fallback``; isotonic if that is
    unidentified too).  Stuck devices (never or always switched) are not
    fitted (family ``"constant"``).  Devices of the non-logistic families
    are table devices of the population (sampled by the compiled sampler;
    ``probability`` and ``derivative`` come from the tables).

    Examples
    --------
    >>> import sotcore
    >>> pop = sotcore.DevicePopulation.from_width(20.0, 100, random_state=0)
    >>> table = sotcore.simulate_measurements(pop, pulses=200, random_state=1)
    >>> result = sotcore.calibrate(table)
    >>> result.population.n_devices, int(result.per_device["stuck"].sum())
    (100, 0)
    >>> print(result.report())  # doctest: +ELLIPSIS
    sotcore calibration of 100 device(s) from measurements (logistic fit, ...
    """
    t0 = time.perf_counter()
    model = _resolve_model(model, method)
    fit_levels = isinstance(levels, str)
    if fit_levels:
        if levels != "fit":
            raise InvalidInputError(f"levels must be 'fit' or a pair (p_lo, p_hi), got {levels!r}")
        lo_fixed, hi_fixed = 0.0, 1.0
    else:
        try:
            lo_fixed, hi_fixed = levels
        except (TypeError, ValueError):
            raise InvalidInputError(f"levels must be 'fit' or a pair (p_lo, p_hi), "
                             f"got {levels!r}") from None
        lo_fixed = _check_scalar(lo_fixed, "levels[0] (p_lo)", low=0.0, high=1.0)
        hi_fixed = _check_scalar(hi_fixed, "levels[1] (p_hi)", low=0.0, high=1.0)
        if not lo_fixed < hi_fixed:
            raise InvalidInputError(f"levels must satisfy p_lo < p_hi, got {levels!r}")
    if model in ("isotonic", "table") and (fit_levels or (lo_fixed, hi_fixed) != (0.0, 1.0)):
        raise InvalidInputError(f"levels applies to the parametric models only; the {model} curve "
                         f"takes its levels from the data")
    if not isinstance(selection, str) or selection not in ("aic", "bic"):
        raise InvalidInputError(f"selection must be 'aic' or 'bic', got {selection!r}")
    confidence = _check_scalar(confidence, "confidence", low=0.0, low_open=True)
    if confidence >= 1:
        raise InvalidInputError(f"confidence must be < 1, got {confidence}")
    min_currents = _check_scalar(min_currents, "min_currents", low=3, integer=True)
    poor_fit_pvalue = _check_scalar(poor_fit_pvalue, "poor_fit_pvalue", low=0.0, high=1.0)
    nonmonotone_pvalue = _check_scalar(nonmonotone_pvalue, "nonmonotone_pvalue", low=0.0,
                                       high=1.0)
    max_error_tolerance = _check_scalar(max_error_tolerance, "max_error_tolerance", low=0.0,
                                        high=1.0)
    tau0 = _check_scalar(tau0, "tau0", low=0.0, low_open=True)
    pulse_width = _check_scalar(pulse_width, "pulse_width", low=0.0, low_open=True)
    if not pulse_width > tau0:
        raise InvalidInputError(
            f"pulse_width must be > tau0 (the thermal law needs t_p / tau0 > 1), "
            f"got pulse_width={pulse_width:g}, tau0={tau0:g}")
    table_bins = _check_scalar(table_bins, "table_bins", low=3, high=100_000, integer=True)
    table_smoothing = _check_scalar(table_smoothing, "table_smoothing", low=0, high=100,
                                    integer=True)
    table_points = _check_scalar(table_points, "table_points", low=2, high=1 << 20,
                                 integer=True)
    if progress is not None and not isinstance(progress, (bool, np.bool_)):
        raise TypeError(f"progress must be True, False or None, got {progress!r}")

    meas, skipped = load_measurements(measurements, width=width, min_currents=min_currents,
                                      skip_invalid=skip_invalid)
    D = meas.n_devices
    cur, n, k = meas.padded()
    counts = np.diff(meas.offsets)
    cmin, cmax = cur[:, 0], cur[np.arange(D), counts - 1]
    centre, half = 0.5 * (cmin + cmax), 0.5 * (cmax - cmin)
    tot_n, tot_k = n.sum(1), k.sum(1)
    stuck = (tot_k == 0) | (tot_k == tot_n)
    stuck_level = (tot_k > 0).astype(np.float64)
    sat = npm.saturated_loglik(n, k)
    nonmono_stat = 2.0 * (sat - npm.monotone_loglik(n, k, counts))
    nonmono_p = stats.chi2.sf(np.maximum(nonmono_stat, 0.0), counts - 1)
    nonmonotone = (nonmono_p < nonmonotone_pvalue) & ~stuck

    fit = np.flatnonzero(~stuck)
    K = fit.size
    fits = {}
    show = (K >= _PROGRESS_MIN_DEVICES) if progress is None else bool(progress)
    bar = None
    if show:
        from tqdm.auto import tqdm
        bar = tqdm(total=K, desc=f"calibrate ({model})", unit="device")
    cf, nf, kf, cnt = cur[fit], n[fit], k[fit], counts[fit]
    # The fits make many tiny solves; a multi-threaded BLAS spinning on them was
    # measured 5-15x slower on a shared machine (one thread policy: _threads.py).
    with blas_limit(1):
        try:
            if K and model in fam.PARAMETRIC + ("auto",):
                x = (cf - centre[fit, None]) / half[fit, None]
                fits["logistic"] = _fit_logistic(x, nf, kf, cnt, centre[fit], half[fit], lo_fixed,
                                                 hi_fixed, fit_levels, bar)
                others = fam.PARAMETRIC[1:] if model == "auto" else (
                    (model,) if model != "logistic" else ())
                for name in others:
                    fits[name] = _fit_generic(name, x, cf, nf, kf, centre[fit], half[fit],
                                              fits["logistic"], lo_fixed, hi_fixed, fit_levels)
            if K and model == "isotonic":
                tables, summary = npm.fit_isotonic(cur, n, k, counts, fit, table_points, bar)
                fits["isotonic"] = _nonparametric_record(tables, summary, cf, nf)
                fits["isotonic"]["edf"] = cnt - summary["dof"]
            table_rows = (np.arange(K) if model == "table"
                          else np.flatnonzero(nonmonotone[fit]) if model == "auto" else [])
            if len(table_rows):
                tables, summary, bins = npm.fit_table(cur, n, k, counts, fit[table_rows],
                                                      table_points, table_bins, table_smoothing,
                                                      confidence)
                rec = _nonparametric_record(tables, summary, cf[table_rows], nf[table_rows])
                rec["rows"], rec["bins"], rec["edf"] = table_rows, bins, summary["edf"]
                fits["table"] = rec
        finally:
            if bar is not None:
                bar.close()

    # ---- per family: log-likelihood and information criteria on the fitted rows ----
    for name, rec in fits.items():
        rows = rec.get("rows", np.arange(K))
        P = rec["P"]
        if "loglik" not in rec:
            rec["loglik"] = fam.loglik_at(kf[rows], nf[rows], P)
        p = rec["edf"] if "edf" in rec else fam.n_params(name, fit_levels)
        rec["n_params"] = np.broadcast_to(np.asarray(p, dtype=np.float64), rows.shape).copy()
        rec["aic"], rec["bic"] = fam.information_criteria(rec["loglik"], rec["n_params"],
                                                          tot_n[fit][rows])
        if name in fam.PARAMETRIC:  # more parameters than currents: nothing identified
            rec["identified"] = rec["identified"] & (cnt[rows] > rec["n_params"])
        rec["rows"] = rows

    # ---- choice of family per fitted device ----
    choice = np.full(K, model if model != "auto" else "logistic", dtype=object)
    fallback = np.zeros(K, dtype=bool)
    unidentified = np.zeros(K, dtype=bool)
    runner_up = np.full(K, "", dtype=object)
    delta_aic = np.full(K, np.nan)
    delta_bic = np.full(K, np.nan)
    if K and model == "auto":
        names = [f for f in fam.PARAMETRIC + ("table",) if f in fits]
        crit = np.full((len(names), K), np.inf)
        for j, name in enumerate(names):
            rec = fits[name]
            c = rec[selection]
            crit[j, rec["rows"]] = np.where(rec["identified"], c, np.inf)
        order = np.argsort(crit, axis=0, kind="stable")
        best, second = order[0], order[1] if len(names) > 1 else order[0]
        cols = np.arange(K)
        ok = np.isfinite(crit[best, cols])
        choice[ok] = np.array(names, dtype=object)[best[ok]]
        unidentified = ~ok
        has2 = ok & np.isfinite(crit[second, cols]) & (len(names) > 1)
        runner_up[has2] = np.array(names, dtype=object)[second[has2]]
        for key, out in (("aic", delta_aic), ("bic", delta_bic)):
            vals = np.full((len(names), K), np.nan)
            for j, name in enumerate(names):
                vals[j, fits[name]["rows"]] = fits[name][key]
            out[has2] = vals[second[has2], cols[has2]] - vals[best[has2], cols[has2]]
        fallback = ~ok
    elif K and model in fam.PARAMETRIC:
        unidentified = ~fits[model]["identified"]
        if model != "logistic":
            fallback = unidentified.copy()
            choice[fallback] = "logistic"
    elif K:
        unidentified = ~fits[model]["identified"]
    if K and fallback.any() and "logistic" in fits:
        bad = fallback & ~fits["logistic"]["identified"]
        if bad.any():  # the logistic cannot describe it either: monotone table
            tables, summary = npm.fit_isotonic(cur, n, k, counts, fit[bad], table_points, None)
            rec = _nonparametric_record(tables, summary, cf[bad], nf[bad])
            rec["rows"] = np.flatnonzero(bad)
            rec["edf"] = cnt[bad] - summary["dof"]
            rec["n_params"] = rec["edf"].astype(np.float64)
            rec["aic"], rec["bic"] = fam.information_criteria(rec["loglik"], rec["n_params"],
                                                              tot_n[fit][bad])
            fits["isotonic"] = rec
            choice[bad] = "isotonic"

    # ---- per-device columns ----
    nan = np.full(D, np.nan)
    col = {
        "device": meas.labels, "width": meas.width, "n_currents": counts,
        "n_pulses": tot_n.astype(np.int64), "current_min": cmin, "current_max": cmax,
        "family": np.where(stuck, "constant", "").astype(object),
        "i50": nan.copy(), "i50_se": nan.copy(), "i50_ci_low": nan.copy(),
        "i50_ci_high": nan.copy(), "scale": nan.copy(), "scale_se": nan.copy(),
        "scale_ci_low": nan.copy(), "scale_ci_high": nan.copy(), "window": nan.copy(),
        "window_se": nan.copy(), "window_ci_low": nan.copy(), "window_ci_high": nan.copy(),
        "p_lo": np.where(stuck, stuck_level, lo_fixed), "p_lo_se": nan.copy(),
        "p_hi": np.where(stuck, stuck_level, hi_fixed), "p_hi_se": nan.copy(),
        "shape": nan.copy(), "shape_se": nan.copy(),
        "ic": nan.copy(), "ic_se": nan.copy(), "delta": nan.copy(), "delta_se": nan.copy(),
        "loglik": nan.copy(), "n_params": nan.copy(), "aic": nan.copy(), "bic": nan.copy(),
        "runner_up": np.full(D, "", dtype=object), "delta_aic": nan.copy(),
        "delta_bic": nan.copy(),
        "deviance": np.zeros(D), "dof": np.zeros(D), "pvalue": np.ones(D),
        "monotone_pvalue": nonmono_p, "max_error": np.zeros(D), "max_error_se": np.zeros(D),
        "max_error_low": np.zeros(D), "overdispersion": nan.copy(),
        "stuck": stuck, "nonmonotone": nonmonotone, "rejected": np.zeros(D, dtype=bool),
        "unusable": np.zeros(D, dtype=bool), "poor_fit": np.zeros(D, dtype=bool),
        "at_bound": np.zeros(D, dtype=bool), "converged": np.ones(D, dtype=bool),
        "unidentified": np.zeros(D, dtype=bool), "fallback": np.zeros(D, dtype=bool),
        "implausible_current": np.zeros(D, dtype=bool),
    }
    zc = stats.norm.ppf(0.5 + 0.5 * confidence)
    Pfit = np.zeros_like(nf)
    params = np.full((D, 5), np.nan)
    tab_lo, tab_hi, tab_p, tab_dev = [], [], [], []
    for name, rec in fits.items():
        rows = rec["rows"]
        sel = choice[rows] == name
        r, d = rows[sel], fit[rows[sel]]
        if r.size == 0:
            continue
        col["family"][d] = name
        for key in ("i50", "i50_se", "window", "window_se", "shape", "shape_se", "p_lo_se",
                    "p_hi_se", "loglik", "n_params", "aic", "bic"):
            col[key][d] = rec[key][sel]
        col["converged"][d] = rec["converged"][sel]
        col["at_bound"][d] = rec["at_bound"][sel]
        Pfit[r] = rec["P"][sel]
        if rec["params"] is not None:
            params[d] = rec["params"][sel]
            col["p_lo"][d], col["p_hi"][d] = params[d, 3], params[d, 4]
            if name != "logistic":
                glo, ghi, probs = fam.family_tables(name, params[d], table_points)
                tab_lo.append(glo), tab_hi.append(ghi), tab_p.append(probs), tab_dev.append(d)
            if name == "thermal":
                _thermal_columns(col, d, rec, sel, tau0, pulse_width)
        else:
            glo, ghi, probs = rec["tables"]
            col["p_lo"][d], col["p_hi"][d] = rec["p_lo"][sel], rec["p_hi"][sel]
            tab_lo.append(glo[sel]), tab_hi.append(ghi[sel]), tab_p.append(probs[sel])
            tab_dev.append(d)
    col["fallback"][fit], col["unidentified"][fit] = fallback, unidentified
    col["runner_up"][fit], col["delta_aic"][fit], col["delta_bic"][fit] = (
        runner_up, delta_aic, delta_bic)
    col["scale"] = col["window"] / WINDOW_PER_SCALE
    col["scale_se"] = col["window_se"] / WINDOW_PER_SCALE
    col["i50_ci_low"] = col["i50"] - zc * col["i50_se"]
    col["i50_ci_high"] = col["i50"] + zc * col["i50_se"]
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        rel = col["window_se"] / col["window"]
        col["window_ci_low"] = col["window"] * np.exp(-zc * rel)
        col["window_ci_high"] = col["window"] * np.exp(zc * rel)
    col["scale_ci_low"] = col["window_ci_low"] / WINDOW_PER_SCALE
    col["scale_ci_high"] = col["window_ci_high"] / WINDOW_PER_SCALE
    for name in ("ic", "delta"):  # Wald intervals
        col[f"{name}_ci_low"] = col[name] - zc * col[f"{name}_se"]
        col[f"{name}_ci_high"] = col[name] + zc * col[f"{name}_se"]
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # log scale: nu > 0
        rel = col["shape_se"] / col["shape"]
        col["shape_ci_low"] = col["shape"] * np.exp(-zc * rel)
        col["shape_ci_high"] = col["shape"] * np.exp(zc * rel)
    if K:
        _quality(col, fit, nf, kf, Pfit, cnt, sat[fit], confidence, max_error_tolerance)
    col["rejected"] = (col["pvalue"] < poor_fit_pvalue) & ~stuck
    col["poor_fit"] = col["rejected"].copy()
    # A fitted curve that decreases with current is not monotone.
    col["nonmonotone"] |= ~stuck & (col["p_hi"] < col["p_lo"])
    col["implausible_current"] = check_currents(col, meas.source)

    # ---- the population ----
    pop_i50 = np.where(np.isfinite(col["i50"]), col["i50"], centre)
    pop_scale = np.where(np.isfinite(col["scale"]) & (col["scale"] > 0), col["scale"],
                         (cmax - cmin) / WINDOW_PER_SCALE)
    widths = meas.width if np.isfinite(meas.width).all() else np.nan
    from .. import __version__
    meta = {"calibration": {
        "model": model, "method": _legacy_name(model),
        "levels": "fit" if fit_levels else [lo_fixed, hi_fixed],
        "source": meas.source, "confidence": confidence, "sotcore_version": __version__,
        "devices": [json_label(v) for v in meas.labels],
        "families": [str(v) for v in col["family"]],
        "params": [None if not np.isfinite(r).all() else [float(v) for v in r]
                   for r in params],
        "thermal": {"tau0": tau0, "pulse_width": pulse_width}}}
    kwargs = {}
    if tab_dev:
        kwargs = {"tables": (np.concatenate(tab_lo), np.concatenate(tab_hi),
                             np.concatenate(tab_p)), "table_devices": np.concatenate(tab_dev)}
    population = DevicePopulation(pop_i50, pop_scale, col["p_lo"], col["p_hi"], widths,
                                  meta=meta, table_points=table_points, **kwargs)
    family_fits = {name: _public_fit(rec, fit) for name, rec in fits.items()}
    return CalibrationResult(population, col, meas, skipped=skipped, model=model,
                             method=_legacy_name(model),
                             levels="fit" if fit_levels else (lo_fixed, hi_fixed),
                             confidence=confidence, fit_time=time.perf_counter() - t0,
                             poor_fit_pvalue=poor_fit_pvalue, selection=selection,
                             max_error_tolerance=max_error_tolerance, family_fits=family_fits,
                             thermal={"tau0": tau0, "pulse_width": pulse_width})


def _legacy_name(model):
    return {"logistic": "sigmoid"}.get(model, model)


def _public_fit(rec, fit):
    """What a result keeps of one family's fit (device indices, curves, criteria)."""
    out = {"devices": fit[rec["rows"]], "loglik": rec["loglik"], "aic": rec["aic"],
           "bic": rec["bic"], "identified": rec["identified"], "i50": rec["i50"],
           "window": rec["window"]}
    if rec["params"] is not None:
        out["params"] = rec["params"]
    else:
        out["tables"] = rec["tables"]
    if "bins" in rec:
        out["bins"] = rec["bins"]
    return out


def _thermal_columns(col, d, rec, sel, tau0, pulse_width):
    """Ic and Delta of thermal fits with delta-method standard errors."""
    loc, s = rec["params"][sel, 0], rec["params"][sel, 1]
    ic, delta = fam.thermal_parameters(loc, s, tau0, pulse_width)
    r = math.log(pulse_width / tau0)
    # Covariance of (loc, s) from that of the normalised (a, b): loc = c + h a, s = h e^b.
    cov = rec["cov"][sel][:, :2, :2]
    h = col["current_max"][d] - col["current_min"][d]
    J = np.zeros((d.size, 2, 2))
    J[:, 0, 0], J[:, 1, 1] = 0.5 * h, s
    cls = np.einsum("nij,njk,nlk->nil", J, cov, J)
    g_ic = np.stack([np.ones_like(s), np.full_like(s, r)], 1)
    g_de = np.stack([1.0 / s, -loc / s ** 2], 1)
    col["ic"][d], col["delta"][d] = ic, delta
    col["ic_se"][d] = np.sqrt(np.einsum("ni,nij,nj->n", g_ic, cls, g_ic))
    col["delta_se"][d] = np.sqrt(np.einsum("ni,nij,nj->n", g_de, cls, g_de))


def _quality(col, fit, n, k, P, counts, sat, confidence, tol):
    """Deviance test, largest error with its binomial uncertainty, overdispersion.

    ``max_error_low`` is a lower confidence bound (level ``confidence`` for
    the device) on the largest true |fitted - P| over the measured currents;
    ``unusable`` when it exceeds ``tol``.
    """
    live = n > 0
    nn = np.where(live, n, 1.0)
    dev = np.maximum(2.0 * (sat - col["loglik"][fit]), 0.0)
    dof = counts - col["n_params"][fit]
    with np.errstate(invalid="ignore"):
        pval = np.where(dof >= 0.5, stats.chi2.sf(dev, np.maximum(dof, 0.5)), np.nan)
    err = np.where(live, np.abs(P - k / nn), -1.0)
    se = np.sqrt(np.maximum(P * (1.0 - P), 1.0 / nn ** 2) / nn)  # floor: one switch
    j = np.argmax(err, axis=1)
    rows = np.arange(fit.size)
    # Lower confidence bound of the worst misfit: the distance from the fitted
    # P to the Wilson interval of the measured P (Bonferroni over the currents;
    # Wilson, unlike the normal interval, holds at few pulses and P near 0 or 1).
    zb = stats.norm.ppf(1.0 - (1.0 - confidence) / (2.0 * counts))
    wl, wh = npm.wilson_interval(k, nn, z=zb[:, None])
    low = np.where(live, np.maximum(wl - P, P - wh), -np.inf).max(1)
    pearson = np.where(live, (k - n * P) ** 2 / np.maximum(n * P * (1 - P), 1e-12), 0.0).sum(1)
    nbar = n.sum(1) / counts
    with np.errstate(invalid="ignore", divide="ignore"):
        phi = np.where(dof >= 1, pearson / np.maximum(dof, 1), np.nan)
        rho = np.where(nbar > 1, np.maximum(phi - 1.0, 0.0) / (nbar - 1.0), np.nan)
    col["deviance"][fit], col["dof"][fit], col["pvalue"][fit] = dev, dof, pval
    col["max_error"][fit], col["max_error_se"][fit] = err[rows, j], se[rows, j]
    col["max_error_low"][fit] = np.maximum(low, 0.0)
    col["overdispersion"][fit] = rho
    col["unusable"][fit] = low > tol
