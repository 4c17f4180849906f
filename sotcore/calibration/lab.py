"""Virtual lab: simulated measurements of any curve family, and experiment planning."""
import math
import os
from pathlib import Path

import numpy as np
from scipy.special import log_expit

from .._utils import as_float_array, as_per_device, seed_from_random_state
from ..devices import DEFAULT_TABLE_POINTS, WINDOW_PER_SCALE, DevicePopulation
from .._utils import check_scalar_arg as _check_scalar
from ..exceptions import InvalidInputError
from . import _families as fam
from ._measurements import MAX_RAW_PULSES, gc_paused

__all__ = ["simulate_measurements", "family_population", "expected_standard_errors",
           "pulses_for_precision", "write_table", "DEFAULT_SPAN"]

#: ASSUMPTION: half-span of the simulated current sweep, in programming
#: windows around I50 (P runs from ~0.001 to ~0.999 across it).
DEFAULT_SPAN = 1.5


def family_population(family, i50, window, *, shape=1.0, p_lo=0.0, p_hi=1.0, width=np.nan,
                      rollover=None, table_points=DEFAULT_TABLE_POINTS):
    """Devices whose switching curves follow one family (the virtual lab's truth).

    Parameters
    ----------
    family : {"logistic", "probit", "thermal", "asymmetric"}
    i50, window : array-like of shape (n_devices,)
        I50 and programming window (F = 0.1 -> 0.9) of each device, amperes.
    shape : float or array-like, default 1
        nu of the asymmetric family (ignored by the others).
    p_lo, p_hi : float or array-like, default 0 and 1
    width : float or array-like, default NaN
        Widths in micrometres.
    rollover : (onset, floor), optional
        Over-drive: beyond ``onset * i50`` the probability falls linearly,
        reaching ``floor`` times its value at ``2 * onset * i50`` and staying
        there (a non-monotone device, e.g. ``(1.3, 0.7)``).
    table_points : int, default 1024

    Returns
    -------
    DevicePopulation
        Table devices (plain sigmoid devices for a logistic without
        rollover); ``meta["lab"]`` holds the family and the per-device
        parameter rows ``(loc, s, c, p_lo, p_hi)`` (see ``sotcore.calibration``).
    """
    if family not in fam.PARAMETRIC:
        raise InvalidInputError(f"family must be one of {', '.join(map(repr, fam.PARAMETRIC))}; "
                         f"got {family!r}")
    i50 = as_float_array(i50, "i50", ndim=1)
    D = i50.size
    window = as_per_device(window, "window", D, positive=True)
    c = np.log(as_per_device(shape, "shape", D, positive=True))
    lo = as_per_device(p_lo, "p_lo", D, low=0.0, high=1.0)
    hi = as_per_device(p_hi, "p_hi", D, low=0.0, high=1.0)
    table_points = _check_scalar(table_points, "table_points", low=2, high=1 << 20,
                                 integer=True)
    if family != "asymmetric":
        c = np.zeros(D)
    loc, s = fam.from_i50_window(family, i50, window, c)
    params = np.column_stack([loc, s, c, lo, hi])
    meta = {"lab": {"family": family, "params": params.tolist(),
                    "rollover": None if rollover is None else list(map(float, rollover))}}
    if family == "logistic" and rollover is None:
        return DevicePopulation(i50, window / WINDOW_PER_SCALE, lo, hi, width, meta=meta,
                                table_points=table_points)
    glo, ghi, probs = fam.family_tables(family, params, table_points)
    if rollover is not None:
        try:
            onset, floor = (float(v) for v in rollover)
        except (TypeError, ValueError):
            raise InvalidInputError(
                f"rollover must be a pair (onset, floor), got {rollover!r}") from None
        if not (onset > 0 and 0 <= floor <= 1):
            raise InvalidInputError(
                f"rollover needs onset > 0 and 0 <= floor <= 1, got {rollover!r}")
        ghi = np.maximum(ghi, 2.2 * onset * i50)
        grid = glo[:, None] + (ghi - glo)[:, None] * np.linspace(0, 1, table_points)[None, :]
        start = onset * i50[:, None]
        drop = np.clip((grid - start) / start, 0.0, 1.0)
        probs = fam.family_probability(family, grid, params[:, None, :]) * (
            1.0 - (1.0 - floor) * drop)
    return DevicePopulation(i50, window / WINDOW_PER_SCALE, lo, hi, width,
                            tables=(glo, ghi, np.clip(probs, 0.0, 1.0)), meta=meta,
                            table_points=table_points)


def _sweep(population, currents, n_points, span, sweep):
    """Currents (n_devices, n_points) of each device's sweep, in amperes."""
    D = len(population)
    if currents is not None:
        cur = as_float_array(currents, "currents", ndim=(1, 2))
        if cur.ndim == 1:
            cur = np.broadcast_to(cur, (D, cur.size))
        elif cur.shape[0] != D:
            raise InvalidInputError(f"currents must have shape (n_points,) or ({D}, n_points) "
                             f"(one sweep per device), got {cur.shape}")
        if cur.shape[1] < 1:
            raise InvalidInputError("currents must hold at least one current")
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
        raise InvalidInputError(f"sweep must be 'device' or 'width', got {sweep!r}")
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
        raise InvalidInputError(f"pulses must broadcast to (n_devices, n_points) = {(D, M)}, got "
                         f"shape {pul.shape}") from None
    if not (np.isfinite(pul).all() and (pul == np.round(pul)).all() and (pul >= 1).all()):
        raise InvalidInputError(f"pulses must be positive whole numbers, got {pulses!r}")
    pul = pul.astype(np.int64)
    if raw and pul.sum() > MAX_RAW_PULSES:
        raise InvalidInputError(f"raw=True would write {pul.sum():,} rows (> {MAX_RAW_PULSES:,}); "
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
        write_table(table, path)
    if as_frame:
        import pandas as pd
        return pd.DataFrame(table)
    return table


def write_table(table, path):
    """Write a dict of columns to CSV (floats in shortest round-trip form)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with gc_paused():
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
        raise InvalidInputError(f"pulses must be positive, got {pulses!r}")
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
        raise InvalidInputError(f"parameter must be 'scale', 'window' or 'i50', got {parameter!r}")
    se = expected_standard_errors(population, pulses=1, n_points=n_points, span=span,
                                  sweep=sweep)
    rel = se["rel_i50"] if parameter == "i50" else se["rel_scale"]
    rel = rel[np.isfinite(rel)]
    if rel.size == 0:
        raise InvalidInputError("no device with a resolvable curve (all stuck)")
    return int(math.ceil((float(np.quantile(rel, quantile)) / rel_se) ** 2))
