"""Fixtures and the ours/NumPy ratio summaries for the benchmarks (sampling,
inference, training).

Not collected by the normal test run (pyproject's testpaths is ["tests"]);
run with ``pytest bench/ --benchmark-only`` (see bench/README.md).
"""
import numpy as np
import pytest

import sotcore

#: (rows, devices) of the timed problems; the first is the issue's size.
SIZES = [(10_000, 500), (1_000, 500)]


@pytest.fixture(scope="session")
def population():
    return sotcore.DevicePopulation.from_width(20.0, n_devices=500, variability=0.10,
                                               random_state=0)


@pytest.fixture(scope="session")
def problems(population):
    """Per size: float64 currents spread realistically over each device's
    switching region (I50 + 3 scale N(0, 1)), and sum(P), sum(P(1-P)) for the
    correctness checks."""
    rng = np.random.default_rng(1)
    out = {}
    for n, m in SIZES:
        pop = population if m == len(population) else population[:m]
        cur = pop.i50 + 3.0 * pop.scale * rng.standard_normal((n, m))
        p = pop.table_probability(cur)
        out[(n, m)] = (pop, cur, float(p.sum()), float((p * (1 - p)).sum()))
    return out


@pytest.fixture(scope="session")
def inference():
    """784-500-10 weights from a short HIL run, the 10,000 MNIST test images."""
    from references import InferenceProblem
    return InferenceProblem()


@pytest.fixture(scope="session")
def training():
    """The one-epoch HIL training problem (60,000 x 784)."""
    from references import TrainingProblem
    return TrainingProblem()


def pytest_terminal_summary(terminalreporter, config):
    """Print each suite's throughput per implementation and its ratio to the
    NumPy reference, all measured in this run (ratios of medians)."""
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or not bs.benchmarks:
        return
    _sampling_summary(terminalreporter, bs)
    _inference_summary(terminalreporter, bs)
    _training_summary(terminalreporter, bs)


def _inference_summary(tr, bs):
    rows = {}
    for bench in bs.benchmarks:
        info = bench.extra_info
        if info.get("suite") != "inference" or not bench.stats:
            continue
        rows.setdefault(info["T"], []).append(
            (info["impl"], info["threads"], info["images"] / bench.stats.median / 1e3,
             info["images"] / bench.stats.min / 1e3))
    if not rows:
        return
    tr.section("inference throughput (k images/s) and ratio to the NumPy reference")
    tr.write_line(f"{'T':>4} {'implementation':>16} {'threads':>7} {'median':>9} {'best':>9} "
                  f"{'x NumPy (median)':>17}")
    for T, entries in sorted(rows.items()):
        ref = max((e[2] for e in entries if e[0] == "numpy"), default=float("nan"))
        for impl, threads, med, best in sorted(entries, key=lambda e: (e[0] != "numpy", e[0], e[1])):
            tr.write_line(f"{T:>4} {impl:>16} {threads or 'BLAS':>7} {med:>9.1f} {best:>9.1f} "
                          f"{med / ref:>17.2f}")


def _training_summary(tr, bs):
    entries = []
    for bench in bs.benchmarks:
        info = bench.extra_info
        if info.get("suite") != "training" or not bench.stats:
            continue
        entries.append((info["impl"], info["threads"], bench.stats.median, bench.stats.min))
    if not entries:
        return
    ref = min((e[2] for e in entries if e[0] == "numpy"), default=float("nan"))
    tr.section("HIL training epoch (s) and speed-up over the NumPy loop")
    tr.write_line(f"{'implementation':>16} {'threads':>7} {'median s':>9} {'best s':>9} "
                  f"{'x NumPy (median)':>17}")
    for impl, threads, med, best in sorted(entries, key=lambda e: (e[0] != "numpy", e[0], e[1])):
        tr.write_line(f"{impl:>16} {threads or 'default':>7} {med:>9.3f} {best:>9.3f} "
                      f"{ref / med:>17.2f}")


def _sampling_summary(terminalreporter, bs):
    """M samples/s per implementation and the ratio to the *faster* of the two
    NumPy references."""
    rows = {}
    for bench in bs.benchmarks:
        info = bench.extra_info
        if "impl" not in info or "rows" not in info or not bench.stats:
            continue
        key = (info["rows"], info["cols"], info["dtype"])
        rows.setdefault(key, []).append(
            (info["impl"], info["threads"], info["elements"] / bench.stats.median / 1e6,
             info["elements"] / bench.stats.min / 1e6))
    if not rows:
        return
    tr = terminalreporter
    tr.section("sampler throughput (M samples/s) and ratio to the faster NumPy reference")
    tr.write_line(f"{'size':>12} {'dtype':>8} {'implementation':>16} {'threads':>7} "
                  f"{'median':>9} {'best':>9} {'x NumPy (median)':>17}")
    for (n, m, dtype), entries in sorted(rows.items()):
        ref_med = max((e[2] for e in entries if e[0].startswith("numpy")), default=float("nan"))
        for impl, threads, med, best in sorted(
                entries, key=lambda e: (not e[0].startswith("numpy"), e[0], e[1])):
            tr.write_line(f"{n:>6}x{m:<5} {dtype:>8} {impl:>16} {threads:>7} {med:>9.0f} "
                          f"{best:>9.0f} {med / ref_med:>17.1f}")
