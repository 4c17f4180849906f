import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from sotcore import DevicePopulation
from sotcore.devices import (DEFAULT_I50_PER_UM, DEFAULT_WINDOW_FRACTION, WINDOW_PER_SCALE,
                             switching_probability)


def test_public_surface(pop20):
    assert len(pop20) == 64
    for name in ("i50", "scale", "p_lo", "p_hi", "width"):
        arr = getattr(pop20, name)
        assert arr.dtype == np.float64 and arr.shape == (64,)
    assert np.all(pop20.width == 20.0)
    I = np.tile(pop20.i50, (3, 1))
    P = pop20.probability(I)
    assert P.shape == (3, 64) and P.dtype == np.float64
    np.testing.assert_allclose(P, 0.5)
    bits = pop20.sample(I, random_state=0)
    assert bits.dtype == np.uint8 and bits.shape == (3, 64)
    assert set(np.unique(bits)) <= {0, 1}
    assert "DevicePopulation(n_devices=64" in repr(pop20)


def test_window_definition():
    pop = DevicePopulation([1e-3], [1e-5])
    lo_hi = pop.i50 + pop.scale * np.log(np.array([1 / 9, 9.0]))
    P = pop.probability(lo_hi[:, None])
    np.testing.assert_allclose(P[:, 0], [0.1, 0.9])
    np.testing.assert_allclose(pop.window, lo_hi[1] - lo_hi[0])
    assert math.isclose(WINDOW_PER_SCALE, 2 * math.log(9))


@pytest.mark.parametrize("width", [5.0, 20.0, 40.0])
def test_from_width_linear_scaling(width):
    pop = DevicePopulation.from_width(width, 4000, variability=0.10, random_state=1)
    nominal_i50 = DEFAULT_I50_PER_UM * width
    nominal_w = DEFAULT_WINDOW_FRACTION * nominal_i50
    # Mean 1 factors with CV 0.1: the sample mean is within 5 standard errors.
    se = 0.10 / math.sqrt(4000)
    assert abs(pop.i50.mean() / nominal_i50 - 1) < 5 * se
    assert abs(pop.window.mean() / nominal_w - 1) < 5 * se
    assert abs(pop.i50.std() / pop.i50.mean() - 0.10) < 0.01
    assert abs(pop.window.std() / pop.window.mean() - 0.10) < 0.01


def test_from_width_defaults_match_issue():
    pop = DevicePopulation.from_width(20.0, 2000, variability=0.0, random_state=0)
    np.testing.assert_allclose(pop.i50, 2e-3)
    np.testing.assert_allclose(pop.window, 0.3e-3)


def test_from_width_stuck_and_read_errors():
    pop = DevicePopulation.from_width(20.0, 2000, stuck_fraction=0.25, read_error=0.02,
                                      random_state=3)
    stuck = pop.stuck
    assert 0.2 < stuck.mean() < 0.3
    assert set(np.unique(pop.p_lo[stuck])) <= {0.0, 1.0}
    np.testing.assert_allclose(pop.p_lo[~stuck], 0.02)
    np.testing.assert_allclose(pop.p_hi[~stuck], 0.98)
    far = np.tile(pop.i50 + 50 * pop.scale, (1, 1))
    P = pop.probability(far)[0]
    np.testing.assert_allclose(P[~stuck], 0.98)
    np.testing.assert_array_equal(P[stuck], pop.p_lo[stuck])


def test_from_width_deterministic():
    a = DevicePopulation.from_width(10.0, 50, random_state=7)
    b = DevicePopulation.from_width(10.0, 50, random_state=7)
    c = DevicePopulation.from_width(10.0, 50, random_state=8)
    np.testing.assert_array_equal(a.i50, b.i50)
    assert not np.array_equal(a.i50, c.i50)


def test_table_resolution_error_below_1e3():
    pop = DevicePopulation.from_width(20.0, 200, variability=0.2, read_error=0.01,
                                      random_state=0)
    lo, hi, thr = pop.table()
    assert thr.dtype == np.uint32 and thr.shape == (200, 1024)
    assert pop.table_points >= 1024
    err = pop.table_error()
    assert err < 1e-3
    # coarse tables are measurably worse: the error estimate is not vacuous
    coarse = DevicePopulation(pop.i50, pop.scale, table_points=8, table_span=3)
    assert coarse.table_error() > 1e-2


def test_table_probability_matches_probability_on_grid(pop20):
    lo, hi, thr = pop20.table()
    grid = lo + (hi - lo) * 0.37
    np.testing.assert_allclose(pop20.table_probability(grid[None, :]),
                               pop20.probability(grid[None, :]), atol=2e-5)


def test_derivative_matches_finite_difference(pop20):
    I = pop20.i50 + pop20.scale * np.linspace(-3, 3, 7)[:, None]
    h = 1e-4 * pop20.scale
    fd = (pop20.probability(I + h) - pop20.probability(I - h)) / (2 * h)
    np.testing.assert_allclose(pop20.derivative(I), fd, rtol=1e-5)


def test_nonparametric_tables_roundtrip(tmp_path):
    G = 16
    probs = np.vstack([np.linspace(0, 1, G), np.linspace(0.2, 0.6, G) ** 2])
    pop = DevicePopulation([1e-3, 2e-3, 3e-3], [1e-5, 2e-5, 3e-5],
                           tables=([0.5e-3, 1e-3], [1.5e-3, 5e-3], probs),
                           table_devices=[0, 2])
    assert pop.nonparametric.tolist() == [True, False, True]
    I = np.array([[1e-3, 2e-3, 3e-3]])
    P = pop.probability(I)
    assert P[0, 0] == pytest.approx(0.5)
    assert P[0, 1] == pytest.approx(0.5)
    np.testing.assert_allclose(pop.table_probability(I), P, atol=1e-9)
    path = pop.save(tmp_path / "pop.json")
    back = DevicePopulation.load(path)
    np.testing.assert_array_equal(back.probability(I), P)
    assert back.nonparametric.tolist() == [True, False, True]
    sub = pop[[2, 1]]
    np.testing.assert_allclose(sub.probability(I[:, [2, 1]]), P[:, [2, 1]])


def test_save_load_roundtrip_exact(tmp_path, pop20):
    path = pop20.save(tmp_path / "devices.json")
    back = DevicePopulation.load(path)
    for name in ("i50", "scale", "p_lo", "p_hi", "width"):
        np.testing.assert_array_equal(getattr(back, name), getattr(pop20, name))
    I = pop20.i50 + pop20.scale * np.random.default_rng(0).standard_normal((50, 64))
    np.testing.assert_array_equal(back.sample(I, random_state=5), pop20.sample(I, random_state=5))
    d = json.loads(path.read_text())
    assert d["format"] == "sotcore.population" and d["version"] == 1


def test_load_rejects_bad_files(tmp_path, pop20):
    path = pop20.save(tmp_path / "devices.json")
    text = path.read_text()
    (tmp_path / "trunc.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="truncated"):
        DevicePopulation.load(tmp_path / "trunc.json")
    d = json.loads(text)
    d["version"] = 99
    (tmp_path / "new.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="newer"):
        DevicePopulation.load(tmp_path / "new.json")
    d = json.loads(text)
    d["scale"][3] = -1.0
    (tmp_path / "neg.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="scale"):
        DevicePopulation.load(tmp_path / "neg.json")
    d = json.loads(text)
    del d["i50"]
    (tmp_path / "miss.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="i50"):
        DevicePopulation.load(tmp_path / "miss.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something"}))
    with pytest.raises(ValueError, match="not a sotcore population"):
        DevicePopulation.load(tmp_path / "other.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError):
        DevicePopulation.load(tmp_path / "bin.json")
    with pytest.raises(FileNotFoundError, match="not found"):
        DevicePopulation.load(tmp_path / "absent.json")


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(width_um=0.0, n_devices=5), ValueError, "width_um"),
    (dict(width_um=-3.0, n_devices=5), ValueError, "width_um"),
    (dict(width_um=np.nan, n_devices=5), ValueError, "width_um"),
    (dict(width_um="20", n_devices=5), TypeError, "width_um"),
    (dict(width_um=20.0, n_devices=0), ValueError, "n_devices"),
    (dict(width_um=20.0, n_devices=2.5), TypeError, "n_devices"),
    (dict(width_um=20.0, n_devices=5, variability=-0.1), ValueError, "variability"),
    (dict(width_um=20.0, n_devices=5, stuck_fraction=1.5), ValueError, "stuck_fraction"),
    (dict(width_um=[1.0, 2.0], n_devices=5), ValueError, "width_um"),
])
def test_from_width_rejects_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        DevicePopulation.from_width(**kwargs)


@pytest.mark.parametrize("args, exc, match", [
    (([1e-3, 2e-3], [1e-5, 0.0]), ValueError, "scale"),
    (([1e-3, 2e-3], [1e-5, -1e-5]), ValueError, "scale"),
    (([1e-3, np.inf], 1e-5), ValueError, "i50"),
    (([], []), ValueError, "at least one device"),
    ((np.zeros((2, 2)), 1e-5), ValueError, "i50"),
    ((["a", "b"], 1e-5), TypeError, "i50"),
    (([1e-3, 2e-3], 1e-5, 1.5), ValueError, "p_lo"),
    (([1e-3, 2e-3], [1e-5, 1e-5, 1e-5]), ValueError, "scale"),
])
def test_constructor_rejects_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        DevicePopulation(*args)


@pytest.mark.parametrize("current, exc, match", [
    (np.zeros((3, 5)), ValueError, r"shape \(n, 64\)"),
    (np.full((2, 64), np.nan), ValueError, "finite"),
    (np.full((2, 64), -np.inf), ValueError, "finite"),
    (np.zeros((2, 2, 64)), ValueError, "dimension"),
    (np.array([["x"] * 64]), TypeError, "numeric"),
    (np.zeros((2, 64), dtype=complex), TypeError, "real"),
    (np.zeros((2, 64), dtype=bool), TypeError, "booleans"),
    ("1e-3", TypeError, "string"),
    ([[1e-3] * 63, [1e-3] * 64], ValueError, "current"),
])
def test_sample_and_probability_reject_bad_currents(pop20, current, exc, match):
    with pytest.raises(exc, match=match):
        pop20.sample(current, random_state=0)
    with pytest.raises(exc, match=match):
        pop20.probability(current)


def test_sample_accepts_noncontiguous_readonly_and_1d(pop20):
    I = np.asfortranarray(np.tile(pop20.i50, (10, 1)))
    I.setflags(write=False)
    assert pop20.sample(I, random_state=1).shape == (10, 64)
    strided = np.tile(pop20.i50, (10, 2))[:, ::2]
    np.testing.assert_array_equal(pop20.sample(strided, random_state=1),
                                  pop20.sample(np.ascontiguousarray(strided), random_state=1))
    one = pop20.sample(pop20.i50, random_state=1)
    assert one.shape == (64,)
    # integer currents are accepted (converted): huge values clamp to the grid
    assert pop20.sample(np.full((1, 64), 10**6), random_state=0).all()


def test_n_threads_validation(pop20):
    I = np.tile(pop20.i50, (4, 1))
    with pytest.raises(ValueError, match="n_threads"):
        pop20.sample(I, n_threads=0)
    with pytest.raises(TypeError, match="n_threads"):
        pop20.sample(I, n_threads=1.5)
    a = pop20.sample(I, random_state=0, n_threads=-1)
    np.testing.assert_array_equal(a, pop20.sample(I, random_state=0, n_threads=1))


def test_switching_probability_function():
    assert switching_probability(1.0, 1.0, 0.1) == pytest.approx(0.5)
    assert switching_probability(1.0, 1.0, 0.1, 0.1, 0.3) == pytest.approx(0.2)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5), m=st.integers(1, 9),
       z=st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False),
       dtype=st.sampled_from([np.float64, np.float32, np.int64]))
def test_hypothesis_shapes_and_values(n, m, z, dtype):
    pop = DevicePopulation.from_width(10.0, m, random_state=m)
    I = (pop.i50 + z * pop.scale) * np.ones((n, 1))
    I = I.astype(dtype) if dtype != np.int64 else np.rint(I * 1e6).astype(np.int64)
    P = pop.probability(I)
    assert P.shape == (n, m) and np.all((P >= 0) & (P <= 1))
    bits = pop.sample(I, random_state=0)
    assert bits.shape == (n, m) and bits.dtype == np.uint8 and bits.max(initial=0) <= 1


@settings(max_examples=30, deadline=None)
@given(arr=hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=3, max_side=6),
                      elements=st.floats(allow_nan=True, allow_infinity=True, width=64)))
def test_hypothesis_arbitrary_arrays_never_crash(arr):
    pop = DevicePopulation.from_width(10.0, 6, random_state=0)
    try:
        bits = pop.sample(arr * 1e-3, random_state=0)
    except (ValueError, TypeError):
        return
    assert bits.shape == arr.shape and bits.max(initial=0) <= 1


# -- immutability (#12 item 3) ---------------------------------------------------------------
def test_population_arrays_are_read_only(pop20):
    I = np.tile(pop20.i50, (2, 1))
    P0 = pop20.probability(I)
    for name in ("i50", "scale", "p_lo", "p_hi", "width"):
        with pytest.raises(ValueError, match="read-only"):
            getattr(pop20, name)[:] += 10 * pop20.scale
        with pytest.raises(AttributeError):
            setattr(pop20, name, np.zeros(len(pop20)))
    m = pop20.meta
    m["model"] = "edited"
    assert pop20.meta != m                       # meta is handed out as a copy
    np.testing.assert_array_equal(pop20.probability(I), P0)


def test_replace_returns_a_consistent_new_population(pop20):
    shifted = pop20.replace(i50=pop20.i50 + 10 * pop20.scale)
    assert shifted is not pop20
    I = np.tile(pop20.i50, (4000, 1))
    # probability() and sample() of the new population agree (no stale table) ...
    assert shifted.probability(I[:1]).max() < 1e-4
    assert shifted.sample(I, random_state=0).mean() < 1e-3
    # ... and the old one is unchanged (P = 0.5 at its own i50).
    assert abs(pop20.sample(I, random_state=0).mean() - 0.5) < 0.01
    with pytest.raises(TypeError, match="unknown"):
        pop20.replace(bias=1.0)


def test_replace_and_subset_keep_tables_and_widths():
    probs = np.vstack([np.linspace(0, 1, 16)])
    pop = DevicePopulation([1e-3, 2e-3, 3e-3], [1e-5, 2e-5, 3e-5], width=[1.0, np.nan, 3.0],
                           tables=([0.5e-3], [1.5e-3], probs), table_devices=[2])
    back = pop.replace(p_hi=0.9)
    assert back.nonparametric.tolist() == [False, False, True]
    np.testing.assert_array_equal(back.width, [1.0, np.nan, 3.0])
    np.testing.assert_array_equal(pop[[0, 2]].width, [1.0, 3.0])   # not all-NaN


# -- population files --------------------------------------------------------------------------
def _deep(k):
    x = []
    for _ in range(k):
        x = [x]
    return x


def _pop_file(tmp_path, edit, n=6):
    d = DevicePopulation.from_width(10.0, n, random_state=0).to_dict()
    edit(d)
    p = tmp_path / "p.json"
    p.write_text(json.dumps(d))
    return p


def test_null_width_stays_per_device(tmp_path):
    p = _pop_file(tmp_path, lambda d: d["width"].__setitem__(2, None))
    back = DevicePopulation.load(p)
    assert np.isnan(back.width[2]) and np.isfinite(np.delete(back.width, 2)).all()
    back.save(tmp_path / "again.json")
    np.testing.assert_array_equal(DevicePopulation.load(tmp_path / "again.json").width,
                                  back.width)


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.__setitem__("table_span", 1e-300), "resolved"),
    (lambda d: d.__setitem__("table_span", 0), "table_span"),
    (lambda d: d.__setitem__("table_points", 2**21), "table_points"),
    (lambda d: d.__setitem__("table_points", 1.5), "table_points"),
    (lambda d: d["scale"].__setitem__(0, 1e-200), "resolved"),
    (lambda d: d["i50"].__setitem__(0, 10**400), "too large"),
    (lambda d: d["i50"].__setitem__(0, 1e308), "resolved"),
    (lambda d: d["i50"].__setitem__(0, "1e-3"), "i50"),
    (lambda d: d["p_hi"].__setitem__(0, True), "p_hi"),
    (lambda d: d["width"].__setitem__(0, -1.0), "width"),
    (lambda d: d.__setitem__("n_devices", 7), "n_devices"),
    (lambda d: d.__setitem__("n_devices", 2**70), "n_devices"),
    (lambda d: d.__setitem__("scale", d["scale"][:-1]), "scale"),
    (lambda d: d.__setitem__("meta", [1]), "meta"),
    (lambda d: d.__setitem__("tables", {"devices": [0], "grid_lo": [1e-3], "grid_hi": [1e-3],
                                        "probs": [[0, 1]]}), "grid_hi"),
    (lambda d: d.__setitem__("tables", {"devices": [9], "grid_lo": [0], "grid_hi": [1],
                                        "probs": [[0, 1]]}), "tables.devices"),
    (lambda d: d.__setitem__("tables", [1, 2]), "tables"),
    (lambda d: d.__setitem__("meta", {"x": _deep(80)}), "deep"),
])
def test_population_file_fields_are_checked(tmp_path, edit, match):
    from sotcore.exceptions import InvalidInputError
    p = _pop_file(tmp_path, edit)
    with pytest.raises(InvalidInputError, match=match) as ei:
        DevicePopulation.load(p)
    assert str(p) in str(ei.value)


def test_huge_table_in_a_small_file_is_refused_before_allocating(tmp_path):
    import tracemalloc
    p = _pop_file(tmp_path, lambda d: d.__setitem__("table_points", 2**20), n=200)
    assert p.stat().st_size < 64 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="limit"):
            DevicePopulation.load(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_failed_population_save_leaves_old_file_and_no_tmp(tmp_path, monkeypatch, pop20):
    import errno
    import os
    path = pop20.save(tmp_path / "pop.json")
    before = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        pop20[:3].save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [x.name for x in tmp_path.iterdir()] == ["pop.json"]


# -- sampling agrees with probability() for every accepted device ------------------------------
def _sample_freq(pop, cur, T, seed, dtype=np.float64):
    """Frequency of 1s over T draws of each (current row, device) cell."""
    I = np.repeat(np.asarray(cur, dtype=dtype), T, axis=0)
    return pop.sample(I, random_state=seed).reshape(len(cur), T, -1).mean(axis=1)


def test_tiny_scale_and_degenerate_grid_are_refused():
    with pytest.raises(ValueError, match="resolved"):
        DevicePopulation([2e-3, 2e-3], [1e-4, 1e-200])
    with pytest.raises(ValueError, match="resolved"):
        DevicePopulation([2e-3], [1e-4], table_span=1e-300)
    with pytest.raises(ValueError, match="resolved"):
        DevicePopulation([1e-3], [1e-5], tables=([1e-3], [1e-3 + 1e-17], [[0.0, 1.0]]))
    with pytest.raises(ValueError, match="resolved"):      # 4096 a would overflow
        DevicePopulation([1e-293], [1e-303])


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(log_i50=st.floats(-300, 300), log_ratio=st.floats(-14, 0),
       sign=st.sampled_from([1.0, -1.0]))
def test_sampling_follows_probability_for_accepted_devices(global_random_seed, log_i50,
                                                           log_ratio, sign):
    """Either the device is refused, or for float64 and float32 currents the
    sampled frequency matches probability() of the very current sampled.

    T = 2000 draws at 7 currents x 2 dtypes per example, <= 25 examples x 3
    seeds: ~1050 cells.  A cell fails beyond 6 binomial sigma (two-sided
    2e-9 each, family-wise < 3e-6) plus 2e-3 for the table's own
    interpolation/clamping error (< 1e-4) -- a collapsed grid (P = 0.5
    where probability() says 0 or 1) is off by 0.5."""
    i50 = sign * 10.0 ** log_i50
    scale = abs(i50) * 10.0 ** log_ratio
    try:
        pop = DevicePopulation([i50], [scale])
    except ValueError as exc:
        assert "resolved" in str(exc) or "scale" in str(exc)
        return
    T = 2000
    for dtype in (np.float64, np.float32):
        with np.errstate(over="ignore"):
            cur = (i50 + scale * np.array([-30, -3, -1, 0, 1, 3, 30.0]))[:, None].astype(dtype)
        if not np.isfinite(cur).all():
            continue
        p = pop.probability(cur.astype(np.float64))        # of the current actually sampled
        f = _sample_freq(pop, cur, T, global_random_seed, dtype)
        tol = 6 * np.sqrt(np.maximum(p * (1 - p), 1.0 / T) / T) + 2e-3
        assert (np.abs(f - p) <= tol).all(), (dtype, cur.ravel(), f.ravel(), p.ravel())


def test_float32_currents_on_a_fine_grid_are_sampled_exactly(global_random_seed):
    """scale 1e-10 A at 2 mA: float64 resolves the grid, float32 does not, so
    float32 currents are sampled through float64.  The float32 neighbours of
    i50 are ~2.3 scales apart: P runs 0.09 / 0.5-ish / 0.9 among them, and a
    float32 grid coordinate would be off by several grid steps.  Bounds as in
    the test above (3 seeds x 5 cells)."""
    pop = DevicePopulation([2e-3], [1e-10])
    c = np.float32(2e-3)
    cur = np.array([np.nextafter(c, -1), c, np.nextafter(c, 1),
                    np.nextafter(np.nextafter(c, 1), 1), np.nextafter(np.nextafter(c, -1), -1)],
                   dtype=np.float32)[:, None]
    p = pop.probability(cur.astype(np.float64))
    assert p.min() < 0.2 and p.max() > 0.8
    T = 4000
    f = _sample_freq(pop, cur, T, global_random_seed, np.float32)
    tol = 6 * np.sqrt(np.maximum(p * (1 - p), 1.0 / T) / T) + 2e-3
    assert (np.abs(f - p) <= tol).all(), (f.ravel(), p.ravel())


@pytest.mark.parametrize("kw, match", [
    ({"n_threads": 2**31}, "n_threads"), ({"n_threads": -2**31}, "n_threads"),
    ({"stream": -1}, "stream"), ({"stream": 1.5}, "stream"), ({"stream": 2**64}, "stream"),
    ({"row_offset": -3}, "row_offset"), ({"row_offset": 2.0}, "row_offset"),
])
def test_sample_counters_and_threads_are_checked(pop20, kw, match):
    with pytest.raises(ValueError, match=match):
        pop20.sample(np.tile(pop20.i50, (2, 1)), random_state=0, **kw)
    assert pop20.sample(np.tile(pop20.i50, (2, 1)), random_state=0,
                        stream=np.int64(3)).shape == (2, 64)


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70)
                     | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=4),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c,
                                                                         max_size=3),
                     max_leaves=5)


@settings(max_examples=80, deadline=None)
@given(field=st.sampled_from(["i50", "scale", "p_lo", "p_hi", "width", "n_devices",
                              "table_points", "table_span", "meta", "tables", "version",
                              "format"]),
       index=st.integers(0, 5) | st.none(), value=_JSON)
def test_population_loader_on_fieldwise_edits(tmp_path_factory, field, index, value):
    """Any field (or one element of it) replaced by any JSON value: a usable
    population whose sampling follows probability(), or one InvalidInputError."""
    from sotcore.exceptions import InvalidInputError
    d = DevicePopulation.from_width(10.0, 6, random_state=0).to_dict()
    if index is not None and isinstance(d.get(field), list):
        d[field][index] = value
    else:
        d[field] = value
    p = tmp_path_factory.mktemp("popf") / "p.json"
    p.write_text(json.dumps(d))
    try:
        pop = DevicePopulation.load(p)
    except InvalidInputError as exc:
        assert str(p) in str(exc)
        return
    I = np.tile(pop.i50, (2000, 1))
    P = pop.probability(I[:1])[0]
    f = pop.sample(I, random_state=0).mean(axis=0)
    # 6 binomial sigma at P (<= 0.5 / sqrt(2000)) plus the table error
    assert (np.abs(f - P) <= 6 * 0.5 / np.sqrt(2000) + 2e-3).all()
