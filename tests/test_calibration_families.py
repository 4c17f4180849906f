"""Tests of the calibration model families, model selection, fit quality and the report."""
import json
import math
import warnings

import numpy as np
import pytest
from scipy import stats

import sotcore
from sotcore import DevicePopulation, calibrate, simulate_measurements
from sotcore.calibration import MODELS, expected_standard_errors, family_population
from sotcore.calibration import _families as fam
from sotcore.devices import WINDOW_PER_SCALE

# Every statistical check below fails a correct implementation with probability
# below ALPHA (exact binomial or normal tail, Bonferroni over the checks of a test).
ALPHA = 1e-6


def _binomial_ok(k, n, p_low, p_high, alpha=ALPHA):
    """Is a count k of n plausible for a success probability in [p_low, p_high]?"""
    return stats.binom.cdf(k, n, p_low) > alpha / 2 and stats.binom.sf(k - 1, n, p_high) > alpha / 2


def _base(n, seed, width=20.0):
    return DevicePopulation.from_width(width, n, variability=0.10, random_state=seed)


def _truth(pop):
    return np.array(pop.meta["lab"]["params"])


# ---------------------------------------------------------------------------------------
# the curves themselves
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, c", [("logistic", 0.0), ("probit", 0.0), ("thermal", 0.0),
                                       ("asymmetric", math.log(3.0)),
                                       ("asymmetric", math.log(0.3))])
def test_curve_quantile_derivative_consistent(family, c):
    params = np.array([2e-3, 1e-4, c, 0.02, 0.97])
    u = np.array([0.1, 0.5, 0.9])
    I = params[0] + params[1] * fam.family_quantile(family, u, c)
    np.testing.assert_allclose(fam.family_probability(family, I, params),
                               0.02 + 0.95 * u, rtol=1e-12)
    cur = np.linspace(1.5e-3, 2.5e-3, 41)
    h = 1e-9
    num = (fam.family_probability(family, cur + h, params)
           - fam.family_probability(family, cur - h, params)) / (2 * h)
    np.testing.assert_allclose(fam.family_derivative(family, cur, params), num, rtol=1e-5,
                               atol=1e-3)
    loc, s = fam.from_i50_window(family, 2e-3, 3e-4, c)
    q = fam.family_quantile(family, np.array([0.1, 0.5, 0.9]), c)
    np.testing.assert_allclose([loc + s * q[1], s * (q[2] - q[0])], [2e-3, 3e-4], rtol=1e-12)


def test_thermal_is_the_neel_brown_law():
    tau0, tp = 1e-9, 1e-8
    loc, s = 1.9e-3, 8e-5
    ic, delta = fam.thermal_parameters(loc, s, tau0, tp)
    I = np.linspace(1.5e-3, 2.3e-3, 17)
    neel = 1.0 - np.exp(-(tp / tau0) * np.exp(-delta * (1.0 - I / ic)))
    np.testing.assert_allclose(fam.family_probability("thermal", I, [loc, s, 0, 0, 1]), neel,
                               rtol=1e-10, atol=1e-15)
    assert delta > 0 and ic > loc  # Ic sits above the 63 % point for t_p > tau0


@pytest.mark.parametrize("family", fam.PARAMETRIC)
@pytest.mark.parametrize("fit_levels", [False, True])
def test_score_and_information_match_finite_differences(family, fit_levels):
    rng = np.random.default_rng(7)
    d, m = 3, 11
    x = np.tile(np.linspace(-1, 1, m), (d, 1))
    n = rng.integers(30, 80, size=(d, m)).astype(float)
    k = rng.binomial(n.astype(int), 0.05 + 0.9 / (1 + np.exp(-4 * x))).astype(float)
    cols = [rng.normal(0, 0.2, d), np.log(rng.uniform(0.2, 0.4, d))]
    if family == "asymmetric":
        cols.append(rng.normal(0, 0.5, d))
    if fit_levels:
        cols += [rng.uniform(0.02, 0.1, d), rng.uniform(0.85, 0.97, d)]
    theta = np.column_stack(cols)
    ll, score, info = fam._evaluate(family, x, n, k, theta, fit_levels, 0.03, 0.96)
    p = theta.shape[1]
    eps = 1e-6
    for j in range(p):
        e = np.zeros(p)
        e[j] = eps
        num = (fam._evaluate(family, x, n, k, theta + e, fit_levels, 0.03, 0.96, False)
               - fam._evaluate(family, x, n, k, theta - e, fit_levels, 0.03, 0.96, False))
        np.testing.assert_allclose(score[:, j], num / (2 * eps), rtol=1e-5, atol=1e-5)
    # Expected information = sum n J J' / (P (1 - P)) with J the Jacobian of P.
    a, b, c, lo, hi = fam._unpack(theta, family, fit_levels, 0.03, 0.96)

    def P_of(t):
        aa, bb, cc, ll_, hh = fam._unpack(t, family, fit_levels, 0.03, 0.96)
        return np.stack([fam.family_probability(family, x[i] * 1.0,
                                                [aa[i, 0], np.exp(bb[i, 0]), cc[i, 0],
                                                 ll_[i, 0], hh[i, 0]]) for i in range(d)])
    J = np.stack([(P_of(theta + eps * np.eye(p)[j]) - P_of(theta - eps * np.eye(p)[j]))
                  / (2 * eps) for j in range(p)], axis=2)
    P = P_of(theta)
    ref = np.einsum("dm,dmp,dmq->dpq", n / (P * (1 - P)), J, J)
    np.testing.assert_allclose(info, ref, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# each family recovers its own truth, with honest intervals
# ---------------------------------------------------------------------------------------
_CASES = [("logistic", 1.0), ("probit", 1.0), ("thermal", 1.0), ("asymmetric", 3.0)]


@pytest.mark.parametrize("family, nu", _CASES)
def test_family_recovers_its_truth(family, nu, global_random_seed):
    N = 400
    base = _base(N, global_random_seed)
    pop = family_population(family, base.i50, base.window, shape=nu)
    m = simulate_measurements(pop, pulses=200, span=2.0, random_state=global_random_seed + 1)
    res = calibrate(m, model=family)
    full = res.per_device
    own = full["family"] == family
    # A shape parameter can run to its bound on a few devices (the likelihood
    # flattens towards the Gumbel limit); those fall back, flagged.
    assert _binomial_ok(int(own.sum()), N, 0.99, 1.0)
    assert (full["unidentified"] == ~own).all() and (full["fallback"] == ~own).all()
    f = {k: v[own] for k, v in full.items()}
    pop = pop[own]
    N = int(own.sum())
    assert f["converged"].all() and not f["stuck"].any()
    assert np.median(np.abs(f["i50"] / pop.i50 - 1)) < 0.01
    assert np.median(np.abs(f["window"] / pop.window - 1)) < 0.06
    n_checks = 4 * 4  # 2 quantities x 2 bands, and the shape/thermal checks
    a = ALPHA / n_checks
    z_i = (f["i50"] - pop.i50) / f["i50_se"]
    z_w = np.log(f["window"] / pop.window) / (f["window_se"] / f["window"])
    for name, z, lo, hi in (("i50", z_i, f["i50_ci_low"], f["i50_ci_high"]),
                            ("window", z_w, f["window_ci_low"], f["window_ci_high"])):
        truth = pop.i50 if name == "i50" else pop.window
        # 95 % intervals cover; Wald intervals at 200 pulses are within a
        # percent or two of nominal, hence the band of true coverages.
        cov95 = int(np.sum((lo <= truth) & (truth <= hi)))
        assert _binomial_ok(cov95, N, 0.93, 0.965, a), (name, cov95)
        # The +-1 SE band covers 68 %: standard errors 1.5x too large (87 %) or
        # too small (50 %) fail.
        cov68 = int(np.sum(np.abs(z) < 1.0))
        assert _binomial_ok(cov68, N, 0.64, 0.72, a), (name, cov68)
    np.testing.assert_allclose(f["window"], WINDOW_PER_SCALE * f["scale"])
    np.testing.assert_allclose(f["window_se"], WINDOW_PER_SCALE * f["scale_se"])
    if family == "asymmetric":
        z = (f["shape"] - nu) / f["shape_se"]
        assert _binomial_ok(int(np.sum(np.abs(z) < 1)), N, 0.62, 0.72, a)
        inside = (f["shape_ci_low"] <= nu) & (nu <= f["shape_ci_high"])
        assert _binomial_ok(int(inside.sum()), N, 0.92, 0.965, a)
    if family == "thermal":
        t = _truth(pop)[own]
        ic, delta = fam.thermal_parameters(t[:, 0], t[:, 1])
        for name, truth in (("ic", ic), ("delta", delta)):
            est, se = f[name], f[f"{name}_se"]
            assert _binomial_ok(int(np.sum(np.abs(est - truth) < se)), N, 0.62, 0.72, a)
            inside = (f[f"{name}_ci_low"] <= truth) & (truth <= f[f"{name}_ci_high"])
            assert _binomial_ok(int(inside.sum()), N, 0.93, 0.965, a)
    # Correct models: deviance tests reject rarely (p < 1e-3 for ~0.1 %).
    assert _binomial_ok(int(f["rejected"].sum()), N, 0.0, 0.01, a)
    assert not f["unusable"].any()


def test_thermal_parameters_follow_tau0_and_pulse_width():
    base = _base(50, 0)
    pop = family_population("thermal", base.i50, base.window)
    m = simulate_measurements(pop, pulses=200, random_state=1)
    a = calibrate(m, model="thermal").per_device
    b = calibrate(m, model="thermal", tau0=1e-10, pulse_width=1e-6).per_device
    np.testing.assert_allclose(a["i50"], b["i50"])  # the curve is the same ...
    r_a, r_b = math.log(10.0), math.log(1e4)
    np.testing.assert_allclose(a["delta"] - r_a, b["delta"] - r_b, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(a["ic"] / a["delta"], b["ic"] / b["delta"], rtol=1e-9)
    with pytest.raises(ValueError, match="pulse_width must be > tau0"):
        calibrate(m, model="thermal", tau0=1e-6, pulse_width=1e-8)


# ---------------------------------------------------------------------------------------
# standard errors on a one-sided sweep (#12)
# ---------------------------------------------------------------------------------------
def test_standard_errors_are_inverse_fisher_on_one_sided_sweep(global_random_seed):
    # A sweep covering only the lower part of the curve correlates I50 and scale
    # strongly; 1 / diag(information) would then underestimate both errors.
    N = 400
    pop = DevicePopulation(np.full(N, 2e-3), np.full(N, 6e-5))
    cur = np.linspace(2e-3 - 4 * 6e-5, 2e-3 - 0.5 * 6e-5, 15)   # P 0.02 .. 0.38
    exp = expected_standard_errors(pop, currents=cur, pulses=300)
    m = simulate_measurements(pop, currents=cur, pulses=300, random_state=global_random_seed)
    f = calibrate(m).per_device
    z = stats.norm.ppf(1 - ALPHA / 8)
    for name, truth in (("i50", 2e-3), ("scale", 6e-5)):
        se_exp = exp[name][0]
        # Observed-information SEs are close to the expected ones ...
        assert abs(np.median(f[f"{name}_se"]) / se_exp - 1) < 0.1
        # ... and to the scatter of the estimates: sum of squared z ~ chi2(N).
        dev = f[name] - truth if name == "i50" else np.log(f["scale"] / truth) * truth
        chi = float(np.sum((dev / se_exp) ** 2))
        assert stats.chi2.ppf(ALPHA / 8, N) * 0.9 < chi < stats.chi2.isf(ALPHA / 8, N) * 1.1, \
            (name, chi)
        assert abs(np.mean(dev)) < z * se_exp / math.sqrt(N) + 0.05 * se_exp
    # 1/diag(I) is far smaller here, so the check above distinguishes the two.
    s = pop.scale[:, None]
    zz = (np.broadcast_to(cur, (N, cur.size)) - pop.i50[:, None]) / s
    sig = 1 / (1 + np.exp(-zz))
    w = 300 * sig * (1 - sig)
    diag_se = 1 / np.sqrt((w / s ** 2).sum(1))
    assert diag_se[0] < 0.55 * exp["i50"][0]
    np.testing.assert_allclose(exp["window"], WINDOW_PER_SCALE * exp["scale"])


# ---------------------------------------------------------------------------------------
# model selection
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, nu, selection", [("probit", 1.0, "aic"),
                                                   ("thermal", 1.0, "aic"),
                                                   ("asymmetric", 3.0, "aic"),
                                                   ("logistic", 1.0, "bic")])
def test_auto_picks_the_true_family(family, nu, selection, global_random_seed):
    # 1000 pulses x 25 currents over +-2 windows: measured misclassification
    # below 1 % for every family (AIC prefers the nested asymmetric curve for
    # ~16 % of logistic devices, as its chi2(1) > 2 rule says; BIC does not).
    N = 100
    base = _base(N, global_random_seed)
    pop = family_population(family, base.i50, base.window, shape=nu)
    m = simulate_measurements(pop, pulses=1000, span=2.0, random_state=global_random_seed)
    res = calibrate(m, model="auto", selection=selection)
    f = res.per_device
    right = int(np.sum(f["family"] == family))
    assert _binomial_ok(right, N, 0.97, 1.0), (family, np.unique(f["family"], return_counts=True))
    assert set(res.family_fits) == {"logistic", "probit", "thermal", "asymmetric"}
    ok = f["family"] == family
    assert (f["runner_up"][ok] != family).all() and (f[f"delta_{selection}"][ok] > 0).all()
    # delta = runner-up's criterion minus the chosen one's, from the stored fits.
    d = int(np.flatnonzero(ok)[0])
    ff = res.family_fits
    crit = {name: ff[name][selection][d] for name in ff}
    assert min(crit, key=crit.get) == family
    second = sorted(crit.values())[1]
    assert f[f"delta_{selection}"][d] == pytest.approx(second - crit[family])
    assert "families:" in res.report() and f"{family} " in res.report()


def test_misspecified_logistic_on_thermal_data_is_detected():
    # The protocol: 48 devices, 30 currents x 400 pulses, thermal truth.
    base = _base(48, 11)
    pop = family_population("thermal", base.i50, base.window)
    m = simulate_measurements(pop, pulses=400, n_points=30, span=2.0, random_state=3)
    lg = calibrate(m).per_device
    auto = calibrate(m, model="auto").per_device
    # The logistic is close inside the window (usable) but rejected ...
    assert lg["rejected"].mean() > 0.5 and lg["poor_fit"].tolist() == lg["rejected"].tolist()
    assert np.median(auto["max_error"]) < 0.8 * np.median(lg["max_error"])
    # ... and "auto" replaces it, the logistic far behind.
    assert (auto["family"] == "thermal").mean() > 0.9
    assert auto["rejected"].mean() < 0.1
    th = auto["family"] == "thermal"
    assert np.median(auto["delta_aic"][th]) > 10


# ---------------------------------------------------------------------------------------
# fit quality: max error, unusable, overdispersion
# ---------------------------------------------------------------------------------------
def test_unusable_is_separate_from_rejected(global_random_seed):
    cur = np.linspace(1e-3, 3e-3, 21)
    rng = np.random.default_rng(global_random_seed)
    good = DevicePopulation(np.full(200, 2e-3), np.full(200, 1.5e-4))
    # Few pulses: noisy points (max |error| ~ 0.1) but nothing provably wrong.
    m = simulate_measurements(good, currents=cur, pulses=30, random_state=global_random_seed)
    f = calibrate(m).per_device
    assert np.median(f["max_error"]) > 0.05
    # The bound holds per device at 95 % (Bonferroni over currents, Wilson):
    # at most ~5 % flagged, where dropping the margin would flag most.
    assert _binomial_ok(int(f["unusable"].sum()), 200, 0.0, 0.05)
    # Two-step devices: the logistic misses by ~0.2; with many pulses that is both
    # rejected and provably unusable.
    p_true = 0.5 * (cur > 1.6e-3) + 0.5 * (cur > 2.4e-3)
    k = rng.binomial(2000, np.tile(p_true, 20))
    t = {"device": np.repeat(np.arange(20), 21), "current": np.tile(cur, 20),
         "pulses": np.full(420, 2000), "switched": k}
    res = calibrate(t)
    g = res.per_device
    assert g["unusable"].all() and g["rejected"].all() and (g["max_error_low"] > 0.05).all()
    P = res.curve(0, cur)
    err = np.abs(P - k[:21] / 2000)
    assert g["max_error"][0] == pytest.approx(err.max())
    q = int(np.argmax(err))
    assert g["max_error_se"][0] == pytest.approx(math.sqrt(P[q] * (1 - P[q]) / 2000))
    # The bound is below the observed error by the (Bonferroni) Wilson margin.
    assert (g["max_error_low"] < g["max_error"]).all()
    res = calibrate(t, max_error_tolerance=0.5)
    assert not res.per_device["unusable"].any()


def test_overdispersion_estimate(global_random_seed):
    rng = np.random.default_rng(global_random_seed)
    N, cur, n = 300, np.linspace(1.6e-3, 2.4e-3, 25), 400
    pop = DevicePopulation(np.full(N, 2e-3), np.full(N, 1e-4))
    P = pop.probability(np.tile(cur[:, None], (1, N))).T
    out = {}
    for rho in (0.0, 0.02):
        if rho:
            ab = (1 - rho) / rho
            p = rng.beta(np.maximum(P * ab, 1e-9), np.maximum((1 - P) * ab, 1e-9))
        else:
            p = P
        k = rng.binomial(n, p)
        t = {"device": np.repeat(np.arange(N), 25), "current": np.tile(cur, N),
             "pulses": np.full(N * 25, n), "switched": k.ravel()}
        out[rho] = calibrate(t).per_device["overdispersion"]
    assert np.median(out[0.0]) < 0.002
    assert 0.01 < np.median(out[0.02]) < 0.03


# ---------------------------------------------------------------------------------------
# non-monotone devices and the table model
# ---------------------------------------------------------------------------------------
def test_table_model_represents_overdrive(global_random_seed):
    N = 40
    base = _base(N, global_random_seed)
    pop = family_population("logistic", base.i50, base.window, rollover=(1.25, 0.7))
    cur = base.i50[:, None] * np.linspace(0.6, 2.6, 41)[None, :]
    m = simulate_measurements(pop, currents=cur, pulses=1000, random_state=global_random_seed)
    res = calibrate(m, model="table")
    f, P = res.per_device, res.population
    assert f["nonmonotone"].all() and (f["family"] == "table").all()
    assert P.nonparametric.all()
    hi = base.i50 * 2.4
    truth = pop.probability(hi)
    fitted = P.probability(hi)
    # Bins of >= 1000 pulses (smoothed, or raw where the data reject smoothing):
    # within binomial noise of the truth on the linear over-drive fall.
    tol = stats.norm.isf(ALPHA / (2 * N)) * np.sqrt(truth * (1 - truth) / 1000)
    assert np.all(np.abs(fitted - truth) < tol)
    assert np.all(fitted < 0.8)  # ... the device really switches less again
    # The emulator samples the table: switching frequency at 2.4 I50 over 4000 pulses.
    bits = P.sample(np.tile(hi, (4000, 1)), random_state=global_random_seed)
    z = (bits.mean(0) - fitted) / np.sqrt(fitted * (1 - fitted) / 4000)
    assert np.abs(z).max() < stats.norm.isf(ALPHA / (2 * N))
    # Wilson intervals of the bins contain the raw proportions.
    b = res.family_fits["table"]["bins"][0]
    assert np.all((b["ci_low"] <= b["p"]) & (b["p"] <= b["ci_high"]))
    # A logistic cannot: isotonic pools the fall into a plateau at the top.
    iso = calibrate(m, model="isotonic").population.probability(hi)
    assert np.median(iso - truth) > 0.05
    # "auto" hands the non-monotone devices to the table.
    auto = calibrate(m, model="auto").per_device
    assert (auto["family"] == "table").all()


def test_table_keeps_sharp_edges_of_coarse_sweeps(global_random_seed):
    # 30 currents over 0.6-2.5 I50: the switching edge spans ~2 currents, so a
    # smoothed table would miss it by ~0.1; such devices keep their raw bins.
    base = _base(20, global_random_seed)
    pop = family_population("logistic", base.i50, base.window, rollover=(1.3, 0.7))
    cur = base.i50[:, None] * np.linspace(0.6, 2.5, 30)[None, :]
    m = simulate_measurements(pop, currents=cur, pulses=400, random_state=global_random_seed)
    f = calibrate(m, model="table").per_device
    # (A kept smoothing may still miss one point by a few binomial SE.)
    assert not f["rejected"].any() and np.median(f["max_error"]) < 0.02
    raw = calibrate(m, model="table", table_smoothing=0).per_device
    assert (raw["max_error"] <= f["max_error"] + 1e-12).all()


def test_table_bins_pool_many_currents():
    rng = np.random.default_rng(0)
    cur = np.sort(rng.uniform(1e-3, 3e-3, 3000))
    p = 1 / (1 + np.exp(-(cur - 2e-3) / 1e-4))
    t = {"device": np.zeros(3000, int), "current": cur, "switched": rng.random(3000) < p}
    res = calibrate(t, model="table", table_bins=30)
    b = res.family_fits["table"]["bins"][0]
    assert b["current"].size == 30 and b["pulses"].sum() == 3000
    assert np.all(np.diff(b["current"]) > 0)
    mid = res.population.probability(np.array([[2e-3]]))[0, 0]
    assert abs(mid - 0.5) < 0.1


# ---------------------------------------------------------------------------------------
# identifiability, fallbacks and bad arguments
# ---------------------------------------------------------------------------------------
def test_unidentified_families_fall_back():
    # Three currents cannot identify 5 parameters (asymmetric with levels).
    t = {"device": [0, 0, 0, 1, 1, 1, 2, 2, 2], "current": [1e-3, 2e-3, 3e-3] * 3,
         "pulses": [100] * 9, "switched": [5, 50, 95, 0, 0, 0, 10, 60, 100]}
    res = calibrate(t, model="asymmetric", levels="fit")
    f = res.per_device
    assert f["stuck"][1] and f["family"][1] == "constant"
    for d in (0, 2):
        assert f["unidentified"][d] and f["fallback"][d]
        assert f["family"][d] in ("logistic", "isotonic")
        assert np.isfinite(f["i50"][d])
    assert "fell back" in res.report()
    assert set(res.flagged("fallback")) == {0, 2}
    # A step the logistic cannot resolve either: isotonic.
    cur = np.linspace(1e-3, 3e-3, 10)
    step = {"device": np.zeros(10, int), "current": cur, "pulses": np.full(10, 100),
            "switched": np.where(cur > 2.05e-3, 100, 0)}
    g = calibrate(step, model="probit").per_device
    assert g["fallback"][0] and g["family"][0] == "isotonic"
    assert 1.88e-3 < g["i50"][0] < 2.12e-3
    # No NaN parameters without a flag, for any family.
    for model in MODELS:
        h = calibrate(t, model=model).per_device
        nanpar = ~np.isfinite(h["i50"]) & ~h["stuck"]
        assert not (nanpar & ~(h["unidentified"] | h["at_bound"])).any(), model


@pytest.mark.parametrize("kwargs, pattern", [
    ({"model": "spline"}, r"model must be one of 'logistic', 'probit', 'thermal', "
                          r"'asymmetric', 'isotonic', 'table', 'auto'"),
    ({"model": "probit", "method": "isotonic"}, "disagree"),
    ({"selection": "hqc"}, "selection must be 'aic' or 'bic'"),
    ({"model": "table", "levels": "fit"}, "levels applies to the parametric models only"),
    ({"tau0": 0.0}, "tau0 == 0.0, must be > 0"),
    ({"max_error_tolerance": 2.0}, "max_error_tolerance == 2.0, must be <= 1"),
    ({"table_bins": 2}, "table_bins == 2, must be >= 3"),
])
def test_bad_model_arguments(kwargs, pattern):
    t = {"device": [0, 0, 0], "current": [1e-3, 2e-3, 3e-3], "pulses": [10] * 3,
         "switched": [1, 5, 9]}
    with pytest.raises(ValueError, match=pattern):
        calibrate(t, **kwargs)


def test_method_alias_still_works():
    pop = _base(20, 0)
    m = simulate_measurements(pop, random_state=0)
    a, b = calibrate(m, method="sigmoid"), calibrate(m, model="logistic")
    np.testing.assert_array_equal(a.per_device["i50"], b.per_device["i50"])
    assert a.method == "sigmoid" and a.model == "logistic"
    c = calibrate(m, method="isotonic")
    assert c.model == "isotonic" and c.population.nonparametric.all()


# ---------------------------------------------------------------------------------------
# report, units, robust statistics, generic flags
# ---------------------------------------------------------------------------------------
def test_report_microampere_devices_shows_digits():
    pop = DevicePopulation.from_width(0.2, 60, i50_per_um=1e-4, random_state=0)  # 20 uA
    res = calibrate(simulate_measurements(pop, pulses=300, random_state=0))
    text = res.report()
    med = np.median(res.per_device["i50"])
    assert 15e-6 < med < 25e-6
    assert "(uA)" in text
    row = [line for line in text.splitlines() if line.strip().startswith("0.2 ")][0]
    assert f"{res.stats[0]['i50_median'] * 1e6:.4g}" in row
    assert f"{res.stats[0]['window_median'] * 1e6:.4g}" in row
    assert "0.00" not in row  # no milliampere-style leading zeros


def test_units_mixup_is_flagged():
    base = _base(30, 0)
    m = simulate_measurements(base, random_state=0)
    m["current"] = m["current"].copy()
    m["current"][m["device"] == 7] *= 1e3        # one device in mA among amperes
    with pytest.warns(UserWarning, match=r"implausible fitted current.*: 7 \(I50 = \d\.\d+ A\)"):
        res = calibrate(m)
    assert res.flagged("implausible_current") == [7]
    # Robust per-width statistics do not move; the device is named as an outlier.
    row = res.stats[0]
    assert abs(row["i50_median"] / np.median(base.i50) - 1) < 0.02
    assert 7 in row["i50_outliers"] and row["i50_mean"] > 10 * row["i50_median"]
    assert "outliers" in res.report() and "implausible current" in res.report()
    # Microampere devices with one in nA-as-uA: inside 1 nA..1 A, but 1000x off.
    small = DevicePopulation.from_width(0.2, 30, random_state=0)
    m = simulate_measurements(small, random_state=0)
    m["current"] = m["current"].copy()
    m["current"][m["device"] == 3] *= 1e3
    with pytest.warns(UserWarning, match=r"more than 10x from the median"):
        assert calibrate(m).flagged("implausible_current") == [3]


def test_robust_width_fit_and_negative_trend(global_random_seed):
    widths = np.repeat([5.0, 10.0, 20.0, 40.0], 60)
    base = DevicePopulation.from_width(widths, widths.size, random_state=global_random_seed)
    # Windows that shrink with width (a made-up trend) and one broken device.
    window = 4e-4 - 5e-6 * widths
    window = window * np.exp(np.random.default_rng(global_random_seed).normal(0, 0.05,
                                                                           widths.size))
    pop = family_population("logistic", base.i50, window, width=widths)
    m = simulate_measurements(pop, pulses=400, random_state=global_random_seed)
    m["switched"] = m["switched"].copy()
    rows = m["device"] == 3
    m["switched"][rows] = np.round(m["pulses"][rows] * np.linspace(0, 1, rows.sum()) ** 0.1)
    with warnings.catch_warnings():   # the broken device may look like a unit slip
        warnings.simplefilter("ignore", UserWarning)
        res = calibrate(m)
    wf = res.width_fits["window"]
    assert abs(wf["slope"] / -5e-6 - 1) < 0.15 and wf["slope_ci"][1] < 0
    assert wf["slope_ci"][0] < -5e-6 < wf["slope_ci"][1] or abs(wf["slope"] + 5e-6) < 4 * wf[
        "slope_se"]
    assert "decreases with width" in res.report()
    assert res.width_fits["i50"]["slope"] > 0 and "increases with width" in res.report()


def test_flags_added_later_are_shown_generically():
    pop = _base(10, 0)
    res = calibrate(simulate_measurements(pop, random_state=0))
    extra = np.zeros(10, dtype=bool)
    extra[[2, 5]] = True
    res.per_device["not_bracketed"] = extra
    res.per_device["extrapolated"] = np.zeros(10, dtype=bool)
    assert res.flagged("not_bracketed") == [2, 5]
    assert "2 not_bracketed" in res.report() and "0 extrapolated" in res.report()
    assert res.to_dict()["flags"]["not_bracketed"] == 2
    assert "not_bracketed" in res.summary
    with pytest.raises(ValueError, match="not_bracketed"):
        res.flagged("nope")


# ---------------------------------------------------------------------------------------
# mixed-family populations drive the emulator and training
# ---------------------------------------------------------------------------------------
def test_auto_population_curves_derivatives_and_samples(tmp_path):
    base = _base(60, 5)
    fams = np.array(["logistic", "probit", "thermal", "asymmetric"] * 15)
    parts = [family_population(f, base.i50[fams == f], base.window[fams == f],
                               shape=3.0) for f in ("logistic", "probit", "thermal", "asymmetric")]
    tabs = []
    for f in ("logistic", "probit", "thermal", "asymmetric"):
        tabs.append(simulate_measurements(parts[len(tabs)], pulses=1000, span=2.0,
                                          random_state=len(tabs)))
    off, table = 0, {k: [] for k in ("device", "current", "pulses", "switched")}
    for t in tabs:
        for key in table:
            table[key].append(t[key] + (off if key == "device" else 0))
        off += 15
    table = {k: np.concatenate(v) for k, v in table.items()}
    res = calibrate(table, model="auto", selection="bic")
    f, P = res.per_device, res.population
    assert (f["family"] == np.repeat(["logistic", "probit", "thermal", "asymmetric"], 15)).mean() \
        > 0.9
    # Table devices for the non-logistic families; their curves equal the fitted family.
    np.testing.assert_array_equal(P.nonparametric, f["family"] != "logistic")
    I = f["i50"][None, :] + f["window"][None, :] * np.linspace(-1.5, 1.5, 13)[:, None]
    for d in range(60):
        fam_d = f["family"][d]
        ref = res.curve(d, I[:, d], family=fam_d)
        np.testing.assert_allclose(P.probability(I)[:, d], ref, atol=1e-4)
        params = res.family_fits[fam_d]["params"][d]
        np.testing.assert_allclose(P.derivative(I)[:, d],
                                   fam.family_derivative(fam_d, I[:, d], params),
                                   rtol=0.02, atol=0.02 * 1 / f["window"][d])
    assert P.table_error() < 1e-4
    bits = P.sample(np.tile(f["i50"], (4000, 1)), random_state=0)
    p50 = P.probability(f["i50"])
    z = (bits.mean(0) - p50) / np.sqrt(p50 * (1 - p50) / 4000)
    assert np.abs(z).max() < stats.norm.isf(ALPHA / 120)
    P.save(tmp_path / "p.json")
    back = DevicePopulation.load(tmp_path / "p.json")
    np.testing.assert_allclose(back.probability(I), P.probability(I))
    assert back.meta["calibration"]["families"] == list(f["family"])


def test_training_on_thermal_devices():
    from sklearn.model_selection import train_test_split

    from sotcore.datasets import load_digits
    X, y = load_digits()
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    base = _base(32, 0)
    pop = family_population("thermal", base.i50, base.window)
    calib = calibrate(simulate_measurements(pop, pulses=300, random_state=1),
                      model="auto").population
    assert calib.nonparametric.sum() >= 28
    for training in ("hardware-aware", "hil"):
        kw = {"surrogate": "calibrated", "calibration": calib} if training == "hil" else {}
        clf = sotcore.SOTClassifier(hidden_layer_sizes=(32,), devices=calib, training=training,
                                    max_iter=3, n_samples=4, batch_size=32,
                                    learning_rate_init=1e-2, random_state=0, **kw)
        clf.fit(Xtr, ytr)
        assert clf.score(Xte, yte) > 0.5, training


def test_family_figures_and_cli(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from sotcore.cli import main
    from sotcore.plotting import plot_family_fits
    base = _base(12, 0)
    pop = family_population("thermal", base.i50, base.window)
    simulate_measurements(pop, pulses=300, random_state=0, path=tmp_path / "m.csv")
    assert main(["calibrate", str(tmp_path / "m.csv"), "--model", "auto", "--plots",
                 str(tmp_path / "figs"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "auto: family per device by AIC" in out and "families.png" in out
    png = (tmp_path / "figs" / "families.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20000
    res = calibrate(tmp_path / "m.csv", model="auto")
    fig = plot_family_fits(res, devices=[0, 3])
    top = fig.axes[0]
    labels = [t.get_text() for t in top.get_legend().get_texts()]
    assert f"{res.per_device['family'][0]} (chosen)" in labels
    assert {"logistic", "probit", "thermal", "asymmetric"} <= {
        lab.replace(" (chosen)", "") for lab in labels}
    assert main(["simulate", "-o", str(tmp_path / "t.csv"), "--family", "asymmetric",
                 "--shape", "3", "--rollover", "1.3", "0.7", "--n-devices", "4",
                 "--seed", "1"]) == 0
    assert "asymmetric curves with over-drive" in capsys.readouterr().out
    assert main(["calibrate", str(tmp_path / "m.csv"), "--model", "thermal",
                 "--max-error", "0.1"]) == 0
    assert "thermal fit" in capsys.readouterr().out


def test_to_dict_json_and_summary_columns(tmp_path):
    pop = _base(20, 0)
    res = calibrate(simulate_measurements(pop, random_state=0), model="auto")
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert d["model"] == "auto" and sum(d["families"].values()) == 20
    assert d["flags"]["rejected"] == int(res.per_device["rejected"].sum())
    res.save_summary(tmp_path / "s.csv")
    head = (tmp_path / "s.csv").read_text().splitlines()[0].split(",")
    for key in ("family", "runner_up", "delta_aic", "max_error", "overdispersion", "unusable",
                "rejected"):
        assert key in head
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate(simulate_measurements(pop, random_state=0), model="auto", levels="fit")


def test_input_sizes_are_bounded(tmp_path, monkeypatch):
    import sotcore.calibration._measurements as meas
    m = simulate_measurements(_base(5, 0), random_state=0, path=tmp_path / "m.csv")
    monkeypatch.setattr(meas, "MAX_CELLS", 100)   # 5 devices x 25 currents = 125 cells
    with pytest.raises(ValueError, match=r"5 devices with up to 25 distinct currents .* "
                                         r"exceed 100 cells"):
        calibrate(m)
    monkeypatch.setattr(meas, "MAX_CELLS", 10_000)
    monkeypatch.setattr(meas, "MAX_CSV_ROWS", 50)
    with pytest.raises(ValueError, match=r"m\.csv: more than 50 data rows"):
        calibrate(tmp_path / "m.csv")
    assert len(calibrate(m)) == 5


@pytest.mark.parametrize("kwargs, pattern", [
    ({"family": "gompertz"}, "family must be one of"),
    ({"family": "isotonic"}, "family must be one of"),
    ({"window": -1.0}, "window"),
    ({"shape": 0.0}, "shape"),
    ({"rollover": (1.2,)}, "rollover must be a pair"),
    ({"rollover": (1.2, 1.5)}, "0 <= floor <= 1"),
])
def test_family_population_bad_arguments(kwargs, pattern):
    args = {"family": "probit", "i50": [2e-3, 2.1e-3], "window": 3e-4} | kwargs
    with pytest.raises(ValueError, match=pattern):
        family_population(args.pop("family"), args.pop("i50"), args.pop("window"), **args)
