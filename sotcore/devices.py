"""Switching curves, device populations and their sampling tables.

A device switches under a current pulse ``I`` (amperes) with probability

    P(I) = p_lo + (p_hi - p_lo) * expit((I - i50) / scale)

and its *programming window* (P from 0.1 to 0.9 of the sigmoid part) is
``W = 2 ln(9) * scale``.  See shared/DESIGN.md.

Size: one class, DevicePopulation, with its constructors (from width, tables,
files), sampling, tables and validation; splitting it would split the class.
"""
import copy
import math
from pathlib import Path

import numpy as np
from scipy.special import expit

from . import _kernels
from . import _io
from ._utils import check_scalar_arg as _check_scalar
from ._utils import (as_float_array, as_per_device, check_counter, effective_n_threads,
                     seed_from_random_state)
from .exceptions import InvalidInputError

__all__ = ["DevicePopulation", "switching_probability", "WINDOW_PER_SCALE",
           "DEFAULT_I50_PER_UM", "DEFAULT_WINDOW_FRACTION"]

#: Programming window (P = 0.1 -> 0.9) in units of the sigmoid scale.
WINDOW_PER_SCALE = 2.0 * math.log(9.0)

#: ASSUMPTION (not a figure from the paper): bias current per micrometre of
#: device width, in A/um.  1e-4 A/um gives I50 = 2 mA at 20 um, the order of
#: magnitude of critical currents in um-wide heavy-metal/ferromagnet SOT bars.
DEFAULT_I50_PER_UM = 1.0e-4

#: ASSUMPTION: programming window as a fraction of I50 (0.15 -> 0.3 mA at
#: 20 um), as in narrow thermally-activated SOT switching curves.  Window and
#: I50 are both linear in width, so the ratio is width independent.
DEFAULT_WINDOW_FRACTION = 0.15

#: Default sampling table: grid points per device and the grid half-span in
#: units of ``scale`` around ``i50``.  With 1024 points over +-10 scales the
#: sampled probability differs from the exact curve by < 1e-4 (interpolation
#: error ~5e-6, clamping beyond the grid 4.5e-5); see ``table_error``.
DEFAULT_TABLE_POINTS = 1024
DEFAULT_TABLE_SPAN = 10.0

#: Limits on sampling tables: grid points per device, total entries (uint32,
#: so 2**26 entries = 256 MiB) and the sigmoid grid half-span in scales.
MAX_TABLE_POINTS = 1 << 20
MAX_TABLE_CELLS = 1 << 26
MAX_TABLE_SPAN = 1e6
#: Largest population file read (bytes; see ``_io.MAX_JSON_BYTES``).
MAX_POPULATION_FILE_BYTES = _io.MAX_JSON_BYTES

FORMAT_NAME = "sotcore.population"
FORMAT_VERSION = 1

_TWO32 = 4294967296.0


def switching_probability(current, i50, scale, p_lo=0.0, p_hi=1.0):
    """Exact switching probability of the sigmoid device model (NumPy)."""
    return p_lo + (p_hi - p_lo) * expit((np.asarray(current, dtype=np.float64) - i50) / scale)


def _lognormal_factor(rng, cv, size):
    """Positive factors with mean 1 and coefficient of variation ``cv``."""
    if cv == 0:
        return np.ones(size)
    sigma = math.sqrt(math.log1p(cv * cv))
    return rng.lognormal(mean=-0.5 * sigma * sigma, sigma=sigma, size=size)


def _as_width(width, n):
    """Widths in um: a scalar or one per device, each > 0 or NaN (unknown)."""
    if width is None:
        return np.full(n, np.nan)
    w = as_float_array(width, "width", ndim=(0, 1), finite=False)
    w = np.full(n, float(w)) if w.ndim == 0 else w.copy()
    if w.shape[0] != n:
        raise ValueError(f"width must be a scalar or have {n} entries (one per device), "
                         f"got {w.shape[0]}")
    bad = ~(np.isnan(w) | (np.isfinite(w) & (w > 0)))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"width must be > 0 (or NaN: unknown), got {w[i]} for device {i}")
    return w


class DevicePopulation:
    """A population of stochastic SOT devices, one per neuron.

    Parameters
    ----------
    i50 : array-like of shape (n_devices,)
        Bias current of each device, in amperes (P halfway between p_lo and p_hi).
    scale : array-like of shape (n_devices,)
        Sigmoid scale in amperes (> 0); the programming window is
        ``WINDOW_PER_SCALE * scale``.
    p_lo, p_hi : float or array-like, default 0 and 1
        Switching probability far below / above ``i50`` (read errors,
        incomplete switching).  A stuck device has ``p_lo == p_hi``.
    width : float or array-like, default NaN
        Device width in micrometres (metadata used by width studies).
    tables : tuple (grid_lo, grid_hi, probs), optional
        Non-parametric curves for some devices: ``probs[k]`` is device
        ``table_devices[k]``'s switching probability on the uniform grid from
        ``grid_lo[k]`` to ``grid_hi[k]`` (linear interpolation between grid
        points, clamped outside).  Such devices ignore their sigmoid in
        ``probability``; their ``i50``/``scale`` are summaries only.
    table_devices : array-like of int, optional
        Which devices ``tables`` describe (default: all).
    table_points : int, default 1024
        Grid points of the sampling table of each sigmoid device.
    table_span : float, default 10
        Half-width of that grid, in units of ``scale`` around ``i50``.
    meta : dict, optional
        Free-form JSON-serialisable metadata saved with the population.
    """

    def __init__(self, i50, scale, p_lo=0.0, p_hi=1.0, width=np.nan, *, tables=None,
                 table_devices=None, table_points=DEFAULT_TABLE_POINTS,
                 table_span=DEFAULT_TABLE_SPAN, meta=None):
        i50 = as_float_array(i50, "i50", ndim=1)
        n = i50.shape[0]
        if n == 0:
            raise ValueError("a DevicePopulation needs at least one device (i50 is empty)")
        self._i50 = i50.copy()
        self._scale = as_per_device(scale, "scale", n, positive=True)
        self._p_lo = as_per_device(p_lo, "p_lo", n, low=0.0, high=1.0)
        self._p_hi = as_per_device(p_hi, "p_hi", n, low=0.0, high=1.0)
        self._width = _as_width(width, n)
        self._table_points = _check_scalar(table_points, "table_points", low=2, integer=True)
        if self._table_points > MAX_TABLE_POINTS:
            raise ValueError(f"table_points must be <= {MAX_TABLE_POINTS}, "
                             f"got {self._table_points}")
        self._table_span = _check_scalar(table_span, "table_span", low=0, low_open=True,
                                         high=MAX_TABLE_SPAN)
        if meta is not None and not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        self._meta = copy.deepcopy(dict(meta)) if meta else {}
        self._nonparam = np.zeros(n, dtype=bool)
        self._np_lo = np.zeros(0)
        self._np_hi = np.zeros(0)
        self._np_prob = np.zeros((0, self._table_points))
        self._np_index = np.full(n, -1, dtype=np.intp)
        if tables is not None:
            self._set_tables(tables, table_devices)
        if n * self._table_points > MAX_TABLE_CELLS:
            raise ValueError(f"{n} devices x table_points {self._table_points} exceed the "
                             f"sampling-table limit of {MAX_TABLE_CELLS} entries")
        self._f32_ok = self._check_grids()
        # Immutable value object: read-only arrays keep the cached table valid.
        for arr in (self._i50, self._scale, self._p_lo, self._p_hi, self._width,
                    self._nonparam, self._np_lo, self._np_hi, self._np_prob, self._np_index):
            arr.setflags(write=False)
        self._table_cache = None

    # -- construction -----------------------------------------------------------------
    def _set_tables(self, tables, table_devices):
        n = len(self)
        try:
            glo, ghi, probs = tables
        except (TypeError, ValueError):
            raise TypeError("tables must be a tuple (grid_lo, grid_hi, probs)") from None
        probs = as_float_array(probs, "tables probs", ndim=2)
        k, G = probs.shape
        if G < 2:
            raise ValueError(f"tables probs needs at least 2 grid points per device, got {G}")
        if G > MAX_TABLE_POINTS:
            raise ValueError(f"tables probs has {G} grid points (limit {MAX_TABLE_POINTS})")
        if table_devices is None:
            idx = np.arange(n)
        else:
            idx = np.asarray(table_devices)
            if idx.dtype.kind not in "iu" or idx.ndim != 1:
                raise TypeError("table_devices must be a 1-D array of device indices")
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise ValueError(f"table_devices must be in [0, {n}), got {idx.min()}..{idx.max()}")
            if np.unique(idx).size != idx.size:
                raise ValueError("table_devices contains repeated devices")
        if idx.shape[0] != k:
            raise ValueError(f"tables probs has {k} rows but {idx.shape[0]} devices are named")
        glo = as_per_device(glo, "tables grid_lo", k)
        ghi = as_per_device(ghi, "tables grid_hi", k)
        if k and not (ghi > glo).all():
            raise ValueError("tables grid_hi must be > grid_lo for every device")
        if probs.size and (probs.min() < 0 or probs.max() > 1):
            raise ValueError("tables probs must lie in [0, 1]")
        self._table_points = G
        self._nonparam[:] = False
        self._nonparam[idx] = True
        self._np_index[:] = -1
        self._np_index[idx] = np.arange(k)
        self._np_lo, self._np_hi, self._np_prob = glo, ghi, probs.copy()

    def _grid(self):
        """(lo, hi) of every device's sampling grid, amperes (fresh arrays)."""
        lo = self._i50 - self._table_span * self._scale
        hi = self._i50 + self._table_span * self._scale
        if self._nonparam.any():
            cols = np.flatnonzero(self._nonparam)
            lo[cols] = self._np_lo[self._np_index[cols]]
            hi[cols] = self._np_hi[self._np_index[cols]]
        return lo, hi

    def _check_grids(self):
        """Refuse devices whose grid float64 cannot resolve; True if float32 can too.

        The sampler maps a current to the grid coordinate ``x = I a + b``
        (computing ``4096 a`` and ``4096 b``, so both must stay <= 1e300).
        With a grid step below ``2**-40`` of the currents' magnitude (e.g. a
        1e-200 A scale at a mA bias, or a 1e-300 table span) ``x`` is noise
        and the samples would not follow ``probability()``: such a device is
        refused.  float32 currents keep ~2**-24 relative precision, so they
        are sampled in float64 unless every step is above ``2**-12`` of the
        magnitude (then x is off by < 2**-12 grid steps).
        """
        lo, hi = self._grid()
        G = self._table_points
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            step = (hi - lo) / (G - 1)
            a = 1.0 / step
            b = -lo * a
            mag = np.maximum(np.abs(lo), np.abs(hi))
            # The kernel scales a and b by 4096: keep them far from overflow.
            ok = (np.isfinite(lo) & np.isfinite(hi) & (hi > lo) & (np.abs(a) <= 1e300)
                  & (np.abs(b) <= 1e300) & np.isfinite(step) & (step >= mag * 2.0**-40))
        if not ok.all():
            j = int(np.argmin(ok))
            raise ValueError(
                f"device {j}: its sampling grid [{lo[j]:.6g}, {hi[j]:.6g}] A cannot be "
                f"resolved in float64 (scale {self._scale[j]:.3g} A at i50 {self._i50[j]:.3g} A, "
                f"table_span {self._table_span:g}); sampling would not follow probability()")
        return bool((step >= mag * 2.0**-12).all() and (np.abs(a) < 1e30).all()
                    and (np.abs(b) < 1e30).all())

    @classmethod
    def from_width(cls, width_um, n_devices, variability=0.10, *, window_variability=None,
                   i50_per_um=DEFAULT_I50_PER_UM, window_fraction=DEFAULT_WINDOW_FRACTION,
                   stuck_fraction=0.0, read_error=0.0, random_state=None, **kwargs):
        """Draw a population from the width/variability model.

        Model (every constant is an ASSUMPTION, not the paper's figure):
        ``I50 = i50_per_um * w * F1`` and ``W = window_fraction * i50_per_um
        * w * F2`` with F1, F2 independent log-normal factors of mean 1 and
        coefficient of variation ``variability`` (``window_variability``,
        default the same).  Both nominal values are linear in width ``w``;
        log-normal keeps currents and windows positive at any spread.

        Parameters
        ----------
        width_um : float or array-like of shape (n_devices,)
            Device width(s) in micrometres (> 0).
        n_devices : int
            Number of devices (>= 1).
        variability : float, default 0.10
            Device-to-device coefficient of variation of I50 (and of the window).
        stuck_fraction : float, default 0
            Fraction of devices stuck at 0 or 1 (each with probability 1/2).
        read_error : float, default 0
            Read-error floor: ``p_lo = read_error``, ``p_hi = 1 - read_error``.
        random_state : int, RandomState, Generator or None
        **kwargs
            Passed to the constructor (``table_points``, ``table_span``, ``meta``).
        """
        n = _check_scalar(n_devices, "n_devices", low=1, integer=True)
        width = as_per_device(width_um, "width_um", n, positive=True)
        variability = _check_scalar(variability, "variability", low=0.0, high=5.0)
        wv = variability if window_variability is None else _check_scalar(
            window_variability, "window_variability", low=0.0, high=5.0)
        i50_per_um = _check_scalar(i50_per_um, "i50_per_um", low=0.0, low_open=True)
        window_fraction = _check_scalar(window_fraction, "window_fraction", low=0.0, low_open=True)
        stuck_fraction = _check_scalar(stuck_fraction, "stuck_fraction", low=0.0, high=1.0)
        read_error = _check_scalar(read_error, "read_error", low=0.0, high=0.5)
        rng = np.random.default_rng(seed_from_random_state(random_state))
        i50 = i50_per_um * width * _lognormal_factor(rng, variability, n)
        window = window_fraction * i50_per_um * width * _lognormal_factor(rng, wv, n)
        p_lo = np.full(n, read_error)
        p_hi = np.full(n, 1.0 - read_error)
        stuck = rng.random(n) < stuck_fraction
        level = (rng.random(n) < 0.5).astype(np.float64)
        p_lo[stuck] = p_hi[stuck] = level[stuck]
        meta = dict(kwargs.pop("meta", {}) or {})
        meta.setdefault("model", {
            "width_um": float(width[0]) if np.all(width == width[0]) else "per-device",
            "variability": variability, "window_variability": wv,
            "i50_per_um": i50_per_um, "window_fraction": window_fraction,
            "stuck_fraction": stuck_fraction, "read_error": read_error})
        return cls(i50, window / WINDOW_PER_SCALE, p_lo, p_hi, width, meta=meta, **kwargs)

    # -- basic protocol -----------------------------------------------------------------
    def __len__(self):
        return self.i50.shape[0]

    def __repr__(self):
        w = self._width[np.isfinite(self._width)]
        ws = f", width={np.median(w):.3g} um" if w.size else ""
        return (f"DevicePopulation(n_devices={len(self)}{ws}, "
                f"i50={np.median(self.i50) * 1e3:.4g} mA (median), "
                f"window={np.median(self.window) * 1e3:.4g} mA (median), "
                f"nonparametric={int(self._nonparam.sum())}, "
                f"stuck={int(self.stuck.sum())})")

    def __getitem__(self, index):
        """A sub-population (``index``: slice, integer array or boolean mask)."""
        idx = np.arange(len(self))[index]
        idx = np.atleast_1d(idx)
        if idx.size == 0:
            raise ValueError("a sub-population must keep at least one device")
        npi = self._np_index[idx]
        keep = npi >= 0
        tables = ((self._np_lo[npi[keep]], self._np_hi[npi[keep]], self._np_prob[npi[keep]])
                  if keep.any() else None)
        return DevicePopulation(self._i50[idx], self._scale[idx], self._p_lo[idx],
                                self._p_hi[idx], self._width[idx], tables=tables,
                                table_devices=np.flatnonzero(keep) if keep.any() else None,
                                table_points=self._table_points, table_span=self._table_span,
                                meta=self._meta)

    def replace(self, **changes):
        """A new population with some of ``i50, scale, p_lo, p_hi, width,
        table_points, table_span, meta`` changed (populations are immutable).

        Measured tables are kept unless ``tables``/``table_devices`` are given.
        """
        allowed = {"i50", "scale", "p_lo", "p_hi", "width", "table_points", "table_span",
                   "meta", "tables", "table_devices"}
        unknown = sorted(set(changes) - allowed)
        if unknown:
            raise TypeError(f"replace() got unknown field(s) {', '.join(unknown)}")
        kw = {"i50": self._i50, "scale": self._scale, "p_lo": self._p_lo, "p_hi": self._p_hi,
              "width": self._width, "table_points": self._table_points,
              "table_span": self._table_span, "meta": self._meta}
        if self._nonparam.any() and "tables" not in changes:
            cols = np.flatnonzero(self._nonparam)
            k = self._np_index[cols]
            kw["tables"] = (self._np_lo[k], self._np_hi[k], self._np_prob[k])
            kw["table_devices"] = cols
        kw.update(changes)
        return DevicePopulation(kw.pop("i50"), kw.pop("scale"), kw.pop("p_lo"), kw.pop("p_hi"),
                                kw.pop("width"), **kw)

    # Read-only views: a population never changes after construction.
    i50 = property(lambda self: self._i50, doc="Bias current per device, amperes (read-only).")
    scale = property(lambda self: self._scale, doc="Sigmoid scale per device, amperes.")
    p_lo = property(lambda self: self._p_lo, doc="Switching probability far below i50.")
    p_hi = property(lambda self: self._p_hi, doc="Switching probability far above i50.")
    width = property(lambda self: self._width, doc="Width per device, um (NaN: unknown).")
    table_points = property(lambda self: self._table_points,
                            doc="Grid points of each device's sampling table.")
    table_span = property(lambda self: self._table_span,
                          doc="Half-width of sigmoid devices' grids, in scales.")

    @property
    def meta(self):
        """Free-form metadata (a copy: changing it does not change the population)."""
        return copy.deepcopy(self._meta)

    @property
    def n_devices(self):
        return len(self)

    @property
    def window(self):
        """Programming window (P 0.1 -> 0.9 of the sigmoid part), amperes."""
        return WINDOW_PER_SCALE * self.scale

    @property
    def stuck(self):
        """Boolean mask of stuck devices (``p_lo == p_hi``)."""
        return self.p_lo == self.p_hi

    @property
    def nonparametric(self):
        """Boolean mask of devices described by a measured table, not a sigmoid."""
        return self._nonparam.copy()

    # -- curves -------------------------------------------------------------------------
    def _check_currents(self, current, name="current", allow_float32=False, finite=True):
        arr = as_float_array(current, name, ndim=(1, 2), allow_float32=allow_float32,
                             finite=finite)
        if arr.ndim == 1:
            arr = arr.reshape(1, -1)
        if arr.shape[1] != len(self):
            raise ValueError(f"{name} must have shape (n, {len(self)}) (one column per "
                             f"device), got {arr.shape}")
        return arr

    def probability(self, current):
        """Switching probability of each device at the given currents.

        Parameters
        ----------
        current : array-like of shape (n, n_devices) or (n_devices,)
            Pulse currents in amperes; column ``j`` drives device ``j``.

        Returns
        -------
        ndarray of float64, same shape, values in [0, 1]
        """
        arr = self._check_currents(current)
        p = switching_probability(arr, self.i50, self.scale, self.p_lo, self.p_hi)
        if self._nonparam.any():
            cols = np.flatnonzero(self._nonparam)
            k = self._np_index[cols]
            p[:, cols] = _interp_rows(arr[:, cols], self._np_lo[k], self._np_hi[k],
                                      self._np_prob[k])
        return p.reshape(np.shape(current)) if np.ndim(current) == 1 else p

    def derivative(self, current):
        """dP/dI of each device (1/A) at the given currents (same shapes as ``probability``)."""
        arr = self._check_currents(current)
        s = expit((arr - self.i50) / self.scale)
        d = (self.p_hi - self.p_lo) / self.scale * s * (1.0 - s)
        if self._nonparam.any():
            cols = np.flatnonzero(self._nonparam)
            k = self._np_index[cols]
            d[:, cols] = _interp_slope_rows(arr[:, cols], self._np_lo[k], self._np_hi[k],
                                            self._np_prob[k])
        return d.reshape(np.shape(current)) if np.ndim(current) == 1 else d

    # -- sampling tables ----------------------------------------------------------------
    def table(self):
        """The per-device sampling table the compiled sampler reads.

        Returns
        -------
        grid_lo, grid_hi : ndarray of shape (n_devices,)
            Current range of each device's uniform grid (amperes).
        thresholds : ndarray of uint32, shape (n_devices, table_points)
            ``round(P * 2**32)`` at each grid point (capped at 2**32 - 1, so
            P = 1 samples as 1 - 2**-32).
        """
        if self._table_cache is None:
            n, G = len(self), self._table_points
            lo, hi = self._grid()
            thr = np.empty((n, G), dtype=np.uint32)
            u = np.linspace(0.0, 1.0, G)[None, :]
            # In blocks of devices: float64 temporaries stay ~8 MiB at any size.
            rows = max(1, (1 << 20) // G)
            for s0 in range(0, n, rows):
                sl = slice(s0, min(n, s0 + rows))
                grid = lo[sl, None] + (hi - lo)[sl, None] * u
                prob = switching_probability(grid, self._i50[sl, None], self._scale[sl, None],
                                             self._p_lo[sl, None], self._p_hi[sl, None])
                npi = self._np_index[sl]
                if (npi >= 0).any():
                    prob[npi >= 0] = self._np_prob[npi[npi >= 0]]
                np.minimum(np.rint(prob * _TWO32), _TWO32 - 1, out=prob)
                thr[sl] = prob
            # Per-device affine map from amperes to grid coordinates.
            a = (G - 1) / (hi - lo)
            b = -lo * a
            for arr in (lo, hi, thr, a, b):
                arr.setflags(write=False)
            with np.errstate(over="ignore"):     # unused where float32 cannot resolve
                ab32 = (a.astype(np.float32), b.astype(np.float32))
            self._table_cache = {"lo": lo, "hi": hi, "thr": thr, np.float64: (a, b),
                                 np.float32: ab32}
        c = self._table_cache
        return c["lo"], c["hi"], c["thr"]

    def table_probability(self, current):
        """What the sampler draws: the table linearly interpolated (NumPy reference)."""
        arr = self._check_currents(current)
        lo, hi, thr = self.table()
        return _interp_rows(arr, lo, hi, thr / _TWO32)

    def table_error(self, n_points=4001):
        """Largest |table_probability - probability| over each device's range.

        Evaluated on ``n_points`` currents spanning twice each device's grid
        (so the clamping beyond the grid is included).
        """
        lo, hi, _ = self.table()
        u = np.linspace(-0.5, 1.5, n_points)[:, None]
        cur = lo[None, :] + (hi - lo)[None, :] * u
        return float(np.max(np.abs(self.table_probability(cur) - self.probability(cur))))

    def sample(self, current, random_state=None, n_threads=None, *, stream=0, row_offset=0):
        """Draw each device's switching bit for each pulse.

        Parameters
        ----------
        current : array-like of shape (n, n_devices) or (n_devices,)
            Pulse currents in amperes.  float32 input is sampled without
            conversion (faster); anything else is converted to float64.
        random_state : int, RandomState, Generator or None
            Turned into one 64-bit seed per call.
        n_threads : int or None
            Threads for the kernel; the bits do not depend on it.
        stream, row_offset : int
            Advanced: bits for row ``i`` come from stream ``stream``, counter
            row ``row_offset + i``, so a large array can be sampled in pieces
            with the same result as in one call.

        Returns
        -------
        ndarray of uint8 (0/1), same shape as ``current``
        """
        # The kernel reports non-finite currents itself (no extra pass over the data).
        arr = self._check_currents(current, allow_float32=True, finite=False)
        seed = seed_from_random_state(random_state)
        return self._sample_seeded(arr, seed, n_threads, stream, row_offset).reshape(
            np.shape(current))

    def _sample_seeded(self, arr, seed, n_threads=None, stream=0, row_offset=0, out=None,
                       row_keys=None, name="current"):
        """Sample C-contiguous (n, n_devices) float currents with a known seed.

        Raises ValueError (naming the first bad element) if a current is not
        finite; ``row_keys`` (uint64, one per row) keys each row's draws.
        """
        stream = check_counter(stream, "stream")
        row_offset = check_counter(row_offset, "row_offset")
        if arr.dtype == np.float32 and not self._f32_ok:
            arr = arr.astype(np.float64)      # float32 cannot resolve this grid (see _check_grids)
        thr = self.table()[2]
        a, b = self._table_cache[arr.dtype.type]
        if out is None:
            out = np.empty(arr.shape, dtype=np.uint8)
        if _kernels.sample_table(arr, a, b, thr, np.uint64(seed), np.uint64(stream),
                                 np.uint64(row_offset), out, effective_n_threads(n_threads),
                                 row_keys):
            as_float_array(arr, name, allow_float32=True)   # raises, naming the element
        return out

    # -- persistence --------------------------------------------------------------------
    def to_dict(self):
        """A JSON-serialisable description (arrays as lists of floats)."""
        from . import __version__
        d = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "sotcore_version": __version__,
            "n_devices": len(self), "units": {"current": "A", "width": "um"},
            "i50": self.i50.tolist(), "scale": self.scale.tolist(),
            "p_lo": self.p_lo.tolist(), "p_hi": self.p_hi.tolist(),
            "width": [None if not np.isfinite(w) else float(w) for w in self.width],
            "table_points": self.table_points, "table_span": self.table_span,
            "meta": self.meta,
        }
        if self._nonparam.any():
            cols = np.flatnonzero(self._nonparam)
            k = self._np_index[cols]
            d["tables"] = {"devices": cols.tolist(), "grid_lo": self._np_lo[k].tolist(),
                           "grid_hi": self._np_hi[k].tolist(), "probs": self._np_prob[k].tolist()}
        return d

    @classmethod
    def from_dict(cls, d, *, source="population"):
        """Inverse of ``to_dict``; ``source`` names the origin in error messages.

        Every field is checked (type, length, range); a problem raises
        ``InvalidInputError`` naming ``source`` and the field.
        """
        _io.check_format(d, source, FORMAT_NAME, FORMAT_VERSION, "sotcore population file")

        def bad(msg):
            return InvalidInputError(f"{source}: {msg}")
        missing = [k for k in ("i50", "scale", "p_lo", "p_hi", "width") if k not in d]
        if missing:
            raise bad(f"missing field(s) {', '.join(missing)}")
        n = len(d["i50"]) if isinstance(d["i50"], list) else None
        for k in ("i50", "scale", "p_lo", "p_hi", "width"):
            v = d[k]
            if not isinstance(v, list) or len(v) != n or not all(
                    (isinstance(x, (int, float)) and not isinstance(x, bool))
                    or (x is None and k == "width") for x in v):
                raise bad(f"field {k!r} must be a list of {n if n is not None else 'n'} "
                          "numbers (one per device)")
        if d.get("n_devices") is not None:
            _io.check_int(d["n_devices"], source, "n_devices", n, n)
        tp = _io.check_int(d.get("table_points", DEFAULT_TABLE_POINTS), source, "table_points",
                           2, MAX_TABLE_POINTS)
        ts = _io.check_float(d.get("table_span", DEFAULT_TABLE_SPAN), source, "table_span", 0,
                             MAX_TABLE_SPAN, low_open=True)
        meta = d.get("meta")
        if meta is not None and not isinstance(meta, dict):
            raise bad("field 'meta' must be an object or null")
        kwargs = {}
        tables = d.get("tables")
        if tables is not None:
            if not isinstance(tables, dict) or not {"devices", "grid_lo", "grid_hi",
                                                    "probs"} <= set(tables):
                raise bad("field 'tables' must be an object with devices, grid_lo, grid_hi "
                          "and probs")
            devs, probs = tables["devices"], tables["probs"]
            if not isinstance(devs, list) or not isinstance(probs, list) \
                    or not all(isinstance(r, list) for r in probs):
                raise bad("field 'tables': devices and probs must be lists (probs of rows)")
            G = len(probs[0]) if probs else 0
            if len(probs) * G > MAX_TABLE_CELLS or G > MAX_TABLE_POINTS:
                raise bad("field 'tables.probs' is larger than the table limit")
            kwargs["tables"] = (tables["grid_lo"], tables["grid_hi"], probs)
            kwargs["table_devices"] = np.asarray(
                [_io.check_int(v, source, "tables.devices", 0, n - 1) for v in devs] or
                np.zeros(0, np.intp), dtype=np.intp)
        width = np.array([np.nan if w is None else w for w in d["width"]], dtype=np.float64)
        try:
            pop = cls(d["i50"], d["scale"], d["p_lo"], d["p_hi"], width, table_points=tp,
                      table_span=ts, meta=meta, **kwargs)
        except (TypeError, ValueError, OverflowError) as exc:
            raise bad(f"invalid population data: {exc}") from None
        return pop

    def save(self, path):
        """Write the population to a versioned JSON file (no pickle), atomically."""
        return _io.atomic_write(Path(path), _io.json_bytes(self.to_dict()))

    @classmethod
    def load(cls, path):
        """Read a population written by ``save``; never executes code from the file.

        The file is untrusted: size (``MAX_POPULATION_FILE_BYTES``), nesting
        depth and every field are checked; problems raise ``InvalidInputError``
        naming the file and the field.
        """
        path = Path(path)
        d = _io.read_json(path, what="population file", max_bytes=MAX_POPULATION_FILE_BYTES)
        return cls.from_dict(d, source=str(path))


def _interp_rows(cur, lo, hi, probs):
    """Per-column linear interpolation of ``probs[j]`` on [lo_j, hi_j], clamped."""
    G = probs.shape[1]
    x = np.clip((cur - lo) * ((G - 1) / (hi - lo)), 0.0, G - 1)
    g = np.minimum(x.astype(np.intp), G - 2)
    f = x - g
    flat = probs.ravel()
    base = g + (np.arange(probs.shape[0]) * G)[None, :]
    return flat[base] * (1.0 - f) + flat[base + 1] * f


def _interp_slope_rows(cur, lo, hi, probs):
    """Slope (per ampere) of the piecewise-linear table at ``cur`` (0 outside the grid)."""
    G = probs.shape[1]
    step = (hi - lo) / (G - 1)
    x = (cur - lo) / step
    inside = (x >= 0) & (x <= G - 1)
    g = np.clip(x.astype(np.intp), 0, G - 2)
    flat = probs.ravel()
    base = g + (np.arange(probs.shape[0]) * G)[None, :]
    return np.where(inside, (flat[base + 1] - flat[base]) / step, 0.0)


class DeviceAging:
    """Non-idealities that change devices while they are used (for the emulator).

    Every rate is per million pulses on the device, and every default is an
    ASSUMPTION for stress tests, not a measured figure.

    Parameters
    ----------
    i50_drift : float, default 0
        Mean relative drift of I50 per 1e6 pulses (0.05: +5 % per million).
    window_drift : float, default 0
        Mean relative drift of the programming window per 1e6 pulses.
    drift_spread : float, default 0.5
        Device-to-device spread of the drift rates (relative standard deviation).
    stuck_rate : float, default 0
        Probability per 1e6 pulses that a device becomes stuck (at 0 or 1,
        equally likely), drawn as an exponential time to failure per device.
    read_error : float, default 0
        Probability that a read returns the wrong bit (folded into p_lo/p_hi).
    """

    def __init__(self, i50_drift=0.0, window_drift=0.0, drift_spread=0.5, stuck_rate=0.0,
                 read_error=0.0):
        self.i50_drift = _check_scalar(i50_drift, "i50_drift", low=-0.99)
        self.window_drift = _check_scalar(window_drift, "window_drift", low=-0.99)
        self.drift_spread = _check_scalar(drift_spread, "drift_spread", low=0.0)
        self.stuck_rate = _check_scalar(stuck_rate, "stuck_rate", low=0.0)
        self.read_error = _check_scalar(read_error, "read_error", low=0.0, high=0.5)

    def __repr__(self):
        return (f"DeviceAging(i50_drift={self.i50_drift}, window_drift={self.window_drift}, "
                f"drift_spread={self.drift_spread}, stuck_rate={self.stuck_rate}, "
                f"read_error={self.read_error})")

    def draw(self, n_devices, rng):
        """Per-device fixed randomness: drift rates, failure times, stuck levels."""
        spread = lambda: 1.0 + self.drift_spread * rng.standard_normal(n_devices)  # noqa: E731
        fail = (rng.exponential(1e6 / self.stuck_rate, n_devices) if self.stuck_rate > 0
                else np.full(n_devices, np.inf))
        return {"i50_rate": self.i50_drift * spread(), "window_rate": self.window_drift * spread(),
                "fail_at": fail, "level": (rng.random(n_devices) < 0.5).astype(np.float64)}

    def population_at(self, base, pulses, draws):
        """The population ``base`` after each device received ``pulses[j]`` pulses."""
        mp = np.asarray(pulses, dtype=np.float64) / 1e6
        i50 = base.i50 * np.maximum(1.0 + draws["i50_rate"] * mp, 0.01)
        scale = base.scale * np.maximum(1.0 + draws["window_rate"] * mp, 0.01)
        r = self.read_error
        p_lo = r + (1 - 2 * r) * base.p_lo
        p_hi = r + (1 - 2 * r) * base.p_hi
        dead = np.asarray(pulses) >= draws["fail_at"]
        p_lo = np.where(dead, draws["level"], p_lo)
        p_hi = np.where(dead, draws["level"], p_hi)
        return DevicePopulation(i50, scale, p_lo, p_hi, base.width,
                                table_points=base.table_points, table_span=base.table_span,
                                meta=base.meta)
