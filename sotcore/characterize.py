"""Characterising devices through a backend: pulse sweeps, as a lab runs them, fitted
by :func:`sotcore.calibrate`.

Only the public backend protocol is used (``n_devices``, ``pulse(currents,
devices)``), so the result depends only on the bits the devices return, never
on an emulator's hidden curves.

The scan, per device (:func:`calibrate_backend` has the details):

1. a coarse grid around the guessed I50;
2. while the device's 50 % point is not bracketed (no measured current with a
   switched fraction <= 0.5 below one with >= 0.5), a further coarse segment
   on the side where the point must lie, each reaching ``expand_factor``
   times as far from the guess, never past ``min_current`` / ``max_current``;
3. a fine sweep around the bracketed point, repeated (moved and resized from
   the fit) while the fitted I50 sits near the sweep's edge or the fitted
   window does not match the swept one;
4. one :func:`sotcore.calibrate` fit of the fine sweeps (of the coarse scan for a
   device that was not bracketed), plus flags.

Size: the scan planner, the four scan stages and the recalibration share
their per-device state; one job (characterising through a backend) in one place.
"""
import math
import warnings

import numpy as np

from .backends import EmulatedBackend, check_bits
from .calibration import calibrate
from .devices import WINDOW_PER_SCALE, DevicePopulation
from ._utils import check_scalar_arg
from .exceptions import InvalidInputError

__all__ = ["calibrate_backend", "estimate_calibration_pulses", "recalibrate", "DEFAULT_MAX_PULSES",
           "STAGES"]

#: Default pulse budget per device.  The default scan needs 3,320 pulses per
#: device for a good guess; the rest pays for expanding the coarse scan and
#: for up to two more fine sweeps.
DEFAULT_MAX_PULSES = 10_000

#: A device that switched with a fraction inside this band at some measured
#: current is not stuck, whatever the fit says.
_SWITCHING_BAND = (0.05, 0.95)

#: Pulses per backend call: large enough for the emulator's throughput, small
#: enough for a live bar and bounded memory.
_PULSES_PER_CALL = 50_000

#: Most currents per sweep (the scan log holds one row per current and device).
_MAX_POINTS = 10_000

#: Stage codes in ``result.scan["stage"]``.
STAGES = ("coarse", "expand", "fine", "refine")


def _int_arg(value, name, low, high=None):
    return check_scalar_arg(value, name, low=low, high=high, integer=True)


def _real_arg(value, name, *, low=None, low_open=False):
    return check_scalar_arg(value, name, low=low, low_open=low_open)


def _plan(coarse_points, coarse_pulses, n_points, pulses, max_pulses):
    """Validated scan sizes and the pulses per device they imply."""
    coarse_points = _int_arg(coarse_points, "coarse_points", 5, _MAX_POINTS)
    coarse_pulses = _int_arg(coarse_pulses, "coarse_pulses", 1)
    n_points = _int_arg(n_points, "n_points", 3, _MAX_POINTS)
    pulses = _int_arg(pulses, "pulses", 1)
    segment_points = (coarse_points - 1) // 2
    plan = {"coarse": coarse_points * coarse_pulses, "fine": n_points * pulses,
            "expand_step": segment_points * coarse_pulses}
    plan["planned"] = plan["coarse"] + plan["fine"]
    if max_pulses is not None:
        max_pulses = _int_arg(max_pulses, "max_pulses", 1)
        if max_pulses < plan["planned"]:
            raise InvalidInputError(
                f"max_pulses={max_pulses} is below the {plan['planned']} pulses per device "
                f"of the planned scan (coarse {coarse_points} x {coarse_pulses} + fine "
                f"{n_points} x {pulses}); raise it or shrink the scan")
    plan["max"] = max_pulses
    return plan, (coarse_points, coarse_pulses, n_points, pulses, segment_points)


def estimate_calibration_pulses(n_devices, *, coarse_points=41, coarse_pulses=20, n_points=25,
                                pulses=100, max_pulses=DEFAULT_MAX_PULSES, pulse_duration=None):
    """Pulses that :func:`calibrate_backend` plans and may at most use.

    Parameters
    ----------
    n_devices : int
        Devices to characterise.
    coarse_points, coarse_pulses, n_points, pulses, max_pulses
        As in :func:`calibrate_backend`; ``max_pulses`` is checked the same way.
    pulse_duration : float, optional
        Seconds per pulse; adds the implied times (pulses one after another).

    Returns
    -------
    dict
        ``per_device`` (coarse scan + one fine sweep: what a good guess costs),
        ``total`` (= ``per_device * n_devices``), ``per_device_max`` and
        ``total_max`` (the budget; None if unlimited), per device ``coarse``
        (first coarse grid), ``fine`` (one fine or refine sweep) and
        ``expand_step`` (one extra coarse segment), and ``seconds`` /
        ``seconds_max`` when ``pulse_duration`` is given.
    """
    n_devices = _int_arg(n_devices, "n_devices", 1)
    plan, _ = _plan(coarse_points, coarse_pulses, n_points, pulses, max_pulses)
    out = {"per_device": plan["planned"], "total": plan["planned"] * n_devices,
           "per_device_max": plan["max"],
           "total_max": None if plan["max"] is None else plan["max"] * n_devices,
           "coarse": plan["coarse"], "fine": plan["fine"], "expand_step": plan["expand_step"]}
    if pulse_duration is not None:
        pulse_duration = _real_arg(pulse_duration, "pulse_duration", low=0.0, low_open=True)
        out["seconds"] = out["total"] * pulse_duration
        out["seconds_max"] = (None if out["total_max"] is None
                              else out["total_max"] * pulse_duration)
    return out


def _limits(i50n, sn, min_current, max_current):
    """The scan's reach unit and current limits (see calibrate_backend, Notes)."""
    reach = max(abs(i50n), 4.0 * WINDOW_PER_SCALE * sn)
    if max_current is None:
        max_current = i50n + 3.0 * reach
    else:
        max_current = _real_arg(max_current, "max_current")
        if not max_current > i50n:
            raise InvalidInputError(f"max_current={max_current!r} A must be above the guessed "
                                    f"I50 {i50n!r} A (the scan starts at the guess)")
    if min_current is None:
        min_current = 0.0 if i50n > 0 else i50n - 3.0 * reach
    else:
        min_current = _real_arg(min_current, "min_current")
        if not min_current < i50n:
            raise InvalidInputError(f"min_current={min_current!r} A must be below the guessed "
                                    f"I50 {i50n!r} A (the scan starts at the guess)")
    return reach, float(min_current), float(max_current)


class _Log:
    """Everything pulsed so far, as blocks of (device, current, pulses, switched, stage)."""

    def __init__(self, n_devices):
        self.blocks = []
        self.used = np.zeros(n_devices, dtype=np.int64)

    def add(self, devs, grids, pulses, switched, stage):
        """Log counts: ``grids``, ``pulses``, ``switched`` of shape (currents, devices)."""
        self.blocks.append((np.broadcast_to(devs, grids.shape).ravel(), grids.ravel(),
                            pulses.ravel().astype(np.int64), switched.ravel(),
                            np.full(grids.size, stage, dtype=np.int8)))

    def table(self):
        cols = [np.concatenate([b[i] for b in self.blocks]) for i in range(5)]
        order = np.lexsort((cols[1], cols[0]))
        return {name: c[order] for name, c in
                zip(("device", "current", "pulses", "switched", "stage"), cols)}

    def device_points(self, n_devices):
        """Per device: sorted unique currents, pulses and switches (pooled)."""
        t = self.table()
        out = []
        starts = np.searchsorted(t["device"], np.arange(n_devices + 1))
        for j in range(n_devices):
            s = slice(starts[j], starts[j + 1])
            cur, inv = np.unique(t["current"][s], return_inverse=True)
            n = np.bincount(inv, weights=t["pulses"][s], minlength=cur.size)
            k = np.bincount(inv, weights=t["switched"][s], minlength=cur.size)
            out.append((cur, n, k))
        return out


def _bracket(cur, n, k):
    """(lowest current with fraction <= 1/2, highest with >= 1/2); NaN where none."""
    f = k / n
    low, high = cur[f <= 0.5], cur[f >= 0.5]
    return (low[0] if low.size else math.nan), (high[-1] if high.size else math.nan)


def _crossing(cur, n, k):
    """Where the switched fraction crosses 1/2: the best single step (pulse-weighted
    L1) between two measured currents, interpolated linearly between them."""
    f = k / n
    above = n * np.maximum(f - 0.5, 0.0)   # cost of a point left of the step
    below = n * np.maximum(0.5 - f, 0.0)   # cost of a point right of the step
    # cost[i]: step between cur[i-1] and cur[i] (i = 0 .. len)
    cost = np.concatenate(([0.0], np.cumsum(above))) + \
        np.concatenate((np.cumsum(below[::-1])[::-1], [0.0]))
    best = np.flatnonzero(cost <= cost.min() + 1e-9)
    i = int(best[best.size // 2])
    if i == 0:
        return float(cur[0])
    if i == cur.size:
        return float(cur[-1])
    f0, f1 = f[i - 1], f[i]
    t = (0.5 - f0) / (f1 - f0) if f1 > f0 else 0.5
    return float(cur[i - 1] + min(max(t, 0.0), 1.0) * (cur[i] - cur[i - 1]))


def _tight_bracket(cur, n, k, c):
    """The nearest measured currents around ``c`` with fraction <= 1/2 below it and
    >= 1/2 above it (the measured range's ends where there is none)."""
    f = k / n
    below = cur[(cur <= c) & (f <= 0.5)]
    above = cur[(cur >= c) & (f >= 0.5)]
    return (below[-1] if below.size else cur[0]), (above[0] if above.size else cur[-1])


def calibrate_backend(backend, nominal, *, max_current=None, min_current=None,
                      max_pulses=DEFAULT_MAX_PULSES, coarse_span=0.5, coarse_points=41,
                      coarse_pulses=20, expand_factor=2.0, n_points=25, pulses=100, span=1.5,
                      max_refine=2, progress=None, **calibrate_kw):
    """Characterise a backend's devices by pulsing them, as a lab would, and fit them.

    Every device's 50 % point is bracketed by a coarse scan that expands from
    the guess until it is found or a current limit is reached, then measured
    by a fine sweep and fitted by :func:`sotcore.calibrate`.  Devices whose
    point could not be bracketed, or whose fitted I50 lies outside the
    measured currents, are flagged and kept out of the population's working
    curves (see Returns).  Currents are never outside
    ``[min_current, max_current]``.

    Parameters
    ----------
    backend : device backend
        Anything with ``n_devices`` and ``pulse(currents, devices)``.
    nominal : (i50, scale)
        Guessed I50 (any real number, amperes: zero or negative for p-bits)
        and sigmoid scale (> 0, amperes).  They set the scan's ranges only.
    max_current : float, optional
        Highest current ever applied (amperes, > the guessed I50).  Default:
        ``i50 + 3 * reach`` (``reach`` is defined in Notes): 4x the guess
        when the guess is at least 4 nominal windows.  To scan further, set it.
    min_current : float, optional
        Lowest current ever applied (amperes, < the guessed I50; may be
        negative).  Default 0 for a positive guess, else ``i50 - 3 * reach``.
    max_pulses : int or None, default 10_000
        Pulse budget per device; must cover the planned coarse scan and one
        fine sweep (3,320 by default), else ValueError before any pulse.
        Extra coarse segments and refine sweeps are only run while the budget
        allows (an extra segment only if a fine sweep still fits after it).
        None: no budget (the scan is still bounded by the limits and
        ``max_refine``).
    coarse_span : float, default 0.5
        Half-width of the first coarse grid, in units of ``reach``.
    coarse_points, coarse_pulses : int, default 41, 20
        Currents of the first coarse grid and pulses per coarse current; each
        extra segment has ``(coarse_points - 1) // 2`` currents.
    expand_factor : float, default 2
        Each extra segment reaches this many times as far from the guess as
        the previous one (> 1).
    n_points, pulses : int, default 25, 100
        Currents per fine sweep and pulses per fine current.
    span : float, default 1.5
        Half-width of the fine sweep in windows (``WINDOW_PER_SCALE * scale``):
        of the nominal window first, of the fitted one for a refine sweep.
    max_refine : int, default 2
        Most extra fine sweeps per device.
    progress : bool or None, default None
        A tqdm bar counting pulses; None shows it unless ``backend`` is an
        :class:`~sotcore.EmulatedBackend`.
    **calibrate_kw
        Passed to :func:`sotcore.calibrate` (e.g. ``levels=``, ``method=``);
        checked on a tiny synthetic table before any pulse.

    Returns
    -------
    CalibrationResult
        The fit of each bracketed device's fine sweeps (coarse points far from
        the curve are left out: one read error there would dominate the fit)
        and of the other devices' coarse scans, with extra ``per_device``
        columns (rows in backend device order):

        - ``not_bracketed``: no measured current with a switched fraction
          <= 1/2 below one with >= 1/2 (within the limits and the budget);
        - ``extrapolated``: the fitted I50 lies outside the currents fitted
          (``current_min`` .. ``current_max``), or is undefined for a device
          that is not stuck;
        - ``stuck``: calibrate's verdict, cleared for any device that switched
          with a fraction in [0.05, 0.95] at some measured current.

        Devices that are ``not_bracketed`` or ``extrapolated`` have no
        trustworthy curve: in ``result.population`` they are made *flat*
        (``p_lo == p_hi ==`` the fraction of all their pulses that switched,
        so ``population.stuck`` is True for them and they never pass for a
        working device), with ``i50`` the measured current nearest their
        50 % point (the highest for a device that switched too little, the
        lowest for one that switched too much) and the nominal scale.  Their
        fitted numbers stay in ``per_device`` for inspection, and
        ``population.meta["characterize"]`` lists them (``not_bracketed``,
        ``extrapolated``) with the limits and the pulses used.
        ``result.pulses_used`` (int64, per device) counts the pulses applied;
        ``result.scan`` holds what was measured: ``device, current, pulses,
        switched, stage`` (one row per current of each sweep; ``stage``
        indexes ``STAGES``), and per device ``bracket_low`` /
        ``bracket_high`` (the lowest current with fraction <= 1/2 and the
        highest with >= 1/2), ``budget_exhausted``, plus the limits used.

    Raises
    ------
    InvalidInputError (a ValueError)
        Bad ``nominal``, limits, sizes or budget (naming the argument), or
        bad ``calibrate_kw``; nothing has been pulsed.
    BackendError
        The backend failed or returned something that is not a bit array.
        Any exception raised while scanning (also KeyboardInterrupt) carries
        ``pulses_used`` and ``scan`` (the sweeps measured so far, as in
        ``result.scan``; None if nothing was measured), so a failed lab run
        is not lost.

    Notes
    -----
    Step rule (works for signed currents and guesses at or near 0): with
    guess ``c``, nominal window ``W = WINDOW_PER_SCALE * scale`` and
    ``reach = max(|c|, 4 W)``, the first coarse grid spans ``c +- d0``,
    ``d0 = coarse_span * reach``; the k-th extra segment on a side spans
    distances ``d0 * f**(k-1) .. d0 * f**k`` from ``c`` (``f`` =
    ``expand_factor``), clipped to the limits.  For a good guess the cost is
    the planned ``coarse_points * coarse_pulses + n_points * pulses`` pulses
    per device (:func:`estimate_calibration_pulses`).

    A refine sweep is run (at most ``max_refine`` times) for a bracketed
    device whose fitted I50 lies in the outer sixth of its last fine sweep on
    a side that is not a current limit, is undefined, or whose fitted window
    ``span * W_fit`` differs from the swept half-width by more than 1.5x; it
    is centred on the fitted I50 with half-width ``span * W_fit`` (limited to
    4x change per sweep), or, when the fitted I50 is undefined or beyond the
    limits, spans at least the tightest measured bracket around the measured
    crossing (so a sweep that missed a steep curve closes in on it).

    Requests name each device at most once and only devices still being
    scanned; every current of a sweep is visited once before any is visited
    again, so slow drift averages out instead of biasing one current.
    """
    # ---- validation: nothing is pulsed before all of it passes -------------------
    try:
        i50n, sn = nominal
    except (TypeError, ValueError):
        raise InvalidInputError(f"nominal must be a pair (i50, scale) in amperes, "
                                f"got {nominal!r}") from None
    i50n = _real_arg(i50n, "nominal i50")
    sn = _real_arg(sn, "nominal scale", low=0.0, low_open=True)
    m = getattr(backend, "n_devices", None)
    if not callable(getattr(backend, "pulse", None)):
        raise TypeError(f"backend must have n_devices and pulse(currents, devices), "
                        f"got {type(backend).__name__}")
    m = _int_arg(m, "backend.n_devices", 1)
    plan, (coarse_points, coarse_pulses, n_points, pulses, seg_points) = _plan(
        coarse_points, coarse_pulses, n_points, pulses, max_pulses)
    budget = math.inf if plan["max"] is None else plan["max"]
    coarse_span = _real_arg(coarse_span, "coarse_span", low=0.0, low_open=True)
    expand_factor = _real_arg(expand_factor, "expand_factor", low=1.0, low_open=True)
    span = _real_arg(span, "span", low=0.0, low_open=True)
    max_refine = _int_arg(max_refine, "max_refine", 0)
    if progress is not None and not isinstance(progress, (bool, np.bool_)):
        raise InvalidInputError(f"progress must be True, False or None, got {progress!r}")
    reach, lo_lim, hi_lim = _limits(i50n, sn, min_current, max_current)
    limits = (lo_lim, hi_lim)
    w_nom = WINDOW_PER_SCALE * sn
    _check_calibrate_kw(calibrate_kw)

    show = (not isinstance(backend, EmulatedBackend)) if progress is None else bool(progress)
    bar = None
    if show:
        from tqdm.auto import tqdm
        bar = tqdm(total=m * plan["planned"], desc="calibrate_backend", unit="pulse",
                   unit_scale=True)
    log = _Log(m)
    try:
        # ---- 1. first coarse grid, all devices --------------------------------------
        d0 = coarse_span * reach
        grid = np.linspace(max(lo_lim, i50n - d0), min(hi_lim, i50n + d0), coarse_points)
        all_devs = np.arange(m)
        _sweep(backend, log, all_devs, np.repeat(grid[:, None], m, axis=1), coarse_pulses,
               0, bar, limits)
        # ---- 2. expand each unbracketed device towards its 50 % point ---------------
        d_up = np.full(m, d0)
        d_dn = np.full(m, d0)
        exhausted = np.zeros(m, dtype=bool)
        while True:
            pts = log.device_points(m)
            br = np.array([_bracket(*p) for p in pts])
            go_up = np.isnan(br[:, 1]) & (i50n + d_up < hi_lim)   # never reached 1/2
            go_dn = np.isnan(br[:, 0]) & (i50n - d_dn > lo_lim)   # always above 1/2
            want = go_up | go_dn
            afford = log.used + plan["expand_step"] + plan["fine"] <= budget
            exhausted |= want & ~afford
            devs = np.flatnonzero(want & afford)
            if devs.size == 0:
                break
            grids = np.empty((seg_points, devs.size))
            for col, j in enumerate(devs):
                if go_up[j]:
                    a, d_up[j] = i50n + d_up[j], d_up[j] * expand_factor
                    b = min(hi_lim, i50n + d_up[j])
                else:
                    a, d_dn[j] = i50n - d_dn[j], d_dn[j] * expand_factor
                    b = max(lo_lim, i50n - d_dn[j])
                grids[:, col] = np.linspace(a, b, seg_points + 1)[1:]
            if bar is not None:
                bar.total += devs.size * plan["expand_step"]
                bar.refresh()
            _sweep(backend, log, devs, grids, coarse_pulses, 1, bar, limits)
        pts = log.device_points(m)
        br = np.array([_bracket(*p) for p in pts])
        bracketed = br[:, 0] <= br[:, 1]
        # ---- 3. fine sweep around each bracketed point, refined from the fit --------
        centre = np.full(m, np.nan)
        half = np.full(m, span * w_nom)
        devs = np.flatnonzero(bracketed)
        for j in devs:
            centre[j] = _crossing(*pts[j])
        fine_lo = np.full(m, np.nan)
        fine_hi = np.full(m, np.nan)
        stage = 2
        if bar is not None:
            bar.total -= (m - devs.size) * plan["fine"]   # unbracketed: no fine sweep
            bar.refresh()
        res = None
        for r in range(max_refine + 1 if devs.size else 0):
            lo = np.maximum(lo_lim, centre[devs] - half[devs])
            hi = np.minimum(hi_lim, centre[devs] + half[devs])
            fine_lo[devs], fine_hi[devs] = lo, hi
            grids = lo + np.linspace(0.0, 1.0, n_points)[:, None] * (hi - lo)
            _sweep(backend, log, devs, grids, pulses, stage, bar, limits)
            stage, res = 3, None
            if r == max_refine:
                break
            # Fit the bracketed devices only: the others' one-sided data can stall a fit.
            res = _fit(log, bracketed, calibrate_kw)
            devs = _needs_refine(res, bracketed, fine_lo, fine_hi, half, lo_lim, hi_lim,
                                 centre, span, log.used, plan["fine"], budget, exhausted)
            lost = devs[~np.isfinite(centre[devs])]
            if lost.size:
                # The sweep missed the curve: sweep the tightest measured bracket.
                pts = log.device_points(m)
                for j in lost:
                    a, b = _tight_bracket(*pts[j], _crossing(*pts[j]))
                    centre[j], half[j] = 0.5 * (a + b), max(half[j], 0.5 * (b - a))
            if devs.size == 0:
                break
            if bar is not None:
                bar.total += devs.size * plan["fine"]
                bar.refresh()
        if res is None or not bracketed.all():
            res = _fit(log, np.ones(m, dtype=bool), calibrate_kw)
    except BaseException as exc:
        # What was measured survives a failing instrument or a Ctrl-C (lab time is
        # expensive).
        exc.pulses_used = log.used.copy()
        exc.scan = log.table() if log.blocks else None
        raise
    finally:
        if bar is not None:
            bar.close()
    return _finish(res, log, m, exhausted, lo_lim, hi_lim, sn)


def _check_calibrate_kw(calibrate_kw):
    """Run calibrate's own validation on a tiny synthetic table, before any pulse."""
    # A clean logistic device (11 currents, 100 pulses each): any model family fits it.
    table = {"device": np.zeros(11, dtype=np.int64), "current": np.linspace(-5.0, 5.0, 11),
             "pulses": np.full(11, 100),
             "switched": np.array([1, 2, 5, 12, 27, 50, 73, 88, 95, 98, 99])}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            calibrate(table, progress=False, **calibrate_kw)
    except TypeError as exc:
        raise InvalidInputError(f"calibrate_kw: {exc}") from None
    except ValueError as exc:
        raise InvalidInputError(f"calibrate_kw: {exc}") from None


def _sweep(backend, log, devs, grids, pulses, stage, bar, limits):
    """Pulse device ``devs[c]`` at currents ``grids[:, c]``, ``pulses`` times each, in
    whole sweeps (every current once before any again); log the counts, also of a
    sweep cut short by a failing backend."""
    # Rounding in a grid must not step past a lab's limit, not even by one ulp.
    grids = np.clip(grids, *limits)
    g, k = grids.shape
    select = slice(0, int(backend.n_devices)) if (k == backend.n_devices and
                                                  np.array_equal(devs, np.arange(k))) \
        else devs.astype(np.int64)
    switched = np.zeros((g, k), dtype=np.int64)
    applied = np.zeros(g, dtype=np.int64)
    chunk = max(1, _PULSES_PER_CALL // k)       # rows per call: bounded memory
    total = g * pulses
    try:
        for r0 in range(0, total, chunk):
            idx = np.arange(r0, min(total, r0 + chunk)) % g
            rows = grids[idx]
            bits = check_bits(backend.pulse(rows, select), rows.shape, type(backend).__name__)
            np.add.at(switched, idx, bits)
            np.add.at(applied, idx, 1)
            log.used[devs] += idx.size
            if bar is not None:
                bar.update(rows.size)
    finally:
        done = applied > 0
        if done.any():
            log.add(devs, grids[done], np.repeat(applied[done, None], k, axis=1),
                    switched[done], stage)


def _fit(log, which, calibrate_kw):
    """Fit the devices ``which`` (mask): their fine sweeps, or their coarse scan if they
    had none.  Coarse points far from the curve are left out: there a single read
    error (or a tail that is not logistic) would dominate the fit and its
    goodness-of-fit test."""
    t = log.table()
    fine = t["stage"] >= 2
    has_fine = np.bincount(t["device"][fine], minlength=which.size) > 0
    use = (fine | ~has_fine[t["device"]]) & which[t["device"]]
    return calibrate({"device": t["device"][use], "current": t["current"][use],
                      "pulses": t["pulses"][use], "switched": t["switched"][use]},
                     progress=False, **calibrate_kw)


def _order(res, m):
    """Row of ``res.per_device`` for each backend device 0..m-1 (-1: not in the fit)."""
    labels = np.array([int(v) for v in res.per_device["device"]], dtype=np.int64)
    pos = np.full(m, -1, dtype=np.int64)
    pos[labels] = np.arange(labels.size)
    return pos


def _column(res, name, pos):
    """Per-device column ``name`` in backend device order, NaN where not fitted."""
    col = np.asarray(res.per_device[name], dtype=np.float64)
    return np.where(pos >= 0, col[np.maximum(pos, 0)], np.nan)


def _needs_refine(res, bracketed, fine_lo, fine_hi, half, lo_lim, hi_lim, centre, span, used,
                  fine_cost, budget, exhausted):
    """Devices whose last fine sweep missed their fitted curve; updates centre/half."""
    m = bracketed.size
    pos = _order(res, m)
    i50, scale = _column(res, "i50", pos), _column(res, "scale", pos)
    width = fine_hi - fine_lo
    edge = width / 6.0
    with np.errstate(invalid="ignore"):
        low_edge = (i50 < fine_lo + edge) & (fine_lo > lo_lim)
        high_edge = (i50 > fine_hi - edge) & (fine_hi < hi_lim)
        want_half = span * WINDOW_PER_SCALE * scale
        sized = (want_half > 1.5 * half) | (want_half < half / 1.5)
    undefined = ~np.isfinite(i50)
    need = bracketed & (low_edge | high_edge | sized | undefined)
    afford = used + fine_cost <= budget
    exhausted |= need & ~afford
    devs = np.flatnonzero(need & afford)
    for j in devs:
        # An undefined fit (or one beyond the limits) is no guide: NaN tells the
        # caller to re-locate the device from its measured bracket.
        ok = np.isfinite(i50[j]) and lo_lim <= i50[j] <= hi_lim
        centre[j] = i50[j] if ok else np.nan
        if np.isfinite(want_half[j]):
            half[j] = min(max(want_half[j], 0.25 * half[j]), 4.0 * half[j])
    return devs


def _finish(res, log, m, exhausted, lo_lim, hi_lim, sn):
    """Add the flags, the safe population, ``pulses_used`` and ``scan`` to ``res``."""
    f = res.per_device
    pos = _order(res, m)
    pts = log.device_points(m)
    br = np.array([_bracket(*p) for p in pts])
    lo_band, hi_band = _SWITCHING_BAND
    switching = np.array([np.any((k / n >= lo_band) & (k / n <= hi_band)) for _, n, k in pts])
    cmin = np.array([p[0][0] for p in pts])
    cmax = np.array([p[0][-1] for p in pts])
    i50 = np.asarray(f["i50"], dtype=np.float64)[pos]
    stuck = np.asarray(f["stuck"], dtype=bool)[pos] & ~switching
    not_bracketed = ~(br[:, 0] <= br[:, 1])
    fit_lo = np.asarray(f["current_min"], dtype=np.float64)[pos]
    fit_hi = np.asarray(f["current_max"], dtype=np.float64)[pos]
    with np.errstate(invalid="ignore"):
        extrapolated = ~stuck & ~((i50 >= fit_lo) & (i50 <= fit_hi))
    inv = np.empty(m, dtype=np.int64)
    inv[pos] = np.arange(m)
    f["not_bracketed"] = not_bracketed[inv]
    f["extrapolated"] = extrapolated[inv]
    f["stuck"] = stuck[inv]

    untrusted = not_bracketed | extrapolated
    d = res.population.to_dict()
    level = np.array([k.sum() / n.sum() for _, n, k in pts])
    rows = pos[untrusted]
    for key in ("i50", "scale", "p_lo", "p_hi"):
        d[key] = list(d[key])
    for j, r in zip(np.flatnonzero(untrusted), rows):
        # The measured current nearest the 50 % point: the highest for a device that
        # never reached 1/2, the lowest for one always above, else the crossing.
        edge = (cmax[j] if np.isnan(br[j, 1]) else cmin[j] if np.isnan(br[j, 0])
                else _crossing(*pts[j]))
        d["i50"][r], d["scale"][r] = float(edge), float(sn)
        d["p_lo"][r] = d["p_hi"][r] = float(level[j])
    tables = d.get("tables")
    if tables is not None and rows.size:
        drop = set(rows.tolist())
        keep = [i for i, dev in enumerate(tables["devices"]) if dev not in drop]
        if keep:
            d["tables"] = {key: [tables[key][i] for i in keep] for key in tables}
        else:
            del d["tables"]
    # Saved populations say which devices are placeholders, and the limits scanned.
    d["meta"] = {**d.get("meta", {}), "characterize": {
        "not_bracketed": np.flatnonzero(not_bracketed).tolist(),
        "extrapolated": np.flatnonzero(extrapolated).tolist(),
        "min_current": lo_lim, "max_current": hi_lim,
        "pulses_used": log.used.tolist()}}
    res.population = DevicePopulation.from_dict(d, source="calibrate_backend")
    res.pulses_used = log.used.copy()
    t = log.table()
    res.scan = {**t, "bracket_low": br[:, 0], "bracket_high": br[:, 1],
                "budget_exhausted": exhausted, "min_current": lo_lim, "max_current": hi_lim,
                "stages": STAGES}
    return res


def recalibrate(backend, records, *, bin_width=None, min_pulses=200, max_rel_se=0.25):
    """Refit a :class:`~sotcore.backends.CompensatedBackend`'s present curves from
    per-pulse records (drift compensation).

    ``records``: dict of ``device``, ``current`` (applied amperes) and
    ``switched`` arrays, e.g. ``RecordingBackend.records(last=k)``.
    Currents are binned (``bin_width`` amperes, default a quarter of the
    median reference scale) before the binomial fit.  Devices with fewer
    than ``min_pulses`` pulses or fewer than 3 bins with both outcomes,
    flagged fits (stuck, poor fit, non-monotone, at a bound) or an I50
    standard error above ``max_rel_se`` of the scale keep their previous
    curve.  Returns the boolean mask of devices updated.
    """
    dev = np.asarray(records["device"], dtype=np.int64)
    cur = np.asarray(records["current"], dtype=np.float64)
    sw = np.asarray(records["switched"], dtype=np.int64)
    if bin_width is None:
        bin_width = 0.25 * float(np.median(backend.reference.scale))
    b = np.rint(cur / bin_width).astype(np.int64)
    key = dev * (1 << 40) + (b - b.min(initial=0))
    uniq, inv, counts = np.unique(key, return_inverse=True, return_counts=True)
    sw_sum = np.bincount(inv, weights=sw, minlength=uniq.size)
    cur_mean = np.bincount(inv, weights=cur, minlength=uniq.size) / counts
    d = uniq >> 40
    per_dev = np.bincount(d, weights=counts, minlength=backend.n_devices)
    # Only devices whose pulses straddle their switching region carry
    # information: >= 3 current bins with both outcomes.  Near-separable
    # devices (scale -> 0) would also stall the joint fit.
    mixed = (sw_sum > 0) & (sw_sum < counts)
    n_mixed = np.bincount(d, weights=mixed, minlength=backend.n_devices)
    use = (per_dev[d] >= min_pulses) & (n_mixed[d] >= 3)
    updated = np.zeros(backend.n_devices, bool)
    if not use.any():
        return updated
    table = {"device": d[use], "current": cur_mean[use], "pulses": counts[use],
             "switched": sw_sum[use].astype(np.int64)}
    res = calibrate(table, progress=False)
    f = res.per_device
    labels = np.asarray(f["device"], dtype=np.int64)
    good = ~(f["stuck"] | f["poor_fit"] | f["nonmonotone"] | f["at_bound"]) \
        & np.isfinite(f["i50"]) & (f["i50_se"] < max_rel_se * f["scale"])
    i50 = backend.i50_now.copy()
    scale = backend.scale_now.copy()
    i50[labels[good]] = f["i50"][good]
    scale[labels[good]] = f["scale"][good]
    mask = np.zeros(backend.n_devices, bool)
    mask[labels[good]] = True
    updated = backend.set_curves(i50, scale, mask)
    backend.recalibrations += 1
    return updated
