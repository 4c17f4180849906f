"""calibrate_backend: bracketing, limits, budget, flags, bad input (issue #10).

Statistical bounds use each fit's own standard error with a Bonferroni-corrected
z over the devices of a test (family-wise false-failure rate 1e-4 per seed), so
they hold for any seed while a wrong device, a shifted sweep or a mis-ordered
table (errors of many standard errors) fails them.
"""
import os

import numpy as np
import pytest
from scipy import stats
from scipy.special import expit

import sotcore
from sotcore.backends import EmulatedBackend, InstrumentBackend
from sotcore.characterize import (DEFAULT_MAX_PULSES, STAGES, calibrate_backend,
                                  estimate_calibration_pulses)
from sotcore.devices import WINDOW_PER_SCALE
from sotcore.exceptions import InvalidInputError

PLANNED = 41 * 20 + 25 * 100    # default coarse scan + one fine sweep, per device


def _z(n_tests, alpha=1e-4):
    return stats.norm.isf(alpha / (2 * n_tests))


def _assert_i50_within(res, true_i50, mask, slack=0.0):
    """Fitted I50 within z * SE (+ ``slack`` amperes) of the truth on ``mask``."""
    f = res.per_device
    err = np.abs(f["i50"][mask] - true_i50[mask])
    bound = _z(mask.sum()) * f["i50_se"][mask] + slack
    assert np.all(np.isfinite(f["i50_se"][mask]))
    assert np.all(err <= bound), (err / bound).max()


def _spread_population(i50_mean, n, lo=0.6, hi=1.5, window_fraction=0.15):
    i50 = i50_mean * np.linspace(lo, hi, n)
    return sotcore.DevicePopulation(i50, window_fraction * i50 / WINDOW_PER_SCALE)


class _Lab:
    """A plain-function instrument: logistic devices, with guards a lab would want.

    Raises if a current outside [lo, hi] is requested or a request names a
    device twice; records every request.
    """

    def __init__(self, i50, scale, seed, lo=-np.inf, hi=np.inf, p_hi=1.0):
        self.i50, self.scale = np.asarray(i50, float), np.asarray(scale, float)
        self.p_hi = np.broadcast_to(np.asarray(p_hi, float), self.i50.shape)
        self.rng = np.random.default_rng(seed)
        self.lo, self.hi = lo, hi
        self.calls = []

    def probability(self, currents, idx):
        return self.p_hi[idx] * expit((currents - self.i50[idx]) / self.scale[idx])

    def __call__(self, currents, idx):
        if currents.max() > self.hi or currents.min() < self.lo:
            raise RuntimeError(f"current {currents.max()!r} outside the safe range")
        if np.unique(idx).size != idx.size:
            raise RuntimeError("a device named twice in one request")
        self.calls.append((idx.copy(), currents.shape[0]))
        return self.rng.random(currents.shape) < self.probability(currents, idx)


# ---- the existing behaviour for a good guess (moved from test_backends) ---------------
def test_calibrate_backend_measures_only_through_pulses():
    from sotcore.training import nominal_curve
    pop = sotcore.DevicePopulation.from_width(20.0, 200, variability=0.1, random_state=4)
    be = EmulatedBackend(pop, 1)
    res = calibrate_backend(be, nominal_curve(pop))
    est = res.population
    assert len(est) == 200
    assert np.median(np.abs(est.i50 / pop.i50 - 1)) < 0.005
    assert np.median(np.abs(est.scale / pop.scale - 1)) < 0.06
    # a good guess costs exactly the planned scan: no expansion, no refine sweep
    assert be.pulse_counts.min() == be.pulse_counts.max() == PLANNED
    np.testing.assert_array_equal(res.pulses_used, be.pulse_counts)
    f = res.per_device
    assert not (f["not_bracketed"].any() or f["extrapolated"].any() or f["stuck"].any())


def test_good_guess_i50_within_standard_errors(global_random_seed):
    pop = sotcore.DevicePopulation.from_width(20.0, 60, variability=0.1, random_state=7)
    be = EmulatedBackend(pop, global_random_seed)
    res = calibrate_backend(be, (2e-3, 0.15 * 2e-3 / WINDOW_PER_SCALE))
    # a swapped device order or a shifted table is off by ~0.1 I50 >> SE (~0.002 I50)
    _assert_i50_within(res, pop.i50, np.ones(60, bool), slack=1e-3 * pop.scale.min())
    np.testing.assert_array_equal(np.asarray(res.per_device["device"]), np.arange(60))


# ---- guesses 3x off: bracket every device or flag it ---------------------------------
@pytest.mark.parametrize("factor", [1 / 3, 3.0])
@pytest.mark.parametrize("scale_too", [True, False])
def test_guess_3x_off_emulated(factor, scale_too, global_random_seed):
    pop = _spread_population(2e-3, 40, lo=0.6, hi=1.45)
    s_nom = pop.scale.mean() * (factor if scale_too else 1.0)
    guess = 2e-3 * factor
    be = EmulatedBackend(pop, global_random_seed)
    res = calibrate_backend(be, (guess, s_nom))
    f = res.per_device
    lo, hi = res.scan["min_current"], res.scan["max_current"]
    reach = max(guess, 4 * WINDOW_PER_SCALE * s_nom)          # the default limits
    assert hi == pytest.approx(guess + 3 * reach) and lo == 0.0
    assert hi == pytest.approx(4 * guess) or not scale_too
    flagged = f["not_bracketed"] | f["extrapolated"]
    # clearly inside the limits (P(max) > 0.95): measured; clearly outside: flagged
    inside = pop.i50 + 3 * pop.scale < hi
    outside = pop.i50 - 3 * pop.scale > hi
    assert inside.sum() >= 20
    assert not flagged[inside].any()
    assert f["not_bracketed"][outside].all()
    _assert_i50_within(res, pop.i50, inside, slack=0.05 * pop.scale[inside])
    # flagged devices are flat in the population: they never pass for a working curve
    assert res.population.stuck[flagged].all()
    assert not res.population.stuck[~flagged].any()
    np.testing.assert_array_equal(res.pulses_used, be.pulse_counts)
    assert res.pulses_used.max() <= DEFAULT_MAX_PULSES
    assert (res.scan["current"] <= hi).all() and (res.scan["current"] >= lo).all()
    # the last fine sweep fits the device's own window (resized by refine sweeps)
    t = res.scan
    for j in np.flatnonzero(inside):
        last = t["stage"][t["device"] == j].max()
        cur = t["current"][(t["device"] == j) & (t["stage"] == last)]
        ratio = (cur.max() - cur.min()) / (2 * 1.5 * WINDOW_PER_SCALE * pop.scale[j])
        assert 0.45 < ratio < 2.2, (j, ratio)


def _thermal(seed, ic, delta=60.0, attempts=1e4):
    """Independent simulator: Neel-Arrhenius switching (not logistic),
    P = 1 - exp(-attempts * exp(-delta * (1 - I / Ic))).  Returns fn, 50 % points."""
    rng = np.random.default_rng(seed)
    ic = np.asarray(ic, float)

    def fn(currents, idx):
        rate = attempts * np.exp(-delta * (1.0 - currents / ic[idx]))
        return rng.random(currents.shape) < -np.expm1(-rate)
    return fn, ic * (1.0 - np.log(attempts / np.log(2.0)) / delta)


@pytest.mark.parametrize("factor", [1 / 3, 0.5, 3.0])
def test_guess_off_instrument_plain_function(factor, global_random_seed):
    ic = 2.4e-3 * np.linspace(0.85, 1.15, 16)
    fn, i50_true = _thermal(global_random_seed, ic)
    eff_scale = ic / 60.0      # slope scale of the thermal curve at its 50 % point
    be = InstrumentBackend(fn, n_devices=16)
    guess = 2e-3 * factor
    res = calibrate_backend(be, (guess, guess * 0.15 / WINDOW_PER_SCALE),
                            max_current=max(2 * guess, 3 * 2e-3), progress=False)
    f = res.per_device
    assert not f["not_bracketed"].any() and not f["extrapolated"].any()
    assert not f["stuck"].any()
    # the logistic fit of an asymmetric curve: I50 within half a slope scale
    assert np.all(np.abs(f["i50"] - i50_true) < 0.5 * eff_scale + _z(16) * f["i50_se"])
    np.testing.assert_array_equal(res.pulses_used, be.pulse_counts)


def test_reported_case_no_false_stuck_or_silent_error(global_random_seed):
    """The lab's report: guess 2x below I50, one device at ~7 uA among 2 mA ones."""
    i50 = np.r_[np.full(15, 2e-3) * np.linspace(0.9, 1.1, 15), 7e-6]
    scale = np.r_[np.full(15, 0.15 * 2e-3 / WINDOW_PER_SCALE), 1e-6]
    lab = _Lab(i50, scale, global_random_seed, lo=0.0, hi=4e-3)
    be = InstrumentBackend(lab, n_devices=16)
    res = calibrate_backend(be, (1e-3, 0.5 * scale[0]), max_current=4e-3, progress=False)
    f = res.per_device
    assert not f["stuck"].any()
    ok = ~(f["not_bracketed"] | f["extrapolated"])
    # every device is measured or flagged; the 2 mA ones are all measured
    assert ok[:15].all()
    _assert_i50_within(res, i50, ok, slack=0.05 * scale[ok])
    assert np.all(np.isfinite(f["i50"][ok]) & (f["i50"][ok] > 0))


# ---- signed currents, p-bits ----------------------------------------------------------
@pytest.mark.parametrize("guess", [0.0, -5e-6, 4e-6])
def test_pbits_at_or_below_zero(guess, global_random_seed):
    i50 = np.linspace(-15e-6, 5e-6, 12)
    scale = np.full(12, 2e-6)
    lab = _Lab(i50, scale, global_random_seed)
    be = InstrumentBackend(lab, n_devices=12)
    kw = {"min_current": -40e-6} if guess > 0 else {}
    res = calibrate_backend(be, (guess, 2e-6), progress=False, **kw)
    f = res.per_device
    assert not (f["not_bracketed"] | f["extrapolated"] | f["stuck"]).any()
    _assert_i50_within(res, i50, np.ones(12, bool), slack=0.05 * scale)
    assert (res.scan["current"] < 0).any()
    assert res.scan["min_current"] == kw.get("min_current", res.scan["min_current"])


def test_positive_guess_default_stays_at_or_above_zero(global_random_seed):
    lab = _Lab([-5e-6, 8e-6], [1e-6, 1e-6], global_random_seed, lo=0.0)
    res = calibrate_backend(InstrumentBackend(lab, n_devices=2), (6e-6, 1e-6), progress=False)
    f = res.per_device
    # device 0 switches at every current >= 0: its 50 % point is below the limit
    assert f["not_bracketed"].tolist() == [True, False]
    assert res.population.stuck[0] and res.population.p_lo[0] > 0.95
    assert res.population.i50[0] == 0.0          # the nearest measured current


# ---- limits and budget -----------------------------------------------------------------
def test_never_pulses_outside_the_limits(global_random_seed):
    # device 1 switches only far above max_current, device 2 always below min_current;
    # devices 3 and 4 sit just inside the limits (their fine sweeps must be clipped)
    i50 = np.array([1e-3, 9e-3, -1e-3, 1.5e-3, 0.3e-3])
    lab = _Lab(i50, np.full(5, 3e-5), global_random_seed, lo=2e-4, hi=1.6e-3)
    be = InstrumentBackend(lab, n_devices=5)
    res = calibrate_backend(be, (1.2e-3, 3e-5), min_current=2e-4, max_current=1.6e-3,
                            progress=False)
    f = res.per_device
    assert f["not_bracketed"].tolist() == [False, True, True, False, False]
    assert f["stuck"].tolist() == [False, True, True, False, False]   # none seen in limits
    assert res.scan["current"].max() == 1.6e-3 and res.scan["current"].min() == 2e-4
    pop = res.population
    assert pop.stuck[1] and pop.p_lo[1] == 0.0 and pop.i50[1] == pytest.approx(1.6e-3)
    assert pop.stuck[2] and pop.p_lo[2] == 1.0 and pop.i50[2] == pytest.approx(2e-4)
    # unbracketed devices are not given a fine sweep
    assert set(res.scan["stage"][np.isin(res.scan["device"], [1, 2])]) <= {0, 1}


def test_only_unbracketed_devices_are_pulsed_again(global_random_seed):
    i50 = np.array([1e-3, 1e-3, 2.5e-3])
    lab = _Lab(i50, np.full(3, 3e-5), global_random_seed)
    be = InstrumentBackend(lab, n_devices=3)
    res = calibrate_backend(be, (1e-3, 3e-5), max_current=4e-3, progress=False)
    # devices 0 and 1 need the planned scan only; device 2 needed expansions
    assert res.pulses_used[:2].tolist() == [PLANNED, PLANNED]
    assert res.pulses_used[2] > PLANNED
    expand = [(idx, n) for idx, n in lab.calls if n and 2 in idx and idx.size == 1]
    assert expand, "expansion requests name the unbracketed device alone"
    sent = np.zeros(3, np.int64)
    for idx, n in lab.calls:
        sent[idx] += n
    np.testing.assert_array_equal(sent, res.pulses_used)
    np.testing.assert_array_equal(be.pulse_counts, res.pulses_used)
    st = res.scan["stage"][res.scan["device"] == 2]
    assert STAGES[1] == "expand" and (st == 1).any()


def test_budget_is_never_exceeded(global_random_seed):
    pop = _spread_population(2e-3, 10, lo=0.9, hi=1.1)
    be = EmulatedBackend(pop, global_random_seed)
    # budget = the plan: no room to expand from a guess 3x too low
    res = calibrate_backend(be, (2e-3 / 3, pop.scale.mean() / 3), max_current=8e-3,
                            max_pulses=PLANNED)
    assert res.pulses_used.max() <= PLANNED
    assert res.per_device["not_bracketed"].all() and res.scan["budget_exhausted"].all()
    assert res.population.stuck.all()
    # a budget with room for the expansions brackets them all
    be = EmulatedBackend(pop, global_random_seed)
    res = calibrate_backend(be, (2e-3 / 3, pop.scale.mean() / 3), max_current=8e-3,
                            max_pulses=PLANNED + 4 * 400)
    assert res.pulses_used.max() <= PLANNED + 4 * 400
    assert not res.per_device["not_bracketed"].any()


def test_estimate_calibration_pulses_matches_a_run():
    est = estimate_calibration_pulses(8, pulse_duration=1e-8)
    assert est["per_device"] == PLANNED and est["total"] == 8 * PLANNED
    assert est["per_device_max"] == DEFAULT_MAX_PULSES
    assert est["seconds"] == pytest.approx(8 * PLANNED * 1e-8)
    pop = _spread_population(2e-3, 8, lo=0.95, hi=1.05)
    be = EmulatedBackend(pop, 0)
    calibrate_backend(be, (2e-3, pop.scale.mean()))
    assert be.pulse_counts.sum() == est["total"]
    small = estimate_calibration_pulses(3, coarse_points=11, coarse_pulses=4, n_points=5,
                                        pulses=10, max_pulses=None)
    assert small["per_device"] == 11 * 4 + 5 * 10 and small["total_max"] is None
    with pytest.raises(InvalidInputError, match="max_pulses"):
        estimate_calibration_pulses(3, max_pulses=PLANNED - 1)


def test_fine_sweep_is_centred_on_the_interpolated_crossing(global_random_seed):
    # I50 midway between two coarse currents (1.25 scales apart): a precise coarse
    # scan must centre the fine sweep there, not on a grid point
    s, guess = 2e-5, 1e-3
    step = 2 * 0.5 * max(guess, 4 * WINDOW_PER_SCALE * s) / 40     # the coarse grid's
    i50 = guess + 3.5 * step
    lab = _Lab([i50], [s], global_random_seed)
    res = calibrate_backend(InstrumentBackend(lab, 1), (guess, s), coarse_pulses=2000,
                            max_pulses=None, progress=False)
    fine = res.scan["current"][res.scan["stage"] == 2]
    assert abs(0.5 * (fine.min() + fine.max()) - i50) < 0.25 * step


# ---- refine sweeps and the flags -------------------------------------------------------
class _JumpAfterCoarse(_Lab):
    """Device 0's I50 moves by ``jump`` once the first coarse scan is done."""

    def __init__(self, *a, jump, coarse_pulses, **kw):
        super().__init__(*a, **kw)
        self.jump, self.left = jump, coarse_pulses

    def __call__(self, currents, idx):
        bits = super().__call__(currents, idx)
        if self.left is not None:
            self.left -= currents.shape[0]
            if self.left <= 0:
                self.i50 = self.i50.copy()
                self.i50[0] += self.jump
                self.left = None
        return bits


@pytest.mark.parametrize("max_refine", [0, 2])
def test_refine_moves_a_missed_sweep_else_flags_it(max_refine, global_random_seed, tmp_path):
    s = 2e-5
    i50 = np.array([1e-3, 1e-3])
    # after the coarse scan device 0 sits 9 scales higher: the fine sweep (+-6.6
    # scales around the old point) sees only its foot
    lab = _JumpAfterCoarse(i50, np.full(2, s), global_random_seed, jump=9 * s,
                           coarse_pulses=41 * 20)
    be = InstrumentBackend(lab, n_devices=2)
    res = calibrate_backend(be, (1e-3, s), max_refine=max_refine, progress=False)
    f = res.per_device
    assert not f["not_bracketed"].any() and not f["stuck"].any()
    if max_refine == 0:
        assert f["extrapolated"].tolist() == [True, False]
        assert res.population.stuck.tolist() == [True, False]
        assert res.pulses_used.tolist() == [PLANNED, PLANNED]
        # the placeholder sits at the measured crossing, inside the measured bracket
        assert res.scan["bracket_low"][0] <= res.population.i50[0] \
            <= res.scan["bracket_high"][0]
        meta = res.population.meta["characterize"]
        assert meta["extrapolated"] == [0] and meta["not_bracketed"] == []
        path = res.population.save(tmp_path / "pop.json")
        back = sotcore.DevicePopulation.load(path)
        assert back.stuck.tolist() == [True, False]
        assert back.meta["characterize"]["pulses_used"] == [PLANNED, PLANNED]
    else:
        assert not f["extrapolated"].any()
        _assert_i50_within(res, lab.i50, np.ones(2, bool), slack=0.05 * s)
        assert res.pulses_used[0] > PLANNED and res.pulses_used[1] == PLANNED
        assert 3 in set(res.scan["stage"][res.scan["device"] == 0])


class _DiesAfterCoarse(_JumpAfterCoarse):
    def __call__(self, currents, idx):
        dead = self.left is None
        bits = super().__call__(currents, idx)
        if dead:
            bits[:, idx == 0] = False
        return bits


def test_no_stuck_verdict_for_a_device_that_switched(global_random_seed):
    # device 0 switches normally in the coarse scan, then stops switching: the fit
    # (fine sweeps only) says stuck, but it switched with P in (0.05, 0.95)
    lab = _DiesAfterCoarse(np.array([1e-3, 1e-3]), np.full(2, 2e-5), global_random_seed,
                           jump=0.0, coarse_pulses=41 * 20)
    be = InstrumentBackend(lab, n_devices=2)
    res = calibrate_backend(be, (1e-3, 2e-5), progress=False)
    f = res.per_device
    assert f["stuck"].tolist() == [False, False]
    assert f["extrapolated"].tolist() == [True, False]   # no I50 in its fitted data
    assert res.population.stuck.tolist() == [True, False]
    # a device that never switched anywhere stays stuck
    lab = _Lab([1e-3, 1.0], [2e-5, 2e-5], global_random_seed)
    res = calibrate_backend(InstrumentBackend(lab, 2), (1e-3, 2e-5), progress=False)
    assert res.per_device["stuck"].tolist() == [False, True]


def test_calibrate_kw_pass_through_and_isotonic_population(global_random_seed):
    i50 = np.array([1e-3, 1.1e-3, 50e-3])       # device 2 never switches within limits
    lab = _Lab(i50, np.full(3, 3e-5), global_random_seed, p_hi=[0.9, 0.9, 0.9])
    res = calibrate_backend(InstrumentBackend(lab, 3), (1e-3, 3e-5), progress=False,
                            levels="fit")
    f = res.per_device
    assert np.all(np.abs(f["p_hi"][:2] - 0.9) < _z(2) * f["p_hi_se"][:2])
    res = calibrate_backend(InstrumentBackend(lab, 3), (1e-3, 3e-5), progress=False,
                            method="isotonic")
    assert res.population.nonparametric.tolist() == [True, True, False]
    assert res.population.stuck.tolist() == [False, False, True]
    assert res.per_device["not_bracketed"].tolist() == [False, False, True]


def test_a_failing_instrument_keeps_what_was_measured():
    lab = _Lab([1e-3, 1.1e-3], [3e-5, 3e-5], 0)
    calls = []

    def flaky(currents, idx):
        calls.append(currents.shape[0])
        if len(calls) == 3:
            raise OSError("instrument timeout")
        return lab(currents, idx)
    be = InstrumentBackend(flaky, n_devices=2, max_batch=500)
    with pytest.raises(sotcore.BackendError, match="timeout") as info:
        calibrate_backend(be, (1e-3, 3e-5), progress=False)
    np.testing.assert_array_equal(info.value.pulses_used, be.pulse_counts)
    scan = info.value.scan
    assert scan["pulses"].sum() == be.pulse_counts.sum() > 0


def test_sizes_are_bounded():
    with pytest.raises(InvalidInputError, match="n_points"):
        calibrate_backend(InstrumentBackend(_Lab([1e-3], [3e-5], 0), 1), (1e-3, 3e-5),
                          n_points=10**9, max_pulses=None)


# ---- progress --------------------------------------------------------------------------
def test_progress_bar_counts_pulses(capsys):
    lab = _Lab([1e-3], [3e-5], 0)
    calibrate_backend(InstrumentBackend(lab, 1), (1e-3, 3e-5))   # default: on
    err = capsys.readouterr().err
    assert "calibrate_backend" in err and "pulse" in err
    calibrate_backend(EmulatedBackend(sotcore.DevicePopulation([1e-3], [3e-5]), 0),
                      (1e-3, 3e-5))                                 # default: off
    assert capsys.readouterr().err == ""


# ---- bad input: a ValueError naming the argument, and nothing pulsed ---------------------
@pytest.mark.parametrize("kw, name", [
    ({"nominal": (1e-3, 0.0)}, "nominal scale"),
    ({"nominal": (1e-3, -1e-5)}, "nominal scale"),
    ({"nominal": (np.nan, 1e-5)}, "nominal i50"),
    ({"nominal": (1e-3,)}, "nominal"),
    ({"nominal": "1e-3"}, "nominal"),
    ({"max_current": 0.5e-3}, "max_current"),
    ({"max_current": 1e-3}, "max_current"),
    ({"max_current": np.inf}, "max_current"),
    ({"min_current": 2e-3}, "min_current"),
    ({"max_pulses": -1}, "max_pulses"),
    ({"max_pulses": PLANNED - 1}, "max_pulses"),
    ({"max_pulses": 1.5e4}, "max_pulses"),
    ({"coarse_points": 2}, "coarse_points"),
    ({"pulses": 0}, "pulses"),
    ({"expand_factor": 1.0}, "expand_factor"),
    ({"span": -1.0}, "span"),
    ({"max_refine": -1}, "max_refine"),
    ({"progress": "yes"}, "progress"),
    ({"method": "nope"}, "method"),
    ({"not_an_option": 1}, "not_an_option"),
])
def test_bad_input_is_refused_before_any_pulse(kw, name):
    lab = _Lab([1e-3, 1e-3], [3e-5, 3e-5], 0)
    be = InstrumentBackend(lab, n_devices=2)
    args = {"nominal": (1e-3, 3e-5), **kw}
    with pytest.raises(InvalidInputError, match=name):
        calibrate_backend(be, **args)
    assert lab.calls == [] and be.pulse_counts.sum() == 0


def test_negative_guess_accepted_and_not_a_backend_refused():
    with pytest.raises(TypeError, match="backend"):
        calibrate_backend(object(), (1e-3, 1e-5))
    lab = _Lab([-1e-3], [3e-5], 0)
    res = calibrate_backend(InstrumentBackend(lab, 1), (-1e-3, 3e-5), progress=False)
    assert res.scan["max_current"] > -1e-3 > res.scan["min_current"]
    assert not res.per_device["not_bracketed"][0]


# ---- property: any guess, any limits -------------------------------------------------
from hypothesis import HealthCheck, example, given, settings, strategies as st  # noqa: E402


@settings(max_examples=int(os.environ.get("SOTCORE_HYPOTHESIS_EXAMPLES", 15)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(i50=st.lists(st.floats(-4e-3, 4e-3), min_size=1, max_size=3),
       log_scale=st.floats(np.log(2e-6), np.log(1e-4)),
       guess=st.floats(-3e-3, 3e-3), log_guess_scale=st.floats(np.log(2e-6), np.log(1e-4)),
       below=st.floats(1e-4, 5e-3), above=st.floats(1e-4, 5e-3), seed=st.integers(0, 2**31))
# found by Hypothesis: a grid's rounding stepped one ulp past max_current
@example(i50=[0.0, 0.0], log_scale=-10.0, guess=0.0, log_guess_scale=-9.5, below=0.00390625,
         above=0.0001, seed=0)
def test_any_guess_brackets_or_flags_within_limits(i50, log_scale, guess, log_guess_scale,
                                                   below, above, seed):
    s = float(np.exp(log_scale))
    lo, hi = guess - below, guess + above
    lab = _Lab(i50, np.full(len(i50), s), seed, lo=lo, hi=hi)   # raises outside limits
    be = InstrumentBackend(lab, n_devices=len(i50))
    res = calibrate_backend(be, (guess, float(np.exp(log_guess_scale))), min_current=lo,
                            max_current=hi, coarse_pulses=10, pulses=40, progress=False)
    f = res.per_device
    np.testing.assert_array_equal(res.pulses_used, be.pulse_counts)
    assert res.pulses_used.max() <= DEFAULT_MAX_PULSES
    flagged = f["not_bracketed"] | f["extrapolated"]
    assert np.array_equal(res.population.stuck, flagged | f["stuck"])
    ok = ~flagged & ~f["stuck"]
    assert np.all((f["i50"][ok] >= f["current_min"][ok]) & (f["i50"][ok] <= f["current_max"][ok]))
    # a device far inside the limits (P < 1e-3 at lo, > 1 - 1e-3 at hi) is bracketed
    deep = (np.asarray(i50) - 7 * s > lo) & (np.asarray(i50) + 7 * s < hi)
    assert not f["not_bracketed"][deep].any()


def test_recalibrate_follows_drifted_devices(global_random_seed):
    """Devices drift by +3 scales; recalibration from recorded pulses finds the new
    I50 within its standard errors' reach and compensation restores the reference."""
    from sotcore.backends import CompensatedBackend, EmulatedBackend, RecordingBackend
    from sotcore.characterize import recalibrate
    ref = sotcore.DevicePopulation.from_width(20.0, 12, variability=0.1, random_state=3)
    drifted = sotcore.DevicePopulation(ref.i50 + 3 * ref.scale, ref.scale * 1.1)
    rec = RecordingBackend(EmulatedBackend(drifted, global_random_seed))
    comp = CompensatedBackend(rec, ref)
    rng = np.random.default_rng(global_random_seed)
    cur = ref.i50 + ref.scale * rng.uniform(-4, 4, (3000, 12))
    comp.pulse(cur)
    updated = recalibrate(comp, rec.records())
    assert updated.all() and comp.recalibrations == 1
    assert np.abs(comp.i50_now - drifted.i50).max() < 0.25 * ref.scale.min()
    np.testing.assert_allclose(comp.scale_now, drifted.scale, rtol=0.15)
    # compensated pulses at the reference I50 switch half the time again
    bits = comp.pulse(np.tile(ref.i50, (4000, 1)))
    assert np.abs(bits.mean(axis=0) - 0.5).max() < 0.06
    with pytest.warns(DeprecationWarning):
        comp.recalibrate(rec.records())
    # too few pulses: nothing changes
    comp2 = CompensatedBackend(RecordingBackend(EmulatedBackend(drifted, 1)), ref)
    assert not recalibrate(comp2, {"device": np.zeros(10, int), "current": np.zeros(10),
                                   "switched": np.zeros(10, int)}).any()
