"""The sampler's peers for the benchmarks: plain NumPy and PyTorch CPU.

Both draw from the same distribution as ``sotcore`` (the per-device table
linearly interpolated at the current, via the same 12-bit dither), so the
comparison is like for like.  Setup (tables, scaled coefficients, buffers) is
done once, outside the timed call, as for ``sotcore``.
"""
import numpy as np

#: Rows per NumPy chunk: small enough that the ~8 temporaries stay in L2.
NUMPY_CHUNK_ROWS = 256


def kernel_args(pop, dtype):
    """What ``DevicePopulation.sample`` hands the kernel: (a, b, thresholds)."""
    thr = pop.table()[2]
    a, b = pop._table_cache[np.dtype(dtype).type]
    return a, b, thr


class NumpySampler:
    """Table-lookup Bernoulli sampler in vectorised NumPy.

    Per chunk of rows: ``s = cur * 4096a + 4096b`` clipped to the grid,
    ``g = (trunc(s) + (r & 4095)) >> 12`` plus each device's table offset,
    ``np.take`` on the flattened uint32 table, ``bits = r < t``.  In-place
    ufuncs on preallocated buffers, chunks sized for the cache (~1.5x faster
    than whole-array code).  The uint32 draws ``r`` come from
    ``Generator.integers(0, 2**32, dtype=uint32)`` (``rng`` a Generator), or,
    ``raw=True``, from ``BitGenerator.random_raw`` viewed as uint32 (``rng`` a
    BitGenerator; ~15% faster overall, the fastest NumPy variant we found).
    """

    def __init__(self, pop, dtype, chunk_rows=NUMPY_CHUNK_ROWS, raw=False):
        a, b, thr = kernel_args(pop, dtype)
        self.raw = raw
        dt = np.dtype(dtype).type
        m, G = thr.shape
        self.a4, self.b4 = a * dt(4096), b * dt(4096)
        self.smax = dt(4096) * dt(G - 1)
        self.flat = np.ascontiguousarray(thr).ravel()
        self.offs = np.arange(m, dtype=np.uint32) * np.uint32(G)
        self.chunk = chunk_rows
        self.x = np.empty((chunk_rows, m), dtype=dt)
        self.q = np.empty((chunk_rows, m), dtype=np.uint32)
        self.t = np.empty((chunk_rows, m), dtype=np.uint32)

    def __call__(self, currents, rng, out=None):
        n, m = currents.shape
        if out is None:
            out = np.empty((n, m), dtype=np.uint8)
        for s in range(0, n, self.chunk):
            c = currents[s:s + self.chunk]
            k = c.shape[0]
            x, q, t = self.x[:k], self.q[:k], self.t[:k]
            np.multiply(c, self.a4, out=x)
            x += self.b4
            np.clip(x, 0, self.smax, out=x)
            np.copyto(q, x, casting="unsafe")              # trunc
            if self.raw:
                r = rng.random_raw((k * m + 1) // 2).view(np.uint32)[:k * m].reshape(k, m)
            else:
                r = rng.integers(0, 1 << 32, size=(k, m), dtype=np.uint32)
            np.bitwise_and(r, 4095, out=t)
            q += t
            q >>= 12
            q += self.offs
            np.take(self.flat, q, out=t, mode="wrap")      # indices are in range
            np.less(r, t, out=out[s:s + k].view(np.bool_))
        return out


class TorchSampler:
    """The same algorithm in PyTorch (CPU), on whole tensors.

    PyTorch has no uint32 compare, so thresholds and draws are shifted by
    2**31 into int32 (``r - 2**31 < t - 2**31`` iff ``r < t``); the fastest
    variants we measured: ``randint`` over the full int32 range and
    ``index_select`` with int32 indices (2-3x faster than int64 ``take``).
    """

    def __init__(self, pop, dtype):
        import torch
        self.torch = torch
        a, b, thr = kernel_args(pop, dtype)
        dt = np.dtype(dtype).type
        m, G = thr.shape
        self.a4 = torch.from_numpy(a * dt(4096))
        self.b4 = torch.from_numpy(b * dt(4096))
        self.smax = float(dt(4096) * dt(G - 1))
        shifted = (thr.astype(np.int64) - (1 << 31)).astype(np.int32)
        self.flat = torch.from_numpy(np.ascontiguousarray(shifted).ravel())
        self.offs = torch.arange(m, dtype=torch.int32) * G

    def __call__(self, currents, generator):
        torch = self.torch
        x = torch.from_numpy(currents)
        s = x * self.a4
        s += self.b4
        s.clamp_(0.0, self.smax)
        q = s.to(torch.int32)                                   # trunc
        r = torch.randint(-(1 << 31), 1 << 31, tuple(x.shape), dtype=torch.int32,
                          generator=generator)                  # w - 2**31
        q += r & 4095                                           # low bits unchanged by the shift
        q >>= 12
        q += self.offs
        t = torch.index_select(self.flat, 0, q.view(-1)).view(q.shape)
        return r < t


def binomial_check(bits, p_sum, p_var, bias=2.2e-6, z=6.0):
    """Assert sum(bits) is within z sigma (plus the sampler's bias bound) of sum(P)."""
    total = float(bits.sum())
    tol = z * np.sqrt(p_var) + bias * bits.size
    assert abs(total - p_sum) <= tol, (
        f"sum of bits {total:.0f} vs expected {p_sum:.0f} (tolerance {tol:.0f})")
