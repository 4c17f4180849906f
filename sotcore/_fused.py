"""The emulator's fused inference pass and what it shares with the general path (private).

Lower layer: imports only the compiled kernels.  ``EmulatedBackend.fused_forward``
(the backend owns its fast path) and ``StochasticMLP`` use it.

Random stream ids live here, in one place, so that no two uses collide:

=====================  ==============================================================
stream                 used by
=====================  ==============================================================
0, 1, 2, ...           ``EmulatedBackend.pulse``: one stream per call (the call count)
``KEYED_BASE + l``     keyed inference pulses of hidden layer ``l`` (general path)
``FUSED_STREAM``       keyed draws of the fused inference kernel
=====================  ==============================================================
"""
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import _kernels
from ._threads import blas_limit

#: Rows per block of inference (first layer, then the devices and the output layer).
FIRST_LAYER_ROWS = 256

#: Keyed inference pulses of layer ``l`` use stream ``KEYED_BASE + l``.
KEYED_BASE = 1 << 62
#: Stream of the fused path's keyed draws.
FUSED_STREAM = (1 << 62) + (1 << 61)
#: Salts mixed into a model seed for derived generators (aging draws, evaluation devices).
AGING_SALT = 0xA9E
EVAL_SALT = 0x5EED
#: Per-sample key step of keyed inference (sample t of input i uses key_i + t * GOLDEN).
GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def aligned_empty(shape, dtype, align=64):
    """An uninitialised array whose data start on an ``align``-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + nbytes].view(dtype).reshape(shape)


def first_layer(X, s, e, W1p, xbuf, zbuf):
    """``X[s:e] @ W1`` (no bias) into ``zbuf[:e - s]`` by the compiled first layer
    (``_kernels.first_layer``: a row's sums depend only on that row, zeros of the
    input skipped); ``W1p``: ``_kernels.first_layer_panels(W1)``; ``xbuf`` holds
    a block that is not float32 C-ordered."""
    k = e - s
    if X.dtype == np.float32 and X.flags.c_contiguous:
        xb = X[s:e]
    else:
        xb = xbuf[:k]
        xb[...] = X[s:e]
    _kernels.first_layer(xb, W1p, zbuf[:k])
    return zbuf[:k]


def keyed_samples(row_keys, T):
    """Keys of the T samples of each row: ``key_i + t * GOLDEN`` (row-major)."""
    with np.errstate(over="ignore"):
        return (np.repeat(row_keys, T)
                + np.tile(np.arange(T, dtype=np.uint64), len(row_keys)) * GOLDEN)


def fused_predict(X, W1, b1, W2, b2, unit, offset, table, seed, stream, keys, T, n_threads):
    """Class probabilities of a one-hidden-layer network, averaged over T samples.

    ``table`` = ``(grid_lo, grid_hi, thresholds)`` of the hidden neurons' devices
    (one row per neuron, see ``DevicePopulation.table``).  ``keys``: uint64 per
    row of X, or a callable giving the keys of a block of rows.  Per block of
    ``FIRST_LAYER_ROWS`` inputs the compiled first layer (``_sot_first.h``: the
    inputs' zeros skipped) computes the currents, then one compiled
    kernel thresholds each (input, neuron) once, draws all T samples and
    accumulates the output layer from subset sums (``_sot_infer.h``).
    Returns ``(probabilities (n, C) float64, nonfinite)``.
    """
    n, d = X.shape
    H, C = W2.shape
    lo, hi, thr = table
    G = thr.shape[1]
    a = (G - 1) / (hi - lo)
    b = -lo * a
    # 4096 x grid coordinate of the neuron's table at current offset + unit (z + b1).
    A = (4096.0 * a * unit).astype(np.float32)
    B = (4096.0 * (a * (offset + unit * np.asarray(b1, np.float64)) + b)).astype(np.float32)
    Hp, Cp = _kernels.fused_padded_sizes(H, C)
    R = aligned_empty(((Hp // 8) * 256, Cp), np.float32)
    _kernels.subset_sum_table(np.ascontiguousarray(W2, dtype=np.float32), R)
    bias = np.zeros(Cp, np.float32)
    bias[:C] = b2
    out = np.empty((n, C), dtype=np.float64)
    CH = FIRST_LAYER_ROWS
    nch = -(-n // CH)
    nw = max(1, min(n_threads, nch))
    seed = np.uint64(seed)
    W1 = _kernels.first_layer_panels(W1)

    next_block = itertools.count().__next__      # atomic under the GIL
    stop = threading.Event()                      # a worker failed: the others stop too

    def worker():
        # Workers take the next block of rows until none is left (or one failed),
        # each with its own buffers, running the first layer and the kernel on one
        # thread, so no two thread pools spin against each other.  Taking blocks as
        # they come (not a fixed share) keeps every core busy when one is shared
        # with another process or a previous BLAS call's spinning threads; a
        # block's output depends only on its rows, not on who computed it.
        xbuf = np.empty((CH, d), np.float32)
        zbuf = np.empty((CH, H), np.float32)
        bad = False
        try:
            while not stop.is_set() and (c := next_block()) < nch:
                s, e = c * CH, min((c + 1) * CH, n)
                if callable(keys):
                    kb = np.ascontiguousarray(keys(X[s:e]), dtype=np.uint64)
                    if kb.shape != (e - s,):
                        raise ValueError("row_keys must give one key per row")
                else:
                    kb = keys[s:e]
                Z = first_layer(X, s, e, W1, xbuf, zbuf)
                bad |= _kernels.fused_predict(Z, A, B, thr, R, bias, seed, stream, kb, T,
                                              out[s:e], 1)
        except BaseException:          # an error or Ctrl-C: no one starts another block
            stop.set()
            raise
        return bad

    with blas_limit(1):
        if nw == 1:
            bad = worker()
        else:
            # One worker is this thread; the others are helpers (no pool to keep).
            with ThreadPoolExecutor(nw - 1) as ex:
                futures = [ex.submit(worker) for _ in range(1, nw)]
                bad = worker()
                bad = any([f.result() for f in futures]) or bad
    return out, bool(bad)
