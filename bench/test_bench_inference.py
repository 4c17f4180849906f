"""T-sample inference, 784-500-10 on the 10,000 MNIST test images: sotcore beside
NumPy and PyTorch CPU, same weights (a short HIL run of SOTClassifier).

``sotcore`` is the public API: ``SOTClassifier.predict_proba`` (input
validation, content-keyed noise, the fused kernel).  Each timing is followed
by a correctness check against the NumPy reference implementation's output
(accuracy and argmax agreement within what two independent T-sample
estimates of the same model give).  Run: ``pytest bench/ --benchmark-only``.
"""
import time

import numpy as np
import pytest

SAMPLES = [1, 8, 32]
THREADS = [1, 2]


def _info(benchmark, impl, T, threads, n):
    benchmark.group = f"inference T={T}"
    benchmark.extra_info.update(suite="inference", impl=impl, T=T, threads=threads, images=n)
    # OpenBLAS's idle workers busy-wait ~0.1 s after a multi-threaded call (here: the
    # previous benchmark's); start every benchmark from a quiet machine.
    time.sleep(0.2)


@pytest.fixture(scope="module")
def numpy_outputs(inference):
    """The NumPy reference's probabilities per T (the correctness reference)."""
    return {T: inference.numpy(T, np.random.default_rng(T)) for T in SAMPLES}


@pytest.mark.parametrize("T", SAMPLES)
@pytest.mark.parametrize("threads", THREADS)
def test_sotcore_predict(benchmark, inference, numpy_outputs, T, threads):
    _info(benchmark, "sotcore", T, threads, len(inference.X))
    P = benchmark(inference.ours, T, threads)
    inference.check(P, T, numpy_outputs[T])


@pytest.mark.parametrize("T", SAMPLES)
def test_numpy_reference(benchmark, inference, numpy_outputs, T):
    """One sgemm, the probabilities once, T rounds of uniforms < P, bits @ W2, softmax
    (BLAS threads: the library default)."""
    _info(benchmark, "numpy", T, 0, len(inference.X))
    rng = np.random.default_rng(0)
    P = benchmark(inference.numpy, T, rng)
    inference.check(P, T, numpy_outputs[T])


@pytest.mark.parametrize("T", SAMPLES)
@pytest.mark.parametrize("threads", THREADS)
def test_torch_reference(benchmark, inference, numpy_outputs, T, threads):
    torch = pytest.importorskip("torch")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _info(benchmark, "torch", T, threads, len(inference.X))
        P = benchmark(inference.torch, T)
    finally:
        torch.set_num_threads(previous)
    inference.check(P, T, numpy_outputs[T])
