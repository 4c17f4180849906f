"""Print sotcore's throughput beside the NumPy (and PyTorch) references, all
measured in the same run, and every ratio the performance issues ask for: the
sampler; T-sample inference (784-500-10, 10,000 MNIST test images) on each CPU
path, as a fraction of the limit measured in the issue; one HIL training epoch;
prediction and fitting right after a multi-threaded BLAS call; calibrate and
fit beside a busy neighbour process.

    python bench/ratio.py                     # every suite (~5 min on 2 idle cores)
    python bench/ratio.py --suites inference training
    python bench/ratio.py --suites inference --isa avx2 avx512 --samples 8 32
    python bench/ratio.py --suites after-blas cotenant --no-torch
    python bench/ratio.py --suites sampling --rows 1000 --rounds 10 --no-torch

Each round runs every implementation once untimed (to warm the caches, as
in pytest-benchmark's tight loops) and then ``--calls`` timed times back to
back; the rounds interleave the implementations, so background load hits
them alike.  The table shows the
median call (and the best); "x NumPy" is against the faster NumPy variant.
Every call's output is checked (sum of bits vs sum of P, binomial bound).
The load average is printed at the start and the end: ratios are only
comparable to the README's when it stayed near 0.
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


SUITES = ("sampling", "inference", "training", "after-blas", "cotenant")

#: Best HIL epoch and inference rates the issue measured as this machine kind's
#: physical limit (GEMM at peak, minimal memory traffic, SIMD random numbers):
#: T -> images/s.  Printed as "% of limit" beside our rates.
LIMIT = {1: 450e3, 8: 413e3, 32: 323e3}


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
    ap.add_argument("--isa", nargs="+", choices=_kernels._SAMPLER_ISAS,
                    default=list(_kernels._SAMPLER_ISAS[:_kernels._SAMPLER_ISAS.index(
                        _kernels.sampler_isa_max()) + 1]),
                    help="inference: CPU paths to time (default: every path this CPU has)")
    ap.add_argument("--cotenant-seconds", type=float, default=40.0,
                    help="cotenant: how long the busy neighbour process runs at most")
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
        results[suite] = globals()[suite.replace("-", "_")](args, torch)
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


def _on_path(isa, fn, *a):
    """``fn(*a)`` with the kernels forced onto CPU path ``isa``."""
    best = _kernels.sampler_isa()
    _kernels.sampler_isa(isa)
    try:
        return fn(*a)
    finally:
        _kernels.sampler_isa(best)


_PROBLEMS = {}


def _problem(name):
    """One instance per problem and run (InferenceProblem trains a model first)."""
    import references
    if name not in _PROBLEMS:
        _PROBLEMS[name] = getattr(references, name)()
    return _PROBLEMS[name]


def inference(args, torch):
    prob = _problem("InferenceProblem")
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
        best_isa, nt_max = _kernels.sampler_isa(), max(args.threads)
        cases += [((f"sotcore-{isa}", nt_max), lambda isa=isa: _on_path(isa, prob.ours, T, nt_max))
                  for isa in args.isa if isa != best_isa]
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
        if T in LIMIT:
            line += f", {100 * best_ours * 1e3 / LIMIT[T]:.0f} % of the issue's limit"
        if torch is not None:
            tr = max(n / res[("torch", nt)][0] / 1e3 for nt in args.threads)
            line += f", {best_ours / tr:.2f}x PyTorch ({tr:.0f}k)"
        summary.append(line)
        for isa in args.isa:
            if isa != best_isa:
                rate = n / res[(f"sotcore-{isa}", nt_max)][0] / 1e3
                summary.append(f"inference T={T}, {isa} path forced: {rate:.0f}k img/s = "
                               f"{rate / ref_rate:.2f}x NumPy, "
                               f"{rate / (n / res[('sotcore', nt_max)][0] / 1e3):.2f}x the "
                               f"{best_isa} path")
    return summary


def training(args, torch):
    prob = _problem("TrainingProblem")
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
    ours = float(np.median(times[("sotcore", "default")]))
    if torch is not None:
        tr = min(float(np.median(times[("torch", nt)])) for nt in args.threads)
        summary.append(f"training sotcore vs the faster PyTorch: {tr / ours:.2f}x")
    return summary


def after_blas(args, torch):
    """Prediction and a short fit right after a multi-threaded BLAS call in this
    process (OpenBLAS's workers still spinning), against the same call after an
    idle pause: what a user's script sees."""
    prob = _problem("InferenceProblem")
    Xfit, yfit = _problem("TrainingProblem").X[:10_000], _problem("TrainingProblem").y[:10_000]
    A = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    print(f"\n== after BLAS: each call timed after a 0.2 s pause and right after a "
          f"multi-threaded 1024^2 sgemm (BLAS threads: {_blas_threads()})")
    print(f"{'call':>26} {'after pause ms':>15} {'after sgemm ms':>15} {'ratio':>6}")
    calls = [(f"predict_proba T={T}", lambda T=T: prob.ours(T)) for T in args.samples]
    calls.append(("fit, 1 HIL epoch, 10k rows",
                  lambda: sotcore.SOTClassifier(devices=prob.pop, training="hil", max_iter=1,
                                             random_state=0).fit(Xfit, yfit)))
    summary = []
    for name, fn in calls:
        fn()
        idle, after = [], []
        for _ in range(max(3, args.rounds)):
            time.sleep(SETTLE_SECONDS)
            t0 = time.perf_counter()
            fn()
            idle.append(time.perf_counter() - t0)
            A @ A
            t0 = time.perf_counter()
            fn()
            after.append(time.perf_counter() - t0)
        a, b = float(np.median(idle)), float(np.median(after))
        print(f"{name:>26} {1e3 * a:>15.1f} {1e3 * b:>15.1f} {b / a:>6.2f}")
        tag = (f" [SOTCORE_QUIET_BLAS={os.environ['SOTCORE_QUIET_BLAS']}]"
               if os.environ.get("SOTCORE_QUIET_BLAS") else "")
        summary.append(f"after a BLAS call{tag}: {name} {b / a:.2f}x its time after a pause "
                       f"(target <= 1.2)")
    if not os.environ.get("SOTCORE_QUIET_BLAS"):
        # OpenBLAS's workers busy-wait 2**28 cycles (~0.1 s) after a call; sotcore shuts
        # such a pool down when it starts (sotcore/_threads.py): the same suite in a
        # process where it does not.
        import subprocess
        env = dict(os.environ, SOTCORE_QUIET_BLAS="0")
        child = subprocess.run([sys.executable, os.path.abspath(__file__), "--suites",
                                "after-blas", "--no-torch", "--samples",
                                *map(str, args.samples), "--rounds", str(args.rounds)],
                               env=env, capture_output=True, text=True, check=True)
        print("\n(the same with SOTCORE_QUIET_BLAS=0: OpenBLAS's pool left running)")
        lines = child.stdout.splitlines()
        print("\n".join(lines[lines.index(next(x for x in lines if x.startswith("== after"))):
                             lines.index("summary (ratios of medians, this run):")
                             if "summary (ratios of medians, this run):" in lines else None]))
        summary += [x.strip() for x in lines if x.strip().startswith("after a BLAS call [")]
    return summary


def _blas_threads():
    from threadpoolctl import threadpool_info
    return ",".join(str(i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas")


_NEIGHBOUR = """
import os, sys, time
import numpy as np
A = np.random.default_rng(0).standard_normal((700, 700))
t0 = time.time()
while time.time() - t0 < float(sys.argv[1]):
    A @ A
"""


def cotenant(args, torch):
    """calibrate and a small fit while another process runs a 2-thread BLAS loop:
    default threading against the same call with BLAS limited to one thread
    (issue #13.7's target: no slower than 1.3x)."""
    import subprocess
    from sklearn.datasets import load_digits
    from threadpoolctl import threadpool_limits
    from sotcore.calibration import simulate_measurements
    pop = sotcore.DevicePopulation.from_width(20.0, 1000, random_state=0)
    table = simulate_measurements(pop, pulses=200, n_points=25, random_state=1)
    X, y = load_digits(return_X_y=True)
    X = (X / 16).astype(np.float32)
    calls = [("calibrate, 1000 devices x 25", lambda: sotcore.calibrate(table)),
             ("fit, digits, 20 epochs", lambda: sotcore.SOTClassifier(
                 max_iter=20, random_state=0).fit(X, y))]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="2", OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    neighbour = subprocess.Popen([sys.executable, "-c", _NEIGHBOUR, str(args.cotenant_seconds)],
                                 env=env)
    print("\n== co-tenant: another process runs a 2-thread BLAS loop; each call with "
          "default threading and with BLAS limited to one thread")
    print(f"{'call':>30} {'default s':>10} {'1 BLAS thread s':>16} {'ratio':>6}")
    summary = []
    try:
        time.sleep(1.0)
        for name, fn in calls:
            fn()
            dflt, one = [], []
            for _ in range(max(5, args.rounds)):
                t0 = time.perf_counter()
                fn()
                dflt.append(time.perf_counter() - t0)
                with threadpool_limits(1, user_api="blas"):
                    t0 = time.perf_counter()
                    fn()
                    one.append(time.perf_counter() - t0)
            a, b = float(np.median(dflt)), float(np.median(one))
            print(f"{name:>30} {a:>10.3f} {b:>16.3f} {a / b:>6.2f}")
            summary.append(f"co-tenant: {name} with default threading {a / b:.2f}x the "
                           f"one-BLAS-thread time (target <= 1.3)")
        if neighbour.poll() is not None:
            print("(the neighbour finished before the measurements did: raise "
                  "--cotenant-seconds)")
    finally:
        neighbour.kill()
        neighbour.wait()
    return summary


if __name__ == "__main__":
    main()
