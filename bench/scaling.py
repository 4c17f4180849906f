"""Inference throughput vs network shape, and peak memory for a million inputs.

    python bench/scaling.py                      # every table (~3 min on 2 idle cores)
    python bench/scaling.py --tables hidden T    # some of them
    python bench/scaling.py --tables memory --memory-rows 1000000

Tables (images/s of ``StochasticMLP.predict_proba`` on an ``EmulatedBackend``,
all threads, 10 classes, 20 um devices, weights from ``initialize``, inputs
uniform in [0, 1) -- the rate does not depend on the weights' values):

* ``hidden``: one hidden layer of 100 ... 4,000 devices (784 inputs, T = 8);
* ``inputs``: 64 ... 3,072 inputs (500 devices, T = 8);
* ``T``: 1 ... 128 samples (784-500-10);
* ``depth``: 1 to 3 hidden layers of 500 (T = 8; deeper networks take the
  general path: pulses per layer and the compiled binary mat-vec);
* ``memory``: peak resident memory above the inputs while predicting
  ``--memory-rows`` inputs (784-500-10, T = 32), measured in a fresh process;
  bounded: the working set is per block of 256 rows, plus the (n, 10) output.

The median of ``--rounds`` calls on ``--rows`` inputs; the load average is
printed at the start and the end (compare runs only when it stayed near 0).
"""
import argparse
import os
import resource
import subprocess
import sys
import time

import numpy as np

import sotcore
from sotcore.backends import EmulatedBackend
from sotcore.network import CurrentMapping, StochasticMLP
from sotcore.training import nominal_curve

TABLES = ("hidden", "inputs", "T", "depth", "memory")


def _network(d, hidden, C=10, seed=0):
    pop = sotcore.DevicePopulation.from_width(20.0, sum(hidden), random_state=seed)
    i50n, sn = nominal_curve(pop)
    net = StochasticMLP([d, *hidden, C], CurrentMapping.for_nominal(sn))
    net.initialize(np.random.default_rng(seed), i50n / sn)
    return net, EmulatedBackend(pop, random_state=seed)


def _rate(d, hidden, T, rows, rounds):
    net, backend = _network(d, hidden)
    X = np.random.default_rng(1).random((rows, d), dtype=np.float32)
    keys = np.arange(rows, dtype=np.uint64)
    P = net.predict_proba(X, backend, T, row_keys=keys)              # warm-up
    assert P.shape == (rows, 10) and np.allclose(P.sum(axis=1), 1.0)
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        net.predict_proba(X, backend, T, row_keys=keys)
        ts.append(time.perf_counter() - t0)
    return rows / float(np.median(ts))


def _table(title, head, cases, rows, rounds):
    print(f"\n{title}\n")
    print(f"| {head} | images/s | us per image |\n| ---: | ---: | ---: |")
    for label, (d, hidden, T) in cases:
        r = _rate(d, hidden, T, rows, rounds)
        print(f"| {label} | {r:,.0f} | {1e6 / r:.2f} |", flush=True)


def _memory(rows):
    """Run in a fresh process: peak RSS above the inputs while predicting."""
    net, backend = _network(784, [500])
    X = np.random.default_rng(1).random((rows, 784), dtype=np.float32)
    net.predict_proba(X[:512], backend, 32)                          # load everything
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    P = net.predict_proba(X, backend, 32, row_keys=np.arange(rows, dtype=np.uint64))
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{rows} {X.nbytes / 2**20:.0f} {P.nbytes / 2**20:.0f} {peak - base:.0f} {dt:.1f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tables", nargs="+", choices=TABLES, default=list(TABLES))
    ap.add_argument("--rows", type=int, default=10_000, help="inputs per timed call")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--memory-rows", type=int, default=1_000_000)
    ap.add_argument("--_memory-child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._memory_child:
        _memory(args._memory_child)
        return
    from sotcore import _kernels
    print(f"sotcore {sotcore.__version__}, path {_kernels.sampler_isa()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    rows, rounds = args.rows, args.rounds
    if "hidden" in args.tables:
        _table("Hidden devices (784 inputs, 10 classes, T = 8, one hidden layer)", "hidden",
               [(f"{h:,}", (784, [h], 8)) for h in (100, 250, 500, 1000, 2000, 4000)],
               rows, rounds)
    if "inputs" in args.tables:
        _table("Inputs (500 hidden devices, 10 classes, T = 8)", "inputs",
               [(f"{d:,}", (d, [500], 8)) for d in (64, 196, 784, 3072)], rows, rounds)
    if "T" in args.tables:
        _table("Samples per input (784-500-10)", "T",
               [(str(T), (784, [500], T)) for T in (1, 2, 4, 8, 16, 32, 64, 128)], rows,
               rounds)
    if "depth" in args.tables:
        _table("Depth (784 inputs, hidden layers of 500, 10 classes, T = 8)", "hidden layers",
               [(str(k), (784, [500] * k, 8)) for k in (1, 2, 3)], rows, rounds)
    if "memory" in args.tables:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_memory-child",
                              str(args.memory_rows)], capture_output=True, text=True, check=True)
        n, xin, pout, extra, dt = out.stdout.split()
        print(f"\nPeak memory, 784-500-10, T = 32, {int(n):,} inputs ({xin} MiB of float32 "
              f"inputs, {pout} MiB of float64 output): peak RSS {extra} MiB above the "
              f"process before the call, {dt} s")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
