import numpy as np
import pytest

import sotcore
from sotcore.backends import (BackendError, EmulatedBackend, InstrumentBackend,
                              RecordingBackend, ReplayBackend)
from sotcore.estimator import SOTClassifier


@pytest.fixture
def pop():
    return sotcore.DevicePopulation.from_width(20.0, 10, random_state=0)


def _lab(pop, seed=0):
    """A fake instrument: the emulator behind a user callable."""
    rng = np.random.default_rng(seed)

    def fn(currents, devices):
        assert currents.dtype == np.float64 and devices.dtype == np.int64
        return (rng.random(currents.shape) < pop[devices].probability(currents)).astype(int)
    return fn


def test_emulated_backend_reproducible(pop):
    I = np.tile(pop.i50, (50, 1))
    a = EmulatedBackend(pop, 7)
    b = EmulatedBackend(pop, 7)
    np.testing.assert_array_equal(a.pulse(I), b.pulse(I))
    # successive calls draw fresh bits
    assert not np.array_equal(a.pulse(I), a.pulse(I))
    sub = a.pulse(I[:, 2:5], slice(2, 5))
    assert sub.shape == (50, 3)
    assert a.pulse_counts.tolist() == [150, 150, 200, 200, 200, 150, 150, 150, 150, 150]
    with pytest.raises(ValueError, match="3 columns"):
        a.pulse(I, slice(2, 5))
    with pytest.raises(ValueError, match="devices"):
        a.pulse(I[:, :3], np.array([0, 1, 10]))
    with pytest.raises(TypeError, match="population"):
        EmulatedBackend("pop")


def test_instrument_backend_batches_and_counts(pop):
    calls = []
    inner = _lab(pop)

    def fn(c, d):
        calls.append(c.shape)
        return inner(c, d)
    be = InstrumentBackend(fn, 10, max_batch=7, pulse_duration=1e-8)
    bits = be.pulse(np.tile(pop.i50, (20, 1)))
    assert bits.shape == (20, 10) and bits.dtype == np.uint8
    assert calls == [(7, 10), (7, 10), (6, 10)]
    assert be.pulse_counts.sum() == 200
    assert be.hardware_time == pytest.approx(20 * 1e-8)
    seq = InstrumentBackend(fn, 10, parallel=False, pulse_duration=1e-8)
    seq.pulse(np.tile(pop.i50, (2, 1)))
    assert seq.hardware_time == pytest.approx(20 * 1e-8)


@pytest.mark.parametrize("bad, match", [
    (lambda c, d: np.zeros((c.shape[0], c.shape[1] + 1)), "shape"),
    (lambda c, d: np.full(c.shape, 2), "non-binary"),
    (lambda c, d: np.full(c.shape, 0.5), "non-binary"),
    (lambda c, d: np.full(c.shape, "1"), "dtype"),
    (lambda c, d: None, "shape"),
])
def test_instrument_backend_rejects_bad_answers(pop, bad, match):
    be = InstrumentBackend(bad, 10)
    with pytest.raises(BackendError, match=match):
        be.pulse(np.tile(pop.i50, (3, 1)))


def test_instrument_backend_wraps_exceptions(pop):
    def fn(c, d):
        raise TimeoutError("scope did not trigger")
    with pytest.raises(BackendError, match="TimeoutError: scope did not trigger"):
        InstrumentBackend(fn, 10).pulse(np.tile(pop.i50, (3, 1)))


def test_instrument_backend_validation():
    with pytest.raises(TypeError, match="callable"):
        InstrumentBackend(42, 3)
    with pytest.raises(ValueError, match="n_devices"):
        InstrumentBackend(lambda c, d: c, 0)
    with pytest.raises(ValueError, match="pulse_duration"):
        InstrumentBackend(lambda c, d: c, 3, pulse_duration=-1)


def test_recording_replay_bit_exact(pop):
    rec = RecordingBackend(EmulatedBackend(pop, 3))
    X = np.random.default_rng(0).random((60, 5)).astype(np.float32)
    y = np.arange(60) % 3
    clf = SOTClassifier(hidden_layer_sizes=(10,), devices=rec, max_iter=2, batch_size=20,
                        random_state=0).fit(X, y)
    log_len = len(rec.log)
    assert log_len > 0
    replay = rec.replay()
    clf2 = SOTClassifier(hidden_layer_sizes=(10,), devices=replay, max_iter=2, batch_size=20,
                         random_state=0).fit(X, y)
    for a, b in zip(clf.coefs_, clf2.coefs_):
        np.testing.assert_array_equal(a, b)
    r = rec.records()
    assert r["device"].shape == r["current"].shape == r["switched"].shape
    # every pulse is labelled with the device it went to, and carries its bit
    np.testing.assert_array_equal(np.bincount(r["device"], minlength=10), rec.pulse_counts)
    c, d, b = rec.log[0]
    first = r["current"][:c.size].reshape(c.shape)
    np.testing.assert_array_equal(first, c)
    np.testing.assert_array_equal(r["device"][:c.size].reshape(c.shape)[0],
                                  np.arange(d.start, d.stop) if isinstance(d, slice) else d)
    np.testing.assert_array_equal(r["switched"][:c.size].reshape(c.shape), b)


def test_replay_detects_divergence(pop, tmp_path):
    rec = RecordingBackend(EmulatedBackend(pop, 3))
    I = np.tile(pop.i50, (4, 1))
    bits = rec.pulse(I)
    rec.save(tmp_path / "log.npz")
    rp = ReplayBackend.load(tmp_path / "log.npz")
    np.testing.assert_array_equal(rp.pulse(I), bits)
    with pytest.raises(BackendError, match="exhausted"):
        rp.pulse(I)
    rp = ReplayBackend.load(tmp_path / "log.npz")
    with pytest.raises(BackendError, match="diverged"):
        rp.pulse(I * 1.01)


def test_instrument_gets_exactly_the_devices_asked_in_order(pop):
    seen = []

    def fn(c, d):
        seen.append((c.copy(), d.copy()))
        return (c > pop.i50[d]).astype(np.uint8)
    be = InstrumentBackend(fn, 10)
    devs = np.array([7, 2, 9, 0])
    cur = pop.i50[devs][None, :] + np.array([[1.0, -1.0, 1.0, -1.0]]) * pop.scale[devs]
    bits = be.pulse(cur, devs)
    assert seen[0][1].tolist() == [7, 2, 9, 0]
    np.testing.assert_array_equal(seen[0][0], cur)
    assert bits.tolist() == [[1, 0, 1, 0]]
    assert be.pulse_counts.tolist() == [1, 0, 1, 0, 0, 0, 0, 1, 0, 1]


def test_backend_protocol(pop):
    assert isinstance(EmulatedBackend(pop, 0), sotcore.Backend)
    assert isinstance(InstrumentBackend(lambda c, d: np.zeros(c.shape), 3), sotcore.Backend)
    assert not isinstance(pop, sotcore.Backend)
    assert sotcore.suggest_mapping(pop).unit > 0 and sotcore.DeviceMap


def test_subpopulation_cache_is_bounded():
    """200 distinct device subsets: the emulator keeps at most SUBPOP_CACHE of
    them (least recently used first out) and memory stays bounded; a cached
    subset gives the same bits as a fresh one."""
    import tracemalloc
    pop = sotcore.DevicePopulation.from_width(20.0, 400, random_state=0)
    be = EmulatedBackend(pop, random_state=1)
    rng = np.random.default_rng(2)
    cur = np.full((2, 300), float(np.median(pop.i50)))
    be.pulse(cur, rng.choice(400, 300, replace=False))          # warm up
    tracemalloc.start()
    try:
        for _ in range(200):
            be.pulse(cur, rng.choice(400, 300, replace=False))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(be._subpops) <= be.SUBPOP_CACHE
    # One sub-population of 300 devices holds ~1.2 MB of tables: 200 would be ~240 MB.
    assert peak < 60 * 2**20, peak / 2**20
    keep = np.arange(5, 305)
    be.pulse(cur, keep)
    for _ in range(5):                                         # recently used: stays
        be.pulse(cur, rng.choice(400, 300, replace=False))
    assert keep.tobytes() in be._subpops
    a = EmulatedBackend(pop, random_state=1, n_threads=1)
    a.calls = be.calls
    np.testing.assert_array_equal(be.pulse(cur, keep), a.pulse(cur, keep))
