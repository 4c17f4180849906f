"""Device calibration: switching curves fitted to measured pulse data.

A researcher pulses each device ``pulses`` times at each of a sweep of
currents and counts how often it switched.  :func:`calibrate` turns such a
table into per-device switching curves (a binomial maximum-likelihood
sigmoid fit, or a monotone non-parametric table), per-device flags,
population statistics per device width and the width scaling of I50 and of
the programming window, and returns them with a ready-to-use
:class:`~sotcore.DevicePopulation`.  :func:`simulate_measurements` is the
virtual lab: it produces the same kind of table from any population.

Measurement tables
------------------
Columns (names matched case-insensitively, surrounding spaces ignored;
accepted aliases in brackets, see ``COLUMN_ALIASES``):

``device`` [``device_id``]
    Device label (any text or number).  Devices keep their order of first
    appearance.
``current`` [``I``, ``current_A``]
    Pulse current in amperes (any finite real; the sweep of one device needs
    at least ``min_currents`` distinct values).
``pulses`` [``n_pulses``]
    Pulses applied at that current (a positive whole number).
``switched`` [``n_switched``]
    How many of them switched the device (whole number, 0 <= switched <= pulses).
``width`` [``width_um``], optional
    Device width in micrometres (> 0, the same on every row of a device).

Without a ``pulses`` column every row is one pulse and ``switched`` is its
0/1 outcome (raw per-pulse records); rows are aggregated per (device,
current).  Aggregated rows that repeat a (device, current) pair are summed
(repeated sweeps of the same device).  Other columns are ignored, with a
warning, and listed in ``CalibrationResult.ignored_columns``.  In CSV files,
blank lines and lines starting with ``#`` are skipped (comments); everything
else must be a data row.
"""
import contextlib
import csv
import gc
import json
import math
import numbers
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from scipy import stats
from scipy.optimize import minimize
from scipy.special import log_expit, xlogy
from sklearn.isotonic import IsotonicRegression

try:  # SciPy >= 1.12: a fast PAVA without estimator overhead
    from scipy.optimize import isotonic_regression as _scipy_isotonic
except ImportError:  # pragma: no cover - older SciPy
    _scipy_isotonic = None
    from sklearn.isotonic import isotonic_regression as _sklearn_isotonic

from ._utils import as_float_array, seed_from_random_state
from .devices import DEFAULT_TABLE_POINTS, WINDOW_PER_SCALE, DevicePopulation, _check_scalar

__all__ = ["calibrate", "CalibrationResult", "simulate_measurements",
           "expected_standard_errors", "pulses_for_precision", "COLUMN_ALIASES"]

#: Canonical column names and the names accepted for them (case-insensitive).
COLUMN_ALIASES = {
    "device": ("device", "device_id"),
    "current": ("current", "i", "current_a"),
    "pulses": ("pulses", "n_pulses"),
    "switched": ("switched", "n_switched"),
    "width": ("width", "width_um"),
}

#: ASSUMPTION: deviance p-value below which a fit is flagged as poor.
POOR_FIT_PVALUE = 1e-3
#: ASSUMPTION: p-value of the monotonicity test below which data are flagged non-monotone.
NONMONOTONE_PVALUE = 1e-3
#: ASSUMPTION: half-span of the simulated current sweep, in programming
#: windows around I50 (P runs from ~0.001 to ~0.999 across it).
DEFAULT_SPAN = 1.5

# Search box of the sigmoid fit, in each device's normalised units
# (centre and half-range of its own sweep): I50 within 20 half-ranges of the
# sweep centre, scale from 1/1000 to 100 half-ranges.  Hitting it means the
# data do not resolve the curve (flag ``at_bound``).
_A_BOUND = 20.0
_LOG_SCALE_BOUNDS = (math.log(1e-3), math.log(1e2))
# Fitted levels are searched in [eps, 1 - eps] so the likelihood stays finite
# everywhere in the box (L-BFGS-B cannot recover from an infinite trial
# point); estimates on these bounds are reported as exactly 0 and 1.
_LEVEL_EPS = 1e-9
# Devices per optimiser call.  The problem is separable, but one joint L-BFGS
# run takes as many iterations as its worst-conditioned device needs, so small
# chunks keep messy data (e.g. pulses recorded during training) fast: 32 gives
# 0.18 s for a clean 1000 x 25 sweep and 3.6x faster re-fits of recorded
# pulses than 1024.  Fixed, independent of the machine.
_FIT_CHUNK = 32
# Newton decrement g' H^-1 g (~ twice the log-likelihood still to gain) below
# which a device counts as converged; 1e-6 puts the estimate within ~0.001 SE
# of the optimum.
_NEWTON_TOL = 1e-6
_PROGRESS_MIN_DEVICES = 10000
_MAX_RAW_PULSES = 50_000_000


# ----------------------------------------------------------------------------------------
# reading and validating measurements
# ----------------------------------------------------------------------------------------
class _Measurements:
    """Validated measurements aggregated to one row per (device, distinct current).

    Rows are sorted by device (order of first appearance) then current;
    ``offsets[d]:offsets[d + 1]`` are device ``d``'s rows.
    """

    def __init__(self, labels, width, dev, current, pulses, switched, source, raw,
                 n_input_rows, ignored_columns):
        self.labels = labels
        self.width = width
        self.dev = dev
        self.current = current
        self.pulses = pulses
        self.switched = switched
        self.source = source
        self.raw = raw
        self.n_input_rows = n_input_rows
        self.ignored_columns = ignored_columns
        self.offsets = np.searchsorted(dev, np.arange(len(labels) + 1))

    @property
    def n_devices(self):
        return len(self.labels)

    def padded(self):
        """(current, pulses, switched) as (n_devices, max_points) arrays; padding has 0 pulses."""
        D = self.n_devices
        counts = np.diff(self.offsets)
        M = int(counts.max())
        col = np.arange(self.dev.shape[0]) - self.offsets[self.dev]
        cur = np.repeat(self.current[self.offsets[1:] - 1][:, None], M, axis=1)
        n = np.zeros((D, M))
        k = np.zeros((D, M))
        cur[self.dev, col] = self.current
        n[self.dev, col] = self.pulses
        k[self.dev, col] = self.switched
        return cur, n, k


def _canonical_columns(names, source):
    """Map the input's column names to canonical names; also return the ignored ones."""
    lookup = {alias: canon for canon, aliases in COLUMN_ALIASES.items() for alias in aliases}
    found, ignored = {}, []
    for name in names:
        canon = lookup.get(str(name).strip().lower())
        if canon is None:
            ignored.append(str(name))
        elif canon in found:
            raise ValueError(f"{source}: columns {found[canon]!r} and {name!r} both give "
                             f"'{canon}'; keep one of them")
        else:
            found[canon] = name
    missing = [c for c in ("device", "current", "switched") if c not in found]
    if missing:
        have = ", ".join(repr(str(n)) for n in names) or "none"
        raise ValueError(f"{source}: missing column(s) {', '.join(repr(m) for m in missing)} "
                         f"(found: {have}); expected device, current, pulses, switched "
                         f"[, width]")
    return found, ignored


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector while millions of small strings are made.

    Parsing a per-pulse file creates tens of millions of objects without
    cycles; the collector would rescan them all repeatedly (a 4-5x slowdown).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _read_csv(path):
    """Header, columns (lists of str) and the line number of each data row of a CSV file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, expected a CSV file")
    try:
        fh = open(path, newline="", encoding="utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"measurements file not found: {path}") from None
    header, rows, lines = None, [], []
    with fh, _gc_paused():
        reader = csv.reader(fh)
        add_row, add_line = rows.append, lines.append
        try:
            for row in reader:
                first = row[0] if row else ""
                # Fast test for the common row; the slow one for blanks and comments.
                if not first or first[0] in "# \t":
                    if not "".join(row).strip() or first.lstrip().startswith("#"):
                        continue
                if header is None:
                    header = [c.strip() for c in row]
                    continue
                add_row(row)
                add_line(reader.line_num)
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a text (CSV) file") from None
        except csv.Error as exc:
            raise ValueError(f"{path}, line {reader.line_num}: malformed CSV ({exc})") from None
        if header is None:
            raise ValueError(f"{path}: the file is empty (expected a header line "
                             f"'device,current,pulses,switched' and data rows)")
        if not rows:
            raise ValueError(f"{path}: the file has a header but no data rows")
        ncol = len(header)
        if set(map(len, rows)) != {ncol}:
            i = next(i for i, r in enumerate(rows) if len(r) != ncol)
            raise ValueError(f"{path}, line {lines[i]}: expected {ncol} fields like the "
                             f"header ({', '.join(header)}), got {len(rows[i])}")
        columns = {h: [r[j] for r in rows] for j, h in enumerate(header)}
    return header, columns, np.asarray(lines)


def _input_columns(measurements):
    """(source name, {name: values}, locate(i) -> 'where' string) for any accepted input."""
    if isinstance(measurements, (str, os.PathLike)):
        source = str(measurements)
        header, cols, lines = _read_csv(measurements)
        return source, header, cols, (lambda i: f"{source}, line {lines[i]}")
    source = "measurements"
    if hasattr(measurements, "columns") and hasattr(measurements, "to_numpy"):  # DataFrame
        names = list(measurements.columns)
        if len(set(map(str, names))) != len(names):
            raise ValueError(f"{source}: repeated column names {names}")
        cols = {n: measurements[n].to_numpy() for n in names}
    elif isinstance(measurements, np.ndarray) and measurements.dtype.names:
        names = list(measurements.dtype.names)
        cols = {n: measurements[n] for n in names}
    elif isinstance(measurements, Mapping):
        names = list(measurements.keys())
        cols = dict(measurements)
    else:
        raise TypeError("measurements must be a CSV path, a pandas DataFrame, a NumPy "
                        "structured array or a dict of columns, got "
                        f"{type(measurements).__name__}")
    lengths = set()
    for n in names:
        v = cols[n]
        if np.ndim(v) != 1:
            raise ValueError(f"{source}: column {n!r} must be one-dimensional, got shape "
                             f"{np.shape(v)}")
        lengths.add(len(v))
    if len(lengths) > 1:
        raise ValueError(f"{source}: columns have different lengths {sorted(lengths)}")
    if not names or lengths == {0}:
        raise ValueError(f"{source}: the table is empty (no rows)")
    return source, names, cols, (lambda i: f"{source}, row {i}")


def _numeric_column(values, col, locate, *, allow_bool=False):
    """float64 array of a column; ValueError naming the first bad row."""
    if isinstance(values, list):  # text from a CSV file: parse without a str array
        try:
            values = np.array(values, dtype=np.float64)
        except (TypeError, ValueError):
            pass
    arr = np.asarray(values)
    if arr.dtype.kind == "b" and not allow_bool:
        raise ValueError(f"{locate(0)}, column '{col}': booleans are not numbers")
    if arr.dtype.kind in "biuf":
        out = arr.astype(np.float64)
    else:
        try:
            if arr.dtype.kind not in "OUS":
                raise TypeError
            out = arr.astype(np.float64)
        except (TypeError, ValueError):
            for i, v in enumerate(arr):
                try:
                    if isinstance(v, (bool, np.bool_)) and not allow_bool:
                        raise TypeError
                    float(v)
                except (TypeError, ValueError):
                    what = ("an empty value" if v is None or str(v).strip() == ""
                            else f"{str(v)!r} is not a number")
                    raise ValueError(f"{locate(i)}, column '{col}': {what}") from None
            raise ValueError(f"{locate(0)}, column '{col}': values are not numbers "
                             f"(dtype {arr.dtype})") from None
    bad = ~np.isfinite(out)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{locate(i)}, column '{col}': value {out[i]} is not finite "
                         f"(NaN or infinite values are not allowed)")
    return out


def _whole(values, col, locate, *, low):
    """Check that a float column holds whole numbers >= low; return int64."""
    frac = values != np.round(values)
    if frac.any():
        i = int(np.argmax(frac))
        raise ValueError(f"{locate(i)}, column '{col}': must be a whole number, got {values[i]}")
    small = values < low
    if small.any():
        i = int(np.argmax(small))
        kind = "positive" if low == 1 else "non-negative"
        raise ValueError(f"{locate(i)}, column '{col}': must be a {kind} whole number, got "
                         f"{values[i]:g}")
    return values.astype(np.int64)


def _device_labels(values, locate):
    """Device index per row (order of first appearance) and the label of each device."""
    arr = np.asarray(values)
    if arr.dtype.kind in "US":  # plain text labels: vectorised checks
        arr = np.char.strip(arr)
        empty = arr == arr.dtype.type()
        if empty.any():
            raise ValueError(f"{locate(int(np.argmax(empty)))}, column 'device': missing "
                             f"device label")
    elif arr.dtype.kind == "O":
        arr = np.array([v.strip() if isinstance(v, str) else v for v in arr], dtype=object)
        for i, v in enumerate(arr):
            if v is None or (isinstance(v, str) and v == "") or (
                    isinstance(v, numbers.Real) and not math.isfinite(v)):
                raise ValueError(f"{locate(i)}, column 'device': missing device label")
    elif arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            raise ValueError(f"{locate(int(np.argmax(bad)))}, column 'device': missing device "
                             f"label ({arr[bad][0]})")
    try:
        uniq, first, inverse = np.unique(arr, return_index=True, return_inverse=True)
    except TypeError:  # mixed label types: compare them as text
        arr = np.array([str(v) for v in arr], dtype=object)
        uniq, first, inverse = np.unique(arr, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    labels = np.empty(order.size, dtype=object)
    labels[:] = uniq[order].tolist()  # Python str/int/float labels
    return rank[inverse.ravel()], labels, first[order]


def _load_measurements(measurements, *, width=None, min_currents=3, skip_invalid=False):
    """Read, validate and aggregate measurements; return (_Measurements, skipped)."""
    with _gc_paused():
        return _parse_measurements(measurements, width, min_currents, skip_invalid)


def _parse_measurements(measurements, width, min_currents, skip_invalid):
    source, names, cols, locate = _input_columns(measurements)
    found, ignored = _canonical_columns(names, source)
    if ignored:
        warnings.warn(f"{source}: ignored column(s) {', '.join(repr(c) for c in ignored)} "
                      f"(calibrate reads device, current, pulses, switched, width)",
                      UserWarning, stacklevel=4)
    raw = "pulses" not in found
    n_rows = len(cols[found["device"]])
    dev, labels, first_row = _device_labels(cols[found["device"]], locate)
    current = _numeric_column(cols[found["current"]], "current", locate)
    sw = _numeric_column(cols[found["switched"]], "switched", locate, allow_bool=raw)
    if raw:
        notbit = (sw != 0) & (sw != 1)
        if notbit.any():
            i = int(np.argmax(notbit))
            raise ValueError(f"{locate(i)}, column 'switched': got {sw[i]:g}, but without a "
                             f"'pulses' column every row is one pulse and 'switched' must be "
                             f"0 or 1 (add a 'pulses' column for counts)")
        sw = sw.astype(np.int64)
        pul = np.ones(n_rows, dtype=np.int64)
    else:
        pul = _whole(_numeric_column(cols[found["pulses"]], "pulses", locate), "pulses",
                     locate, low=1)
        sw = _whole(sw, "switched", locate, low=0)
        over = sw > pul
        if over.any():
            i = int(np.argmax(over))
            raise ValueError(f"{locate(i)}, column 'switched': {sw[i]} switches exceed the "
                             f"{pul[i]} pulses applied")
    D = labels.shape[0]
    if "width" in found:
        if width is not None:
            raise ValueError(f"{source}: has a 'width' column; do not also pass width=")
        w_rows = _numeric_column(cols[found["width"]], "width", locate)
        bad = w_rows <= 0
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{locate(i)}, column 'width': must be > 0 (micrometres), got "
                             f"{w_rows[i]:g}")
        wmin = np.full(D, np.inf)
        wmax = np.full(D, -np.inf)
        np.minimum.at(wmin, dev, w_rows)
        np.maximum.at(wmax, dev, w_rows)
        diff = wmin != wmax
        if diff.any():
            d = int(np.argmax(diff))
            rows = np.flatnonzero(dev == d)
            i = rows[np.argmax(w_rows[rows] != w_rows[rows[0]])]
            raise ValueError(f"{locate(i)}, column 'width': device {labels[d]!r} has width "
                             f"{w_rows[i]:g} here but {w_rows[rows[0]]:g} at "
                             f"{locate(rows[0]).split(', ')[-1]}; a device has one width")
        dev_width = wmin
    elif width is not None:
        dev_width = np.full(D, _check_scalar(width, "width", low=0.0, low_open=True))
    else:
        dev_width = np.full(D, np.nan)

    # Aggregate to one row per (device, current); lexsort is stable, so the
    # first row of a group is its first occurrence in the input.
    order = np.lexsort((current, dev))
    d_s, c_s = dev[order], current[order]
    new = np.ones(n_rows, dtype=bool)
    new[1:] = (d_s[1:] != d_s[:-1]) | (c_s[1:] != c_s[:-1])
    starts = np.flatnonzero(new)
    a_dev, a_cur = d_s[starts], c_s[starts]
    a_pul = np.add.reduceat(pul[order], starts)
    a_sw = np.add.reduceat(sw[order], starts)
    n_cur = np.bincount(a_dev, minlength=D)

    skipped = {}
    few = n_cur < min_currents
    if few.any():
        bad = np.flatnonzero(few)
        desc = "; ".join(f"device {labels[d]!r} ({locate(first_row[d])}) has {n_cur[d]}"
                         for d in bad[:5])
        more = f" and {bad.size - 5} more" if bad.size > 5 else ""
        if not skip_invalid:
            raise ValueError(f"{desc}{more} distinct current(s); at least {min_currents} are "
                             f"needed to fit a switching curve (pass skip_invalid=True to "
                             f"skip such devices)")
        for d in bad:
            skipped[labels[d]] = (f"only {n_cur[d]} distinct current(s), at least "
                                  f"{min_currents} needed")
        warnings.warn(f"{source}: skipped {bad.size} device(s) with fewer than {min_currents} "
                      f"distinct currents: {desc}{more}", UserWarning, stacklevel=4)
        if bad.size == D:
            raise ValueError(f"{source}: no device has {min_currents} or more distinct "
                             f"currents; nothing to calibrate")
        keep = ~few
        remap = np.cumsum(keep) - 1
        rows = keep[a_dev]
        a_dev, a_cur, a_pul, a_sw = remap[a_dev[rows]], a_cur[rows], a_pul[rows], a_sw[rows]
        labels, dev_width = labels[keep], dev_width[keep]
    meas = _Measurements(labels, dev_width, a_dev, a_cur, a_pul, a_sw, source, raw, n_rows,
                         ignored)
    return meas, skipped


# ----------------------------------------------------------------------------------------
# sigmoid maximum-likelihood fit
# ----------------------------------------------------------------------------------------
def _xlog(c, logp):
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


def _curve_terms(x, a, b, lo, hi):
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


def _objective(theta, x, n, k, fit_levels, lo_fixed, hi_fixed):
    """Summed binomial negative log-likelihood of a chunk of devices and its gradient."""
    d = x.shape[0]
    a, b, lo, hi = _split(theta, d, fit_levels, lo_fixed, hi_fixed)
    nk = n - k
    e, z, ls, lsb, logP, logQ = _curve_terms(x, a, b, lo, hi)
    f = -(_xlog(k, logP) + _xlog(nk, logQ)).sum()
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


def _information(x, n, k, a, b, lo, hi, fit_levels):
    """Observed Fisher information (minus the log-likelihood Hessian) per device.

    Parameters are (a, b[, lo, hi]) with ``z = (x - a) exp(-b)``; returns
    shape (n_devices, p, p) and the score (gradient of -loglik), (n_devices, p).
    """
    nk = n - k
    e, z, ls, lsb, logP, logQ = _curve_terms(x, a, b, lo, hi)
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
    return (np.clip(a0, -_A_BOUND, _A_BOUND),
            np.clip(b0, _LOG_SCALE_BOUNDS[0], _LOG_SCALE_BOUNDS[1]))


def _newton_decrement(info, score, free):
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


def _fit_sigmoid(x, n, k, lo_fixed, hi_fixed, fit_levels, bar):
    """Binomial ML fit of all devices (rows); normalised parameters (a, b, lo, hi)."""
    D = x.shape[0]
    p_emp = k / np.where(n > 0, n, 1.0)
    if fit_levels:
        lo0 = np.where(n > 0, p_emp, np.inf).min(1)
        hi0 = np.where(n > 0, p_emp, -np.inf).max(1)
        flat = hi0 - lo0 < 0.1
        lo0 = np.clip(np.where(flat, 0.0, lo0), _LEVEL_EPS, 1.0 - _LEVEL_EPS)
        hi0 = np.clip(np.where(flat, 1.0, hi0), _LEVEL_EPS, 1.0 - _LEVEL_EPS)
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
            bounds = ([(-_A_BOUND, _A_BOUND)] * d + [_LOG_SCALE_BOUNDS] * d
                      + ([(_LEVEL_EPS, 1.0 - _LEVEL_EPS)] * (2 * d) if fit_levels else []))
            res = minimize(_objective, np.concatenate(th0), jac=True, method="L-BFGS-B",
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
        info, score = _information(x[todo], n[todo], k[todo], a[todo], b[todo],
                                   lo[todo] if fit_levels else np.full(todo.size, lo_fixed),
                                   hi[todo] if fit_levels else np.full(todo.size, hi_fixed),
                                   fit_levels)
        free = _free_mask(a[todo], b[todo], lo[todo], hi[todo], fit_levels)
        lam = _newton_decrement(info, score, free)
        todo = todo[~(lam <= _NEWTON_TOL)]
        if todo.size == 0:
            break
    if not fit_levels:
        lo, hi = np.full(D, lo_fixed), np.full(D, hi_fixed)
    return a, b, lo, hi, ok


def _snap_levels(v):
    """Fitted levels on the search bounds are the boundary values 0 and 1."""
    v = np.where(v <= 2 * _LEVEL_EPS, 0.0, v)
    return np.where(v >= 1.0 - 2 * _LEVEL_EPS, 1.0, v)


def _free_mask(a, b, lo, hi, fit_levels):
    """Which parameters are away from their search bounds (n_devices, p)."""
    eps = 1e-9
    cols = [np.abs(a) < _A_BOUND - eps,
            (b > _LOG_SCALE_BOUNDS[0] + eps) & (b < _LOG_SCALE_BOUNDS[1] - eps)]
    if fit_levels:
        e2 = 2 * _LEVEL_EPS
        cols += [(lo > e2) & (lo < 1 - e2), (hi > e2) & (hi < 1 - e2)]
    return np.stack(cols, axis=1)


def _saturated_loglik(n, k):
    nk = n - k
    nn = np.where(n > 0, n, 1.0)
    return (xlogy(k, k / nn) + xlogy(nk, nk / nn)).sum(1)


def _monotone_loglik(n, k, counts):
    """Log-likelihood of the best non-decreasing switching probabilities (per device)."""
    out = np.empty(n.shape[0])
    for d in range(n.shape[0]):
        m = counts[d]
        nd, kd = n[d, :m], k[d, :m]
        y = kd / nd
        if np.all(np.diff(y) >= 0):
            p = y
        elif _scipy_isotonic is not None:
            p = _scipy_isotonic(y, weights=nd).x
        else:  # pragma: no cover
            p = _sklearn_isotonic(y, sample_weight=nd)
        out[d] = (xlogy(kd, p) + xlogy(nd - kd, 1.0 - p)).sum()
    return out


# ----------------------------------------------------------------------------------------
# the public entry point
# ----------------------------------------------------------------------------------------
def calibrate(measurements, *, method="sigmoid", levels=(0.0, 1.0), width=None,
              confidence=0.95, min_currents=3, skip_invalid=False,
              poor_fit_pvalue=POOR_FIT_PVALUE, nonmonotone_pvalue=NONMONOTONE_PVALUE,
              table_points=DEFAULT_TABLE_POINTS, progress=None):
    """Fit switching curves to measured pulse data.

    Parameters
    ----------
    measurements : str, path, DataFrame, structured array or dict of columns
        Columns ``device, current, pulses, switched`` and optional ``width``,
        or raw per-pulse records ``device, current, switched`` (0/1); see the
        module docstring for aliases and rules.  Currents in amperes, widths
        in micrometres.
    method : {"sigmoid", "isotonic"}, default "sigmoid"
        ``"sigmoid"``: binomial maximum-likelihood fit of
        ``P(I) = p_lo + (p_hi - p_lo) * expit((I - i50) / scale)`` per device.
        ``"isotonic"``: pulse-weighted isotonic regression (monotone,
        non-parametric, linear between measured currents, flat beyond them);
        the devices become table devices of the population, with i50
        (crossing of the curve's midpoint) and scale (10 %-90 % width /
        ``2 ln 9``) as summaries.  The table grid starts at the lowest
        current; for a uniformly spaced sweep it is stretched so every
        measured current is a grid point (the table then equals the fit
        there), otherwise it ends at the highest current and the table
        differs from the fit by at most a grid step times the slope change.
    levels : (float, float) or "fit", default (0.0, 1.0)
        Sigmoid method: fixed ``(p_lo, p_hi)`` with ``0 <= p_lo < p_hi <= 1``,
        or ``"fit"`` to estimate them per device (each in [0, 1]).
    width : float, optional
        Width in micrometres of every device, for tables without a ``width`` column.
    confidence : float, default 0.95
        Level of the reported confidence intervals.
    min_currents : int, default 3
        Distinct currents a device needs; fewer is an error (or a skip, below).
    skip_invalid : bool, default False
        Skip devices with too few distinct currents instead of raising; they
        are warned about and listed in ``result.skipped``.
    poor_fit_pvalue : float, default 1e-3
        ASSUMPTION: a device is flagged ``poor_fit`` when the chi-square
        p-value of its deviance is below this.
    nonmonotone_pvalue : float, default 1e-3
        ASSUMPTION: a device is flagged ``nonmonotone`` when the likelihood-ratio
        test of its data against the best non-decreasing curve has a p-value
        below this (chi-square with ``n_currents - 1`` degrees of freedom, a
        conservative bound on the test's chi-bar-square law).
    table_points : int, default 1024
        Grid points of the isotonic tables (and so of the population's tables).
    progress : bool or None, default None
        Show a tqdm progress bar; None shows one for 10,000 devices or more.

    Returns
    -------
    CalibrationResult

    Raises
    ------
    ValueError
        Broken input, naming the file (or "measurements"), the line or row and
        the column: missing columns, non-numbers, NaN/inf, pulses <= 0,
        switched outside [0, pulses], a device with fewer than ``min_currents``
        distinct currents, an empty file.
    FileNotFoundError
        ``measurements`` names a file that does not exist.

    Notes
    -----
    Standard errors come from the observed Fisher information at the
    maximum; I50 intervals are Wald intervals, scale and window intervals are
    Wald intervals for ``log(scale)`` mapped back (so they stay positive).
    Parameters at a search bound (``at_bound``) or levels at 0 or 1 are held
    fixed for the standard errors of the others.  Devices that never or
    always switched (``stuck``) are not fitted: they get ``p_lo == p_hi``
    equal to the observed level, NaN parameters in the summary, and
    placeholder ``i50``/``scale`` (sweep centre, sweep range / ``2 ln 9``) in
    the population, where they do not affect the curve.

    All devices are fitted at once: the summed negative log-likelihood (it is
    separable per device) is minimised by SciPy's L-BFGS-B with its analytic
    gradient, in per-device normalised coordinates (I50 and ``log(scale)``
    relative to the centre and half-range of the device's sweep), from
    empirical-logit regression starts; devices whose Newton decrement is not
    yet negligible are refitted.  1,000 devices x 25 currents take ~0.1 s.

    Examples
    --------
    >>> import sotcore
    >>> pop = sotcore.DevicePopulation.from_width(20.0, 100, random_state=0)
    >>> table = sotcore.simulate_measurements(pop, pulses=200, random_state=1)
    >>> result = sotcore.calibrate(table)
    >>> result.population.n_devices, int(result.per_device["stuck"].sum())
    (100, 0)
    >>> print(result.report())  # doctest: +ELLIPSIS
    sotcore calibration of 100 device(s) from measurements (sigmoid fit, ...
    """
    t0 = time.perf_counter()
    if method not in ("sigmoid", "isotonic"):
        raise ValueError(f"method must be 'sigmoid' or 'isotonic', got {method!r}")
    fit_levels = isinstance(levels, str)
    if fit_levels:
        if levels != "fit":
            raise ValueError(f"levels must be 'fit' or a pair (p_lo, p_hi), got {levels!r}")
        lo_fixed, hi_fixed = 0.0, 1.0
    else:
        try:
            lo_fixed, hi_fixed = levels
        except (TypeError, ValueError):
            raise ValueError(f"levels must be 'fit' or a pair (p_lo, p_hi), "
                             f"got {levels!r}") from None
        lo_fixed = _check_scalar(lo_fixed, "levels[0] (p_lo)", low=0.0, high=1.0)
        hi_fixed = _check_scalar(hi_fixed, "levels[1] (p_hi)", low=0.0, high=1.0)
        if not lo_fixed < hi_fixed:
            raise ValueError(f"levels must satisfy p_lo < p_hi, got {levels!r}")
    if method == "isotonic" and (fit_levels or (lo_fixed, hi_fixed) != (0.0, 1.0)):
        raise ValueError("levels applies to method='sigmoid' only; the isotonic curve "
                         "takes its levels from the data")
    confidence = _check_scalar(confidence, "confidence", low=0.0, low_open=True)
    if confidence >= 1:
        raise ValueError(f"confidence must be < 1, got {confidence}")
    min_currents = _check_scalar(min_currents, "min_currents", low=3, integer=True)
    poor_fit_pvalue = _check_scalar(poor_fit_pvalue, "poor_fit_pvalue", low=0.0, high=1.0)
    nonmonotone_pvalue = _check_scalar(nonmonotone_pvalue, "nonmonotone_pvalue", low=0.0,
                                       high=1.0)
    table_points = _check_scalar(table_points, "table_points", low=2, integer=True)
    if progress is not None and not isinstance(progress, (bool, np.bool_)):
        raise TypeError(f"progress must be True, False or None, got {progress!r}")

    meas, skipped = _load_measurements(measurements, width=width, min_currents=min_currents,
                                       skip_invalid=skip_invalid)
    D = meas.n_devices
    cur, n, k = meas.padded()
    counts = np.diff(meas.offsets)
    cmin, cmax = cur[:, 0], cur[np.arange(D), counts - 1]
    centre, half = 0.5 * (cmin + cmax), 0.5 * (cmax - cmin)
    tot_n, tot_k = n.sum(1), k.sum(1)
    stuck = (tot_k == 0) | (tot_k == tot_n)
    stuck_level = (tot_k > 0).astype(np.float64)

    sat = _saturated_loglik(n, k)
    nonmono_stat = 2.0 * (sat - _monotone_loglik(n, k, counts))
    nonmono_p = stats.chi2.sf(np.maximum(nonmono_stat, 0.0), counts - 1)
    nonmonotone = (nonmono_p < nonmonotone_pvalue) & ~stuck

    nan = np.full(D, np.nan)
    col = {
        "device": meas.labels, "width": meas.width, "n_currents": counts,
        "n_pulses": tot_n.astype(np.int64), "current_min": cmin, "current_max": cmax,
        "i50": nan.copy(), "i50_se": nan.copy(), "i50_ci_low": nan.copy(),
        "i50_ci_high": nan.copy(), "scale": nan.copy(), "scale_se": nan.copy(),
        "scale_ci_low": nan.copy(), "scale_ci_high": nan.copy(), "window": nan.copy(),
        "window_se": nan.copy(), "window_ci_low": nan.copy(), "window_ci_high": nan.copy(),
        "p_lo": np.where(stuck, stuck_level, lo_fixed), "p_lo_se": nan.copy(),
        "p_hi": np.where(stuck, stuck_level, hi_fixed), "p_hi_se": nan.copy(),
        "deviance": np.zeros(D), "dof": np.zeros(D, dtype=np.int64), "pvalue": np.ones(D),
        "monotone_pvalue": nonmono_p,
        "stuck": stuck, "nonmonotone": nonmonotone, "poor_fit": np.zeros(D, dtype=bool),
        "at_bound": np.zeros(D, dtype=bool), "converged": np.ones(D, dtype=bool),
    }
    pop_i50, pop_scale = centre.copy(), (cmax - cmin) / WINDOW_PER_SCALE
    pop_lo, pop_hi = col["p_lo"].copy(), col["p_hi"].copy()
    tables, table_devices = None, None
    zc = stats.norm.ppf(0.5 + 0.5 * confidence)

    fit = np.flatnonzero(~stuck)
    show = (fit.size >= _PROGRESS_MIN_DEVICES) if progress is None else bool(progress)
    bar = None
    if show:
        from tqdm.auto import tqdm
        bar = tqdm(total=fit.size, desc=f"calibrate ({method})", unit="device")
    try:
        if fit.size and method == "sigmoid":
            x = (cur[fit] - centre[fit, None]) / half[fit, None]
            nf, kf = n[fit], k[fit]
            a, b, lo, hi, ok = _fit_sigmoid(x, nf, kf, lo_fixed, hi_fixed, fit_levels, bar)
            info, score = _information(x, nf, kf, a, b, lo, hi, fit_levels)
            free = _free_mask(a, b, lo, hi, fit_levels)
            lam = _newton_decrement(info, score, free)
            if fit_levels:
                lo, hi = _snap_levels(lo), _snap_levels(hi)
            p = info.shape[1]
            H = np.where(free[:, :, None] & free[:, None, :], info, np.eye(p)[None])
            pd = np.all(np.linalg.eigvalsh(H) > 0, axis=1)
            cov = np.full_like(H, np.nan)
            if pd.any():
                cov[pd] = np.linalg.inv(H[pd])
            var = np.where(free, np.einsum("ijj->ij", cov), np.nan)
            se = np.sqrt(var)
            r, c = half[fit], centre[fit]
            i50, scale = c + r * a, r * np.exp(b)
            col["i50"][fit], col["scale"][fit] = i50, scale
            col["i50_se"][fit] = r * se[:, 0]
            col["i50_ci_low"][fit] = i50 - zc * r * se[:, 0]
            col["i50_ci_high"][fit] = i50 + zc * r * se[:, 0]
            col["scale_se"][fit] = scale * se[:, 1]
            with np.errstate(over="ignore"):  # unidentified scale: unbounded interval
                col["scale_ci_low"][fit] = scale * np.exp(-zc * se[:, 1])
                col["scale_ci_high"][fit] = scale * np.exp(zc * se[:, 1])
            col["p_lo"][fit], col["p_hi"][fit] = lo, hi
            if fit_levels:
                col["p_lo_se"][fit], col["p_hi_se"][fit] = se[:, 2], se[:, 3]
            _, _, _, _, logP, logQ = _curve_terms(x, a, b, lo, hi)
            loglik = (_xlog(kf, logP) + _xlog(nf - kf, logQ)).sum(1)
            dev = np.maximum(2.0 * (sat[fit] - loglik), 0.0)
            dof = counts[fit] - p
            col["deviance"][fit], col["dof"][fit] = dev, dof
            col["pvalue"][fit] = np.where(dof > 0, stats.chi2.sf(dev, np.maximum(dof, 1)),
                                          np.nan)
            col["at_bound"][fit] = ~free[:, :2].all(1)
            col["converged"][fit] = ok & ((lam <= _NEWTON_TOL) | col["at_bound"][fit]) & pd
            pop_i50[fit], pop_scale[fit] = i50, scale
            pop_lo[fit], pop_hi[fit] = lo, hi
            # A curve with hi < lo decreases with current: not monotone.
            col["nonmonotone"][fit] |= hi < lo
        elif fit.size:
            tables, summary = _fit_isotonic(cur, n, k, counts, fit, table_points, bar)
            table_devices = fit
            for name in ("i50", "scale", "p_lo", "p_hi", "deviance", "dof", "pvalue"):
                col[name][fit] = summary[name]
            flat = ~np.isfinite(summary["i50"])
            pop_i50[fit] = np.where(flat, centre[fit], summary["i50"])
            pop_scale[fit] = np.where(flat, pop_scale[fit], summary["scale"])
            pop_lo[fit], pop_hi[fit] = summary["p_lo"], summary["p_hi"]
    finally:
        if bar is not None:
            bar.close()
    col["window"] = WINDOW_PER_SCALE * col["scale"]
    col["window_se"] = WINDOW_PER_SCALE * col["scale_se"]
    col["window_ci_low"] = WINDOW_PER_SCALE * col["scale_ci_low"]
    col["window_ci_high"] = WINDOW_PER_SCALE * col["scale_ci_high"]
    col["poor_fit"] = (col["pvalue"] < poor_fit_pvalue) & ~stuck

    widths = meas.width if np.isfinite(meas.width).all() else np.nan
    from . import __version__
    meta = {"calibration": {
        "method": method, "levels": "fit" if fit_levels else [lo_fixed, hi_fixed],
        "source": meas.source, "confidence": confidence, "sotcore_version": __version__,
        "devices": [_json_label(v) for v in meas.labels]}}
    kwargs = {}
    if tables is not None:
        kwargs = {"tables": tables, "table_devices": table_devices}
    population = DevicePopulation(pop_i50, pop_scale, pop_lo, pop_hi, widths, meta=meta,
                                  table_points=table_points, **kwargs)
    return CalibrationResult(population, col, meas, skipped=skipped, method=method,
                             levels="fit" if fit_levels else (lo_fixed, hi_fixed),
                             confidence=confidence, fit_time=time.perf_counter() - t0,
                             poor_fit_pvalue=poor_fit_pvalue)


def _json_label(v):
    if isinstance(v, (str, bool)) or v is None:
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    return str(v)


# ----------------------------------------------------------------------------------------
# isotonic (non-parametric) fit
# ----------------------------------------------------------------------------------------
def _crossing(glo, ghi, probs, level):
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


def _fit_isotonic(cur, n, k, counts, fit, G, bar):
    """Pulse-weighted isotonic regression per device, tabulated on a uniform grid."""
    K = fit.size
    probs = np.empty((K, G))
    glo, ghi = np.empty(K), np.empty(K)
    dev, dof = np.empty(K), np.empty(K, dtype=np.int64)
    u = np.linspace(0.0, 1.0, G)
    for j, d in enumerate(fit):
        m = counts[d]
        I, nd, kd = cur[d, :m], n[d, :m], k[d, :m]
        ir = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
        ir.fit(I, kd / nd, sample_weight=nd)
        glo[j], ghi[j] = I[0], I[-1]
        q = (G - 1) // (m - 1)
        step = np.diff(I)
        if q >= 1 and np.allclose(step, step[0], rtol=1e-6, atol=0.0):
            # Uniform sweep: stretch the grid so every measured current is a
            # grid point and the table equals the fit there (flat beyond).
            ghi[j] = I[0] + (I[-1] - I[0]) * (G - 1) / (q * (m - 1))
        probs[j] = np.clip(ir.predict(glo[j] + (ghi[j] - glo[j]) * u), 0.0, 1.0)
        pf = np.clip(ir.predict(I), 0.0, 1.0)
        ll = (xlogy(kd, pf) + xlogy(nd - kd, 1.0 - pf)).sum()
        sat = (xlogy(kd, kd / nd) + xlogy(nd - kd, (nd - kd) / nd)).sum()
        dev[j] = max(2.0 * (sat - ll), 0.0)
        dof[j] = m - np.unique(pf).size
        if bar is not None and (j + 1) % 256 == 0:
            bar.update(256)
    if bar is not None:
        bar.update(K % 256)
    lo, hi = probs[:, 0], probs[:, -1]
    rng_ = hi - lo
    flat = rng_ < 1e-9
    c10 = _crossing(glo, ghi, probs, lo + 0.1 * rng_)
    c50 = _crossing(glo, ghi, probs, lo + 0.5 * rng_)
    c90 = _crossing(glo, ghi, probs, lo + 0.9 * rng_)
    window = np.maximum(c90 - c10, 1e-3 * (ghi - glo) / (G - 1))
    i50 = np.where(flat, np.nan, c50)
    scale = np.where(flat, np.nan, window / WINDOW_PER_SCALE)
    with np.errstate(invalid="ignore"):
        pvalue = np.where(dof > 0, stats.chi2.sf(dev, np.maximum(dof, 1)), np.nan)
    summary = {"i50": i50, "scale": scale, "p_lo": lo, "p_hi": hi, "deviance": dev,
               "dof": dof, "pvalue": pvalue}
    return (glo, ghi, probs), summary


# ----------------------------------------------------------------------------------------
# population statistics
# ----------------------------------------------------------------------------------------
def _group_stats(col, used, confidence):
    """Mean and spread of I50 and window per width (one group if widths are unknown)."""
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
            # Fitted values scatter by device variation plus estimation noise;
            # subtracting the mean squared standard error estimates the former.
            if m > 1 and np.isfinite(se).all():
                intrinsic = math.sqrt(max(sd * sd - float(np.mean(se ** 2)), 0.0))
            else:
                intrinsic = math.nan
            row.update({f"{name}_mean": mean, f"{name}_std": sd,
                        f"{name}_cv": sd / mean if m > 1 and mean else math.nan,
                        f"{name}_mean_ci": [mean - half, mean + half],
                        f"{name}_std_intrinsic": intrinsic})
        out.append(row)
    return out


def _width_fit(w, y, confidence):
    """Weighted least-squares line y = slope * w + intercept over devices.

    Device-to-device spread grows with width, so each device is weighted by
    the inverse variance of its width group (ordinary least squares if some
    group has fewer than 3 devices or no spread).
    """
    groups, inv = np.unique(w, return_inverse=True)
    var = np.array([y[inv == g].var(ddof=1) if (inv == g).sum() >= 3 else np.nan
                    for g in range(groups.size)])
    if np.all(np.isfinite(var) & (var > 0)):
        wt, weighting = 1.0 / var[inv], "inverse within-width variance"
    else:
        wt, weighting = np.ones_like(y), "ordinary least squares"
    X = np.column_stack([w, np.ones_like(w)])
    sw = np.sqrt(wt)
    coef, *_ = np.linalg.lstsq(X * sw[:, None], y * sw, rcond=None)
    resid = y - X @ coef
    dof = y.size - 2
    sigma2 = float(np.sum(wt * resid ** 2) / dof)
    cov = sigma2 * np.linalg.inv((X * wt[:, None]).T @ X)
    se = np.sqrt(np.diag(cov))
    tq = stats.t.ppf(0.5 + 0.5 * confidence, dof)
    ybar = np.sum(wt * y) / np.sum(wt)
    r2 = 1.0 - np.sum(wt * resid ** 2) / np.sum(wt * (y - ybar) ** 2)
    return {"slope": float(coef[0]), "intercept": float(coef[1]),
            "slope_se": float(se[0]), "intercept_se": float(se[1]),
            "slope_ci": [float(coef[0] - tq * se[0]), float(coef[0] + tq * se[0])],
            "intercept_ci": [float(coef[1] - tq * se[1]), float(coef[1] + tq * se[1])],
            "slope_intercept_cov": float(cov[0, 1]),
            "r2": float(r2), "n_devices": int(y.size), "n_widths": int(groups.size),
            "weighting": weighting}


# ----------------------------------------------------------------------------------------
# the result
# ----------------------------------------------------------------------------------------
class CalibrationResult:
    """Fitted devices, their flags and population statistics (from :func:`calibrate`).

    Attributes
    ----------
    population : DevicePopulation
        One device per calibrated device, in input order (skipped devices
        left out); isotonic fits are table devices.  Ready for the emulator.
    summary : pandas.DataFrame or dict of ndarray
        Per-device table (a DataFrame when pandas is importable, otherwise the
        same columns as a dict of NumPy arrays, see ``per_device``).
    per_device : dict of ndarray
        The per-device columns, always as NumPy arrays: ``device, width,
        n_currents, n_pulses, current_min, current_max, i50, i50_se,
        i50_ci_low, i50_ci_high, scale, scale_se, scale_ci_low,
        scale_ci_high, window, window_se, window_ci_low, window_ci_high,
        p_lo, p_lo_se, p_hi, p_hi_se, deviance, dof, pvalue,
        monotone_pvalue, stuck, nonmonotone, poor_fit, at_bound, converged``.
        Currents in amperes; NaN where a value does not apply.
    devices : ndarray of object
        Device labels, as in the input (text for CSV files).
    stats : list of dict
        Per width (``width_um`` None when unknown): device counts, mean,
        standard deviation, coefficient of variation and confidence interval
        of the mean of I50 and of the window, and the spread corrected for
        estimation noise (``*_std_intrinsic``).  Stuck devices and devices
        without a curve are left out (``n_used``).
    width_fits : dict or None
        ``{"i50": fit, "window": fit}``, linear fits against width (slope in
        A/um, intercept in A, standard errors, confidence intervals, R^2);
        None unless there are at least 2 distinct widths.
    skipped : dict
        Skipped device label -> reason.
    ignored_columns : list of str
    measurements : dict of ndarray
        The aggregated data: ``device`` (index into ``devices``), ``current``,
        ``pulses``, ``switched``.
    method, levels, confidence, fit_time, source
    """

    def __init__(self, population, per_device, meas, *, skipped, method, levels, confidence,
                 fit_time, poor_fit_pvalue):
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
        self.method = method
        self.levels = levels
        self.confidence = confidence
        self.fit_time = fit_time
        self.poor_fit_pvalue = poor_fit_pvalue
        used = ~per_device["stuck"] & np.isfinite(per_device["i50"])
        self.stats = _group_stats(per_device, used, confidence)
        w = per_device["width"]
        self.width_fits = None
        if np.isfinite(w).all() and np.unique(w[used]).size >= 2 and used.sum() >= 3:
            self.width_fits = {name: _width_fit(w[used], per_device[name][used], confidence)
                               for name in ("i50", "window")}

    def __len__(self):
        return len(self.devices)

    def __repr__(self):
        f = self.per_device
        return (f"CalibrationResult(n_devices={len(self)}, method={self.method!r}, "
                f"stuck={int(f['stuck'].sum())}, nonmonotone={int(f['nonmonotone'].sum())}, "
                f"poor_fit={int(f['poor_fit'].sum())}, skipped={len(self.skipped)})")

    @property
    def summary(self):
        try:
            import pandas as pd
        except ImportError:
            return dict(self.per_device)
        return pd.DataFrame(self.per_device)

    def flagged(self, flag):
        """Labels of the devices with a flag (``stuck``, ``nonmonotone``, ``poor_fit``,
        ``at_bound``) or without ``converged``."""
        if flag not in ("stuck", "nonmonotone", "poor_fit", "at_bound", "converged"):
            raise ValueError(f"flag must be one of stuck, nonmonotone, poor_fit, at_bound, "
                             f"converged; got {flag!r}")
        mask = self.per_device[flag]
        return list(self.devices[~mask if flag == "converged" else mask])

    def to_dict(self):
        """Population-level numbers as a JSON-serialisable dict."""
        f = self.per_device
        return {
            "source": self.source, "n_devices": len(self), "method": self.method,
            "levels": self.levels if isinstance(self.levels, str) else list(self.levels),
            "confidence": self.confidence, "units": {"current": "A", "width": "um",
                                                     "slope": "A/um"},
            "flags": {name: int(f[name].sum()) for name in
                      ("stuck", "nonmonotone", "poor_fit", "at_bound")}
            | {"not_converged": int((~f["converged"]).sum())},
            "skipped": {str(k): v for k, v in self.skipped.items()},
            "ignored_columns": self.ignored_columns,
            "per_width": _jsonable(self.stats), "width_fits": _jsonable(self.width_fits),
        }

    def report(self):
        """A human-readable text summary (currents in mA)."""
        f = self.per_device
        lv = ("fitted per device" if self.levels == "fit"
              else f"fixed at p_lo={self.levels[0]:g}, p_hi={self.levels[1]:g}")
        what = "sigmoid fit, levels " + lv if self.method == "sigmoid" else "isotonic fit"
        lines = [f"sotcore calibration of {len(self)} device(s) from {self.source} ({what})",
                 f"  {f['n_currents'].sum():,} (device, current) points, "
                 f"{int(f['n_pulses'].sum()):,} pulses"
                 + (f" from {self.n_input_rows:,} per-pulse rows" if self.raw_input else "")
                 + f"; {self.fit_time:.2f} s",
                 f"  flags: {int(f['stuck'].sum())} stuck, {int(f['nonmonotone'].sum())} "
                 f"non-monotone, {int(f['poor_fit'].sum())} poor fit (deviance p < "
                 f"{self.poor_fit_pvalue:g}), {int(f['at_bound'].sum())} at a search bound, "
                 f"{int((~f['converged']).sum())} not converged"]
        if self.skipped:
            names = ", ".join(repr(k) for k in list(self.skipped)[:10])
            more = f" and {len(self.skipped) - 10} more" if len(self.skipped) > 10 else ""
            lines.append(f"  skipped {len(self.skipped)} device(s): {names}{more}")
        if self.ignored_columns:
            lines.append(f"  ignored columns: {', '.join(self.ignored_columns)}")
        lines.append("")
        lines.append(f"  {'width (um)':>10} {'devices':>8} {'used':>5} {'I50 mean':>9} "
                     f"{'I50 sd':>8} {'I50 CV':>7} {'W mean':>8} {'W sd':>8} {'W CV':>6} "
                     f"{'W CV*':>6}   (mA; W = window, CV* corrected for fit noise)")
        for row in self.stats:
            ws = "-" if row["width_um"] is None else f"{row['width_um']:g}"
            icorr = row["window_std_intrinsic"] / row["window_mean"] if row["n_used"] > 1 \
                else math.nan
            lines.append(f"  {ws:>10} {row['n_devices']:>8} {row['n_used']:>5} "
                         f"{row['i50_mean'] * 1e3:>9.4f} {row['i50_std'] * 1e3:>8.4f} "
                         f"{_pct(row['i50_cv']):>7} {row['window_mean'] * 1e3:>8.4f} "
                         f"{row['window_std'] * 1e3:>8.4f} {_pct(row['window_cv']):>6} "
                         f"{_pct(icorr):>6}")
        if self.width_fits:
            pct = f"{self.confidence:.0%}"
            lines.append("")
            lines.append(f"  width scaling (weighted least squares over devices, {pct} CI):")
            for name, label in (("i50", "I50   "), ("window", "window")):
                ft = self.width_fits[name]
                lines.append(
                    f"    {label} = {ft['slope'] * 1e3:.5g} [{ft['slope_ci'][0] * 1e3:.5g}, "
                    f"{ft['slope_ci'][1] * 1e3:.5g}] mA/um * w + {ft['intercept'] * 1e3:.4g} "
                    f"[{ft['intercept_ci'][0] * 1e3:.4g}, {ft['intercept_ci'][1] * 1e3:.4g}] "
                    f"mA   R^2 = {ft['r2']:.3f}")
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


def _jsonable(obj):
    """Floats NaN/inf -> None, NumPy scalars -> Python, recursively."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj) if math.isfinite(obj) else None
    return obj


# ----------------------------------------------------------------------------------------
# virtual lab
# ----------------------------------------------------------------------------------------
def _sweep(population, currents, n_points, span, sweep):
    """Currents (n_devices, n_points) of each device's sweep, in amperes."""
    D = len(population)
    if currents is not None:
        cur = as_float_array(currents, "currents", ndim=(1, 2))
        if cur.ndim == 1:
            cur = np.broadcast_to(cur, (D, cur.size))
        elif cur.shape[0] != D:
            raise ValueError(f"currents must have shape (n_points,) or ({D}, n_points) "
                             f"(one sweep per device), got {cur.shape}")
        if cur.shape[1] < 1:
            raise ValueError("currents must hold at least one current")
        return np.ascontiguousarray(cur)
    n_points = _check_scalar(n_points, "n_points", low=3, integer=True)
    span = _check_scalar(span, "span", low=0.0, low_open=True)
    lo = population.i50 - span * population.window
    hi = population.i50 + span * population.window
    if sweep == "width":
        w = population.width
        groups = np.where(np.isfinite(w), w, -1.0)
        for g in np.unique(groups):
            sel = groups == g
            lo[sel], hi[sel] = lo[sel].min(), hi[sel].max()
    elif sweep != "device":
        raise ValueError(f"sweep must be 'device' or 'width', got {sweep!r}")
    u = np.linspace(0.0, 1.0, n_points)
    return lo[:, None] + (hi - lo)[:, None] * u[None, :]


def simulate_measurements(population, currents=None, pulses=200, n_points=25,
                          span=DEFAULT_SPAN, random_state=None, raw=False, *,
                          sweep="device", path=None, as_frame=False):
    """Simulate a lab's switching-probability measurements of a population.

    Each device is pulsed ``pulses`` times at each current of its sweep; the
    switch count is a binomial draw with the device's
    ``population.probability`` at that current.

    Parameters
    ----------
    population : DevicePopulation
    currents : array-like of shape (n_points,) or (n_devices, n_points), optional
        The sweep in amperes (one for all devices, or one per device).
        Default: ``n_points`` evenly spaced currents chosen by ``sweep``.
    pulses : int or array-like broadcastable to (n_devices, n_points), default 200
        Pulses per (device, current).
    n_points : int, default 25
        Currents per default sweep.
    span : float, default 1.5
        ASSUMPTION: half-span of the default sweep in programming windows
        around I50 (the switching probability runs from ~0.001 to ~0.999).
    random_state : int, RandomState, Generator or None
    raw : bool, default False
        Return per-pulse records (``device, current, switched`` 0/1, one row
        per pulse, in random order within each current) instead of counts;
        aggregated they equal the counts drawn with the same ``random_state``.
    sweep : {"device", "width"}, default "device"
        ``"device"``: each device's own sweep centred on its I50, as after a
        coarse pre-scan that located each device's switching region.
        ``"width"``: one sweep per width covering all the devices of that
        width (one protocol per width, nothing known per device).
    path : str or path, optional
        Also write the table to this CSV file.
    as_frame : bool, default False
        Return a pandas DataFrame instead of a dict of arrays.

    Returns
    -------
    dict of ndarray (or DataFrame)
        Columns ``device`` (index into ``population``), ``current`` (A),
        ``pulses`` (not in raw records), ``switched`` and, when the
        population has widths, ``width`` (um); device-major, currents ascending.

    See Also
    --------
    pulses_for_precision : pulses per point for a target precision.
    """
    if not isinstance(population, DevicePopulation):
        raise TypeError(f"population must be a DevicePopulation, got "
                        f"{type(population).__name__}")
    cur = _sweep(population, currents, n_points, span, sweep)
    D, M = cur.shape
    pul = np.asarray(pulses)
    if pul.dtype.kind == "b" or pul.dtype.kind not in "iuf":
        raise TypeError(f"pulses must be a positive integer or an array of them, got {pulses!r}")
    try:
        pul = np.broadcast_to(pul, (D, M))
    except ValueError:
        raise ValueError(f"pulses must broadcast to (n_devices, n_points) = {(D, M)}, got "
                         f"shape {pul.shape}") from None
    if not (np.isfinite(pul).all() and (pul == np.round(pul)).all() and (pul >= 1).all()):
        raise ValueError(f"pulses must be positive whole numbers, got {pulses!r}")
    pul = pul.astype(np.int64)
    if raw and pul.sum() > _MAX_RAW_PULSES:
        raise ValueError(f"raw=True would write {pul.sum():,} rows (> {_MAX_RAW_PULSES:,}); "
                         f"use raw=False (counts)")
    rng = np.random.default_rng(seed_from_random_state(random_state))
    P = population.probability(cur.T).T
    k = rng.binomial(pul, P)
    dev = np.repeat(np.arange(D), M)
    table = {"device": dev, "current": cur.ravel().copy()}
    if raw:
        reps = pul.ravel()
        block = np.repeat(np.arange(D * M), reps)
        starts = np.cumsum(reps) - reps
        # Place each block's k ones at random positions: rank pulses by a
        # random key within the block and switch the k lowest.
        order = np.lexsort((rng.random(block.size), block))
        rank = np.empty(block.size, dtype=np.int64)
        rank[order] = np.arange(block.size) - starts[block[order]]
        table = {"device": np.repeat(dev, reps), "current": np.repeat(table["current"], reps),
                 "switched": (rank < k.ravel()[block]).astype(np.int64)}
    else:
        table["pulses"] = pul.ravel().copy()
        table["switched"] = k.ravel().astype(np.int64)
    if np.isfinite(population.width).all():
        wcol = np.repeat(population.width, M)
        table["width"] = np.repeat(wcol, pul.ravel()) if raw else wcol
    if path is not None:
        _write_table(table, path)
    if as_frame:
        import pandas as pd
        return pd.DataFrame(table)
    return table


def _write_table(table, path):
    """Write a dict of columns to CSV (floats in shortest round-trip form)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with _gc_paused():
        cols = []
        for v in table.values():
            # Format each distinct value once (per-pulse records repeat them).
            uniq, inv = np.unique(v, return_inverse=True)
            text = list(map(repr if v.dtype.kind == "f" else str, uniq.tolist()))
            cols.append([text[i] for i in inv.ravel().tolist()])
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            fh.write(",".join(table) + "\n")
            for s0 in range(0, len(cols[0]), 1 << 20):  # bounded memory per write
                fh.write("\n".join(map(",".join, zip(*(c[s0:s0 + (1 << 20)] for c in cols)))))
                fh.write("\n")
    os.replace(tmp, path)
    return path


def expected_standard_errors(population, currents=None, pulses=200, n_points=25,
                             span=DEFAULT_SPAN, *, sweep="device"):
    """Standard errors a sigmoid calibration is expected to reach (experiment planning).

    From the expected Fisher information of the binomial measurements of
    :func:`simulate_measurements` with the same protocol, for a fit with the
    levels fixed at each device's ``p_lo``/``p_hi``.

    Returns
    -------
    dict of ndarray of shape (n_devices,)
        ``i50`` (A), ``scale`` (A), ``window`` (A), ``rel_i50`` and
        ``rel_scale`` (= relative window error); NaN for stuck devices.
    """
    if not isinstance(population, DevicePopulation):
        raise TypeError(f"population must be a DevicePopulation, got "
                        f"{type(population).__name__}")
    cur = _sweep(population, currents, n_points, span, sweep)
    pul = np.broadcast_to(np.asarray(pulses, dtype=np.float64), cur.shape)
    if not (np.isfinite(pul).all() and (pul > 0).all()):
        raise ValueError(f"pulses must be positive, got {pulses!r}")
    s = population.scale[:, None]
    z = (cur - population.i50[:, None]) / s
    lo, hi = population.p_lo[:, None], population.p_hi[:, None]
    sig = np.exp(log_expit(z))
    q = sig * np.exp(log_expit(-z))
    P = lo + (hi - lo) * sig
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(q > 0, pul * (hi - lo) ** 2 * q * q / (P * (1.0 - P)), 0.0)
    w = np.nan_to_num(w)
    # Parameters (i50, log scale): dz/di50 = -1/s, dz/dlog s = -z.
    i11 = (w / s ** 2).sum(1)
    i12 = (w * z / s).sum(1)
    i22 = (w * z * z).sum(1)
    det = i11 * i22 - i12 ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = (det > 0) & ~population.stuck
        v_i50 = np.where(ok, i22 / det, np.nan)
        v_ls = np.where(ok, i11 / det, np.nan)
    se_i50, rel_s = np.sqrt(v_i50), np.sqrt(v_ls)
    return {"i50": se_i50, "scale": rel_s * population.scale,
            "window": rel_s * population.window,
            "rel_i50": se_i50 / np.abs(population.i50), "rel_scale": rel_s}


def pulses_for_precision(population, rel_se, parameter="scale", *, n_points=25,
                         span=DEFAULT_SPAN, sweep="device", quantile=0.9):
    """Pulses per current needed for a target relative standard error.

    Standard errors fall as ``1 / sqrt(pulses)`` for a fixed sweep, so the
    answer is ``ceil((se_1 / rel_se) ** 2)`` with ``se_1`` the expected
    relative error at one pulse per point (:func:`expected_standard_errors`).

    Parameters
    ----------
    population : DevicePopulation
        Devices like the ones to be measured (e.g. ``from_width`` or a
        previous calibration).
    rel_se : float
        Target relative standard error (e.g. 0.05 for 5 %).
    parameter : {"scale", "window", "i50"}, default "scale"
    n_points, span, sweep
        The sweep, as in :func:`simulate_measurements`.
    quantile : float, default 0.9
        Fraction of (non-stuck) devices that must reach the target.

    Returns
    -------
    int

    Examples
    --------
    >>> import sotcore
    >>> from sotcore.calibration import pulses_for_precision
    >>> pop = sotcore.DevicePopulation.from_width(20.0, 100, random_state=0)
    >>> pulses_for_precision(pop, 0.05)     # window known to 5 % (1 SE), 25 currents
    70
    >>> pulses_for_precision(pop, 0.02)     # 2 %: about (5 / 2) ** 2 = 6.25 times as many
    435
    """
    rel_se = _check_scalar(rel_se, "rel_se", low=0.0, low_open=True)
    quantile = _check_scalar(quantile, "quantile", low=0.0, high=1.0)
    if parameter not in ("scale", "window", "i50"):
        raise ValueError(f"parameter must be 'scale', 'window' or 'i50', got {parameter!r}")
    se = expected_standard_errors(population, pulses=1, n_points=n_points, span=span,
                                  sweep=sweep)
    rel = se["rel_i50"] if parameter == "i50" else se["rel_scale"]
    rel = rel[np.isfinite(rel)]
    if rel.size == 0:
        raise ValueError("no device with a resolvable curve (all stuck)")
    return int(math.ceil((float(np.quantile(rel, quantile)) / rel_se) ** 2))
