"""Reading and validating measurement tables (CSV files, DataFrames, dicts of columns).

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
import math
import numbers
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .._utils import check_scalar_arg as _check_scalar
from ..exceptions import InvalidInputError

__all__ = ["COLUMN_ALIASES", "Measurements", "load_measurements", "gc_paused", "MAX_RAW_PULSES",
           "MAX_CSV_ROWS", "MAX_CELLS"]

#: Canonical column names and the names accepted for them (case-insensitive).
COLUMN_ALIASES = {
    "device": ("device", "device_id"),
    "current": ("current", "i", "current_a"),
    "pulses": ("pulses", "n_pulses"),
    "switched": ("switched", "n_switched"),
    "width": ("width", "width_um"),
}
#: Most per-pulse rows written or read (bounded memory).
MAX_RAW_PULSES = 50_000_000
#: Most data rows of a measurement CSV file (bounded memory; a per-pulse file
#: of this size takes ~10 GB while parsed).
MAX_CSV_ROWS = MAX_RAW_PULSES
#: Most (device, distinct current) cells of the padded fitting arrays: the
#: number of devices times the largest number of distinct currents of one
#: device (three float64 arrays of this size are allocated).
MAX_CELLS = 20_000_000


# ----------------------------------------------------------------------------------------
# reading and validating measurements
# ----------------------------------------------------------------------------------------
class Measurements:
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
        if D * M > MAX_CELLS:
            d = int(np.argmax(counts))
            raise InvalidInputError(
                f"{self.source}: {D:,} devices with up to {M:,} distinct currents "
                f"(device {self.labels[d]!r}) exceed {MAX_CELLS:,} cells; bin the "
                f"currents (e.g. round them to the sweep's step) before calibrating")
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
            raise InvalidInputError(f"{source}: columns {found[canon]!r} and {name!r} both give "
                             f"'{canon}'; keep one of them")
        else:
            found[canon] = name
    missing = [c for c in ("device", "current", "switched") if c not in found]
    if missing:
        have = ", ".join(repr(str(n)) for n in names) or "none"
        raise InvalidInputError(
            f"{source}: missing column(s) {', '.join(repr(m) for m in missing)} "
            f"(found: {have}); expected device, current, pulses, switched "
            f"[, width]")
    return found, ignored


@contextlib.contextmanager
def gc_paused():
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
        raise InvalidInputError(f"{path}: is a directory, expected a CSV file")
    try:
        fh = open(path, newline="", encoding="utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"measurements file not found: {path}") from None
    header, rows, lines = None, [], []
    with fh, gc_paused():
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
                if len(rows) >= MAX_CSV_ROWS:
                    raise InvalidInputError(f"{path}: more than {MAX_CSV_ROWS:,} data rows; "
                                     f"aggregate per-pulse records to counts (columns device, "
                                     f"current, pulses, switched) first")
                add_row(row)
                add_line(reader.line_num)
        except UnicodeDecodeError:
            raise InvalidInputError(f"{path}: not a text (CSV) file") from None
        except csv.Error as exc:
            raise InvalidInputError(
                f"{path}, line {reader.line_num}: malformed CSV ({exc})") from None
        if header is None:
            raise InvalidInputError(f"{path}: the file is empty (expected a header line "
                             f"'device,current,pulses,switched' and data rows)")
        if not rows:
            raise InvalidInputError(f"{path}: the file has a header but no data rows")
        ncol = len(header)
        if set(map(len, rows)) != {ncol}:
            i = next(i for i, r in enumerate(rows) if len(r) != ncol)
            raise InvalidInputError(f"{path}, line {lines[i]}: expected {ncol} fields like the "
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
            raise InvalidInputError(f"{source}: repeated column names {names}")
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
            raise InvalidInputError(f"{source}: column {n!r} must be one-dimensional, got shape "
                             f"{np.shape(v)}")
        lengths.add(len(v))
    if len(lengths) > 1:
        raise InvalidInputError(f"{source}: columns have different lengths {sorted(lengths)}")
    if not names or lengths == {0}:
        raise InvalidInputError(f"{source}: the table is empty (no rows)")
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
        raise InvalidInputError(f"{locate(0)}, column '{col}': booleans are not numbers")
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
                    raise InvalidInputError(f"{locate(i)}, column '{col}': {what}") from None
            raise InvalidInputError(f"{locate(0)}, column '{col}': values are not numbers "
                             f"(dtype {arr.dtype})") from None
    bad = ~np.isfinite(out)
    if bad.any():
        i = int(np.argmax(bad))
        raise InvalidInputError(f"{locate(i)}, column '{col}': value {out[i]} is not finite "
                         f"(NaN or infinite values are not allowed)")
    return out


def _whole(values, col, locate, *, low):
    """Check that a float column holds whole numbers >= low; return int64."""
    frac = values != np.round(values)
    if frac.any():
        i = int(np.argmax(frac))
        raise InvalidInputError(
            f"{locate(i)}, column '{col}': must be a whole number, got {values[i]}")
    small = values < low
    if small.any():
        i = int(np.argmax(small))
        kind = "positive" if low == 1 else "non-negative"
        raise InvalidInputError(f"{locate(i)}, column '{col}': must be a {kind} whole number, got "
                         f"{values[i]:g}")
    return values.astype(np.int64)


def _device_labels(values, locate):
    """Device index per row (order of first appearance) and the label of each device."""
    arr = np.asarray(values)
    if arr.dtype.kind in "US":  # plain text labels: vectorised checks
        arr = np.char.strip(arr)
        empty = arr == arr.dtype.type()
        if empty.any():
            raise InvalidInputError(f"{locate(int(np.argmax(empty)))}, column 'device': missing "
                             f"device label")
    elif arr.dtype.kind == "O":
        arr = np.array([v.strip() if isinstance(v, str) else v for v in arr], dtype=object)
        for i, v in enumerate(arr):
            if v is None or (isinstance(v, str) and v == "") or (
                    isinstance(v, numbers.Real) and not math.isfinite(v)):
                raise InvalidInputError(f"{locate(i)}, column 'device': missing device label")
    elif arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            raise InvalidInputError(
                f"{locate(int(np.argmax(bad)))}, column 'device': missing device "
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


def load_measurements(measurements, *, width=None, min_currents=3, skip_invalid=False):
    """Read, validate and aggregate measurements; return (Measurements, skipped)."""
    with gc_paused():
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
            raise InvalidInputError(f"{locate(i)}, column 'switched': got {sw[i]:g}, but without a "
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
            raise InvalidInputError(f"{locate(i)}, column 'switched': {sw[i]} switches exceed the "
                             f"{pul[i]} pulses applied")
    D = labels.shape[0]
    if "width" in found:
        if width is not None:
            raise InvalidInputError(f"{source}: has a 'width' column; do not also pass width=")
        w_rows = _numeric_column(cols[found["width"]], "width", locate)
        bad = w_rows <= 0
        if bad.any():
            i = int(np.argmax(bad))
            raise InvalidInputError(f"{locate(i)}, column 'width': must be > 0 (micrometres), got "
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
            raise InvalidInputError(f"{locate(i)}, column 'width': device {labels[d]!r} has width "
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
            raise InvalidInputError(
                f"{desc}{more} distinct current(s); at least {min_currents} are "
                f"needed to fit a switching curve (pass skip_invalid=True to "
                f"skip such devices)")
        for d in bad:
            skipped[labels[d]] = (f"only {n_cur[d]} distinct current(s), at least "
                                  f"{min_currents} needed")
        warnings.warn(f"{source}: skipped {bad.size} device(s) with fewer than {min_currents} "
                      f"distinct currents: {desc}{more}", UserWarning, stacklevel=4)
        if bad.size == D:
            raise InvalidInputError(f"{source}: no device has {min_currents} or more distinct "
                             f"currents; nothing to calibrate")
        keep = ~few
        remap = np.cumsum(keep) - 1
        rows = keep[a_dev]
        a_dev, a_cur, a_pul, a_sw = remap[a_dev[rows]], a_cur[rows], a_pul[rows], a_sw[rows]
        labels, dev_width = labels[keep], dev_width[keep]
    meas = Measurements(labels, dev_width, a_dev, a_cur, a_pul, a_sw, source, raw, n_rows,
                         ignored)
    return meas, skipped

