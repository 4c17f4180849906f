"""One hardware-in-loop epoch (60,000 x 784, 784-500-10, batch 100, Adam, emulated
devices): sotcore beside a NumPy loop and a PyTorch (autograd) loop.

``sotcore`` is ``SOTClassifier(devices=pop, training="hil", max_iter=1).fit``
(the estimator's defaults).  Every round starts from fresh weights (set up
outside the timed call); after timing, the weights of the last round must
reach a sane test accuracy on the 10,000 MNIST test images (the same NumPy
evaluator for all).  Run: ``pytest bench/ --benchmark-only -k training``.
"""
import numpy as np
import pytest

ROUNDS = 3
MIN_ACCURACY = 0.85      # one epoch reaches ~0.88-0.90 with every implementation


def _info(benchmark, impl, threads, n):
    benchmark.group = "HIL epoch 60000x784"
    benchmark.extra_info.update(suite="training", impl=impl, threads=threads, images=n)


def test_sotcore_epoch(benchmark, training):
    _info(benchmark, "sotcore", 0, len(training.X))
    clfs = []

    def setup():
        clfs.append(training.ours())
        return (clfs[-1], training.X, training.y), {}
    benchmark.pedantic(lambda clf, X, y: clf.fit(X, y), setup=setup, rounds=ROUNDS,
                       iterations=1)
    c = clfs[-1]
    acc = training.test_accuracy(c.coefs_[0], c.intercepts_[0], c.coefs_[1], c.intercepts_[1])
    assert acc > MIN_ACCURACY, acc


def test_numpy_epoch(benchmark, training):
    _info(benchmark, "numpy", 0, len(training.X))
    states = []

    def setup():
        states.append(training.numpy_state())
        return states[-1], {}
    benchmark.pedantic(training.numpy_epoch, setup=setup, rounds=ROUNDS, iterations=1)
    acc = training.test_accuracy(*states[-1][0])
    assert acc > MIN_ACCURACY, acc


@pytest.mark.parametrize("threads", [1, 2])
def test_torch_epoch(benchmark, training, threads):
    torch = pytest.importorskip("torch")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    states = []

    def setup():
        states.append(training.torch_state())
        return states[-1], {}
    try:
        _info(benchmark, "torch", threads, len(training.X))
        benchmark.pedantic(training.torch_epoch, setup=setup, rounds=ROUNDS, iterations=1)
    finally:
        torch.set_num_threads(previous)
    acc = training.test_accuracy(*(p.detach().numpy() for p in states[-1][0]))
    assert acc > MIN_ACCURACY, acc
