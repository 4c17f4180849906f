# cython: language_level=3
"""Compiled core of sotcore (private).

Kernels trust their inputs' *values* (validation lives in Python), but every
``def`` entry point checks the shapes it indexes with, so no call from Python
can make a kernel read or write out of bounds.  Randomness is counter-based
(see ``_sotrng.h``): the bit for element (row r, column j) depends only on
(seed, stream, r, j), so results are identical at any thread count.

Size: one extension module (one build, one import) holding the thin,
shape-checking def wrappers of every C header's kernels.
"""
from cython.parallel cimport prange
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memset

cimport cython
from cython cimport floating


cdef extern from "_sotrng.h" nogil:
    int sot_openmp_enabled()
    int sot_omp_max_threads()
    uint64_t sot_stream_key(uint64_t seed, uint64_t stream)
    uint64_t sot_u64(uint64_t key, uint64_t ctr)
    void sot_fill_u64(uint64_t key, uint64_t ctr0, uint64_t *out, Py_ssize_t n)
    # Sampler: one block of rows x columns [j0, j1); see _sotrng.h.  Returns 1
    # if the block held a NaN or infinite current.
    ctypedef int (*sot_block_f64_fn)(const double *cur, const double *a, const double *b,
                                     const uint32_t *table, Py_ssize_t ldt, Py_ssize_t m,
                                     Py_ssize_t G, uint64_t key, uint64_t row,
                                     const uint64_t *rowkeys, Py_ssize_t nrows,
                                     Py_ssize_t j0, Py_ssize_t j1, uint8_t *out)
    ctypedef int (*sot_block_f32_fn)(const float *cur, const float *a, const float *b,
                                     const uint32_t *table, Py_ssize_t ldt, Py_ssize_t m,
                                     Py_ssize_t G, uint64_t key, uint64_t row,
                                     const uint64_t *rowkeys, Py_ssize_t nrows,
                                     Py_ssize_t j0, Py_ssize_t j1, uint8_t *out)
    int sot_sampler_isa()
    int sot_sampler_isa_max()
    int sot_set_sampler_isa(int level)
    sot_block_f64_fn sot_block_f64_for(int isa)
    sot_block_f32_fn sot_block_f32_for(int isa)


# Work per chunk, in elements.  Chunking depends on the data size only.
cdef enum:
    CHUNK_ELEMS = 32768


def openmp_enabled():
    """True if the extension was built with OpenMP."""
    return bool(sot_openmp_enabled())


def omp_max_threads():
    """``omp_get_max_threads()`` (honours OMP_NUM_THREADS); 1 without OpenMP."""
    return sot_omp_max_threads()


def _index_probe(const double[::1] a, Py_ssize_t i):
    """``a[i]`` unchecked, as every kernel indexes: a bounds-checked build
    (SOTCORE_BOUNDSCHECK=1) raises IndexError for ``i`` outside ``a``.  For the
    test of that build only; never call it out of range on a normal build."""
    return a[i]


def stream_key(uint64_t seed, uint64_t stream):
    """The 64-bit key of stream ``stream`` under ``seed`` (for tests)."""
    return sot_stream_key(seed, stream)


def raw_u64(uint64_t key, uint64_t ctr0, Py_ssize_t n):
    """``n`` consecutive raw 64-bit outputs of stream ``key`` (for tests)."""
    import numpy as np
    if n < 0:
        raise ValueError("n must be >= 0")
    out = np.empty(n, dtype=np.uint64)
    cdef uint64_t[::1] o = out
    if n:
        sot_fill_u64(key, ctr0, &o[0], n)
    return out


cdef inline Py_ssize_t _rows_per_chunk(Py_ssize_t n_cols) noexcept nogil:
    if n_cols <= 0:
        return CHUNK_ELEMS
    if n_cols >= CHUNK_ELEMS:
        return 1
    return CHUNK_ELEMS // n_cols


# ---------------------------------------------------------------------------
# Bernoulli sampler (kernels and bias bound: _sotrng.h).  The work is split
# into blocks of up to SAMPLE_ROWS rows x SAMPLE_COLS devices, from the data
# shape only (never the thread count).  Inside a block the C kernel walks one
# tile of 16 devices at a time down all the block's rows, so each device's
# table (4 KB by default) is fetched once per block and then hits L1; many
# rows amortise that fetch.  Blocks are numbered column-block-major, so a
# thread's consecutive blocks share tables, which then stay in L2.
cdef enum:
    SAMPLE_ROWS = 1024
    SAMPLE_COLS = 128     # even (the kernels' pairs and tiles start at even columns)
    SAMPLE_MIN_PER_THREAD = 131072    # elements per thread before going parallel

_SAMPLER_ISAS = ("scalar", "avx2", "avx512")


def sampler_isa(name=None):
    """The instruction-set path of the table sampler and of fused inference;
    select another with ``name``.

    ``name`` is one of ``"scalar"``, ``"avx2"``, ``"avx512"`` (capped at what
    the CPU supports) or ``"best"``.  All paths give identical bits; this is
    for tests and benchmarks.  Not thread-safe.  Returns the path in use.
    The environment variable ``SOTCORE_ISA`` sets it at import (the optimiser
    and training-step kernels pick their path by compiler target clones).
    """
    if name is not None:
        if name == "best":
            sot_set_sampler_isa(-1)
        elif name in _SAMPLER_ISAS:
            sot_set_sampler_isa(_SAMPLER_ISAS.index(name))
        else:
            raise ValueError(f"unknown sampler path {name!r}; one of {_SAMPLER_ISAS} or 'best'")
    return _SAMPLER_ISAS[sot_sampler_isa()]


def sampler_isa_max():
    """The best sampler path this CPU supports."""
    return _SAMPLER_ISAS[sot_sampler_isa_max()]


def _isa_from_environment(value):
    """Apply ``SOTCORE_ISA`` (empty: the best path).  A bad value, or a path the
    CPU lacks, warns and keeps the best path (an import must not fail over it)."""
    import warnings
    name = (value or "").strip().lower()
    if not name:
        return sampler_isa()
    if name not in _SAMPLER_ISAS + ("best",):
        warnings.warn(f"SOTCORE_ISA={value!r} is not one of {_SAMPLER_ISAS} or 'best'; "
                      f"using the best path, {sampler_isa('best')}", RuntimeWarning,
                      stacklevel=2)
        return sampler_isa()
    got = sampler_isa(name)
    if name != "best" and got != name:
        warnings.warn(f"SOTCORE_ISA={name}: this CPU has no {name} path; using {got}",
                      RuntimeWarning, stacklevel=2)
    return got


import os as _os
_isa_from_environment(_os.environ.get("SOTCORE_ISA"))


def sample_table(
    const floating[:, ::1] currents,
    const floating[::1] a,
    const floating[::1] b,
    const uint32_t[:, ::1] table,
    uint64_t seed,
    uint64_t stream,
    uint64_t row0,
    uint8_t[:, ::1] out,
    int n_threads,
    const uint64_t[::1] row_keys=None,
):
    """Bernoulli bits from per-device threshold tables.

    ``P(out[i, j] = 1)`` is ``table[j]`` linearly interpolated at the grid
    coordinate ``x = currents[i, j] * a[j] + b[j]`` (clamped to the grid; NaN
    counts as grid point 0), divided by 2**32, to within the bias bound
    documented in ``_sotrng.h`` (< 2.2e-6 for the default tables).  The draws
    of element ``(i, j)`` depend only on (``seed``, ``stream``, global row
    ``row0 + i``, ``j``): the bits are the same for any ``n_threads``, any
    split of the rows into calls, and any CPU path.

    With ``row_keys`` (one uint64 per row), row ``i`` draws as global row
    ``row_keys[i]`` instead of ``row0 + i``: bits then depend on each row's
    own key only, not on its position (used for inference keyed by input).

    Returns
    -------
    bool
        True if some current was NaN or infinite (those elements are still
        sampled, as clamped), so callers need no separate finiteness pass.
    """
    cdef Py_ssize_t n = currents.shape[0], m = currents.shape[1]
    cdef Py_ssize_t G = table.shape[1]
    if table.shape[0] != m or a.shape[0] != m or b.shape[0] != m:
        raise ValueError("table, a and b must have one entry per column")
    if out.shape[0] != n or out.shape[1] != m:
        raise ValueError("out must have the shape of currents")
    if G < 2 or G > 1 << 20:
        raise ValueError("tables need between 2 and 2**20 grid points")
    if row_keys is not None and row_keys.shape[0] != n:
        raise ValueError("row_keys must have one entry per row of currents")
    if n == 0 or m == 0:
        return False
    cdef const uint64_t *keys = NULL
    if row_keys is not None:
        keys = &row_keys[0]
    cdef int isa = sot_sampler_isa()   # resolved with the GIL held
    cdef sot_block_f64_fn f64 = sot_block_f64_for(isa)
    cdef sot_block_f32_fn f32 = sot_block_f32_for(isa)
    cdef uint64_t key = sot_stream_key(seed, stream)
    cdef Py_ssize_t nrb = (n + SAMPLE_ROWS - 1) // SAMPLE_ROWS
    cdef Py_ssize_t ncb = (m + SAMPLE_COLS - 1) // SAMPLE_COLS
    cdef Py_ssize_t c, i0, i1, j0, j1
    cdef int nonfinite = 0
    # No more threads than blocks, and none for small calls (a training batch):
    # idle OpenMP threads spin after the region and slow BLAS down, which costs
    # more than the parallel sampling saves below ~SAMPLE_MIN_PER_THREAD elements.
    n_threads = max(1, min(n_threads, nrb * ncb, (n * m) // SAMPLE_MIN_PER_THREAD))
    for c in prange(nrb * ncb, schedule="static", nogil=True, num_threads=n_threads):
        i0 = (c % nrb) * SAMPLE_ROWS
        i1 = min(i0 + SAMPLE_ROWS, n)
        j0 = (c // nrb) * SAMPLE_COLS
        j1 = min(j0 + SAMPLE_COLS, m)
        if floating is double:
            nonfinite |= f64(&currents[i0, 0], &a[0], &b[0], &table[0, 0], G, m, G, key,
                             row0 + <uint64_t>i0, keys + i0 if keys != NULL else NULL,
                             i1 - i0, j0, j1, &out[i0, 0])
        else:
            nonfinite |= f32(&currents[i0, 0], &a[0], &b[0], &table[0, 0], G, m, G, key,
                             row0 + <uint64_t>i0, keys + i0 if keys != NULL else NULL,
                             i1 - i0, j0, j1, &out[i0, 0])
    return nonfinite != 0


cdef inline void _add_rows(const uint8_t *bits, const float *W, Py_ssize_t K,
                           Py_ssize_t M, float *o) noexcept nogil:
    cdef Py_ssize_t k, mm
    cdef const float *w
    memset(o, 0, M * sizeof(float))
    for k in range(K):
        if bits[k]:
            w = W + k * M
            for mm in range(M):
                o[mm] += w[mm]


def binary_matvec(const uint8_t[:, ::1] bits, const float[:, ::1] W,
                  float[:, ::1] out, int n_threads):
    """``out = bits @ W`` for a 0/1 matrix, by adding the rows of set bits.

    Any non-zero byte counts as a set bit.  Rows are summed in increasing
    ``k``, so the result does not depend on the thread count.
    """
    cdef Py_ssize_t n = bits.shape[0], K = bits.shape[1]
    cdef Py_ssize_t M = W.shape[1]
    if W.shape[0] != K:
        raise ValueError("W must have one row per column of bits")
    if out.shape[0] != n or out.shape[1] != M:
        raise ValueError("out must have shape (bits.shape[0], W.shape[1])")
    if n == 0 or M == 0:
        return
    if K == 0:
        out[:, :] = 0
        return
    cdef Py_ssize_t rpc = _rows_per_chunk(K * M // 8 + 1)
    cdef Py_ssize_t n_chunks = (n + rpc - 1) // rpc
    cdef Py_ssize_t c, i, i0, i1
    n_threads = max(1, min(n_threads, n_chunks))
    for c in prange(n_chunks, schedule="static", nogil=True, num_threads=n_threads):
        i0 = c * rpc
        i1 = i0 + rpc
        if i1 > n:
            i1 = n
        for i in range(i0, i1):
            _add_rows(&bits[i, 0], &W[0, 0], K, M, &out[i, 0])


# ---------------------------------------------------------------------------
# Fused kernels (_sot_infer.h, _sot_optim.h, _sot_train.h): multi-sample inference of a network with one
# hidden layer of devices, optimiser steps, the nominal surrogate, row hashes.
from cython.parallel cimport parallel
from libc.stdint cimport uint16_t, int32_t, int64_t

cdef enum:
    FIRST_CHUNK = 240     # rows per parallel chunk of first_layer (a multiple of its 6-row groups)

cdef extern from "_sot_first.h" nogil:
    void sot_first_layer(int isa, const float *X, Py_ssize_t ldx, Py_ssize_t n, Py_ssize_t d,
                         const float *W, Py_ssize_t ps, Py_ssize_t kst, Py_ssize_t H, float *Z,
                         Py_ssize_t ldz, int32_t *ks)
    Py_ssize_t sot_first_scratch(Py_ssize_t n, Py_ssize_t d)
    void sot_first_tn(int isa, const float *X, Py_ssize_t ldx, Py_ssize_t n, Py_ssize_t k0,
                      Py_ssize_t k1, const float *G, Py_ssize_t ldg, Py_ssize_t H, float *O,
                      Py_ssize_t ldo, int32_t *ws)
    Py_ssize_t sot_tn_scratch()
    enum: SOT_TN_KB


cdef int _first_run(int isa, const float *X, Py_ssize_t n, Py_ssize_t d, const float *W,
                    Py_ssize_t ps, Py_ssize_t kst, Py_ssize_t H, float *Z,
                    int n_threads) noexcept nogil:
    """Z (n x H) = X (n x d) W on up to n_threads threads (W's layout: ps, kst, as
    sot_first_layer).  Work items: chunks of FIRST_CHUNK rows; with fewer chunks
    than threads, also groups of whole 64-column panels.  Each Z element is made
    by one item with the same FMAs, so the split changes nothing.  Returns 1 if
    a scratch allocation failed."""
    cdef Py_ssize_t nch = (n + FIRST_CHUNK - 1) // FIRST_CHUNK, npan = (H + 63) // 64
    cdef Py_ssize_t ncg = 1, it, c, g, i0, i1, p0, p1, hw
    cdef int failed = 0
    cdef int32_t *ks
    if nch < n_threads:
        ncg = min(npan, (n_threads + nch - 1) // nch)
    cdef int nt = <int> max(1, min(<Py_ssize_t> n_threads, nch * ncg))
    # One scratch per thread, for one chunk: bounded whatever n.
    cdef Py_ssize_t need = sot_first_scratch(min(n, <Py_ssize_t> FIRST_CHUNK), d)
    with parallel(num_threads=nt):
        ks = <int32_t *> malloc(need * sizeof(int32_t))
        for it in prange(nch * ncg, schedule="dynamic"):
            if ks == NULL:
                failed |= 1
            else:
                c = it // ncg
                g = it % ncg
                i0 = c * FIRST_CHUNK
                i1 = min(i0 + FIRST_CHUNK, n)
                p0 = g * npan // ncg
                p1 = (g + 1) * npan // ncg
                hw = min(H, p1 * 64) - p0 * 64
                sot_first_layer(isa, X + i0 * d, d, i1 - i0, d, W + p0 * ps, ps, kst, hw,
                                Z + i0 * H + p0 * 64, H, ks)
        free(ks)
    return failed


def first_layer(const float[:, ::1] X, const float[:, :, ::1] Wp, float[:, ::1] Z,
                int n_threads=1):
    """``Z = X @ W`` row by row: over k ascending, one fused multiply-add per term,
    zeros of X skipped (``_sot_first.h``); ``Wp`` is ``W`` in panels of 64
    columns (``first_layer_panels``).  A row's result depends only on that row
    (never on the batch, the blocking, ``n_threads`` or the CPU path) -- for
    finite W (the estimator's weights always are), and up to the sign of a zero
    sum, which no later step can see.  For 0/1 inputs it equals
    ``binary_matvec`` bit for bit (``fma(1, w, s) = s + w``)."""
    cdef Py_ssize_t n = X.shape[0], d = X.shape[1], H = Z.shape[1]
    if Wp.shape[1] != d or Wp.shape[2] != 64:
        raise ValueError(f"Wp must have shape (chunks, {d}, 64), got ({Wp.shape[0]}, "
                         f"{Wp.shape[1]}, {Wp.shape[2]})")
    if Z.shape[0] != n or Wp.shape[0] != (H + 63) // 64:
        raise ValueError(f"Z must have shape ({n}, H) with H <= 64 x {Wp.shape[0]} "
                         f"(and > 64 x {Wp.shape[0] - 1})")
    if n == 0 or H == 0:
        return
    if d == 0:
        Z[:, :] = 0
        return
    cdef int isa = sot_sampler_isa()     # resolved with the GIL held
    cdef int failed
    with nogil:
        failed = _first_run(isa, &X[0, 0], n, d, &Wp[0, 0, 0], d * 64, 64, H, &Z[0, 0],
                            max(1, n_threads))
    if failed:
        raise MemoryError("first_layer: out of memory for the scratch")


def sparse_matmul(const float[:, ::1] X, const float[:, ::1] W, float[:, ::1] Z,
                  int n_threads=1):
    """``Z = X @ W`` for a row-major ``W`` (d x H), the zeros of ``X`` skipped:
    ``first_layer``'s kernel and sums (one fused multiply-add per term, k
    ascending; a row's result depends only on that row and ``W``, not on the
    batch, ``n_threads`` or the CPU path), without packing ``W`` -- for weights
    that change every step (training).  Finite ``W`` assumed, as there."""
    cdef Py_ssize_t n = X.shape[0], d = X.shape[1], H = W.shape[1]
    if W.shape[0] != d:
        raise ValueError(f"W must have {d} rows (X has {d} columns), got {W.shape[0]}")
    if Z.shape[0] != n or Z.shape[1] != H:
        raise ValueError(f"Z must have shape ({n}, {H}), got ({Z.shape[0]}, {Z.shape[1]})")
    if n == 0 or H == 0:
        return
    if d == 0:
        Z[:, :] = 0
        return
    cdef int isa = sot_sampler_isa()
    cdef int failed
    with nogil:
        failed = _first_run(isa, &X[0, 0], n, d, &W[0, 0], 64, H, H, &Z[0, 0],
                            max(1, n_threads))
    if failed:
        raise MemoryError("sparse_matmul: out of memory for the scratch")


def sparse_matmul_tn(const float[:, ::1] X, const float[:, ::1] G, float[:, ::1] out,
                     int n_threads=1):
    """``out = X.T @ G`` (X: n x d, G: n x H, out: d x H), the zeros of ``X``
    skipped: ``out[k, j]`` is one chain of fused multiply-adds over the rows i
    with ``X[i, k] != 0``, ascending, from 0 (``_sot_first.h``), so the result
    depends only on X and G -- not on ``n_threads``, the blocking or the CPU
    path.  A column of X that is all zeros gives a zero row, also where G holds
    inf or NaN (for finite G it equals the dense sum up to rounding).  Threads
    split the k; the scratch per thread is fixed (~130 KB), whatever n."""
    cdef Py_ssize_t n = X.shape[0], d = X.shape[1], H = G.shape[1]
    if G.shape[0] != n:
        raise ValueError(f"G must have {n} rows (as X), got {G.shape[0]}")
    if out.shape[0] != d or out.shape[1] != H:
        raise ValueError(f"out must have shape ({d}, {H}), got ({out.shape[0]}, "
                         f"{out.shape[1]})")
    if d == 0 or H == 0:
        return
    cdef int isa = sot_sampler_isa()
    cdef Py_ssize_t nkb = (d + SOT_TN_KB - 1) // SOT_TN_KB, b, k0
    cdef int nt = <int> max(1, min(<Py_ssize_t> max(1, n_threads), nkb)), failed = 0
    cdef int32_t *ws
    cdef const float *xp = &X[0, 0] if n > 0 else NULL
    cdef const float *gp = &G[0, 0] if n > 0 else NULL
    with nogil, parallel(num_threads=nt):
        ws = <int32_t *> malloc(sot_tn_scratch() * sizeof(int32_t))
        for b in prange(nkb, schedule="dynamic"):
            if ws == NULL:
                failed |= 1
            else:
                k0 = b * SOT_TN_KB
                sot_first_tn(isa, xp, d, n, k0, min(k0 + SOT_TN_KB, d), gp, H, H, &out[0, 0],
                             H, ws)
        free(ws)
    if failed:
        raise MemoryError("sparse_matmul_tn: out of memory for the scratch")


def first_layer_panels(W):
    """``W`` (d x H) as the panels ``first_layer`` reads: ceil(H/64) x d x 64
    float32, zero-padded."""
    import numpy as np
    W = np.asarray(W, dtype=np.float32)
    d, H = W.shape
    nc = (H + 63) // 64
    Wp = np.zeros((d, nc * 64), np.float32)
    Wp[:, :H] = W
    return np.ascontiguousarray(Wp.reshape(d, nc, 64).transpose(1, 0, 2))


cdef extern from "_sot_infer.h" nogil:
    ctypedef struct sot_fused_model:
        Py_ssize_t H, Hp, ldz
        const float *A
        const float *B
        const uint32_t *table
        Py_ssize_t G
        const float *R
        const float *bias
        Py_ssize_t C, Cp
        uint64_t key, key2
        Py_ssize_t T
    int sot_fused_block(const sot_fused_model *md, int isa, const float *Z, Py_ssize_t nrows,
                        const uint64_t *rowkeys, uint16_t *thi, uint16_t *tlo, float *scratch,
                        double *accd, double *out)
    void sot_subset_table(const float *W, Py_ssize_t H, Py_ssize_t C, Py_ssize_t Hp,
                          Py_ssize_t Cp, float *R)

cdef extern from "_sot_optim.h" nogil:
    void sot_adam_f32(float *p, const float *g, float *m, float *v, Py_ssize_t n, float lr,
                      float b1, float c1, float b2, float c2, float eps, float l2)
    void sot_sgd_f32(float *p, const float *g, float *vel, Py_ssize_t n, float lr, float mu,
                     int nesterov, float l2)
    void sot_sigmoid_deriv_mul(float *g, const float *cur, Py_ssize_t n, float i50, float scale,
                               float k_unit)

cdef extern from "_sot_train.h" nogil:
    void sot_row_hash(const uint32_t *X, Py_ssize_t nrows, Py_ssize_t d, const uint64_t *mult,
                      uint64_t *out)
    double sot_train_output_step(const uint8_t *bits, Py_ssize_t n, Py_ssize_t T, Py_ssize_t H,
                                 const float *W2p, const float *W2T, const float *b2p,
                                 Py_ssize_t C, Py_ssize_t Cp, const int64_t *y, const float *cur,
                                 const float *deriv, float i50, float scale, float kunit,
                                 float *scratch, float *g1, float *gW2, float *gb2, float *gb1,
                                 int64_t *correct)


cdef enum:
    FUSED_ROWS = 512          # rows per block of the fused kernel (thresholds: 512 x Hp x 4 B)
    FUSED_PAD = 32            # devices padded to a multiple of this (one 512-bit draw)
    ELEM_CHUNK = 65536        # elements per chunk of the element-wise kernels
    ELEM_PARALLEL_MIN = 4194304   # element-wise kernels go parallel from this size on


def fused_padded_sizes(Py_ssize_t n_devices, Py_ssize_t n_classes):
    """``(Hp, Cp)``: devices padded to 32 and classes padded to 16, the shapes
    of the ``subset_sum_table`` (``(Hp // 8) * 256`` rows of ``Cp`` floats)."""
    return (n_devices + FUSED_PAD - 1) // FUSED_PAD * FUSED_PAD, (n_classes + 15) // 16 * 16


def subset_sum_table(const float[:, ::1] W, float[:, ::1] R):
    """The output layer's "four Russians" table for ``fused_predict``.

    ``R[(g * 256 + s), c]`` is the sum of ``W[8 g + k, c]`` over the set bits
    ``k`` of ``s`` (rows past ``W.shape[0]`` and columns past ``W.shape[1]``
    count as 0).  ``R`` has shape ``((Hp // 8) * 256, Cp)`` (see
    ``fused_padded_sizes``).
    """
    cdef Py_ssize_t H = W.shape[0], C = W.shape[1]
    if H < 1 or C < 1:
        raise ValueError("W needs at least one row and one column")
    cdef Py_ssize_t Hp = (H + FUSED_PAD - 1) // FUSED_PAD * FUSED_PAD
    if R.shape[1] % 16 or R.shape[1] < C or R.shape[0] != (Hp // 8) * 256:
        raise ValueError(f"R must have shape ({(Hp // 8) * 256}, a multiple of 16 >= {C})")
    with nogil:
        sot_subset_table(&W[0, 0], H, C, Hp, R.shape[1], &R[0, 0])


def fused_predict(const float[:, ::1] Z, const float[::1] A, const float[::1] B,
                  const uint32_t[:, ::1] table, const float[:, ::1] R, const float[::1] bias,
                  uint64_t seed, uint64_t stream, const uint64_t[::1] row_keys,
                  Py_ssize_t n_samples, double[:, ::1] out, int n_threads,
                  Py_ssize_t block_rows=FUSED_ROWS):
    """Class probabilities of a one-hidden-layer device network, ``n_samples`` per row.

    Parameters
    ----------
    Z : float32 (n, H)
        First-layer products ``X @ W1`` (no bias).
    A, B : float32 (H,)
        Per device, ``z * A + B`` is 4096 times the grid coordinate of the
        device's table (hidden bias, current mapping and table map folded in).
    table : uint32 (H, G)
        The devices' threshold tables.
    R : float32 ((Hp // 8) * 256, Cp)
        ``subset_sum_table`` of the output weights.
    bias : float32 (Cp,)
        Output biases, zero-padded.
    seed, stream : the random stream; row_keys : uint64 (n,)
        Row ``i``'s draws depend only on (seed, stream, row_keys[i]).
    out : float64 (n, C)
        Softmax averaged over the samples, each row summing to 1.

    Rows are processed in blocks of ``block_rows`` (each block's thresholds
    are computed tile by tile, then sampled); bit-identical for any
    ``n_threads``, ``block_rows`` or CPU path (``_sot_infer.h``).
    Returns True if some ``Z`` was NaN or infinite (sampled as clamped).
    """
    cdef Py_ssize_t n = Z.shape[0], H = Z.shape[1], G = table.shape[1]
    cdef Py_ssize_t Cp = R.shape[1], C = out.shape[1]
    if H < 1:
        raise ValueError("Z needs at least one column (device)")
    if A.shape[0] != H or B.shape[0] != H or table.shape[0] != H:
        raise ValueError("A, B and table must have one entry per column of Z")
    if G < 2 or G > 1 << 20:
        raise ValueError("tables need between 2 and 2**20 grid points")
    cdef Py_ssize_t Hp = (H + FUSED_PAD - 1) // FUSED_PAD * FUSED_PAD
    if Cp < 16 or Cp % 16 or R.shape[0] != (Hp // 8) * 256:
        raise ValueError(f"R must have shape ({(Hp // 8) * 256}, a multiple of 16)")
    if bias.shape[0] != Cp:
        raise ValueError("bias must have one entry per column of R")
    if C < 1 or C > Cp or out.shape[0] != n:
        raise ValueError("out must have shape (Z.shape[0], C) with 1 <= C <= R.shape[1]")
    if row_keys.shape[0] != n:
        raise ValueError("row_keys must have one entry per row of Z")
    if n_samples < 1:
        raise ValueError("n_samples must be >= 1")
    if block_rows < 1:
        raise ValueError("block_rows must be >= 1")
    if n == 0:
        return False
    cdef sot_fused_model md
    md.H, md.Hp, md.ldz, md.G = H, Hp, H, G
    md.A, md.B, md.table = &A[0], &B[0], &table[0, 0]
    md.R, md.bias, md.C, md.Cp = &R[0, 0], &bias[0], C, Cp
    md.key = sot_stream_key(seed, stream)
    md.key2 = sot_stream_key(~seed, stream)
    md.T = n_samples
    cdef int isa = sot_sampler_isa()     # resolved with the GIL held
    block_rows = min(block_rows, n)      # before the count: no overflow for huge values
    cdef Py_ssize_t nblk = (n + block_rows - 1) // block_rows
    cdef Py_ssize_t c, i0, i1
    cdef int nonfinite = 0, failed = 0
    cdef uint16_t *buf
    cdef float *scratch
    cdef double *accd
    n_threads = max(1, min(n_threads, nblk))
    with nogil, parallel(num_threads=n_threads):
        # Per thread: thresholds (2 x block_rows x Hp uint16), accumulators, scratch.
        buf = <uint16_t *> malloc(2 * block_rows * Hp * sizeof(uint16_t))
        scratch = <float *> malloc((6 * Cp + 528) * sizeof(float))
        accd = <double *> malloc(block_rows * Cp * sizeof(double))
        for c in prange(nblk, schedule="static"):
            if buf == NULL or scratch == NULL or accd == NULL:
                failed |= 1
            else:
                i0 = c * block_rows
                i1 = min(i0 + block_rows, n)
                nonfinite |= sot_fused_block(&md, isa, &Z[i0, 0], i1 - i0, &row_keys[i0], buf,
                                             buf + block_rows * Hp, scratch, accd, &out[i0, 0])
        free(buf)
        free(scratch)
        free(accd)
    if failed:
        raise MemoryError("fused_predict: out of memory for the per-thread buffers")
    return nonfinite != 0


cdef inline int _elem_threads(Py_ssize_t n, int n_threads) noexcept nogil:
    # Small updates run serially: on few cores an OpenMP team spinning next to
    # BLAS's threads costs more than it saves (the training loop's case).
    if n < ELEM_PARALLEL_MIN:
        return 1
    return max(1, min(n_threads, (n + ELEM_CHUNK - 1) // ELEM_CHUNK))


def adam_update(float[::1] p, const float[::1] g, float[::1] m, float[::1] v, float lr,
                double beta1, double beta2, float eps, float l2, int n_threads=1):
    """One Adam step in place, one pass: ``g' = g + l2 p``; ``m = b1 m + (1-b1) g'``;
    ``v = b2 v + (1-b2) g'^2``; ``p -= lr m / (sqrt(v) + eps)`` (``lr`` bias-corrected
    by the caller).  float32, element-wise: the result does not depend on
    ``n_threads`` (parallel only for large arrays)."""
    cdef Py_ssize_t n = p.shape[0], c, k0
    if g.shape[0] != n or m.shape[0] != n or v.shape[0] != n:
        raise ValueError("p, g, m and v must have the same length")
    if n == 0:
        return
    cdef Py_ssize_t nch = (n + ELEM_CHUNK - 1) // ELEM_CHUNK
    cdef int nt = _elem_threads(n, n_threads)
    cdef float b1 = <float>beta1, c1 = <float>(1.0 - beta1)
    cdef float b2 = <float>beta2, c2 = <float>(1.0 - beta2)
    if nt == 1:
        with nogil:
            sot_adam_f32(&p[0], &g[0], &m[0], &v[0], n, lr, b1, c1, b2, c2, eps, l2)
        return
    for c in prange(nch, schedule="static", nogil=True, num_threads=nt):
        k0 = c * ELEM_CHUNK
        sot_adam_f32(&p[k0], &g[k0], &m[k0], &v[k0], min(ELEM_CHUNK, n - k0), lr, b1, c1,
                     b2, c2, eps, l2)


def sgd_update(float[::1] p, const float[::1] g, float[::1] vel, float lr, float momentum,
               bint nesterov, float l2, int n_threads=1):
    """One SGD-with-momentum step in place, one pass (``g' = g + l2 p``;
    ``vel = mu vel - lr g'``; ``p += mu vel - lr g'`` (Nesterov) or ``p += vel``)."""
    cdef Py_ssize_t n = p.shape[0], c, k0
    if g.shape[0] != n or vel.shape[0] != n:
        raise ValueError("p, g and vel must have the same length")
    if n == 0:
        return
    cdef Py_ssize_t nch = (n + ELEM_CHUNK - 1) // ELEM_CHUNK
    cdef int nt = _elem_threads(n, n_threads)
    if nt == 1:
        with nogil:
            sot_sgd_f32(&p[0], &g[0], &vel[0], n, lr, momentum, nesterov, l2)
        return
    for c in prange(nch, schedule="static", nogil=True, num_threads=nt):
        k0 = c * ELEM_CHUNK
        sot_sgd_f32(&p[k0], &g[k0], &vel[k0], min(ELEM_CHUNK, n - k0), lr, momentum, nesterov,
                    l2)


def sigmoid_deriv_mul(float[::1] g, const float[::1] cur, float i50, float scale, float k,
                      int n_threads=1):
    """``g *= k * s * (1 - s)`` in place with ``s = expit((cur - i50) / scale)`` (float32)."""
    cdef Py_ssize_t n = g.shape[0], c, k0
    if cur.shape[0] != n:
        raise ValueError("g and cur must have the same length")
    if n == 0:
        return
    cdef Py_ssize_t nch = (n + ELEM_CHUNK - 1) // ELEM_CHUNK
    cdef int nt = _elem_threads(n, n_threads)
    if nt == 1:
        with nogil:
            sot_sigmoid_deriv_mul(&g[0], &cur[0], n, i50, scale, k)
        return
    for c in prange(nch, schedule="static", nogil=True, num_threads=nt):
        k0 = c * ELEM_CHUNK
        sot_sigmoid_deriv_mul(&g[k0], &cur[k0], min(ELEM_CHUNK, n - k0), i50, scale, k)


def row_hash(const uint32_t[:, ::1] X, const uint64_t[::1] mult, uint64_t[::1] out,
             int n_threads=1):
    """``h_i = sum_j X[i, j] * mult[j]`` (mod 2**64), then ``h ^= h >> 29;
    h *= 0xBF58476D1CE4E5B9; h ^= h >> 32`` (``estimator._row_keys``)."""
    cdef Py_ssize_t n = X.shape[0], d = X.shape[1], c, i0
    if mult.shape[0] != d:
        raise ValueError("mult must have one entry per column of X")
    if out.shape[0] != n:
        raise ValueError("out must have one entry per row of X")
    if n == 0:
        return
    cdef Py_ssize_t rpc = max(1, ELEM_CHUNK // max(d, 1))
    cdef Py_ssize_t nch = (n + rpc - 1) // rpc
    cdef int nt = _elem_threads(n * d, n_threads)
    cdef const uint32_t *x0 = &X[0, 0] if d > 0 else NULL
    if d == 0:
        out[:] = 0
        return
    for c in prange(nch, schedule="static", nogil=True, num_threads=nt):
        i0 = c * rpc
        sot_row_hash(x0 + i0 * d, min(rpc, n - i0), d, &mult[0], &out[i0])


def fill_random(uint64_t seed, uint64_t stream, uint64_t ctr0, uint64_t[::1] out):
    """Fill ``out`` with the generator's words ``u64(key(seed, stream), ctr0 + k)``
    (the SplitMix64 counter generator; for tests and throughput benchmarks)."""
    cdef Py_ssize_t n = out.shape[0]
    cdef uint64_t key = sot_stream_key(seed, stream)
    if n:
        with nogil:
            sot_fill_u64(key, ctr0, &out[0], n)


def train_output_step(const uint8_t[:, ::1] bits, Py_ssize_t n_samples, const float[:, ::1] W2p,
                      const float[:, ::1] W2T, const float[::1] b2p, const int64_t[::1] y,
                      const float[:, ::1] cur, const float[:, ::1] deriv, double i50,
                      double scale, double k_unit, float[:, ::1] g1, float[:, ::1] gW2,
                      float[::1] gb2, float[::1] gb1, float[::1] scratch):
    """Output layer, mixture loss and backward pass of one training step of a
    network with one hidden layer, in one pass (``_sot_train.h``).

    ``bits`` (n*T, H): the devices' answers (0/1), row ``i*T + t``; ``W2p``
    (H, Cp) the output weights zero-padded to ``Cp`` (a multiple of 16)
    columns, ``W2T`` (C, H) their transpose, ``b2p`` (Cp,) the padded biases;
    ``y`` (n,) labels in [0, C); ``cur`` (n, H) the first layer's currents;
    ``deriv`` (n, H) dP/dz, or None for the nominal curve ``k_unit * s (1 - s)``,
    ``s = expit((cur - i50) / scale)``.  Writes ``g1`` (n, H) = d loss / d z1,
    ``gW2`` (H, Cp), ``gb2`` (Cp,), ``gb1`` (H,); ``scratch`` needs
    ``train_output_scratch(n, T, H, Cp)`` floats.  Returns (summed loss, correct).
    """
    cdef Py_ssize_t T = n_samples, H = bits.shape[1], C = W2T.shape[0], Cp = W2p.shape[1]
    cdef Py_ssize_t n = y.shape[0], i
    if T < 1 or bits.shape[0] != n * T:
        raise ValueError("bits must have n_samples rows per label")
    if H < 1 or C < 1 or Cp % 16 or Cp < C or W2p.shape[0] != H or W2T.shape[1] != H:
        raise ValueError("W2p must be (H, Cp), Cp a multiple of 16 >= C, and W2T (C, H)")
    if b2p.shape[0] != Cp or gW2.shape[0] != H or gW2.shape[1] != Cp or gb2.shape[0] != Cp:
        raise ValueError("b2p, gW2 and gb2 must have Cp columns")
    if cur.shape[0] != n or cur.shape[1] != H or g1.shape[0] != n or g1.shape[1] != H \
            or gb1.shape[0] != H:
        raise ValueError("cur and g1 must be (n, H) and gb1 (H,)")
    if deriv is not None and (deriv.shape[0] != n or deriv.shape[1] != H):
        raise ValueError("deriv must be (n, H)")
    if n == 0:
        raise ValueError("empty batch")
    if scratch.shape[0] < train_output_scratch(n, T, H, Cp):
        raise ValueError("scratch is too small")
    for i in range(n):
        if y[i] < 0 or y[i] >= C:
            raise ValueError(f"label {y[i]} outside [0, {C})")
    cdef const float *dp = NULL if deriv is None else &deriv[0, 0]
    cdef int64_t correct = 0
    cdef double loss
    with nogil:
        loss = sot_train_output_step(&bits[0, 0], n, T, H, &W2p[0, 0], &W2T[0, 0], &b2p[0], C, Cp,
                                     &y[0], &cur[0, 0], dp, <float>i50, <float>scale,
                                     <float>k_unit, &scratch[0], &g1[0, 0], &gW2[0, 0], &gb2[0],
                                     &gb1[0], &correct)
    return loss, int(correct)


def train_output_scratch(Py_ssize_t n, Py_ssize_t n_samples, Py_ssize_t H, Py_ssize_t Cp):
    """Floats of scratch ``train_output_step`` needs."""
    return 3 * Cp + n * n_samples * (Cp + H) + 2 * H
