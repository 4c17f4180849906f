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
  Every limit is restored on exit, also when an exception escapes.
* OpenBLAS's idle workers: after a multi-threaded call (the user's ``A @ B``), a
  pthreads OpenBLAS keeps its workers busy-waiting for ~0.1 s (2**28 cycles,
  ``OPENBLAS_THREAD_TIMEOUT``); on 2 cores one of them takes half a core from our
  kernels, and a prediction right after took 1.4-1.8x its time.  For such a
  library (one that exports ``blas_cpu_number``, ``blas_server_avail`` and
  ``blas_thread_shutdown_``: OpenBLAS's own builds and the wheels of NumPy and
  SciPy) :func:`blas_limit` sets the thread count itself -- its setter,
  ``openblas_set_num_threads``, starts the pool again on every call -- and
  shuts a running pool down (``blas_thread_shutdown_``, what OpenBLAS itself
  does before every ``fork()``).  The pool starts again at the library's next
  multi-threaded call (a thread start, ~0.1 ms).  Only when no other Python
  thread is alive that could be inside a BLAS call; ``SOTCORE_QUIET_BLAS=0``
  turns the shutdown off.  Other BLAS libraries: threadpoolctl.
"""
import contextlib
import ctypes
import os
import threading

__all__ = ["cpu_count", "blas_limit", "quiet_openblas"]

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
_POOLS = None


class _OpenBLASPool:
    """A pthreads OpenBLAS's thread count and pool, reached through its exports."""

    def __init__(self, lib):
        dl = lib.dynlib
        self.filepath = lib.filepath
        self.shutdown = dl.blas_thread_shutdown_
        self.shutdown.restype, self.shutdown.argtypes = ctypes.c_int, []
        self.avail = ctypes.c_int.in_dll(dl, "blas_server_avail")
        self.cpus = ctypes.c_int.in_dll(dl, "blas_cpu_number")


def _openblas_pools(ctl):
    """The loaded pthreads OpenBLAS libraries that export what :class:`_OpenBLASPool`
    needs; found once per process."""
    global _POOLS
    if _POOLS is None:
        pools = []
        for lib in getattr(ctl, "lib_controllers", ()):
            if getattr(lib, "internal_api", None) != "openblas" or \
                    getattr(lib, "threading_layer", None) != "pthreads":
                continue
            try:
                pool = _OpenBLASPool(lib)
            except (AttributeError, ValueError, OSError):
                continue
            if pool.cpus.value >= 1:
                pools.append(pool)
        _POOLS = pools
    return _POOLS


#: Threads that never call BLAS: tqdm's monitor, the sweep driver's watchdog.
_BLAS_FREE_THREADS = ("tqdm_monitor", "sotcore-driver-watch")


def _others_alive():
    """Is a Python thread alive, besides the caller, that might be inside BLAS?"""
    me = threading.current_thread()
    return any(t is not me and t.name not in _BLAS_FREE_THREADS for t in threading.enumerate())


def quiet_openblas(ctl=None):
    """Shut down the running worker pools of the loaded pthreads OpenBLAS
    libraries, so that idle workers do not busy-wait beside our kernels; a pool
    starts again at its library's next multi-threaded call.  Does nothing while
    other Python threads (but tqdm's monitor) are alive, or with
    ``SOTCORE_QUIET_BLAS=0``.  Returns the number of pools shut down."""
    if os.environ.get("SOTCORE_QUIET_BLAS", "1").strip() == "0" or _others_alive():
        return 0
    ctl = _controller() if ctl is None else ctl
    if not ctl:
        return 0
    done = 0
    for pool in _openblas_pools(ctl):
        if pool.avail.value:
            pool.shutdown()
            done += 1
    return done


def _limit(ctl, n):
    """Set every BLAS library to ``n`` threads; returns what restores them."""
    pools = _openblas_pools(ctl)
    direct = {p.filepath for p in pools}
    saved = [(p, p.cpus.value) for p in pools]
    for p in pools:
        p.cpus.value = n
    others = []
    for lib in ctl.lib_controllers:
        if lib.user_api == "blas" and lib.filepath not in direct:
            others.append((lib, lib.get_num_threads()))
            lib.set_num_threads(n)
    if n == 1:
        quiet_openblas(ctl)
    return saved, others


def _restore(saved):
    pools, others = saved
    for p, v in pools:
        p.cpus.value = v
    for lib, v in others:
        if v is not None:
            lib.set_num_threads(v)


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
            _SAVED = _limit(ctl, n)
        _DEPTH += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                _restore(_SAVED)
                _SAVED = None
