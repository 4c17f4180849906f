"""Tests of the compiled core ``sotcore._kernels`` against plain-NumPy references.

* ``_reference_bits`` re-implements the sampler bit for bit in NumPy (the
  SplitMix64 counter generator, the dithered grid index, the threshold
  compare); every CPU path of the kernel must match it exactly.
* The statistical tests check the *distribution* against an independent
  reference, ``DevicePopulation.table_probability`` (the table linearly
  interpolated), with exact binomial tails, so a wrong grid index, threshold
  or interpolation fails whatever the seed.
"""
import math

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from scipy import stats

from sotcore import DevicePopulation, _kernels
from _splitmix import GAMMA, MASK64, mix64 as _mix64, stream_key as _stream_key

_PATHS = ("scalar", "avx2", "avx512")
ISAS = _PATHS[:_PATHS.index(_kernels.sampler_isa_max()) + 1]   # the CPU paths we can run


@pytest.fixture
def isa(request):
    """Run the kernel on one CPU path, restoring the best path afterwards."""
    _kernels.sampler_isa(request.param)
    yield request.param
    _kernels.sampler_isa("best")


# ---------------------------------------------------------------------------
# NumPy references
def _raw_u64(key, ctr0, n):
    with np.errstate(over="ignore"):
        ctr = np.uint64(ctr0) + np.arange(n, dtype=np.uint64)
        return _mix64(np.uint64(key) + (ctr + np.uint64(1)) * np.uint64(GAMMA))


def _reference_bits(currents, a, b, table, seed, stream, row0):
    """The sampler's exact output, in NumPy (see _sotrng.h for the definition)."""
    n, m = currents.shape
    G = table.shape[1]
    key = np.uint64(_stream_key(seed, stream))
    rows = np.uint64(row0) + np.arange(n, dtype=np.uint64)[:, None]
    cols = np.arange(m, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        ctr = rows * np.uint64((m + 1) // 2) + cols // np.uint64(2)
        u = _mix64(key + (ctr + np.uint64(1)) * np.uint64(GAMMA))
    w = np.where(cols % np.uint64(2) == 0, u & np.uint64(0xFFFFFFFF), u >> np.uint64(32))
    w = w.astype(np.uint32)
    dt = currents.dtype.type
    with np.errstate(all="ignore"):
        s = currents * (a * dt(4096))          # product, then sum, in the dtype
        s = s + b * dt(4096)
        s = np.where(s > 0, s, dt(0))          # NaN -> 0
        smax = dt(4096) * dt(G - 1)
        s = np.where(s < smax, s, smax)
    g = (s.astype(np.uint64) + (w & np.uint32(4095))) >> np.uint64(12)
    t = table[np.arange(m)[None, :], g.astype(np.intp)]
    return (w < t).astype(np.uint8)


def _kernel_bits(currents, a, b, table, seed=0, stream=0, row0=0, n_threads=1):
    out = np.full(currents.shape, 7, dtype=np.uint8)
    flag = _kernels.sample_table(currents, a, b, table, seed, stream, row0, out, n_threads)
    return out, flag


def _population(n_devices, seed, **kwargs):
    return DevicePopulation.from_width(20.0, n_devices=n_devices, variability=0.10,
                                       random_state=seed, **kwargs)


def _kernel_args(pop, dtype):
    thr = pop.table()[2]
    lo, hi, _ = pop.table()
    G = thr.shape[1]
    a = ((G - 1) / (hi - lo)).astype(dtype)
    b = (-lo * ((G - 1) / (hi - lo))).astype(dtype)
    return a, b, thr


# ---------------------------------------------------------------------------
# The random generator
def test_raw_u64_matches_numpy_splitmix64(global_random_seed):
    key = _kernels.stream_key(global_random_seed, 3)
    assert key == _stream_key(global_random_seed, 3)
    ctr0 = (global_random_seed * 0x1234567) & MASK64
    np.testing.assert_array_equal(_kernels.raw_u64(key, ctr0, 1000), _raw_u64(key, ctr0, 1000))
    assert _kernels.raw_u64(key, 0, 0).shape == (0,)
    with pytest.raises(ValueError):
        _kernels.raw_u64(key, 0, -1)


def test_raw_u64_uniformity(global_random_seed):
    """Chi-square on every byte, on the 12-bit dither field and on pairs of
    consecutive outputs; Bonferroni over the 11 statistics at alpha = 1e-6."""
    n = 1 << 17
    u = _kernels.raw_u64(_kernels.stream_key(global_random_seed, 0), 0, n)
    pvalues = []
    for k in range(8):
        byte = ((u >> np.uint64(8 * k)) & np.uint64(255)).astype(np.intp)
        pvalues.append(stats.chisquare(np.bincount(byte, minlength=256)).pvalue)
    for shift in (0, 32):   # the dither fields of the two 32-bit words of a pair
        field = ((u >> np.uint64(shift)) & np.uint64(4095)).astype(np.intp)
        pvalues.append(stats.chisquare(np.bincount(field, minlength=4096)).pvalue)
    top = (u >> np.uint64(60)).astype(np.intp)      # serial pairs, 16 x 16 cells
    pvalues.append(stats.chisquare(np.bincount(top[:-1] * 16 + top[1:], minlength=256)).pvalue)
    assert min(pvalues) > 1e-6 / len(pvalues), pvalues
    # bit frequencies: each of the 64 bits set half the time (5.5 sigma)
    ones = np.unpackbits(u.view(np.uint8)).reshape(n, 64).sum(axis=0)
    assert np.abs(ones - n / 2).max() < 5.5 * math.sqrt(n / 4)


def test_streams_and_seeds_differ():
    keys = {_kernels.stream_key(seed, stream) for seed in range(20) for stream in range(20)}
    assert len(keys) == 400


# ---------------------------------------------------------------------------
# Exactness against the NumPy reference, on every CPU path
_special = st.sampled_from([np.nan, np.inf, -np.inf, -0.0, 0.0, 1e30, -1e30, 3.5, 1e-40])


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 9), m=st.integers(1, 41), G=st.integers(2, 40),
       dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, MASK64), stream=st.integers(0, MASK64),
       row0=st.integers(0, MASK64), data=st.data())
def test_kernel_matches_numpy_reference(isa, n, m, G, dtype, seed, stream, row0, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    # grid coordinates from well below to well above the grid, some special
    x = rng.uniform(-0.3 * G, 1.3 * G, size=(n, m))
    if n and data.draw(st.booleans()):
        x[rng.integers(0, n), rng.integers(0, m)] = data.draw(_special)
    a = rng.uniform(0.5, 2.0, size=m) * rng.choice([-1.0, 1.0], size=m)
    b = rng.uniform(-1.0, 1.0, size=m)
    with np.errstate(all="ignore"):
        cur = ((x - b) / a).astype(dtype)
    a, b = a.astype(dtype), b.astype(dtype)
    table = rng.integers(0, 2**32, size=(m, G), dtype=np.uint32)
    table[:, rng.integers(0, G)] = rng.choice([0, 2**32 - 1])
    got, flag = _kernel_bits(cur, a, b, table, seed, stream, row0)
    np.testing.assert_array_equal(got, _reference_bits(cur, a, b, table, seed, stream, row0))
    assert flag == bool(n and not np.isfinite(cur).all())


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_matches_reference_large_blocks_and_tables(isa, dtype):
    """Several row and column blocks, odd m, and a table above 2**19 points
    (where the AVX2 path hands over to the scalar one)."""
    rng = np.random.default_rng(5)
    for n, m, G in [(2100, 301, 33), (5, 19, (1 << 19) + 3), (3, 3, 1 << 20)]:
        x = rng.uniform(-5, G + 5, size=(n, m))
        a = np.full(m, 2.0)
        cur, a, b = (x / 2.0).astype(dtype), a.astype(dtype), np.zeros(m, dtype)
        table = rng.integers(0, 2**32, size=(m, G), dtype=np.uint32)
        got, flag = _kernel_bits(cur, a, b, table, 11, 2, 40, n_threads=2)
        np.testing.assert_array_equal(got, _reference_bits(cur, a, b, table, 11, 2, 40))
        assert not flag


def test_nan_and_infinite_currents_clamp_and_are_reported():
    m, G = 20, 8
    table = np.zeros((m, G), dtype=np.uint32)
    table[:, -1] = 2**32 - 1                     # P = 0 at grid point 0, ~1 at G - 1
    a, b = np.ones(m), np.zeros(m)
    for value, expect in [(np.nan, 0), (-np.inf, 0), (np.inf, 1), (1e300, 1), (-1e300, 0)]:
        cur = np.full((50, m), value)
        bits, flag = _kernel_bits(cur, a, b, table)
        assert (bits == expect).all(), value
        assert flag == (not np.isfinite(value))
        with np.errstate(over="ignore"):
            cur32 = cur.astype(np.float32)            # 1e300 -> inf in float32
        bits32, flag32 = _kernel_bits(cur32, a.astype(np.float32), b.astype(np.float32), table)
        assert (bits32 == expect).all()
        assert flag32 == (not np.isfinite(cur32).all())


# ---------------------------------------------------------------------------
# The sampler's exact probability and its documented bias bound
def _exact_kernel_probability(q, t_row):
    """P(bit = 1) of the kernel at q = trunc(4096 x), enumerating the 4096
    dither values L = w & 4095: given L, w = 4096 H + L with H uniform on
    [0, 2**20), and w < t exactly when H < ceil((t - L) / 4096)."""
    L = np.arange(4096, dtype=np.int64)[None, :]
    g = (q[:, None] + L) >> 12
    t = t_row[g].astype(np.int64)
    count = np.clip(-((L - t) // 4096), 0, 1 << 20)      # ceil((t - L) / 4096)
    return count.sum(axis=1) / 2.0**32


def test_bias_bound_of_default_tables(global_random_seed):
    """|P_kernel - interpolated table| <= d / 4096 + 2**-20 (d the local
    table step), < 2.2e-6 for the default tables: the bound in _sotrng.h."""
    pop = _population(8, global_random_seed)
    a, b, thr = _kernel_args(pop, np.float64)
    rng = np.random.default_rng(global_random_seed)
    worst = 0.0
    for j in range(len(pop)):
        cur = pop.i50[j] + pop.scale[j] * rng.uniform(-11, 11, size=400)
        s = np.clip(cur * (a[j] * 4096.0) + b[j] * 4096.0, 0, 4096.0 * (thr.shape[1] - 1))
        q = s.astype(np.int64)
        exact = _exact_kernel_probability(q, thr[j])
        I = np.tile(pop.i50, (cur.size, 1))
        I[:, j] = cur
        interp = pop.table_probability(I)[:, j]
        g = np.minimum(q >> 12, thr.shape[1] - 2)
        d = np.abs(thr[j][g + 1].astype(np.int64) - thr[j][g]) / 2.0**32
        err = np.abs(exact - interp)
        assert (err <= d / 4096 + 2.0**-20 + 1e-12).all()
        worst = max(worst, err.max())
    assert worst < 2.2e-6


# ---------------------------------------------------------------------------
# Statistics: sampled frequencies against the interpolated table
def _cell_currents(pop, fractions, span, stride=1):
    """Currents at grid points g + f for every ``stride``-th grid point within
    +-span scales of each device's I50: one cell per (device, grid point, f)."""
    lo, hi, thr = pop.table()
    G = thr.shape[1]
    step = (hi - lo) / (G - 1)
    cols, cur = [], []
    for j in range(len(pop)):
        g_mid = (pop.i50[j] - lo[j]) / step[j]
        half = span * pop.scale[j] / step[j]
        for g in range(max(0, int(g_mid - half)), min(G - 1, int(g_mid + half) + 1), stride):
            for f in fractions:
                cols.append(j)
                cur.append(lo[j] + (g + f) * step[j])
    return np.array(cols), np.array(cur)


def _frequencies(pop, cols, cur, T, seed, dtype=np.float64):
    """Counts of ones over T draws per cell: the cells are the columns of a
    (T, n_cells) problem, run through the kernel in chunks of rows."""
    a, b, thr = _kernel_args(pop, dtype)
    ca, cb, ct = a[cols], b[cols], np.ascontiguousarray(thr[cols])
    chunk = max(1, min(T, 2_000_000 // cur.size))
    block = np.ascontiguousarray(np.broadcast_to(cur.astype(dtype), (chunk, cur.size)))
    out = np.empty(block.shape, dtype=np.uint8)
    counts = np.zeros(cur.size, dtype=np.int64)
    for r0 in range(0, T, chunk):
        k = min(chunk, T - r0)
        _kernels.sample_table(block[:k], ca, cb, ct, seed, 0, r0, out[:k], 2)
        counts += out[:k].sum(axis=0, dtype=np.int64)
    return counts


def _binomial_pvalues(counts, T, p):
    """Two-sided exact binomial tail probabilities of each count."""
    lower = stats.binom.cdf(counts, T, p)
    upper = stats.binom.sf(counts - 1, T, p)
    return np.minimum(1.0, 2 * np.minimum(lower, upper))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_frequencies_match_interpolated_table_per_cell(global_random_seed, dtype):
    """Coarse tables (24 points) make every grid step large (up to 0.2 in P),
    so each single cell sees an off-by-one grid index (~25 sigma), a missing
    interpolation (up to ~19 sigma at f = 0.5) or a wrong threshold.

    Cells: 40 devices x ~7 grid points x 3 fractions ~ 840, T = 4000 draws
    each.  Per cell the two-sided exact binomial p-value must exceed 3.8e-8
    (the 5.5 sigma normal tail): family-wise false alarm < 840 x 3.8e-8 ~ 3e-5.
    The sampler's bias (< d / 4096 + 2**-20 ~ 5e-5 here) is 0.006 sigma."""
    pop = _population(40, global_random_seed, table_points=24)
    cols, cur = _cell_currents(pop, fractions=(0.25, 0.5, 0.75), span=2.5)
    T = 4000
    counts = _frequencies(pop, cols, cur, T, seed=global_random_seed, dtype=dtype)
    p = _per_cell(pop, cols, cur)
    pvals = _binomial_pvalues(counts, T, p)
    worst = int(np.argmin(pvals))
    assert pvals[worst] > 3.8e-8, (f"cell {worst}: device {cols[worst]}, {counts[worst]}/{T} "
                                   f"ones, expected P = {p[worst]:.4f}")
    assert cur.size > 600   # the switching regions were covered


def _per_cell(pop, cols, cur):
    """Expected P of each cell from the NumPy reference ``table_probability``."""
    I = np.tile(pop.i50, (cur.size, 1))
    I[np.arange(cur.size), cols] = cur
    return pop.table_probability(I)[np.arange(cur.size), cols]


def test_frequencies_match_default_tables_in_aggregate(global_random_seed):
    """Default 1024-point tables: steps are small (<= 0.005), so an off-by-one
    index or a dropped interpolation shows as a *systematic* shift summed over
    all cells (~0.003 x 5e6 draws = 15 sigma of the sum), and any lost
    per-cell structure as excess chi-square.  Bounds: 5.5 sigma on the signed
    sum; chi-square p-value > 1e-7."""
    pop = _population(40, global_random_seed)
    cols, cur = _cell_currents(pop, fractions=(0.5,), span=2.5, stride=4)
    T = 2000
    counts = _frequencies(pop, cols, cur, T, seed=global_random_seed + 1)
    p = _per_cell(pop, cols, cur)
    var = T * p * (1 - p)
    z_sum = (counts - T * p).sum() / math.sqrt(var.sum())
    assert abs(z_sum) < 5.5, z_sum
    keep = var > 5
    chi2 = (((counts - T * p)[keep]) ** 2 / var[keep]).sum()
    assert stats.chi2.sf(chi2, keep.sum()) > 1e-7, (chi2, keep.sum())
    assert cur.size > 2000


def test_population_sample_distribution(global_random_seed):
    """Through the public API: currents spread over the switching region of
    500 devices; the total count of ones within 5.5 sigma of sum(P)."""
    pop = _population(500, global_random_seed)
    rng = np.random.default_rng(global_random_seed)
    I = pop.i50 + 3 * pop.scale * rng.standard_normal((400, 500))
    p = pop.table_probability(I)
    for dtype in (np.float64, np.float32):
        bits = pop.sample(I.astype(dtype), random_state=global_random_seed, n_threads=2)
        z = (bits.sum() - p.sum()) / math.sqrt((p * (1 - p)).sum())
        assert abs(z) < 5.5, (dtype, z)


def test_stuck_devices():
    pop = DevicePopulation([2e-3] * 3, [1e-4] * 3, p_lo=[0, 1, 0.25], p_hi=[0, 1, 0.25])
    I = 2e-3 + 1e-3 * np.random.default_rng(0).standard_normal((3000, 3))
    bits = pop.sample(I, random_state=3)
    assert (bits[:, 0] == 0).all() and (bits[:, 1] == 1).all()     # P = 0 and 1 - 2**-32
    assert _binomial_pvalues(np.array([bits[:, 2].sum()]), 3000, 0.25)[0] > 3.8e-8


# ---------------------------------------------------------------------------
# Determinism: threads, chunking, CPU paths, seeds and streams
@pytest.fixture
def big_problem():
    pop = _population(300, 7)
    rng = np.random.default_rng(8)
    I = pop.i50 + 3 * pop.scale * rng.standard_normal((2500, 300))
    return pop, I


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bits_independent_of_threads_chunks_and_paths(big_problem, dtype, global_random_seed):
    pop, I = big_problem
    X = I.astype(dtype)
    ref = pop.sample(X, random_state=global_random_seed, n_threads=1)
    for nt in (2, 3):
        np.testing.assert_array_equal(pop.sample(X, random_state=global_random_seed,
                                                 n_threads=nt), ref)
    seed = 12345 + global_random_seed
    one = pop._sample_seeded(X, seed, 2, stream=4)
    pieces = [pop._sample_seeded(np.ascontiguousarray(X[s:e]), seed, 2, stream=4,
                                 row_offset=s) for s, e in [(0, 1), (1, 777), (777, 2500)]]
    np.testing.assert_array_equal(np.concatenate(pieces), one)
    try:
        for isa in ISAS:
            _kernels.sampler_isa(isa)
            np.testing.assert_array_equal(pop._sample_seeded(X, seed, 2, stream=4), one)
    finally:
        _kernels.sampler_isa("best")


def test_seeds_streams_and_offsets_change_the_bits(big_problem):
    pop, I = big_problem
    p = pop.table_probability(I)
    agree = (p * p + (1 - p) * (1 - p)).mean()     # for independent draws
    base = pop._sample_seeded(I, 1)
    for other in (pop._sample_seeded(I, 2), pop._sample_seeded(I, 1, stream=1),
                  pop._sample_seeded(I, 1, row_offset=1)):
        assert abs((other == base).mean() - agree) < 0.01
    np.testing.assert_array_equal(pop.sample(I, random_state=9), pop.sample(I, random_state=9))


def test_sampler_isa_selection():
    best = _kernels.sampler_isa_max()
    assert _kernels.sampler_isa() == best
    try:
        assert _kernels.sampler_isa("scalar") == "scalar"
        assert _kernels.sampler_isa("avx512") in ISAS      # capped at what the CPU has
        with pytest.raises(ValueError, match="unknown"):
            _kernels.sampler_isa("sse9")
    finally:
        assert _kernels.sampler_isa("best") == best


def test_isa_from_the_environment():
    """SOTCORE_ISA selects a path; a bad value or a path the CPU lacks warns and
    keeps the best one (the value is read at import)."""
    best = _kernels.sampler_isa_max()
    try:
        assert _kernels._isa_from_environment(" Scalar ") == "scalar"
        assert _kernels._isa_from_environment("") == "scalar"     # empty: leaves it
        with pytest.warns(RuntimeWarning, match="SOTCORE_ISA='sse9' is not one of"):
            assert _kernels._isa_from_environment("sse9") == best
        if best != "avx512":
            with pytest.warns(RuntimeWarning, match="no avx512 path"):
                _kernels._isa_from_environment("avx512")
    finally:
        _kernels.sampler_isa("best")


def test_each_isa_forced_by_environment_predicts_the_same_bits(tmp_path):
    """End to end, in fresh processes: a fitted model's predict_proba (fused
    inference) and a population's samples are bit-identical whichever path
    SOTCORE_ISA forces."""
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys, numpy as np, sotcore\n"
            "from sotcore import _kernels\n"
            "from sklearn.datasets import load_digits\n"
            "X, y = load_digits(return_X_y=True)\n"
            "X = (X / 16).astype(np.float32)\n"
            "clf = sotcore.SOTClassifier(hidden_layer_sizes=(40,), max_iter=15, n_samples=8,\n"
            "                            random_state=0).fit(X[:1000], y[:1000])\n"
            "P = clf.predict_proba(X[1000:1400])\n"
            "pop = sotcore.DevicePopulation.from_width(20.0, 37, random_state=1)\n"
            "I = pop.i50 + pop.scale * np.linspace(-4, 4, 200)[:, None]\n"
            "B = pop.sample(I, random_state=3)\n"
            "np.savez(sys.argv[1], P=P, B=B, isa=_kernels.sampler_isa())\n")
    import sotcore
    root = str(Path(sotcore.__file__).resolve().parent.parent)
    outs = {}
    for isa in ISAS:
        env = dict(os.environ, SOTCORE_ISA=isa, OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        f = tmp_path / f"{isa}.npz"
        # cwd: not the repository root, whose source tree may have no compiled core
        subprocess.run([sys.executable, "-c", code, str(f)], env=env, check=True, timeout=300,
                       cwd=tmp_path)
        with np.load(f) as z:
            assert str(z["isa"]) == isa
            outs[isa] = (z["P"], z["B"])
    P0, B0 = outs[ISAS[0]]
    assert 0.05 < B0.mean() < 0.95 and P0.max() > 0.5     # a trained model, real bits
    for P, B in outs.values():
        np.testing.assert_array_equal(P, P0)
        np.testing.assert_array_equal(B, B0)


# ---------------------------------------------------------------------------
# The def entry points reject what they cannot index safely
def test_sample_table_rejects_bad_shapes_and_types():
    m, G = 5, 8
    cur = np.zeros((4, m))
    a, b = np.ones(m), np.zeros(m)
    table = np.zeros((m, G), dtype=np.uint32)
    out = np.zeros((4, m), dtype=np.uint8)
    ok = (cur, a, b, table, 0, 0, 0, out, 1)
    _kernels.sample_table(*ok)
    bad_cases = [
        (ValueError, {3: np.zeros((m + 1, G), np.uint32)}),     # table rows
        (ValueError, {3: np.zeros((m - 1, G), np.uint32)}),
        (ValueError, {1: np.ones(m + 1)}),                      # a length
        (ValueError, {2: np.ones(m - 1)}),                      # b length
        (ValueError, {7: np.zeros((3, m), np.uint8)}),          # out rows
        (ValueError, {7: np.zeros((4, m + 1), np.uint8)}),      # out columns
        (ValueError, {3: np.zeros((m, 1), np.uint32)}),         # G < 2
        (ValueError, {3: np.zeros((1, (1 << 20) + 1), np.uint32),
                      0: np.zeros((4, 1)), 1: np.ones(1), 2: np.ones(1),
                      7: np.zeros((4, 1), np.uint8)}),          # G > 2**20
        (ValueError, {0: np.zeros((m, 4)).T}),                  # not C-contiguous
        (ValueError, {7: np.zeros((4, m), np.int32)}),          # out dtype
        (ValueError, {3: np.zeros((m, G), np.int64)}),          # table dtype
        ((TypeError, ValueError), {1: np.ones(m, np.float32)}),  # mixed float dtypes
        (ValueError, {7: np.zeros((4, m), np.uint8)[:, ::-1]}),  # out not contiguous
    ]
    for exc, repl in bad_cases:
        args = list(ok)
        for k, v in repl.items():
            args[k] = v
        with pytest.raises(exc):
            _kernels.sample_table(*args)
    ro = np.zeros((4, m), np.uint8)
    ro.setflags(write=False)
    with pytest.raises(ValueError):
        _kernels.sample_table(cur, a, b, table, 0, 0, 0, ro, 1)
    # empty inputs are fine and write nothing
    assert _kernels.sample_table(np.zeros((0, m)), a, b, table, 0, 0, 0,
                                 np.zeros((0, m), np.uint8), 1) is False
    assert _kernels.sample_table(np.zeros((3, 0)), np.ones(0), np.ones(0),
                                 np.zeros((0, G), np.uint32), 0, 0, 0,
                                 np.zeros((3, 0), np.uint8), 1) is False


# ---------------------------------------------------------------------------
# binary_matvec
def _matvec(bits, W, n_threads=1):
    out = np.full((bits.shape[0], W.shape[1]), np.nan, dtype=np.float32)
    _kernels.binary_matvec(bits, W, out, n_threads)
    return out


@pytest.mark.parametrize("n, K, M", [(1, 1, 1), (7, 33, 5), (300, 64, 130), (0, 5, 3),
                                     (4, 0, 6), (5, 7, 0)])
def test_binary_matvec_exact_for_small_integer_weights(n, K, M, global_random_seed):
    rng = np.random.default_rng(global_random_seed)
    bits = rng.integers(0, 2, size=(n, K), dtype=np.uint8)
    W = rng.integers(-8, 9, size=(K, M)).astype(np.float32)
    expected = (bits.astype(np.float64) @ W.astype(np.float64)).astype(np.float32)
    for nt in (1, 2):
        np.testing.assert_array_equal(_matvec(bits, W, nt), expected)


def test_binary_matvec_float_weights_and_nonzero_bytes(global_random_seed):
    rng = np.random.default_rng(global_random_seed)
    bits = rng.integers(0, 4, size=(50, 40), dtype=np.uint8)
    bits[0, :5] = 255                                  # any non-zero byte is a set bit
    W = rng.standard_normal((40, 17)).astype(np.float32)
    expected = (bits != 0).astype(np.float64) @ W.astype(np.float64)
    got = _matvec(bits, W)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(_matvec(bits, W, 2), got)     # thread-count independent


def test_binary_matvec_rejects_bad_shapes():
    bits = np.zeros((3, 4), np.uint8)
    W = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError):
        _kernels.binary_matvec(bits, np.zeros((5, 2), np.float32), np.zeros((3, 2), np.float32), 1)
    with pytest.raises(ValueError):
        _kernels.binary_matvec(bits, W, np.zeros((2, 2), np.float32), 1)
    with pytest.raises(ValueError):
        _kernels.binary_matvec(bits, W, np.zeros((3, 3), np.float32), 1)
    with pytest.raises(ValueError):
        _kernels.binary_matvec(bits, W.astype(np.float64), np.zeros((3, 2), np.float32), 1)


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_keys_equal_one_row_calls_at_that_key(isa, dtype):
    """Keyed row i draws exactly as an unkeyed one-row call at row0 = key_i."""
    K = _kernels
    pop = DevicePopulation.from_width(20.0, 37, random_state=0)
    _, _, thr = pop.table()
    a, b = pop._table_cache[dtype]
    rng = np.random.default_rng(3)
    I = (pop.i50 + pop.scale * rng.standard_normal((150, 37))).astype(dtype)
    keys = rng.integers(0, 2**64, 150, dtype=np.uint64)
    old = K.sampler_isa()
    try:
        K.sampler_isa(isa)
        out = np.empty(I.shape, np.uint8)
        K.sample_table(I, a, b, thr, 5, 2, 0, out, 2, keys)
        for i in range(150):
            one = np.empty((1, 37), np.uint8)
            K.sample_table(I[i:i + 1], a, b, thr, 5, 2, int(keys[i]), one, 1)
            np.testing.assert_array_equal(out[i], one[0])
        perm = rng.permutation(150)
        out2 = np.empty(I.shape, np.uint8)
        K.sample_table(np.ascontiguousarray(I[perm]), a, b, thr, 5, 2, 0, out2, 1, keys[perm])
        np.testing.assert_array_equal(out2, out[perm])
        with pytest.raises(ValueError, match="row_keys"):
            K.sample_table(I, a, b, thr, 5, 2, 0, out, 1, keys[:3])
    finally:
        K.sampler_isa(old)
