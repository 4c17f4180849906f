# cython: language_level=3
"""Compiled core of sotcore (private).

Kernels trust their inputs' *values* (validation lives in Python), but every
``def`` entry point checks the shapes it indexes with, so no call from Python
can make a kernel read or write out of bounds.  Randomness is counter-based
(see ``_sotrng.h``): the bit for element (row r, column j) depends only on
(seed, stream, r, j), so results are identical at any thread count.
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

_SAMPLER_ISAS = ("scalar", "avx2", "avx512")


def sampler_isa(name=None):
    """The instruction-set path of the sampler; select another with ``name``.

    ``name`` is one of ``"scalar"``, ``"avx2"``, ``"avx512"`` (capped at what
    the CPU supports) or ``"best"``.  All paths give identical bits; this is
    for tests and benchmarks.  Not thread-safe.  Returns the path in use.
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
    # No more threads than blocks: idle OpenMP threads spin and slow BLAS down.
    n_threads = max(1, min(n_threads, nrb * ncb))
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
