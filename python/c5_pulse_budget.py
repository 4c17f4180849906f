"""C5: accuracy vs pulses per device -- full HIL, a pulse-efficient schedule, transfer.

A lab pays for every pulse.  On MNIST (train on the 5,000-image subset, test on
the official 10,000), 784-500-10, 20 um devices at 10 % variability (the ASSUMED
default device model), each seed draws a population A, put behind an
``EmulatedBackend`` that plays the lab's instrument (its pulses are counted):

* **full HIL**: ``SOTClassifier(devices=A, training="hil")``, ``--epochs`` epochs;
* **ex-situ**: trained in software, deployed on A (no training pulses);
* **schedule**: measure A (``calibrate_backend``: coarse + fine pulse sweeps), train
  hardware-aware on that measured calibration (no device pulses), then fine-tune
  with k HIL epochs on A: ``SOTClassifier(training="hil", pretrain="hardware-aware",
  hil_epochs=1, calibration=...)`` then ``partial_fit`` for k = 2, 3;  k = 0 is the
  hardware-aware model alone;
* **transfer**: the full-HIL model of A saved and loaded onto another population B
  (``SOTClassifier.load(..., backend=B)``), scored as is, then fine-tuned on B
  with k = 1, 2 HIL epochs (``partial_fit``).

Pulses per device count every pulse a device received during training and
calibration (the mean over devices; inference pulses for the test score are not
counted).  Writes ``results.json``, ``table.txt`` and ``c5_pulse_budget.png``.

    python python/c5_pulse_budget.py --out results/c5            # full (~15 min here)
    python python/c5_pulse_budget.py --quick --out results/c5q   # a smoke run
"""
import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from _study import mnist_study

import sotcore
from sotcore.characterize import calibrate_backend
from sotcore.training import nominal_curve

T = 32


_SCORED = {}     # id(backend) -> pulses spent scoring (not part of the training budget)


def _pulses(backend):
    """Mean training + calibration pulses per device (scoring pulses excluded)."""
    return float(np.mean(backend.pulse_counts - _SCORED.get(id(backend), 0)))


def run_seed(seed, Xtr, ytr, Xte, yte, hidden, epochs, width, variability, ks):
    n_dev = sum(hidden)
    rows = []

    def add(method, k, backend, clf):
        pulses = 0.0 if backend is None else _pulses(backend)
        clf.set_params(n_samples=T)
        before = None if backend is None else backend.pulse_counts.copy()
        acc = float(clf.score(Xte, yte))
        if backend is not None:
            _SCORED[id(backend)] = _SCORED.get(id(backend), 0) + backend.pulse_counts - before
        rows.append({"seed": seed, "method": method, "k": k, "pulses_per_device": pulses,
                     "accuracy": acc})
        print(f"seed {seed}: {method:<22} k={k!s:<4} pulses/device {pulses:>9,.0f}  "
              f"accuracy {100 * rows[-1]['accuracy']:.2f} %", flush=True)
    pop_a = sotcore.DevicePopulation.from_width(width, n_dev, variability=variability,
                                                random_state=seed)
    pop_b = sotcore.DevicePopulation.from_width(width, n_dev, variability=variability,
                                                random_state=1000 + seed)
    kw = dict(hidden_layer_sizes=hidden, max_iter=epochs, random_state=seed)
    lab_a = sotcore.EmulatedBackend(pop_a, random_state=50 + seed)
    full = sotcore.SOTClassifier(devices=lab_a, **kw).fit(Xtr, ytr)
    add("full HIL", None, lab_a, full)
    ex = sotcore.SOTClassifier(devices=lab_a, training="ex-situ", **kw).fit(Xtr, ytr)
    add("ex-situ", None, None, ex)
    # The schedule: measure, pre-train offline on the measurement, fine-tune on the devices.
    lab_s = sotcore.EmulatedBackend(pop_a, random_state=70 + seed)
    calib = calibrate_backend(lab_s, nominal_curve(pop_a), progress=False).population
    ha = sotcore.SOTClassifier(devices=lab_s, training="hardware-aware", calibration=calib,
                               **kw).fit(Xtr, ytr)
    add("schedule", 0, lab_s, ha)
    sch = sotcore.SOTClassifier(devices=lab_s, training="hil", pretrain="hardware-aware",
                                hil_epochs=1, calibration=calib, **kw).fit(Xtr, ytr)
    add("schedule", 1, lab_s, sch)
    for k in range(2, max(ks) + 1):
        sch.partial_fit(Xtr, ytr)
        if k in ks:
            add("schedule", k, lab_s, sch)
    # Transfer: A's HIL model onto population B, then a short fine-tune there.
    with tempfile.TemporaryDirectory() as tmp:
        full.save(Path(tmp) / "a.json")
        lab_b = sotcore.EmulatedBackend(pop_b, random_state=90 + seed)
        moved = sotcore.SOTClassifier.load(Path(tmp) / "a.json", backend=lab_b)
    add("transfer A -> B", 0, lab_b, moved)
    for k in (1, 2):
        moved.partial_fit(Xtr, ytr)
        add("transfer A -> B", k, lab_b, moved)
    return rows


def table(rows):
    groups = {}
    for r in rows:
        groups.setdefault((r["method"], r["k"]), []).append(r)
    full = np.mean([r["pulses_per_device"] for r in rows if r["method"] == "full HIL"])
    lines = ["| method | HIL epochs k | pulses per device | % of full HIL | accuracy T=32 (%) |",
             "| --- | --- | --- | --- | --- |"]
    for (m, k), rs in groups.items():
        p = np.mean([r["pulses_per_device"] for r in rs])
        a = 100 * np.array([r["accuracy"] for r in rs])
        lines.append(f"| {m} | {'-' if k is None else k} | {p:,.0f} | {100 * p / full:.1f} | "
                     f"{a.mean():.2f} ± {a.std():.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="MNIST IDX directory (default: found)")
    ap.add_argument("--out", default="results/c5")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--width", type=float, default=20.0)
    ap.add_argument("--variability", type=float, default=0.10)
    ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    args = ap.parse_args(argv)
    out, Xtr, ytr, Xte, yte, hidden, seeds, epochs = mnist_study(args)
    rows = []
    for seed in seeds:
        rows += run_seed(seed, Xtr, ytr, Xte, yte, hidden, epochs, args.width,
                         args.variability, ks=(1, 2, 3))
        (out / "results.json").write_text(json.dumps(
            {"rows": rows, "settings": {"hidden": hidden, "epochs": epochs, "seeds": seeds,
                                        "width": args.width, "variability": args.variability,
                                        "T": T, "train": len(Xtr), "test": len(Xte),
                                        "note": "device constants are assumptions"}},
            indent=1))
    text = table(rows)
    (out / "table.txt").write_text(text + "\n")
    print(text)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, marker in (("full HIL", "o"), ("schedule", "s"), ("transfer A -> B", "^"),
                           ("ex-situ", "x")):
        sel = [r for r in rows if r["method"] == method]
        ks = sorted({r["k"] for r in sel}, key=lambda v: -1 if v is None else v)
        p = [np.mean([r["pulses_per_device"] for r in sel if r["k"] == k]) for k in ks]
        a = [100 * np.mean([r["accuracy"] for r in sel if r["k"] == k]) for k in ks]
        e = [100 * np.std([r["accuracy"] for r in sel if r["k"] == k]) for k in ks]
        ax.errorbar(np.maximum(p, 1), a, yerr=e, marker=marker, label=method, capsize=3)
    ax.set_xscale("log")
    ax.set_xlabel("training + calibration pulses per device (log; 0 drawn at 1)")
    ax.set_ylabel(f"test accuracy at T={T} (%)")
    ax.set_title("C5: accuracy vs pulse budget (MNIST, 784-500-10, 20 um, 10 %)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "c5_pulse_budget.png", dpi=120)


if __name__ == "__main__":
    main()
