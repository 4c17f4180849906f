"""CalibrationResult: fitted devices, flags, population statistics and the text report."""
import csv
import json
import math
import numbers
from pathlib import Path

import numpy as np

from ..exceptions import InvalidInputError
from . import _families as fam
from ._population import group_stats, width_fit

__all__ = ["CalibrationResult", "json_label", "jsonable", "si_prefix", "format_current"]

_PREFIXES = ((1e-9, "n"), (1e-6, "u"), (1e-3, "m"), (1.0, ""))
# Flags report() describes in words; any other boolean column is shown by name.
_FLAG_TEXT = {"stuck": "stuck", "nonmonotone": "non-monotone",
              "rejected": "rejected (deviance p < {p:g})",
              "unusable": "unusable (max error > {tol:g} at {conf:.0%} confidence)",
              "at_bound": "at a search bound", "unidentified": "unidentified family",
              "fallback": "fell back to logistic/isotonic",
              "implausible_current": "implausible current (units?)"}
_ALIASES = ("poor_fit",)  # same as ``rejected``


def si_prefix(values):
    """(factor, prefix) of the SI prefix (n, u, m or none) suiting the typical |value|."""
    v = np.abs(np.asarray(values, dtype=np.float64))
    v = v[np.isfinite(v) & (v > 0)]
    if v.size == 0:
        return 1.0, ""
    med = float(np.median(v))
    for factor, prefix in reversed(_PREFIXES):
        if med >= factor:
            return factor, prefix
    return _PREFIXES[0]


def format_current(value, factor, digits=4):
    """A number in units of ``factor`` with ``digits`` significant digits ("-" if NaN)."""
    if value is None or not np.isfinite(value):
        return "-"
    return f"{value / factor:.{digits}g}"


class CalibrationResult:
    """Fitted devices, their flags and population statistics (from :func:`calibrate`).

    Attributes
    ----------
    population : DevicePopulation
        One device per calibrated device, in input order (skipped devices
        left out); devices of non-logistic families are table devices.
    summary : pandas.DataFrame or dict of ndarray
        Per-device table (a DataFrame when pandas is importable).
    per_device : dict of ndarray
        The per-device columns as NumPy arrays: ``device, width, n_currents,
        n_pulses, current_min, current_max, family, i50, i50_se, i50_ci_low,
        i50_ci_high, scale, scale_se, scale_ci_low, scale_ci_high, window,
        window_se, window_ci_low, window_ci_high, p_lo, p_lo_se, p_hi,
        p_hi_se, shape, shape_se`` (asymmetric nu), ``ic, ic_se, delta,
        delta_se`` (thermal; intervals in ``*_ci_low``/``*_ci_high``, Wald,
        log scale for nu), ``loglik, n_params, aic, bic, runner_up,
        delta_aic, delta_bic`` (criterion of the runner-up family minus the
        chosen one's; ``model="auto"``), ``deviance, dof, pvalue,
        monotone_pvalue, max_error`` (largest |fitted - measured P|),
        ``max_error_se`` (its binomial SE), ``max_error_low`` (lower
        confidence bound of the largest true error), ``overdispersion``
        (beta-binomial intra-device correlation, moment estimate) and the
        boolean flags ``stuck, nonmonotone, rejected, poor_fit`` (alias of
        ``rejected``), ``unusable, at_bound, converged, unidentified,
        fallback, implausible_current``.  Currents in amperes; NaN where a
        value does not apply.  Boolean columns added later (e.g. by
        :mod:`sotcore.characterize`) are shown by ``report``, ``flagged``
        and ``to_dict`` like the built-in ones.
    family_fits : dict
        Per fitted family: ``devices`` (indices), ``loglik``, ``aic``,
        ``bic``, ``identified``, ``i50``, ``window`` and ``params`` (rows
        ``(loc, s, c, p_lo, p_hi)``) or ``tables``; see :meth:`curve`.
    devices : ndarray of object
        Device labels, as in the input (text for CSV files).
    stats : list of dict
        Per width (``width_um`` None when unknown): device counts; median,
        MAD (normal-scaled), robust CV, median interval, mean, sd, CV, mean
        interval, noise-corrected spread and outlier labels of I50 and
        window.  Stuck devices and devices without a curve are left out.
    width_fits : dict or None
        ``{"i50": fit, "window": fit}``, robust linear fits against width
        (slope in A/um, intercept in A, standard errors, intervals, R^2,
        outliers); None unless there are at least 2 distinct widths.
    skipped : dict
        Skipped device label -> reason.
    ignored_columns : list of str
    measurements : dict of ndarray
        The aggregated data: ``device`` (index into ``devices``), ``current``,
        ``pulses``, ``switched``.
    model, method, levels, confidence, selection, max_error_tolerance, fit_time, source
    """

    def __init__(self, population, per_device, meas, *, skipped, model, method, levels,
                 confidence, fit_time, poor_fit_pvalue, selection="aic",
                 max_error_tolerance=0.05, family_fits=None, thermal=None):
        self.population = population
        self.per_device = per_device
        self.devices = meas.labels
        self.measurements = {"device": meas.dev, "current": meas.current,
                             "pulses": meas.pulses, "switched": meas.switched}
        self.source = meas.source
        self.raw_input = meas.raw
        self.n_input_rows = meas.n_input_rows
        self.ignored_columns = list(meas.ignored_columns)
        self.skipped = dict(skipped)
        self.model = model
        self.method = method
        self.levels = levels
        self.confidence = confidence
        self.fit_time = fit_time
        self.poor_fit_pvalue = poor_fit_pvalue
        self.selection = selection
        self.max_error_tolerance = max_error_tolerance
        self.family_fits = family_fits or {}
        self.thermal = thermal or {}
        used = ~per_device["stuck"] & np.isfinite(per_device["i50"])
        self.stats = group_stats(per_device, used, confidence)
        w = per_device["width"]
        self.width_fits = None
        if np.isfinite(w).all() and np.unique(w[used]).size >= 2 and used.sum() >= 3:
            self.width_fits = {name: width_fit(w[used], per_device[name][used], confidence,
                                               labels=self.devices[used])
                               for name in ("i50", "window")}

    def __len__(self):
        return len(self.devices)

    def __repr__(self):
        f = self.per_device
        return (f"CalibrationResult(n_devices={len(self)}, model={self.model!r}, "
                f"stuck={int(f['stuck'].sum())}, nonmonotone={int(f['nonmonotone'].sum())}, "
                f"rejected={int(f['rejected'].sum())}, unusable={int(f['unusable'].sum())}, "
                f"skipped={len(self.skipped)})")

    @property
    def summary(self):
        try:
            import pandas as pd
        except ImportError:
            return dict(self.per_device)
        return pd.DataFrame(self.per_device)

    def flag_names(self):
        """Names of the boolean per-device columns (including ones added after calibrate)."""
        return [k for k, v in self.per_device.items()
                if np.asarray(v).dtype == np.bool_ and np.ndim(v) == 1]

    def flagged(self, flag):
        """Labels of the devices with a boolean flag set (``converged``: without it)."""
        names = self.flag_names()
        if flag not in names:
            raise InvalidInputError(f"flag must be one of {', '.join(names)}; got {flag!r}")
        mask = np.asarray(self.per_device[flag])
        return list(self.devices[~mask if flag == "converged" else mask])

    def _index(self, device):
        labels = list(self.devices)
        if device in labels:
            return labels.index(device)
        if isinstance(device, numbers.Integral) and 0 <= device < len(labels):
            return int(device)
        raise InvalidInputError(f"device {device!r} is neither a device label nor an index "
                         f"in [0, {len(labels)})")

    def curve(self, device, current, family=None):
        """Fitted switching probability of one device at ``current`` (amperes).

        Parameters
        ----------
        device : label or int
        current : array-like
        family : str, optional
            One of the families fitted (``family_fits``); default the chosen one.

        Returns
        -------
        ndarray like ``current``, or None if that family was not fitted to this device.
        """
        d = self._index(device)
        I = np.asarray(current, dtype=np.float64)
        if family is None:
            P = self.population.probability(
                np.broadcast_to(I.reshape(-1, 1), (I.size, len(self))))[:, d]
            return P.reshape(I.shape)
        if family not in self.family_fits:
            raise InvalidInputError(f"family {family!r} was not fitted; fitted: "
                             f"{', '.join(self.family_fits) or 'none'}")
        f = self.family_fits[family]
        rows = np.flatnonzero(f["devices"] == d)
        if rows.size == 0:
            return None
        j = int(rows[0])
        if "params" in f:
            return fam.family_probability(family, I, f["params"][j])
        glo, ghi, probs = f["tables"]
        grid = np.linspace(glo[j], ghi[j], probs.shape[1])
        return np.interp(I, grid, probs[j])

    def to_dict(self):
        """Population-level numbers as a JSON-serialisable dict."""
        f = self.per_device
        flags = {}
        for name in self.flag_names():
            if name == "converged":
                flags["not_converged"] = int((~f[name]).sum())
            else:
                flags[name] = int(np.sum(f[name]))
        fams, counts = np.unique(np.asarray(f["family"], dtype=str), return_counts=True)
        return {
            "source": self.source, "n_devices": len(self), "model": self.model,
            "method": self.method, "selection": self.selection,
            "levels": self.levels if isinstance(self.levels, str) else list(self.levels),
            "confidence": self.confidence, "max_error_tolerance": self.max_error_tolerance,
            "units": {"current": "A", "width": "um", "slope": "A/um"},
            "families": {str(a): int(b) for a, b in zip(fams, counts)},
            "thermal": self.thermal, "flags": flags,
            "skipped": {str(k): v for k, v in self.skipped.items()},
            "ignored_columns": self.ignored_columns,
            "per_width": jsonable(self.stats), "width_fits": jsonable(self.width_fits),
        }

    def _what(self):
        lv = ("fitted per device" if self.levels == "fit"
              else f"fixed at p_lo={self.levels[0]:g}, p_hi={self.levels[1]:g}")
        if self.model == "auto":
            return f"auto: family per device by {self.selection.upper()}, levels {lv}"
        if self.model in ("isotonic", "table"):
            return f"{self.model} fit"
        return f"{self.model} fit, levels {lv}"

    def report(self):
        """A human-readable summary; currents with SI prefixes chosen from the data."""
        f = self.per_device
        lines = [f"sotcore calibration of {len(self)} device(s) from {self.source} "
                 f"({self._what()})",
                 f"  {f['n_currents'].sum():,} (device, current) points, "
                 f"{int(f['n_pulses'].sum()):,} pulses"
                 + (f" from {self.n_input_rows:,} per-pulse rows" if self.raw_input else "")
                 + f"; {self.fit_time:.2f} s"]
        fams, counts = np.unique(np.asarray(f["family"], dtype=str), return_counts=True)
        text = ", ".join(f"{a} {b}" for a, b in zip(fams, counts))
        if self.model == "auto":
            d = f[f"delta_{self.selection}"]
            d = d[np.isfinite(d)]
            if d.size:
                text += (f"; runner-up worse by median {np.median(d):.3g} "
                         f"(min {d.min():.3g}) {self.selection.upper()}")
        lines.append(f"  families: {text}")
        fmt = {"p": self.poor_fit_pvalue, "tol": self.max_error_tolerance,
               "conf": self.confidence}
        parts = []
        for name in self.flag_names():
            if name in _ALIASES:
                continue
            if name == "converged":
                parts.append(f"{int((~f[name]).sum())} not converged")
            else:
                parts.append(f"{int(np.sum(f[name]))} {_FLAG_TEXT.get(name, name).format(**fmt)}")
        lines.append("  flags: " + ", ".join(parts))
        fitted = ~f["stuck"] & np.isfinite(f["i50"])
        if fitted.any():
            me, se = f["max_error"][fitted], f["max_error_se"][fitted]
            od = f["overdispersion"][fitted]
            od = od[np.isfinite(od)]
            odt = f"{np.median(od):.2g}" if od.size else "-"
            lines.append(f"  fit quality: max |fitted - measured P| median {np.median(me):.3g}"
                         f" (binomial SE {np.median(se):.2g}), worst {me.max():.3g}; "
                         f"overdispersion (beta-binomial rho) median {odt}")
        for name in ("rejected", "unusable"):
            bad = self.flagged(name)
            if bad:
                more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
                lines.append(f"  {name}: {', '.join(map(repr, bad[:8]))}{more}")
        if self.skipped:
            names = ", ".join(repr(k) for k in list(self.skipped)[:10])
            more = f" and {len(self.skipped) - 10} more" if len(self.skipped) > 10 else ""
            lines.append(f"  skipped {len(self.skipped)} device(s): {names}{more}")
        if self.ignored_columns:
            lines.append(f"  ignored columns: {', '.join(self.ignored_columns)}")
        fi, pi = si_prefix(f["i50"][fitted])
        fw, pw = si_prefix(f["window"][fitted])
        lines.append("")
        lines.append(f"  {'width':>6} {'dev':>5} {'used':>5} | {'I50 med':>9} {'MAD':>8} "
                     f"{'mean':>9} {'sd':>8} {'CV':>6} | {'W med':>8} {'MAD':>8} {'mean':>8} "
                     f"{'sd':>8} {'CV*':>6}")
        lines.append(f"  {'(um)':>6} {'':>5} {'':>5} | {'(' + pi + 'A)':>9} {'':>8} {'':>9} "
                     f"{'':>8} {'':>6} | {'(' + pw + 'A)':>8}   (W = window P 0.1->0.9; "
                     f"CV* corrected for fit noise)")
        outl = []
        for row in self.stats:
            ws = "-" if row["width_um"] is None else f"{row['width_um']:g}"
            icorr = row["window_std_intrinsic"] / row["window_mean"] if row["n_used"] > 1 \
                else math.nan
            lines.append(
                f"  {ws:>6} {row['n_devices']:>5} {row['n_used']:>5} | "
                f"{format_current(row['i50_median'], fi):>9} "
                f"{format_current(row['i50_mad'], fi):>8} "
                f"{format_current(row['i50_mean'], fi):>9} "
                f"{format_current(row['i50_std'], fi):>8} {_pct(row['i50_cv']):>6} | "
                f"{format_current(row['window_median'], fw):>8} "
                f"{format_current(row['window_mad'], fw):>8} "
                f"{format_current(row['window_mean'], fw):>8} "
                f"{format_current(row['window_std'], fw):>8} {_pct(icorr):>6}")
            for name, label in (("i50", "I50"), ("window", "window")):
                if row[f"{name}_outliers"]:
                    outl.append(f"width {ws}: {label} " + ", ".join(
                        map(repr, row[f"{name}_outliers"][:8])))
        if outl:
            lines.append("  outliers (> 5 MAD from the median): " + "; ".join(outl))
        if self.width_fits:
            pct = f"{self.confidence:.0%}"
            lines.append("")
            lines.append(f"  width scaling (robust Huber fit over devices, {pct} CI):")
            for name, label, (fac, pre) in (("i50", "I50   ", (fi, pi)),
                                            ("window", "window", (fw, pw))):
                ft = self.width_fits[name]
                sig = ft["slope_ci"][0] > 0 or ft["slope_ci"][1] < 0
                trend = ("increases" if ft["slope"] > 0 else "decreases") if sig else \
                    "no significant trend"
                lines.append(
                    f"    {label} = {format_current(ft['slope'], fac)} "
                    f"[{format_current(ft['slope_ci'][0], fac)}, "
                    f"{format_current(ft['slope_ci'][1], fac)}] {pre}A/um * w "
                    f"{'+' if ft['intercept'] >= 0 else '-'} "
                    f"{format_current(abs(ft['intercept']), fac)} "
                    f"[{format_current(ft['intercept_ci'][0], fac)}, "
                    f"{format_current(ft['intercept_ci'][1], fac)}] {pre}A   "
                    f"R^2 = {ft['r2']:.3f}; {trend} with width")
        return "\n".join(lines)

    def save(self, path, *, summary=None, stats=None):
        """Write the population (``DevicePopulation.save`` JSON) to ``path``.

        Parameters
        ----------
        path : str or path
            Population file.
        summary : str or path, optional
            Also write the per-device table as CSV here (``save_summary``).
        stats : str or path, optional
            Also write ``to_dict()`` as JSON here (``save_stats``).
        """
        self.population.save(path)
        if summary is not None:
            self.save_summary(summary)
        if stats is not None:
            self.save_stats(stats)
        return Path(path)

    def save_summary(self, path):
        """Write the per-device table as CSV (empty cells for NaN; flags as 0/1)."""
        cols = list(self.per_device)
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(cols)
            for i in range(len(self)):
                w.writerow([_csv_value(self.per_device[c][i]) for c in cols])
        return Path(path)

    def save_stats(self, path):
        """Write ``to_dict()`` as JSON (NaN as null)."""
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2, allow_nan=False)
        return Path(path)


def _pct(x):
    return "-" if not np.isfinite(x) else f"{100 * x:.1f}%"


def _csv_value(v):
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return "" if not np.isfinite(v) else repr(float(v))
    return v


def jsonable(obj):
    """Floats NaN/inf -> None, NumPy scalars -> Python, recursively."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj) if math.isfinite(obj) else None
    return obj


def json_label(v):
    if isinstance(v, (str, bool)) or v is None:
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    return str(v)

