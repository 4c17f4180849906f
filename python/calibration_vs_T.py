"""How well calibrated are the averaged-softmax probabilities, as a function of T?

``predict_proba`` averages the softmax over T stochastic passes.  On MNIST (train on
the 5,000-image subset, test on the official 10,000), 784-500-10 HIL-trained on 20 um
devices at 10 % variability (the ASSUMED default model), this script measures, for
T = 1 ... 128: accuracy, expected calibration error (ECE, 15 equal-width confidence
bins), negative log-likelihood, and inference throughput (images/s, 2 threads) --
beside scikit-learn's MLPClassifier(500) on the same split.  Writes ``results.json``,
``table.md`` and ``calibration_vs_T.png`` into ``--out``.

    python python/calibration_vs_T.py --out results/calib_T      # about 2 min here
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
from sklearn.neural_network import MLPClassifier

import sotcore
from sotcore.datasets import load_mnist

TS = (1, 2, 4, 8, 16, 32, 64, 128)


def ece(proba, y, bins=15):
    """Expected calibration error: sum over confidence bins of |accuracy - confidence|
    weighted by the bin's share of the samples."""
    conf = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def nll(proba, y):
    return float(-np.mean(np.log(np.clip(proba[np.arange(len(y)), y], 1e-12, None))))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/calib_T")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    X, y = load_mnist(split="train")
    Xt, yt = load_mnist(split="test")
    pop = sotcore.DevicePopulation.from_width(20.0, 500, variability=0.10,
                                              random_state=args.seed)
    clf = sotcore.SOTClassifier(devices=pop, max_iter=30, random_state=args.seed,
                                n_threads=2).fit(X, y)
    rows = []
    for T in TS:
        clf.set_params(n_samples=T)
        clf.predict_proba(Xt[:512])                     # warm-up
        t0 = time.perf_counter()
        P = clf.predict_proba(Xt)
        secs = time.perf_counter() - t0
        rows.append({"model": "sotcore HIL", "T": T, "accuracy": float((P.argmax(1) == yt).mean()),
                     "ece": ece(P, yt), "nll": nll(P, yt), "images_per_s": len(Xt) / secs})
        print(rows[-1], flush=True)
    mlp = MLPClassifier(hidden_layer_sizes=(500,), random_state=args.seed, max_iter=200).fit(X, y)
    t0 = time.perf_counter()
    P = mlp.predict_proba(Xt)
    secs = time.perf_counter() - t0
    rows.append({"model": "MLPClassifier(500)", "T": None,
                 "accuracy": float((P.argmax(1) == yt).mean()), "ece": ece(P, yt),
                 "nll": nll(P, yt), "images_per_s": len(Xt) / secs})
    print(rows[-1], flush=True)
    (out / "results.json").write_text(json.dumps({"rows": rows, "seed": args.seed}, indent=1))
    lines = ["| model | T | accuracy (%) | ECE (%) | NLL | images/s |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['T'] or '-'} | {100 * r['accuracy']:.2f} | "
                     f"{100 * r['ece']:.2f} | {r['nll']:.3f} | {r['images_per_s']:,.0f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ours = [r for r in rows if r["T"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    Ts = [r["T"] for r in ours]
    axes[0].plot(Ts, [100 * r["accuracy"] for r in ours], "o-", label="accuracy (%)")
    axes[0].plot(Ts, [100 * r["ece"] for r in ours], "s-", label="ECE (%)")
    axes[0].axhline(100 * rows[-1]["ece"], color="gray", ls="--", label="MLPClassifier ECE")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("inference samples T")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    axes[1].plot([r["images_per_s"] for r in ours], [100 * r["accuracy"] for r in ours], "o-")
    for r in ours:
        axes[1].annotate(f"T={r['T']}", (r["images_per_s"], 100 * r["accuracy"]), fontsize=8)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("images/s (2 threads)")
    axes[1].set_ylabel("accuracy (%)")
    axes[1].grid(alpha=0.3)
    fig.suptitle("Averaged-softmax calibration vs T (MNIST, 784-500-10 HIL, 20 um, 10 %)")
    fig.tight_layout()
    fig.savefig(out / "calibration_vs_T.png", dpi=120)


if __name__ == "__main__":
    main()
