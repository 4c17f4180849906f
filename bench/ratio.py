"""Print sotcore's throughput beside the NumPy (and PyTorch) references, all
measured in the same run, and the ratios ours / NumPy: the sampler, T-sample
inference (784-500-10, 10,000 MNIST test images) and one HIL training epoch.

    python bench/ratio.py                     # all three suites
    python bench/ratio.py --suites inference training
    python bench/ratio.py --suites sampling --rows 1000 --rounds 10 --no-torch

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


SUITES = ("sampling", "inference", "training")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suites", nargs="+", choices=SUITES, default=list(SUITES))
    ap.add_argument("--rows", type=int, default=10_000, help="sampling: rows of currents")
    ap.add_argument("--devices", type=int, default=500, help="sampling: devices")
    ap.add_argument("--dtypes", nargs="+", default=["float64", "float32"], help="sampling")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5, help="sampling and inference")
    ap.add_argument("--calls", type=int, default=5, help="sampling: timed calls per round")
    ap.add_argument("--samples", nargs="+", type=int, default=[1, 8, 32],
                    help="inference: T values")
    ap.add_argument("--train-rounds", type=int, default=3, help="training: epochs per impl")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args(argv)
    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            pass
    print(f"sotcore sampler path {_kernels.sampler_isa()}, OpenMP {_kernels.openmp_enabled()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    results = {}
    for suite in args.suites:
        results[suite] = globals()[suite](args, torch)
    if len(args.suites) > 1:
        print("\nsummary (ratios of medians, this run):")
        for suite in args.suites:
            for line in results[suite]:
                print("  " + line)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


def sampling(args, torch):

    pop = sotcore.DevicePopulation.from_width(20.0, n_devices=args.devices, variability=0.10,
                                              random_state=0)
    rng = np.random.default_rng(1)
    cur64 = pop.i50 + 3.0 * pop.scale * rng.standard_normal((args.rows, args.devices))
    p = pop.table_probability(cur64)
    p_sum, p_var = float(p.sum()), float((p * (1 - p)).sum())
    n_el = cur64.size
    summary = []
    print(f"\n== sampling: {args.rows} x {args.devices} currents, I50 + 3 scale N(0,1)")
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
            if name == "sotcore-kernel":
                summary.append(f"sampling {dtype} kernel, {nt} thread(s): {med / ref:.1f}x NumPy "
                               f"({med:.0f} M samples/s)")
    return summary


#: Pause before each timed call of the interleaved suites: OpenBLAS's idle worker
#: threads busy-wait ~0.1 s after every multi-threaded call (and OpenMP teams
#: spin briefly), which would charge one implementation for the previous one's
#: threads on a 2-core machine.  Every implementation starts from the same quiet state.
SETTLE_SECONDS = 0.2


def _interleaved(cases, rounds, check):
    """Median and best seconds per case; rounds interleave the cases (one untimed
    warm-up call first), every output is checked."""
    times = {key: [] for key, _ in cases}
    for key, fn in cases:
        check(key, fn())
    for _ in range(rounds):
        for key, fn in cases:
            time.sleep(SETTLE_SECONDS)
            t0 = time.perf_counter()
            res = fn()
            times[key].append(time.perf_counter() - t0)
            check(key, res)
    return {key: (float(np.median(ts)), float(np.min(ts))) for key, ts in times.items()}


def inference(args, torch):
    from references import InferenceProblem
    prob = InferenceProblem()
    n = len(prob.X)
    print(f"\n== inference: 784-500-10, {n} MNIST test images, weights from 2 HIL epochs")
    print(f"{'T':>4} {'implementation':>16} {'threads':>7} {'median k/s':>11} {'best k/s':>9} "
          f"{'x NumPy':>8} {'accuracy':>9}")
    summary = []
    for T in args.samples:
        ref = prob.numpy(T, np.random.default_rng(T))
        rng = np.random.default_rng(0)
        cases = [(("numpy", "BLAS"), lambda: prob.numpy(T, rng))]
        cases += [(("sotcore", nt), lambda nt=nt: prob.ours(T, nt)) for nt in args.threads]
        if torch is not None:
            def run(nt):
                torch.set_num_threads(nt)
                return prob.torch(T)
            cases += [(("torch", nt), lambda nt=nt: run(nt)) for nt in args.threads]
        accs = {}
        res = _interleaved(cases, args.rounds,
                           lambda key, P: accs.__setitem__(key, prob.check(P, T, ref)))
        ref_rate = n / res[("numpy", "BLAS")][0] / 1e3
        for (name, nt), (med, best) in res.items():
            rate = n / med / 1e3
            print(f"{T:>4} {name:>16} {nt:>7} {rate:>11.1f} {n / best / 1e3:>9.1f} "
                  f"{rate / ref_rate:>8.2f} {accs[(name, nt)]:>9.4f}")
        best_ours = max(n / res[("sotcore", nt)][0] / 1e3 for nt in args.threads)
        line = (f"inference T={T}: sotcore {best_ours:.0f}k img/s = {best_ours / ref_rate:.2f}x "
                f"NumPy ({ref_rate:.0f}k)")
        if torch is not None:
            tr = max(n / res[("torch", nt)][0] / 1e3 for nt in args.threads)
            line += f", PyTorch {tr:.0f}k"
        summary.append(line)
    return summary


def training(args, torch):
    from references import TrainingProblem
    prob = TrainingProblem()
    print(f"\n== training: one HIL epoch, {len(prob.X)} x 784, 784-500-10, batch 100, Adam")
    cases = [(("numpy", "BLAS"), prob.numpy_state, lambda st: prob.numpy_epoch(*st),
              lambda st: prob.test_accuracy(*st[0])),
             (("sotcore", "default"), prob.ours, lambda clf: clf.fit(prob.X, prob.y),
              lambda c: prob.test_accuracy(c.coefs_[0], c.intercepts_[0], c.coefs_[1],
                                           c.intercepts_[1]))]
    if torch is not None:
        for nt in args.threads:
            def setup(nt=nt):
                torch.set_num_threads(nt)
                return prob.torch_state()
            cases.append((("torch", nt), setup, lambda st: prob.torch_epoch(*st),
                          lambda st: prob.test_accuracy(*(p.detach().numpy() for p in st[0]))))
    # Implementations take turns epoch by epoch, so background load hits them alike;
    # every epoch starts from the same fresh weights (set up outside the timing).
    times = {key: [] for key, *_ in cases}
    accs = {}
    for _ in range(args.train_rounds):
        for key, setup, run, accuracy in cases:
            state = setup()
            time.sleep(SETTLE_SECONDS)
            t0 = time.perf_counter()
            run(state)
            times[key].append(time.perf_counter() - t0)
            accs[key] = accuracy(state)
            assert accs[key] > 0.85, f"{key}: test accuracy {accs[key]:.3f} after one epoch"
    print(f"{'implementation':>16} {'threads':>7} {'median s':>9} {'best s':>9} {'x NumPy':>8} "
          f"{'test acc':>9}")
    ref = float(np.median(times[("numpy", "BLAS")]))
    summary = []
    for (name, nt), ts in times.items():
        med, best = float(np.median(ts)), float(np.min(ts))
        print(f"{name:>16} {nt:>7} {med:>9.3f} {best:>9.3f} {ref / med:>8.2f} "
              f"{accs[(name, nt)]:>9.4f}")
        summary.append(f"training {name} ({nt} threads): {med:.2f} s/epoch = {ref / med:.2f}x "
                       f"NumPy loop")
    return summary


if __name__ == "__main__":
    main()
