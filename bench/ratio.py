"""Print the sampler's throughput beside the NumPy (and PyTorch) reference,
measured in the same run, and the ratio ours / NumPy.

    python bench/ratio.py                     # 10,000 x 500, float64 and float32
    python bench/ratio.py --rows 1000 --rounds 10 --no-torch

Each round runs every implementation once untimed (to warm the caches, as
in pytest-benchmark's tight loops) and then ``--calls`` timed times back to
back; the rounds interleave the implementations, so background load hits
them alike.  The table shows the
median call (and the best); "x NumPy" is against the faster NumPy variant.
Every call's output is checked (sum of bits vs sum of P, binomial bound).
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sotcore  # noqa: E402
from sotcore import _kernels  # noqa: E402
from peers import NumpySampler, TorchSampler, binomial_check, kernel_args  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--devices", type=int, default=500)
    ap.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args(argv)

    pop = sotcore.DevicePopulation.from_width(20.0, n_devices=args.devices, variability=0.10,
                                              random_state=0)
    rng = np.random.default_rng(1)
    cur64 = pop.i50 + 3.0 * pop.scale * rng.standard_normal((args.rows, args.devices))
    p = pop.table_probability(cur64)
    p_sum, p_var = float(p.sum()), float((p * (1 - p)).sum())
    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            pass
    n_el = cur64.size
    print(f"{args.rows} x {args.devices} currents, I50 + 3 scale N(0,1); sampler path "
          f"{_kernels.sampler_isa()}, OpenMP {_kernels.openmp_enabled()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'dtype':>8} {'implementation':>16} {'threads':>7} {'median M/s':>11} "
          f"{'best M/s':>9} {'x NumPy':>8}")
    for dtype in args.dtypes:
        X = np.ascontiguousarray(cur64, dtype=dtype)
        a, b, thr = kernel_args(pop, dtype)
        out = np.empty(X.shape, dtype=np.uint8)
        np_sampler, np_rng = NumpySampler(pop, dtype), np.random.default_rng(0)
        raw_sampler, bitgen = NumpySampler(pop, dtype, raw=True), np.random.PCG64(0)
        cases = [("numpy", 1, lambda: np_sampler(X, np_rng, out)),
                 ("numpy-raw", 1, lambda: raw_sampler(X, bitgen, out))]
        for nt in args.threads:
            cases.append(("sotcore-kernel", nt, lambda nt=nt: _kernels.sample_table(
                X, a, b, thr, 7, 0, 0, out, nt)))
            cases.append(("sotcore-sample", nt, lambda nt=nt: pop.sample(
                X, random_state=0, n_threads=nt)))
        if torch is not None:
            t_sampler, gen = TorchSampler(pop, dtype), torch.Generator().manual_seed(0)
            for nt in args.threads:
                def run(nt=nt):
                    torch.set_num_threads(nt)
                    return t_sampler(X, gen)
                cases.append(("torch", nt, run))
        times = {(name, nt): [] for name, nt, _ in cases}
        for _ in range(args.rounds):
            for name, nt, fn in cases:
                fn()                                            # warm-up
                for _ in range(args.calls):
                    t0 = time.perf_counter()
                    res = fn()
                    times[(name, nt)].append(time.perf_counter() - t0)
                    bits = out if res is None or isinstance(res, bool) else np.asarray(res)
                    binomial_check(bits, p_sum, p_var)
        ref = max(n_el / np.median(times[(name, 1)]) / 1e6 for name in ("numpy", "numpy-raw"))
        for (name, nt), ts in times.items():
            med, best = n_el / np.median(ts) / 1e6, n_el / np.min(ts) / 1e6
            print(f"{dtype:>8} {name:>16} {nt:>7} {med:>11.0f} {best:>9.0f} {med / ref:>8.1f}")


if __name__ == "__main__":
    main()
