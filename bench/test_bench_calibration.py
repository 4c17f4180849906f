"""Calibration: 1,000 devices x 25 currents, every model, beside a per-device SciPy fit.

The issue's target: ``calibrate(..., model="auto")`` on 1,000 devices x 25
currents in under 5 s on 2 cores.  The peer is the textbook approach, one
``scipy.optimize.minimize`` (L-BFGS-B, numerical gradient) per device, timed
on the first 100 devices.  Every benchmark checks its fit against the truth
right after timing it.  Run: ``pytest bench/test_bench_calibration.py
--benchmark-only`` (bench/README.md).
"""
import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import expit

import sotcore
from sotcore.calibration import calibrate, family_population, simulate_measurements

N_DEVICES, N_POINTS, PULSES = 1000, 25, 200
MODELS = ["logistic", "probit", "thermal", "asymmetric", "isotonic", "table", "auto"]


@pytest.fixture(scope="module")
def sweep():
    """A mixed population (a quarter of each parametric family) and its measurements."""
    base = sotcore.DevicePopulation.from_width(20.0, N_DEVICES, random_state=0)
    fams = ["logistic", "probit", "thermal", "asymmetric"]
    q = N_DEVICES // 4
    parts = [family_population(f, base.i50[i * q:(i + 1) * q], base.window[i * q:(i + 1) * q],
                               shape=3.0) for i, f in enumerate(fams)]
    tables = [simulate_measurements(p, pulses=PULSES, n_points=N_POINTS, span=2.0,
                                    random_state=i) for i, p in enumerate(parts)]
    table = {k: np.concatenate([t[k] + (i * q if k == "device" else 0)
                                for i, t in enumerate(tables)])
             for k in ("device", "current", "pulses", "switched")}
    return base, table


@pytest.mark.parametrize("model", MODELS)
def test_calibrate(benchmark, sweep, model):
    base, table = sweep
    benchmark.group = f"calibrate {N_DEVICES}x{N_POINTS}"
    benchmark.extra_info.update(model=model, devices=N_DEVICES, currents=N_POINTS)
    res = benchmark.pedantic(calibrate, args=(table,), kwargs={"model": model},
                             rounds=3, iterations=1, warmup_rounds=1)
    f = res.per_device
    fams = ["logistic", "probit", "thermal", "asymmetric"]
    own = (slice(fams.index(model) * (N_DEVICES // 4), (fams.index(model) + 1) * (N_DEVICES // 4))
           if model in fams else slice(None))   # a family is checked on its own devices
    assert np.median(np.abs(f["i50"][own] / base.i50[own] - 1)) < 0.01
    if model == "auto":
        assert benchmark.stats.stats.median < 5.0   # the target
        assert (f["rejected"].mean() < 0.02) and f["converged"].all()


def _scipy_one(cur, n, k):
    """One device, the textbook way: L-BFGS-B on the logistic, numerical gradient."""
    c0, h = cur.mean(), np.ptp(cur) / 2

    def nll(t):
        p = np.clip(expit((cur - (c0 + h * t[0])) / (h * np.exp(t[1]))), 1e-12, 1 - 1e-12)
        return -(k * np.log(p) + (n - k) * np.log1p(-p)).sum()
    r = minimize(nll, [0.0, np.log(0.3)], method="L-BFGS-B")
    return c0 + h * r.x[0]


def test_scipy_per_device_peer(benchmark, sweep):
    base, table = sweep
    benchmark.group = f"calibrate {N_DEVICES}x{N_POINTS}"
    benchmark.extra_info.update(model="scipy per device (100 devices)", devices=100)
    d = table["device"]
    rows = [np.flatnonzero(d == j) for j in range(100)]

    def run():
        return np.array([_scipy_one(table["current"][r], table["pulses"][r],
                                    table["switched"][r]) for r in rows])
    i50 = benchmark.pedantic(run, rounds=3, iterations=1)
    assert np.median(np.abs(i50 / base.i50[:100] - 1)) < 0.01
