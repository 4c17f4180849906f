"""The fused kernels (``_sot_infer.h``, ``_sot_optim.h``, ``_sot_train.h``): inference, optimiser steps, surrogate, row hash.

* ``_ref_fused`` re-implements the fused inference kernel's *bits* in NumPy
  (interpolated thresholds, the 16-bit counter-based draws with the rare
  second halves) and its output layer in float64; with integer output
  weights any differing bit would move a probability by far more than the
  float32 rounding, so agreement to 1e-6 means identical bits.
* The statistical tests compare with the exact expectation of the averaged
  softmax (all 2**H bit patterns of a small layer, each weighted by its
  probability under the devices' tables), for the fused and the unfused path.
"""
import itertools
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import sotcore
from sotcore import _kernels
from sotcore.backends import EmulatedBackend
from sotcore.devices import DeviceAging
from sotcore._fused import FIRST_LAYER_ROWS
from sotcore.network import (CurrentMapping, StochasticMLP, _fusable,
                             softmax)
from sotcore.training import SGD, Adam, nominal_curve
from _splitmix import GAMMA, MASK64, mix64 as _mix64, stream_key as _stream_key

_PATHS = ("scalar", "avx2", "avx512")
ISAS = _PATHS[:_PATHS.index(_kernels.sampler_isa_max()) + 1]


# ---------------------------------------------------------------------------
# NumPy references
def _ref_thresholds(Z, A, B, table):
    """The interpolated uint32 threshold of every (row, device), exactly."""
    G = table.shape[1]
    smax = np.float32(4096) * np.float32(G - 1)
    with np.errstate(all="ignore"):
        s = Z * A                       # float32 product, then sum (no FMA)
        s = s + B
        s = np.where(s > 0, s, np.float32(0))
        s = np.where(s < smax, s, smax)
    q = s.astype(np.uint64)
    g = np.minimum(q >> np.uint64(12), np.uint64(G - 1))
    f = q & np.uint64(4095)
    g1 = np.minimum(g + np.uint64(1), np.uint64(G - 1))
    j = np.arange(Z.shape[1])[None, :]
    t0 = table[j, g.astype(np.intp)].astype(np.uint64)
    t1 = table[j, g1.astype(np.intp)].astype(np.uint64)
    return (t0 * (np.uint64(4096) - f) + t1 * f) >> np.uint64(12)


def _ref_bits(Z, A, B, table, seed, stream, row_keys, T):
    """(n, T, H) bits of the fused kernel."""
    n, H = Z.shape
    Hp = (H + 31) // 32 * 32
    thr = np.zeros((n, Hp), np.uint64)
    thr[:, :H] = _ref_thresholds(Z, A, B, table)
    th, tl = thr >> np.uint64(16), thr & np.uint64(0xFFFF)
    key = np.uint64(_stream_key(seed, stream))
    key2 = np.uint64(_stream_key(~seed & MASK64, stream))
    j = np.arange(Hp, dtype=np.uint64)[None, :]
    out = np.zeros((n, T, H), np.uint8)
    with np.errstate(over="ignore"):
        for t in range(T):
            q = (np.asarray(row_keys, np.uint64) + np.uint64(t) * np.uint64(GAMMA))[:, None]
            u = _mix64(key + (q * np.uint64(Hp // 4) + j // np.uint64(4) + np.uint64(1))
                       * np.uint64(GAMMA))
            w = (u >> (np.uint64(16) * (j % np.uint64(4)))) & np.uint64(0xFFFF)
            lo = _mix64(key2 + (q * np.uint64(Hp) + j + np.uint64(1)) * np.uint64(GAMMA)) \
                & np.uint64(0xFFFF)
            out[:, t] = ((w < th) | ((w == th) & (lo < tl)))[:, :H]
    return out


def _ref_proba(bits, W2, b2):
    n, T, H = bits.shape
    z = bits.reshape(n * T, H).astype(np.float64) @ W2.astype(np.float64) + b2
    p = softmax(z).reshape(n, T, -1).mean(axis=1)
    return p / p.sum(axis=1, keepdims=True)


def _model(H, C, rng, integer_weights=True, G=None):
    """Kernel arguments for H devices of a from_width population (or random tables)."""
    pop = sotcore.DevicePopulation.from_width(20.0, H, random_state=int(rng.integers(99)))
    _, _, table = pop.table()
    a, b = pop._table_cache[np.float64]
    if G is not None:
        table = np.sort(rng.integers(0, 2**32, (H, G), dtype=np.uint64), axis=1).astype(np.uint32)
        a = np.full(H, (G - 1) / (40 * pop.scale.mean()))
        b = -(pop.i50 - 20 * pop.scale.mean()) * a
    unit = float(pop.scale.mean())
    b1 = (pop.i50 / unit).astype(np.float32)
    A = (4096 * a * unit).astype(np.float32)
    B = (4096 * (a * unit * b1.astype(np.float64) + b)).astype(np.float32)
    if integer_weights:
        W2 = rng.integers(-3, 4, (H, C)).astype(np.float32)
    else:
        W2 = rng.standard_normal((H, C)).astype(np.float32)
    b2 = rng.standard_normal(C).astype(np.float32)
    Hp, Cp = _kernels.fused_padded_sizes(H, C)
    R = np.empty(((Hp // 8) * 256, Cp), np.float32)
    _kernels.subset_sum_table(W2, R)
    bias = np.zeros(Cp, np.float32)
    bias[:C] = b2
    return dict(A=A, B=B, table=np.ascontiguousarray(table), R=R, bias=bias, W2=W2, b2=b2)


def _fused(md, Z, keys, T, seed=7, stream=3, n_threads=1, block_rows=512, C=None):
    C = md["W2"].shape[1] if C is None else C
    out = np.full((Z.shape[0], C), np.nan)
    flag = _kernels.fused_predict(Z, md["A"], md["B"], md["table"], md["R"], md["bias"], seed,
                                  stream, keys, T, out, n_threads, block_rows)
    return out, flag


@pytest.fixture
def isa(request):
    _kernels.sampler_isa(request.param)
    yield request.param
    _kernels.sampler_isa("best")


# ---------------------------------------------------------------------------
# Exact agreement with the NumPy reference, on every path, thread count, blocking
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("n, H, C, T", [(5, 37, 3, 3), (300, 500, 10, 2), (70, 64, 20, 2),
                                        (3, 1, 1, 2), (130, 33, 16, 5), (40, 96, 40, 1)])
def test_fused_matches_reference_bits(isa, n, H, C, T, global_random_seed):
    rng = np.random.default_rng(global_random_seed)
    md = _model(H, C, rng)
    Z = (rng.standard_normal((n, H)) * 3).astype(np.float32)
    keys = rng.integers(0, 2**64, n, dtype=np.uint64)
    got, flag = _fused(md, Z, keys, T)
    assert not flag
    ref = _ref_proba(_ref_bits(Z, md["A"], md["B"], md["table"], 7, 3, keys, T), md["W2"],
                     md["b2"])
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-12)
    for nt, br in [(2, 512), (1, 7), (2, 1), (3, 64)]:
        np.testing.assert_array_equal(_fused(md, Z, keys, T, n_threads=nt, block_rows=br)[0],
                                      got)


def test_fused_paths_are_bit_identical(global_random_seed):
    rng = np.random.default_rng(global_random_seed)
    for H, C in [(500, 10), (45, 30)]:
        md = _model(H, C, rng, integer_weights=False)
        Z = (rng.standard_normal((200, H)) * 4).astype(np.float32)
        keys = rng.integers(0, 2**64, 200, dtype=np.uint64)
        outs = []
        for isa in ISAS:
            _kernels.sampler_isa(isa)
            try:
                outs.append(_fused(md, Z, keys, 6)[0])
            finally:
                _kernels.sampler_isa("best")
        for o in outs[1:]:
            np.testing.assert_array_equal(o, outs[0])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 30), H=st.integers(1, 70), C=st.integers(1, 35), T=st.integers(1, 4),
       G=st.integers(2, 40), scale=st.sampled_from([0.0, 1.0, 30.0, 1e30]),
       seed=st.integers(0, 2**32 - 1))
def test_fused_property_random_tables_and_extremes(n, H, C, T, G, scale, seed):
    rng = np.random.default_rng(seed)
    md = _model(H, C, rng, G=G)
    Z = (rng.standard_normal((n, H)) * scale).astype(np.float32)
    keys = rng.integers(0, 2**64, n, dtype=np.uint64)
    outs = {}
    for isa in ISAS:
        _kernels.sampler_isa(isa)
        try:
            outs[isa] = _fused(md, Z, keys, T, seed=seed, n_threads=2, block_rows=3)
        finally:
            _kernels.sampler_isa("best")
    got, flag = outs[ISAS[0]]
    assert not flag
    for o, f in outs.values():
        np.testing.assert_array_equal(o, got)
    ref = _ref_proba(_ref_bits(Z, md["A"], md["B"], md["table"], seed, 3, keys, T), md["W2"],
                     md["b2"])
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_thresholds_of_saturated_and_equal_words(isa):
    """thr = 0 never fires; thr = 2**32 - 1 always (but once in 2**32); tables
    constant at a value v fire with probability v / 2**32 -- exercised with
    v = 65536 th + tl so that the rare second halves decide (about 9 draws
    of the 192,000 hit w16 == th)."""
    rng = np.random.default_rng(0)
    H, G, T = 64, 4, 4000
    table = np.zeros((H, G), np.uint32)
    table[:16] = 0
    table[16:32] = 2**32 - 1
    table[32:48] = 0x00010000 + 0x8000       # th = 1, tl = 1/2: P = (1 + 1/2) / 65536
    table[48:] = 0x80000000                   # P = 1/2
    A = np.ones(H, np.float32)
    B = np.zeros(H, np.float32)
    W2 = np.eye(H, dtype=np.float32)[:, :H]
    Hp, Cp = _kernels.fused_padded_sizes(H, H)
    R = np.empty(((Hp // 8) * 256, Cp), np.float32)
    _kernels.subset_sum_table(W2, R)
    keys = rng.integers(0, 2**64, 3, dtype=np.uint64)
    Z = np.zeros((3, H), np.float32)
    bits = _ref_bits(Z, A, B, table, 1, 2, keys, T)
    assert bits[:, :, :16].sum() == 0 and bits[:, :, 16:32].all()
    frac = bits[:, :, 48:].mean()
    assert abs(frac - 0.5) < 5 * np.sqrt(0.25 / bits[:, :, 48:].size)
    out = np.empty((3, H))
    _kernels.fused_predict(Z, A, B, table, R, np.zeros(Cp, np.float32), 1, 2, keys, T, out, 1)
    np.testing.assert_allclose(out, _ref_proba(bits, W2, np.zeros(H)), atol=1e-9)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_fused_tables_beyond_2_19_points(isa):
    """More than 2**19 grid points: the AVX2 path's signed conversion cannot
    hold 4096 x, so its thresholds take the scalar path; bits stay exact."""
    rng = np.random.default_rng(3)
    H, C, G = 3, 2, (1 << 19) + 40
    md = _model(H, C, rng, G=G)
    # A ramp to 2**31 and a last point at 2**32 - 1: a wrong grid coordinate at
    # the top of the table (clamped inputs, z > 4) changes P from 1 to ~1/2.
    md["table"][:] = np.linspace(0, 2**31, G).astype(np.uint32)
    md["table"][:, -1] = 2**32 - 1
    md["A"][:] = np.float32(4096 * (G - 1) / 8.0)
    md["B"][:] = np.float32(4096 * (G - 1) / 2.0)
    Z = (rng.standard_normal((20, H)) * 4).astype(np.float32)
    keys = rng.integers(0, 2**64, 20, dtype=np.uint64)
    got, flag = _fused(md, Z, keys, 4)
    assert not flag
    ref = _ref_proba(_ref_bits(Z, md["A"], md["B"], md["table"], 7, 3, keys, 4), md["W2"],
                     md["b2"])
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


def test_nonfinite_z_is_reported_and_clamped():
    rng = np.random.default_rng(1)
    md = _model(40, 4, rng)
    Z = rng.standard_normal((6, 40)).astype(np.float32)
    keys = np.arange(6, dtype=np.uint64)
    Z[2, 5], Z[4, 39] = np.nan, -np.inf
    for isa in ISAS:
        _kernels.sampler_isa(isa)
        try:
            got, flag = _fused(md, Z, keys, 2)
        finally:
            _kernels.sampler_isa("best")
        assert flag
        ref = _ref_proba(_ref_bits(Z, md["A"], md["B"], md["table"], 7, 3, keys, 2), md["W2"],
                         md["b2"])
        np.testing.assert_allclose(got, ref, atol=1e-6)


def test_fused_rejects_bad_shapes():
    rng = np.random.default_rng(0)
    md = _model(40, 4, rng)
    Z = np.zeros((5, 40), np.float32)
    keys = np.zeros(5, np.uint64)
    out = np.zeros((5, 4))
    K = _kernels.fused_predict
    args = dict(Z=Z, A=md["A"], B=md["B"], table=md["table"], R=md["R"], bias=md["bias"],
                seed=0, stream=0, row_keys=keys, n_samples=2, out=out, n_threads=1)

    def call(**kw):
        a = {**args, **kw}
        return K(a["Z"], a["A"], a["B"], a["table"], a["R"], a["bias"], a["seed"], a["stream"],
                 a["row_keys"], a["n_samples"], a["out"], a["n_threads"])
    call()
    for bad in [dict(Z=np.zeros((5, 41), np.float32)), dict(A=md["A"][:-1]),
                dict(table=md["table"][:-1]), dict(table=md["table"][:, :1].copy()),
                dict(R=md["R"][:-256]), dict(R=np.zeros((md["R"].shape[0], 8), np.float32)),
                dict(bias=md["bias"][:-1]), dict(out=np.zeros((4, 4))),
                dict(out=np.zeros((5, 17))), dict(row_keys=keys[:-1]), dict(n_samples=0),
                dict(Z=np.zeros((5, 0), np.float32))]:
        with pytest.raises(ValueError):
            call(**bad)
    with pytest.raises(ValueError):
        K(Z, md["A"], md["B"], md["table"], md["R"], md["bias"], 0, 0, keys, 2, out, 1, 0)
    with pytest.raises(ValueError):
        _kernels.subset_sum_table(md["W2"], np.zeros((10, 16), np.float32))
    assert K(Z[:0], md["A"], md["B"], md["table"], md["R"], md["bias"], 0, 0, keys[:0], 2,
             out[:0], 1) is False


def test_subset_sum_table_exact(global_random_seed):
    rng = np.random.default_rng(global_random_seed)
    for H, C in [(1, 1), (13, 5), (64, 16), (70, 20)]:
        W = rng.integers(-50, 51, (H, C)).astype(np.float32)
        Hp, Cp = _kernels.fused_padded_sizes(H, C)
        R = np.full(((Hp // 8) * 256, Cp), np.nan, np.float32)
        _kernels.subset_sum_table(W, R)
        Wp = np.zeros((Hp, Cp))
        Wp[:H, :C] = W
        s = np.arange(256)
        sub = ((s[:, None] >> np.arange(8)[None, :]) & 1).astype(np.float64)   # (256, 8)
        expect = np.concatenate([sub @ Wp[8 * g:8 * g + 8] for g in range(Hp // 8)])
        np.testing.assert_array_equal(R, expect)


# ---------------------------------------------------------------------------
# Statistics: fused and unfused paths against the exact expectation
class _Unfused(EmulatedBackend):
    """The same emulator, but not eligible for the fused path."""

    def _pulse(self, currents, devices):
        return super()._pulse(currents, devices)


def _small_net(H, C, seed):
    rng = np.random.default_rng(seed)
    pop = sotcore.DevicePopulation.from_width(20.0, H, variability=0.1, random_state=seed)
    i50, s = nominal_curve(pop)
    net = StochasticMLP([4, H, C], CurrentMapping.for_nominal(s))
    net.initialize(rng, i50 / s)
    net.coefs[0] = (rng.standard_normal((4, H)) * 0.8).astype(np.float32)
    net.coefs[1] = (rng.standard_normal((H, C)) * 2.0).astype(np.float32)
    net.intercepts[1] = rng.standard_normal(C).astype(np.float32)
    X = rng.random((5, 4)).astype(np.float32)
    return pop, net, X


def _exact_mean_and_sd(pop, net, X):
    """E and SD of the softmax over all 2**H bit patterns (table probabilities)."""
    z = X.astype(np.float64) @ net.coefs[0] + net.intercepts[0]
    P = pop.table_probability(net.mapping.to_current(z))            # (n, H)
    H = P.shape[1]
    pats = np.array(list(itertools.product([0, 1], repeat=H)), np.float64)   # (2**H, H)
    sm = softmax(pats @ net.coefs[1].astype(np.float64) + net.intercepts[1])  # (2**H, C)
    w = np.prod(np.where(pats[None] == 1, P[:, None, :], 1 - P[:, None, :]), axis=2)
    mean = w @ sm
    sd = np.sqrt(np.maximum(w @ sm ** 2 - mean ** 2, 0))
    return mean, sd


@pytest.mark.parametrize("keyed", [True, False])
def test_fused_and_unfused_agree_with_exact_expectation(global_random_seed, keyed):
    pop, net, X = _small_net(5, 3, global_random_seed)
    mean, sd = _exact_mean_and_sd(pop, net, X)
    T = 20000
    keys = np.arange(len(X), dtype=np.uint64) * np.uint64(977) if keyed else None
    fused = EmulatedBackend(pop, global_random_seed)
    assert _fusable(fused)
    a = net.predict_proba(X, fused, T, row_keys=keys)
    b = net.predict_proba(X, _Unfused(pop, global_random_seed), T, row_keys=keys)
    tol = 5 * sd / np.sqrt(T) + 2e-5
    assert (np.abs(a - mean) <= tol).all(), np.abs(a - mean).max()
    assert (np.abs(b - mean) <= tol).all(), np.abs(b - mean).max()
    assert fused.pulse_counts.sum() == len(X) * T * 5


def test_fused_matches_unfused_on_a_larger_layer():
    """784-like sizes: the two paths' averaged probabilities agree within their noise."""
    rng = np.random.default_rng(3)
    pop = sotcore.DevicePopulation.from_width(20.0, 200, random_state=3)
    i50, s = nominal_curve(pop)
    net = StochasticMLP([30, 200, 10], CurrentMapping.for_nominal(s))
    net.initialize(rng, i50 / s)
    net.coefs[1] *= 4
    X = rng.random((40, 30)).astype(np.float32)
    T = 3000
    a = net.predict_proba(X, EmulatedBackend(pop, 1), T)
    b = net.predict_proba(X, _Unfused(pop, 2), T)
    # per-entry SD of a T-mean is < 0.5 / sqrt(T) ~ 0.009; the difference of two < 0.013
    assert np.abs(a - b).max() < 6 * 0.5 * np.sqrt(2 / T)
    assert np.abs(a - b).mean() < 0.5 * np.sqrt(2 / T)


# ---------------------------------------------------------------------------
# Invariances through the estimator (single hidden layer: the fused path)
@pytest.fixture(scope="module")
def fitted_digits():
    from sklearn.model_selection import train_test_split
    from sotcore.datasets import load_digits
    X, y = load_digits()
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    clf = sotcore.SOTClassifier(hidden_layer_sizes=(40,), devices=20.0, max_iter=3,
                                n_samples=8, batch_size=32, learning_rate_init=1e-2,
                                random_state=0).fit(Xtr, ytr)
    return clf, Xte, yte


def test_estimator_uses_the_fused_path(fitted_digits, monkeypatch):
    clf, Xte, _ = fitted_digits
    calls = []
    real = _kernels.fused_predict
    monkeypatch.setattr(_kernels, "fused_predict", lambda *a: calls.append(1) or real(*a))
    clf.predict_proba(Xte[:3])
    assert calls


def test_row_alone_equals_row_in_batch(fitted_digits):
    clf, Xte, _ = fitted_digits
    n = FIRST_LAYER_ROWS + 57
    X = np.concatenate([Xte, Xte])[:n]
    P = clf.predict_proba(X)
    for i in [0, 1, FIRST_LAYER_ROWS - 1, FIRST_LAYER_ROWS, n - 1]:
        np.testing.assert_array_equal(clf.predict_proba(X[i:i + 1]), P[i:i + 1])
    perm = np.random.default_rng(0).permutation(n)
    np.testing.assert_array_equal(clf.predict_proba(X[perm]), P[perm])
    np.testing.assert_array_equal(clf.predict_proba(np.asfortranarray(X)), P)
    np.testing.assert_array_equal(clf.predict_proba(X.astype(np.float64)), P)


def test_predictions_identical_for_any_thread_count(fitted_digits):
    clf, Xte, _ = fitted_digits
    P = clf.predict_proba(Xte)
    for nt in (1, 2, 3, -1):
        clf.set_params(n_threads=nt)
        try:
            np.testing.assert_array_equal(clf.predict_proba(Xte), P)
        finally:
            clf.set_params(n_threads=None)


def test_fused_accuracy_matches_unfused(fitted_digits):
    clf, Xte, yte = fitted_digits
    net = clf._network
    keys = np.arange(len(Xte), dtype=np.uint64)
    a = net.predict_proba(np.asarray(Xte, np.float32), EmulatedBackend(clf.devices_, 5), 32,
                          row_keys=keys)
    b = net.predict_proba(np.asarray(Xte, np.float32), _Unfused(clf.devices_, 5), 32,
                          row_keys=keys)
    assert abs((a.argmax(1) == yte).mean() - (b.argmax(1) == yte).mean()) < 0.03
    assert (a.argmax(1) == b.argmax(1)).mean() > 0.9


def test_fusable_only_for_plain_emulators():
    pop = sotcore.DevicePopulation.from_width(20.0, 8, random_state=0)
    assert _fusable(EmulatedBackend(pop, 0))
    assert not _fusable(EmulatedBackend(pop, 0, aging=DeviceAging(i50_drift=0.1)))
    assert not _fusable(_Unfused(pop, 0))
    assert not _fusable(sotcore.InstrumentBackend(lambda c, d: np.zeros(c.shape), 8))


def test_nonfinite_first_layer_raises():
    pop, net, X = _small_net(5, 3, 0)
    net.coefs[0][0, 0] = np.inf
    with pytest.raises(ValueError, match="finite"):
        net.predict_proba(X, EmulatedBackend(pop, 0), 4)


def test_fused_memory_is_bounded():
    """Peak Python-traced memory beyond the output is a few blocks, whatever n."""
    rng = np.random.default_rng(0)
    pop = sotcore.DevicePopulation.from_width(20.0, 64, random_state=0)
    i50, s = nominal_curve(pop)
    net = StochasticMLP([16, 64, 10], CurrentMapping.for_nominal(s))
    net.initialize(rng, i50 / s)
    X = rng.random((60000, 16)).astype(np.float32)
    be = EmulatedBackend(pop, 0)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        P = net.predict_proba(X, be, 2, row_keys=np.arange(len(X), dtype=np.uint64))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert P.shape == (60000, 10)
    assert peak < P.nbytes + 4 * 2**20


# ---------------------------------------------------------------------------
# Optimiser steps, surrogate, row hash, generator
def _adam_ref(p, g, m, v, lr, b1, b2, eps, l2):
    f = np.float32
    g = g + f(l2) * p
    m = f(b1) * m + f(1 - b1) * g
    v = f(b2) * v + f(1 - b2) * (g * g)
    return p - f(lr) * m / (np.sqrt(v) + f(eps)), m, v


@pytest.mark.parametrize("n", [1, 17, 100_003])
def test_adam_kernel_matches_numpy(n, global_random_seed):
    rng = np.random.default_rng(global_random_seed)
    p, g = (rng.standard_normal(n).astype(np.float32) for _ in range(2))
    m = rng.standard_normal(n).astype(np.float32) * 0.1
    v = rng.random(n).astype(np.float32) * 0.01
    ep, em, ev = _adam_ref(p, g, m, v, 3e-3, 0.9, 0.999, 1e-8, 1e-4)
    outs = []
    for nt in (1, 2):
        pp, mm, vv = p.copy(), m.copy(), v.copy()
        _kernels.adam_update(pp, g, mm, vv, 3e-3, 0.9, 0.999, 1e-8, 1e-4, nt)
        outs.append((pp, mm, vv))
    for a, b in zip(outs[0], outs[1]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(outs[0][0], ep, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(outs[0][1], em, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(outs[0][2], ev, rtol=1e-6, atol=1e-9)


def test_elementwise_kernels_parallel_path_is_identical():
    """Arrays past the parallel threshold: the same results for any thread count."""
    rng = np.random.default_rng(0)
    n = 4_300_000
    p, g = (rng.standard_normal(n).astype(np.float32) for _ in range(2))
    m, v = np.zeros(n, np.float32), rng.random(n).astype(np.float32)
    outs = []
    for nt in (1, 2):
        pp, mm, vv = p.copy(), m.copy(), v.copy()
        _kernels.adam_update(pp, g, mm, vv, 1e-3, 0.9, 0.999, 1e-8, 1e-4, nt)
        gg = g.copy()
        _kernels.sigmoid_deriv_mul(gg, p, 0.1, 0.3, 2.0, nt)
        outs.append((pp, mm, vv, gg))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


def test_sampler_thread_heuristic_keeps_bits():
    """sample_table stays single-threaded for small calls; large ones split, same bits."""
    pop = sotcore.DevicePopulation.from_width(20.0, 300, random_state=0)
    _, _, thr = pop.table()
    a, b = pop._table_cache[np.float32]
    rng = np.random.default_rng(1)
    for n in (100, 3000):
        I = (pop.i50 + 3 * pop.scale * rng.standard_normal((n, 300))).astype(np.float32)
        outs = []
        for nt in (1, 2):
            out = np.empty(I.shape, np.uint8)
            _kernels.sample_table(I, a, b, thr, 4, 5, 6, out, nt)
            outs.append(out)
        np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("nesterov", [True, False])
def test_sgd_kernel_matches_numpy(nesterov):
    rng = np.random.default_rng(0)
    p, g, vel = (rng.standard_normal(1000).astype(np.float32) for _ in range(3))
    f = np.float32
    gg = g + f(1e-3) * p
    ev = f(0.9) * vel - f(0.01) * gg
    ep = p + (f(0.9) * ev - f(0.01) * gg) if nesterov else p + ev
    _kernels.sgd_update(p, g, vel, 0.01, 0.9, nesterov, 1e-3, 1)
    np.testing.assert_allclose(vel, ev, rtol=1e-6)
    np.testing.assert_allclose(p, ep, rtol=1e-6, atol=1e-7)


def test_optimizers_use_the_kernels_and_fold_l2():
    rng = np.random.default_rng(0)
    params = [rng.standard_normal((30, 7)).astype(np.float32),
              rng.standard_normal(7).astype(np.float32)]
    grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
    for opt_cls in (Adam, SGD):
        a = [p.copy() for p in params]
        b = [p.copy() for p in params]
        oa, ob = opt_cls(a, lr=0.01), opt_cls(b, lr=0.01)
        for _ in range(3):
            oa.step(a, grads, l2=[0.5, 0.0])
            ob.step(b, [grads[0] + np.float32(0.5) * b[0], grads[1]])
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    p64 = [np.array([3.0, -2.0])]                      # float64: the NumPy fallback
    o = Adam(p64, lr=0.05)
    for _ in range(300):
        o.step(p64, [2 * p64[0]])
    assert np.abs(p64[0]).max() < 0.1


def test_sigmoid_deriv_mul_matches_float64():
    rng = np.random.default_rng(0)
    cur = (2e-3 + 1e-4 * rng.standard_normal(5000) * 10).astype(np.float32)
    cur[:3] = [0.0, 1.0, -1.0]
    g = rng.standard_normal(5000).astype(np.float32)
    i50, scale, k = 2e-3, 6.8e-5, 0.4
    x = (cur.astype(np.float64) - i50) / scale
    e = np.exp(-np.abs(x))                        # s (1 - s) without cancellation
    expect = g * k * e / (1 + e) ** 2
    got = g.copy()
    _kernels.sigmoid_deriv_mul(got, cur, i50, scale, k, 1)
    np.testing.assert_allclose(got, expect, rtol=2e-5, atol=1e-30)


def test_row_hash_matches_numpy(global_random_seed):
    rng = np.random.default_rng(global_random_seed)
    X = rng.standard_normal((300, 37)).astype(np.float32)
    mult = rng.integers(1, 2**63, 37, dtype=np.uint64) | np.uint64(1)
    bits = X.view(np.uint32).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = (bits * mult).sum(axis=1, dtype=np.uint64)
        h ^= h >> np.uint64(29)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(32)
    out = np.empty(300, np.uint64)
    _kernels.row_hash(X.view(np.uint32), mult, out, 2)
    np.testing.assert_array_equal(out, h)
    with pytest.raises(ValueError):
        _kernels.row_hash(X.view(np.uint32), mult[:-1], out, 1)


def test_fill_random_is_the_counter_generator():
    out = np.empty(1000, np.uint64)
    _kernels.fill_random(5, 6, 123, out)
    np.testing.assert_array_equal(out, _kernels.raw_u64(_stream_key(5, 6), 123, 1000))


# ---------------------------------------------------------------------------
# The one-hidden-layer training step
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("kind", ["nominal", "calibrated"])
def test_fast_training_step_matches_numpy_path(T, kind, global_random_seed):
    from sotcore.training import _fast_output_step, _fast_step_buffers, _mixture_grad, \
        make_surrogate
    rng = np.random.default_rng(global_random_seed)
    n, H, C = 23, 70, 12
    pop = sotcore.DevicePopulation.from_width(20.0, H, random_state=global_random_seed)
    i50, s = nominal_curve(pop)
    m = CurrentMapping.for_nominal(s)
    net = StochasticMLP([9, H, C], m)
    net.initialize(rng, i50 / s)
    net.intercepts[1] = rng.standard_normal(C).astype(np.float32)
    sur = make_surrogate(kind, m, i50, s, pop)
    bits = (rng.random((n * T, H)) < 0.4).astype(np.uint8)
    cur = (i50 + 2 * s * rng.standard_normal((n, H))).astype(np.float32)
    y = rng.integers(0, C, n)
    fast = _fast_step_buffers(net, np.zeros((1, 9), np.float32), n, T)
    gw, gb = [None, None], [None, None]
    loss_sum, ok, g1 = _fast_output_step(fast, net, bits, cur, y, T, sur, slice(0, H), gw, gb)
    # the NumPy path of Trainer.fit
    h = bits.astype(np.float32)
    probs = softmax(h @ net.coefs[1] + net.intercepts[1]).reshape(n, T, C)
    loss, g = _mixture_grad(probs, y)
    gh = (g @ net.coefs[1].T).reshape(n, T, H).sum(axis=1)
    ref_g1 = gh * sur(cur, slice(0, H))
    assert loss_sum == pytest.approx(loss * n, rel=1e-5)
    assert ok == int((probs.mean(axis=1).argmax(axis=1) == y).sum())
    np.testing.assert_allclose(g1, ref_g1, rtol=2e-4, atol=1e-9)
    np.testing.assert_allclose(gb[0], ref_g1.sum(axis=0), rtol=2e-4, atol=1e-8)
    np.testing.assert_allclose(gw[1], h.T @ g, rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(gb[1], g.sum(axis=0), rtol=2e-4, atol=1e-7)


def test_fast_training_step_rejects_bad_input():
    H, C, Cp, n = 8, 3, 16, 4
    args = dict(bits=np.zeros((n, H), np.uint8), T=1, W2p=np.zeros((H, Cp), np.float32),
                W2T=np.zeros((C, H), np.float32), b2p=np.zeros(Cp, np.float32),
                y=np.zeros(n, np.int64), cur=np.zeros((n, H), np.float32), deriv=None,
                i50=0.0, scale=1.0, k=1.0, g1=np.zeros((n, H), np.float32),
                gW2=np.zeros((H, Cp), np.float32), gb2=np.zeros(Cp, np.float32),
                gb1=np.zeros(H, np.float32),
                scratch=np.zeros(_kernels.train_output_scratch(n, 1, H, Cp), np.float32))

    def call(**kw):
        return _kernels.train_output_step(*{**args, **kw}.values())
    assert call()[1] == n                     # all-zero logits: class 0 is the first maximum
    for bad in [dict(y=np.array([0, 1, 2, 3])), dict(T=2), dict(W2p=np.zeros((H, 8), np.float32)),
                dict(cur=np.zeros((n, H + 1), np.float32)), dict(scratch=np.zeros(3, np.float32)),
                dict(deriv=np.zeros((n, 2), np.float32)), dict(gb1=np.zeros(2, np.float32))]:
        with pytest.raises(ValueError):
            call(**bad)


def test_training_fast_path_tracks_the_general_path():
    """Same data and seeds: the fused step and the NumPy path train alike."""
    from sklearn.model_selection import train_test_split
    from sotcore import training
    from sotcore.datasets import load_digits
    X, y = load_digits()
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    kw = dict(hidden_layer_sizes=(32,), devices=20.0, max_iter=4, n_samples=8, batch_size=32,
              learning_rate_init=1e-2, random_state=0)
    a = sotcore.SOTClassifier(**kw).fit(Xtr, ytr)
    real = training._fast_step_buffers
    training._fast_step_buffers = lambda *args: None
    try:
        b = sotcore.SOTClassifier(**kw).fit(Xtr, ytr)
    finally:
        training._fast_step_buffers = real
    np.testing.assert_allclose(a.loss_curve_, b.loss_curve_, rtol=0.05)
    assert abs(a.score(Xte, yte) - b.score(Xte, yte)) < 0.05


# ---------------------------------------------------------------------------
# The first layer (``_sot_first.h``): one FMA per term, k ascending, zeros skipped
def _first(X, W, isa=None):
    Z = np.full((X.shape[0], W.shape[1]), np.nan, np.float32)
    if isa is not None:
        _kernels.sampler_isa(isa)
    try:
        _kernels.first_layer(np.ascontiguousarray(X, np.float32),
                             _kernels.first_layer_panels(W), Z)
    finally:
        _kernels.sampler_isa("best")
    return Z


@pytest.mark.parametrize("n, d, H, density", [
    (1, 1, 1, 1.0), (7, 5, 17, 0.5), (13, 130, 65, 0.2), (6, 784, 500, 0.19), (40, 64, 64, 0.0),
    (257, 200, 129, 1.0), (9, 3, 300, 0.7)])
def test_first_layer_matches_float64_and_is_identical_on_every_path(n, d, H, density,
                                                                    global_random_seed):
    rng = np.random.default_rng(global_random_seed)
    X = (rng.random((n, d)) * (rng.random((n, d)) < density)).astype(np.float32)
    X[n // 2] = 0.0                                    # an all-zero row
    W = rng.standard_normal((d, H)).astype(np.float32)
    ref = X.astype(np.float64) @ W.astype(np.float64)
    outs = [_first(X, W, isa) for isa in ISAS]
    for Z in outs:
        np.testing.assert_array_equal(Z, outs[0])
    # float32 sums of |terms| <= d: error bound ~ d * 2**-24 * sum |x w|
    bound = (np.abs(X).astype(np.float64) @ np.abs(W).astype(np.float64)) * d * 2.0**-23 + 1e-30
    assert np.all(np.abs(outs[0] - ref) <= bound)
    assert np.all(outs[0][n // 2] == 0) and not np.signbit(outs[0][n // 2]).any()


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_first_layer_row_alone_equals_row_in_block(isa):
    """A row's sums never depend on its block-mates: each row alone, in a block
    with dense or empty neighbours and at every position gives the same bits."""
    rng = np.random.default_rng(5)
    d, H = 300, 90
    W = rng.standard_normal((d, H)).astype(np.float32)
    X = (rng.random((23, d)) * (rng.random((23, d)) < 0.15)).astype(np.float32)
    X[3] = rng.random(d)                               # a dense neighbour
    Wp = _kernels.first_layer_panels(W)
    whole = np.empty((23, H), np.float32)
    _kernels.first_layer(X, Wp, whole)
    for i in range(23):
        alone = np.empty((1, H), np.float32)
        _kernels.first_layer(X[i:i + 1], Wp, alone)
        np.testing.assert_array_equal(alone[0], whole[i])
    perm = rng.permutation(23)
    shuffled = np.empty((23, H), np.float32)
    _kernels.first_layer(np.ascontiguousarray(X[perm]), Wp, shuffled)
    np.testing.assert_array_equal(shuffled, whole[perm])


def test_first_layer_rejects_bad_shapes():
    W = np.ones((5, 70), np.float32)
    Wp = _kernels.first_layer_panels(W)
    X = np.ones((3, 5), np.float32)
    with pytest.raises(ValueError, match="Wp must have shape"):
        _kernels.first_layer(np.ones((3, 6), np.float32), Wp, np.empty((3, 70), np.float32))
    with pytest.raises(ValueError, match="Z must have shape"):
        _kernels.first_layer(X, Wp, np.empty((4, 70), np.float32))
    with pytest.raises(ValueError, match="Z must have shape"):
        _kernels.first_layer(X, Wp, np.empty((3, 129), np.float32))
    Z = np.empty((3, 64), np.float32)                  # 2 panels hold 65..128 columns
    with pytest.raises(ValueError, match="Z must have shape"):
        _kernels.first_layer(X, Wp, Z)
    Z = np.empty((3, 70), np.float32)
    _kernels.first_layer(X, Wp, Z)
    np.testing.assert_allclose(Z, 5.0)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_first_layer_on_bits_equals_binary_matvec_at_any_thread_count(isa):
    """The general path's hidden layers: 0/1 inputs through first_layer give the
    bits of binary_matvec (rows of set bits added in order), on 1-3 threads and
    for chunks that do not divide the rows."""
    rng = np.random.default_rng(11)
    n, K, M = 487, 130, 77
    bits = (rng.random((n, K)) < 0.4).astype(np.uint8)
    W = rng.standard_normal((K, M)).astype(np.float32)
    ref = np.empty((n, M), np.float32)
    _kernels.binary_matvec(bits, W, ref, 1)
    Wp = _kernels.first_layer_panels(W)
    for nt in (1, 2, 3):
        Z = np.full((n, M), np.nan, np.float32)
        _kernels.first_layer(bits.astype(np.float32), Wp, Z, nt)
        np.testing.assert_array_equal(Z, ref)


# ---------------------------------------------------------------------------
# The training step's first layer: Z = X W (unpacked W) and the gradient X^T G
def _on_every_path(fn):
    out = []
    try:
        for p in ISAS:
            _kernels.sampler_isa(p)
            for nt in (1, 2, 3):
                out.append(fn(nt))
    finally:
        _kernels.sampler_isa("best")
    return out


def _sparse_inputs(rng, n, d, density):
    X = (rng.random((n, d)) * (rng.random((n, d)) < density)).astype(np.float32)
    X[n // 2] = 0.0                                    # an all-zero row
    if d > 2:
        X[:, d // 3] = 0.0                             # an all-zero column
    return X


@pytest.mark.parametrize("n, d, H", [(1, 1, 1), (7, 5, 17), (100, 784, 500), (13, 130, 65),
                                     (250, 40, 129), (6, 3, 300), (1201, 33, 31)])
def test_sparse_matmul_is_first_layer_without_packing(n, d, H, global_random_seed):
    """Unpacked W: the same bits as ``first_layer`` on its panels, on every path
    and thread count (rows and column panels split among threads), within
    float32 rounding of float64."""
    rng = np.random.default_rng(global_random_seed)
    X = _sparse_inputs(rng, n, d, 0.2)
    W = rng.standard_normal((d, H)).astype(np.float32)
    ref = np.full((n, H), np.nan, np.float32)
    _kernels.first_layer(X, _kernels.first_layer_panels(W), ref)

    def run(nt):
        Z = np.full((n, H), np.nan, np.float32)
        _kernels.sparse_matmul(X, W, Z, nt)
        return Z
    for Z in _on_every_path(run):
        np.testing.assert_array_equal(Z, ref)
    exact = X.astype(np.float64) @ W.astype(np.float64)
    bound = (np.abs(X).astype(np.float64) @ np.abs(W).astype(np.float64)) * d * 2.0**-23 + 1e-30
    assert np.all(np.abs(ref - exact) <= bound)


_GUARD_PAGE_SCRIPT = r"""
import ctypes, mmap, sys
import numpy as np
from sotcore import _kernels
PAGE = mmap.PAGESIZE
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
buf = mmap.mmap(-1, 3 * PAGE)
base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
assert libc.mprotect(base + 2 * PAGE, PAGE, 0) == 0   # the third page: no access

def at_page_end(shape):
    # an array whose last byte is the last byte before the guard page
    nbytes = int(np.prod(shape)) * 4
    a = np.frombuffer(buf, np.float32, count=int(np.prod(shape)),
                      offset=2 * PAGE - nbytes).reshape(shape)
    return a

rng = np.random.default_rng(0)
for isa in sys.argv[1:]:
    _kernels.sampler_isa(isa)
    for d, H in ((16, 60), (5, 17), (3, 100), (30, 33)):
        W = at_page_end((d, H))
        W[:] = rng.standard_normal((d, H))
        X = rng.random((7, d)).astype(np.float32)
        Z = np.empty((7, H), np.float32)
        _kernels.sparse_matmul(X, W, Z, 2)
        assert np.allclose(Z, X.astype(np.float64) @ W, rtol=1e-5, atol=1e-4)
        G = at_page_end((d, H))                         # d rows of gradients
        G[:] = rng.standard_normal((d, H))
        Xg = rng.random((d, 9)).astype(np.float32)
        O = np.empty((9, H), np.float32)
        _kernels.sparse_matmul_tn(Xg, G, O, 2)
        assert np.allclose(O, Xg.T.astype(np.float64) @ G, rtol=1e-5, atol=1e-4)
print("ok")
"""


def test_sparse_kernels_read_nothing_past_the_arrays(tmp_path):
    """W (and G) ending right before a page with no access: a read past column
    H of the last row -- an unmasked vector load -- would kill the process."""
    import os
    import subprocess
    import sys
    # The child imports the sotcore this test runs (installed or built in place),
    # not a source tree that happens to be its working directory.
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(sotcore.__file__)))
    proc = subprocess.run([sys.executable, "-c", _GUARD_PAGE_SCRIPT, *ISAS], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode,
                                                                 proc.stderr[-2000:])


@pytest.mark.parametrize("n, d, H", [(1, 1, 1), (7, 5, 17), (100, 784, 500), (33, 65, 47),
                                     (1100, 40, 70), (3, 100, 33), (0, 9, 12)])
def test_sparse_matmul_tn_matches_float64_on_every_path(n, d, H, global_random_seed):
    """out = X^T G, zeros of X skipped: within float32 rounding of float64, the
    same bits on every path and thread count, also past the 512-row chunks
    (n = 1100) whose sums continue in ``out``; zero rows for zero columns."""
    rng = np.random.default_rng(global_random_seed)
    X = _sparse_inputs(rng, n, d, 0.25) if n else np.zeros((0, d), np.float32)
    G = rng.standard_normal((n, H)).astype(np.float32)

    def run(nt):
        O = np.full((d, H), np.nan, np.float32)
        _kernels.sparse_matmul_tn(X, G, O, nt)
        return O
    outs = _on_every_path(run)
    for O in outs:
        np.testing.assert_array_equal(O, outs[0])
    exact = X.T.astype(np.float64) @ G.astype(np.float64)
    bound = (np.abs(X.T).astype(np.float64) @ np.abs(G).astype(np.float64)) * max(n, 1) \
        * 2.0**-23 + 1e-30
    assert np.all(np.abs(outs[0] - exact) <= bound)
    if d > 2:
        assert np.all(outs[0][d // 3] == 0)


def test_sparse_matmul_tn_is_exact_on_small_integers():
    """Small integers: every partial sum is exact, so each entry must equal the
    exact product -- a dropped, repeated or misplaced term shows at once."""
    rng = np.random.default_rng(9)
    n, d, H = 1300, 45, 83
    X = (rng.integers(-3, 4, (n, d)) * (rng.random((n, d)) < 0.3)).astype(np.float32)
    G = rng.integers(-8, 9, (n, H)).astype(np.float32)
    exact = X.T.astype(np.int64) @ G.astype(np.int64)
    for O in _on_every_path(lambda nt: (_kernels.sparse_matmul_tn(X, G, O := np.full(
            (d, H), np.nan, np.float32), nt), O)[1]):
        np.testing.assert_array_equal(O, exact.astype(np.float32))


def test_sparse_matmul_tn_zero_columns_ignore_nonfinite_g():
    X = np.zeros((4, 3), np.float32)
    X[:, 1] = [1, 0, 2, 0]
    G = np.ones((4, 5), np.float32)
    G[1] = np.inf                                      # row 1 meets only zeros of X
    O = np.full((3, 5), np.nan, np.float32)
    _kernels.sparse_matmul_tn(X, G, O, 2)
    np.testing.assert_array_equal(O, [[0] * 5, [3] * 5, [0] * 5])


def test_sparse_matmul_rejects_bad_shapes():
    X, W = np.ones((3, 5), np.float32), np.ones((5, 7), np.float32)
    with pytest.raises(ValueError, match="W must have 5 rows"):
        _kernels.sparse_matmul(X, np.ones((6, 7), np.float32), np.empty((3, 7), np.float32))
    with pytest.raises(ValueError, match=r"Z must have shape \(3, 7\)"):
        _kernels.sparse_matmul(X, W, np.empty((3, 8), np.float32))
    with pytest.raises(ValueError, match="G must have 3 rows"):
        _kernels.sparse_matmul_tn(X, np.ones((4, 7), np.float32), np.empty((5, 7), np.float32))
    with pytest.raises(ValueError, match=r"out must have shape \(5, 7\)"):
        _kernels.sparse_matmul_tn(X, np.ones((3, 7), np.float32), np.empty((7, 5), np.float32))
    with pytest.raises(ValueError):                    # float64 is not silently cast
        _kernels.sparse_matmul(X.astype(np.float64), W, np.empty((3, 7), np.float32))


def test_a_failing_worker_stops_the_others():
    """An error in one prediction worker (here: the row-key callable) stops the
    others after their current block instead of letting them finish the call."""
    import threading
    from sotcore._fused import fused_predict
    rng = np.random.default_rng(0)
    pop = sotcore.DevicePopulation.from_width(20.0, 40, random_state=0)
    n = 60 * FIRST_LAYER_ROWS
    X = rng.random((n, 8), dtype=np.float32)
    W1 = rng.standard_normal((8, 40)).astype(np.float32)
    W2 = rng.standard_normal((40, 3)).astype(np.float32)
    calls, lock = [0], threading.Lock()

    def keys(block):
        with lock:
            calls[0] += 1
            k = calls[0]
        if k == 3:
            raise RuntimeError("key source failed")
        return np.arange(len(block), dtype=np.uint64)
    with pytest.raises(RuntimeError, match="key source failed"):
        fused_predict(X, W1, np.zeros(40), W2, np.zeros(3), float(pop.scale.mean()), 0.0,
                      pop.table(), 1, 2, keys, 2, 2)
    assert calls[0] <= 3 + 2, calls[0]           # not the 60 blocks of the call


def test_huge_block_rows_is_clamped_not_overflowed():
    rng = np.random.default_rng(1)
    md = _model(20, 3, rng)
    Z = rng.standard_normal((7, 20)).astype(np.float32)
    keys = np.arange(7, dtype=np.uint64)
    got = _fused(md, Z, keys, 2, block_rows=2**63 - 1)[0]
    np.testing.assert_array_equal(got, _fused(md, Z, keys, 2)[0])
