"""The BLAS side of the thread policy (sotcore/_threads.py): limits set and
restored, reference counting across threads, and the shutdown of OpenBLAS's
busy-waiting pool."""
import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from sotcore import _threads


def _blas_counts():
    return {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}


def _pools():
    return _threads._openblas_pools(_threads._controller())


needs_pool = pytest.mark.skipif(not _pools(), reason="no pthreads OpenBLAS with the exports")
A = np.random.default_rng(0).standard_normal((600, 600)).astype(np.float32)


def _wake_pool():
    """A multi-threaded product: every pthreads OpenBLAS pool starts (if it had stopped)."""
    with threadpool_limits(2, user_api="blas"):
        np.testing.assert_allclose(A @ A, A.astype(np.float64) @ A, rtol=1e-3, atol=1e-2)
        from scipy.linalg import blas
        blas.sgemm(1.0, A, A)


def test_limit_sets_and_restores_every_blas_library():
    with threadpool_limits(2, user_api="blas"):
        before = _blas_counts()
        assert before and all(v == 2 for v in before.values())
        with _threads.blas_limit(1):
            assert all(v == 1 for v in _blas_counts().values()), _blas_counts()
            with _threads.blas_limit(1):                  # nested: no change
                assert all(v == 1 for v in _blas_counts().values())
            assert all(v == 1 for v in _blas_counts().values())
        assert _blas_counts() == before
        with pytest.raises(RuntimeError, match="boom"):
            with _threads.blas_limit(1):
                raise RuntimeError("boom")
        assert _blas_counts() == before


def test_limit_is_reference_counted_across_threads():
    """Two overlapping callers: the limit holds until the last one leaves."""
    with threadpool_limits(2, user_api="blas"):
        before = _blas_counts()
        entered, release = threading.Event(), threading.Event()
        seen = []

        def other():
            with _threads.blas_limit(1):
                entered.set()
                release.wait(10)
                seen.append(_blas_counts())
        t = threading.Thread(target=other)
        with _threads.blas_limit(1):
            t.start()
            assert entered.wait(10)
        # the main caller has left; the other is still inside
        assert all(v == 1 for v in _blas_counts().values())
        release.set()
        t.join(10)
        assert all(v == 1 for v in seen[0].values())
        assert _blas_counts() == before


@needs_pool
def test_entering_shuts_a_running_pool_down_and_blas_still_works(monkeypatch):
    # (threads other tests left behind, e.g. an abandoned instrument call, would
    # hold the shutdown back: the gate has its own test below)
    monkeypatch.setattr(_threads, "_others_alive", lambda: False)
    _wake_pool()
    assert all(p.avail.value == 1 for p in _pools())
    with _threads.blas_limit(1):
        assert all(p.avail.value == 0 for p in _pools())
        np.testing.assert_allclose(A @ A, A.astype(np.float64) @ A, rtol=1e-3, atol=1e-2)
    assert all(p.avail.value == 0 for p in _pools())      # not restarted on exit
    _wake_pool()                                             # ... but by the next call
    assert all(p.avail.value == 1 for p in _pools())


@needs_pool
def test_no_shutdown_while_another_thread_could_be_in_blas(monkeypatch):
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, args=(10,), name="user-worker")
    t.start()
    try:
        assert _threads._others_alive()
        _wake_pool()
        with _threads.blas_limit(1):
            assert all(p.avail.value == 1 for p in _pools())
    finally:
        stop.set()
        t.join(10)
    monkeypatch.setattr(_threads, "_others_alive", lambda: False)
    _wake_pool()
    monkeypatch.setenv("SOTCORE_QUIET_BLAS", "0")
    with _threads.blas_limit(1):
        assert all(p.avail.value == 1 for p in _pools())
    monkeypatch.setenv("SOTCORE_QUIET_BLAS", "1")
    assert _threads.quiet_openblas() == len(_pools())
    assert _threads.quiet_openblas() == 0                     # nothing left running
