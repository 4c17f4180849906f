"""Characterising devices through a backend: pulse sweeps, as a lab runs them, fitted
by :func:`sotcore.calibrate`.  Only the bits a backend returns are used, never an
emulator's hidden curves."""
import numpy as np

from .calibration import calibrate
from .devices import WINDOW_PER_SCALE

__all__ = ["calibrate_backend"]


def calibrate_backend(backend, nominal, *, coarse_span=0.5, coarse_points=41, coarse_pulses=20,
                      n_points=25, pulses=100, span=1.5, progress=False, **calibrate_kw):
    """Characterise a backend's devices by pulsing them, as a lab would, and fit them.

    A coarse scan (``coarse_points`` currents over ``I50_nominal * (1 +- coarse_span)``,
    ``coarse_pulses`` each) locates each device's 50 % point; a fine sweep of
    ``n_points`` currents over that point +- ``span`` nominal windows, with
    ``pulses`` pulses each, is then fitted by :func:`sotcore.calibrate`.
    Only the bits the backend returns are used, never its hidden curves.

    Parameters
    ----------
    backend : device backend
    nominal : (i50, scale) in amperes
        The nominal device, which sets the sweep ranges.

    Returns
    -------
    CalibrationResult (``.population`` has one device per backend device)
    """
    i50n, sn = (float(v) for v in nominal)
    if not (i50n > 0 and sn > 0):
        raise ValueError(f"nominal must be (i50, scale) > 0 in amperes, got {nominal!r}")
    m = backend.n_devices
    grid = np.linspace(i50n * (1 - coarse_span), i50n * (1 + coarse_span), coarse_points)
    cur = np.repeat(grid, coarse_pulses)[:, None] * np.ones((1, m))
    frac = backend.pulse(cur).reshape(coarse_points, coarse_pulses, m).mean(axis=1)
    # First grid point where the switching fraction reaches 1/2 (clamped to the grid).
    above = frac >= 0.5
    first = np.where(above.any(axis=0), above.argmax(axis=0), coarse_points - 1)
    prev = np.maximum(first - 1, 0)
    f0, f1 = frac[prev, np.arange(m)], frac[first, np.arange(m)]
    t = np.where(f1 > f0, (0.5 - f0) / np.where(f1 > f0, f1 - f0, 1.0), 0.0)
    centre = grid[prev] + np.clip(t, 0.0, 1.0) * (grid[first] - grid[prev])
    half = span * WINDOW_PER_SCALE * sn
    fine = centre[None, :] + np.linspace(-half, half, n_points)[:, None]
    bits = backend.pulse(np.repeat(fine, pulses, axis=0)).reshape(n_points, pulses, m)
    table = {"device": np.tile(np.arange(m), n_points),
             "current": fine.ravel(),
             "pulses": np.full(n_points * m, pulses),
             "switched": bits.sum(axis=1).ravel()}
    return calibrate(table, progress=progress, **calibrate_kw)
