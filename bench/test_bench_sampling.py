"""Bernoulli sampling from per-device tables: sotcore beside NumPy and PyTorch.

Every benchmark checks its own output (sum of bits against sum of P within a
binomial bound) right after timing it.  Setup happens outside the timed call.
Run: ``pytest bench/ --benchmark-only`` (bench/README.md).
"""
import numpy as np
import pytest

from sotcore import _kernels

from conftest import SIZES
from peers import NumpySampler, TorchSampler, binomial_check, kernel_args

THREADS = [1, 2]
DTYPES = ["float64", "float32"]


def _info(benchmark, impl, threads, n, m, dtype):
    benchmark.group = f"sample {n}x{m} {dtype}"
    benchmark.extra_info.update(impl=impl, threads=threads, rows=n, cols=m, dtype=dtype,
                                elements=n * m)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", THREADS)
def test_sotcore_kernel(benchmark, problems, size, dtype, threads):
    """The compiled kernel alone (what the network path calls), output preallocated."""
    pop, cur, p_sum, p_var = problems[size]
    X = np.ascontiguousarray(cur, dtype=dtype)
    a, b, thr = kernel_args(pop, dtype)
    out = np.empty(X.shape, dtype=np.uint8)
    _info(benchmark, "sotcore-kernel", threads, *size, dtype)
    benchmark(_kernels.sample_table, X, a, b, thr, 12345, 0, 0, out, threads)
    binomial_check(out, p_sum, p_var)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", THREADS)
def test_sotcore_sample(benchmark, problems, size, dtype, threads):
    """The public API: validation (incl. the finite check), allocation, kernel."""
    pop, cur, p_sum, p_var = problems[size]
    X = np.ascontiguousarray(cur, dtype=dtype)
    _info(benchmark, "sotcore-sample", threads, *size, dtype)
    bits = benchmark(pop.sample, X, random_state=0, n_threads=threads)
    binomial_check(bits, p_sum, p_var)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["integers", "raw"])
def test_numpy_reference(benchmark, problems, size, dtype, variant):
    """Vectorised NumPy, single-threaded (NumPy's ufuncs, take and random are).
    ``integers``: Generator.integers uint32 draws; ``raw``: random_raw words."""
    pop, cur, p_sum, p_var = problems[size]
    X = np.ascontiguousarray(cur, dtype=dtype)
    raw = variant == "raw"
    sampler = NumpySampler(pop, dtype, raw=raw)
    rng = np.random.PCG64(0) if raw else np.random.default_rng(0)
    out = np.empty(X.shape, dtype=np.uint8)
    _info(benchmark, "numpy" if not raw else "numpy-raw", 1, *size, dtype)
    benchmark(sampler, X, rng, out)
    binomial_check(out, p_sum, p_var)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", THREADS)
def test_torch_reference(benchmark, problems, size, dtype, threads):
    torch = pytest.importorskip("torch")
    pop, cur, p_sum, p_var = problems[size]
    X = np.ascontiguousarray(cur, dtype=dtype)
    sampler = TorchSampler(pop, dtype)
    gen = torch.Generator().manual_seed(0)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _info(benchmark, "torch", threads, *size, dtype)
        bits = benchmark(sampler, X, gen)
    finally:
        torch.set_num_threads(previous)
    binomial_check(bits.numpy(), p_sum, p_var)
