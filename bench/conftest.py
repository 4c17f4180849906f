"""Fixtures and the ours/NumPy ratio summary for the sampling benchmarks.

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


def pytest_terminal_summary(terminalreporter, config):
    """Print M samples/s per implementation and the ratio to the *faster* of
    the two NumPy references, all measured in this run (ratios of medians)."""
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or not bs.benchmarks:
        return
    rows = {}
    for bench in bs.benchmarks:
        info = bench.extra_info
        if "impl" not in info or not bench.stats:
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
