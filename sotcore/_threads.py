"""One thread policy for the package (private).

* Kernel threads: ``effective_n_threads`` (in ``_utils``) -- OpenMP's default,
  which honours ``OMP_NUM_THREADS``, or a user's ``n_threads``; negative counts
  are relative to :func:`cpu_count`.
* CPUs: :func:`cpu_count` is cgroup- and affinity-aware (``joblib.cpu_count``), so
  a container limited to 2 CPUs on a 64-core host counts 2.
* BLAS: inside ``fit``, prediction and calibration the BLAS libraries run on one
  thread (:func:`blas_limit`).  Our calls are many small GEMMs next to our own
  OpenMP kernels; a multi-threaded BLAS spins its workers between them and, with
  another busy process on the machine, made small fits up to 10x slower.
  threadpoolctl restores every limit on exit, also when an exception escapes.
"""
import contextlib
import os
import threading

__all__ = ["cpu_count", "blas_limit"]

_CONTROLLER = None
_LOCK = threading.Lock()


def cpu_count():
    """CPUs this process may use (cgroup quota and affinity respected)."""
    try:
        import joblib
        return max(1, int(joblib.cpu_count(only_physical_cores=False)))
    except Exception:  # pragma: no cover - joblib comes with scikit-learn
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else (os.cpu_count() or 1))


def _controller():
    global _CONTROLLER
    with _LOCK:
        if _CONTROLLER is None:
            try:
                from threadpoolctl import ThreadpoolController
                _CONTROLLER = ThreadpoolController()
            except Exception:  # pragma: no cover - threadpoolctl comes with scikit-learn
                _CONTROLLER = False
    return _CONTROLLER


_DEPTH = 0
_SAVED = None


@contextlib.contextmanager
def blas_limit(n=1):
    """Context manager: BLAS limited to ``n`` threads while any caller is inside.

    Reference-counted across threads: the first caller to enter saves the
    process's limits and sets ``n``, the last one to leave restores them.
    (threadpoolctl's own ``limit`` restores what it saw on entry, so two
    overlapping calls in two threads would leave the limit of the first.)
    """
    global _DEPTH, _SAVED
    ctl = _controller()
    if not ctl:
        yield
        return
    with _LOCK:
        if _DEPTH == 0:
            _SAVED = ctl.limit(limits=n, user_api="blas")
        _DEPTH += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                _SAVED.restore_original_limits()
                _SAVED = None
