"""The DeviceNeurons layer's forward pass on the emulator beside the PyTorch peer
``torch.bernoulli(torch.sigmoid(z))`` on the same pre-activations, in one run.

Problems: a 784-500 layer at batch 10,000 (``z = X W + b`` from the 10,000 MNIST
test images when present, else Gaussian pre-activations; z is computed outside
the timed call), and a convolutional feature map (256 images x 16 channels x
24 x 24, the output of a 5x5 conv on MNIST, one device per channel).  Devices:
``DevicePopulation.from_width(20.0, ..., variability=0.1, random_state=0)``.
Parametrised over 1 and 2 threads (``torch.set_num_threads`` and the layer's
``n_threads``).  Each timing is followed by a check that the bits' mean is
within 6 binomial standard deviations of the mean probability the
implementation samples (the device tables for ours, the sigmoid for torch).
Run: ``pytest bench/test_bench_torch.py --benchmark-only``.
"""
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sotcore  # noqa: E402
from sotcore.torch import DeviceNeurons  # noqa: E402

THREADS = [1, 2]
PROBLEMS = ["dense-10000x500", "conv-256x16x24x24"]
_results = {}


def _dense_z():
    rng = np.random.default_rng(0)
    try:
        from sotcore.datasets import load_mnist
        X, _ = load_mnist(None, "test")
    except (FileNotFoundError, ValueError):
        X = rng.random((10_000, 784), dtype=np.float32)
    W = rng.normal(0, np.sqrt(2.0 / (784 + 500)), (784, 500)).astype(np.float32)
    z = X @ W
    z -= z.mean(axis=0)
    z /= z.std(axis=0) + 1e-6          # unit-variance pre-activations, as after batch norm
    return torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))


def _conv_z():
    g = torch.Generator().manual_seed(0)
    return torch.randn(256, 16, 24, 24, generator=g)


@pytest.fixture(scope="module")
def problems():
    out = {}
    for name, z, m in (("dense-10000x500", _dense_z(), 500), ("conv-256x16x24x24", _conv_z(), 16)):
        pop = sotcore.DevicePopulation.from_width(20.0, m, variability=0.1, random_state=0)
        layer = DeviceNeurons(pop, random_state=0)
        layer(z[:1])                                   # fixes the device map, builds tables
        zn = z.numpy().reshape(z.shape[0], -1)
        cur = layer.mapping.offset + layer.mapping.unit * zn.astype(np.float64)
        sub = pop[layer.device_map.index]
        p_dev = sub.table_probability(cur)
        p_sig = 1.0 / (1.0 + np.exp(-zn.astype(np.float64)))
        out[name] = {"name": name, "z": z, "pop": pop,
                     "ours": (float(p_dev.sum()), float((p_dev * (1 - p_dev)).sum())),
                     "torch": (float(p_sig.sum()), float((p_sig * (1 - p_sig)).sum()))}
    return out


@pytest.fixture(scope="module", autouse=True)
def ratio_summary(request):
    yield
    if not _results:
        return
    tr = request.config.pluginmanager.getplugin("terminalreporter")
    tr.write_line("")
    tr.write_line("DeviceNeurons forward vs torch.bernoulli(sigmoid(z)) (M neurons/s, median)")
    for (prob, threads) in sorted({(p, t) for (p, _, t) in _results}):
        ours = _results.get((prob, "ours", threads))
        peer = _results.get((prob, "torch", threads))
        if ours and peer:
            tr.write_line(f"  {prob:>20} threads={threads}: sotcore {ours:8.1f}  torch "
                          f"{peer:8.1f}  x torch {ours / peer:5.2f}")


def _check(bits, expected):
    s, var = expected
    assert abs(float(bits.sum()) - s) <= 6 * np.sqrt(var) + 1e-3 * bits.numel(), \
        (float(bits.sum()), s)


def _timed(benchmark, prob, impl, threads, make):
    """Time ``make()()`` (set up under ``threads`` torch threads); record M neurons/s."""
    z = prob["z"]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fn = make()
        benchmark.group = f"torch layer {prob['name']}"
        benchmark.extra_info.update(suite="torch-layer", impl=impl, threads=threads,
                                    neurons=z.numel())
        time.sleep(0.2)    # let the previous benchmark's spinning threads go idle
        with torch.no_grad():
            bits = benchmark(fn)
    finally:
        torch.set_num_threads(previous)
    _results[(prob["name"], impl, threads)] = z.numel() / benchmark.stats.stats.median / 1e6
    assert bits.shape == z.shape
    _check(bits, prob[impl])


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("prob", PROBLEMS)
def test_device_neurons_forward(benchmark, problems, prob, threads):
    P = problems[prob]

    def make():
        layer = DeviceNeurons(P["pop"], random_state=1, n_threads=threads)
        layer(P["z"][:1])                              # device map and tables, untimed
        return lambda: layer(P["z"])
    _timed(benchmark, P, "ours", threads, make)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("prob", PROBLEMS)
def test_torch_bernoulli_sigmoid(benchmark, problems, prob, threads):
    P = problems[prob]

    def make():
        torch.manual_seed(1)
        return lambda: torch.bernoulli(torch.sigmoid(P["z"]))
    _timed(benchmark, P, "torch", threads, make)
