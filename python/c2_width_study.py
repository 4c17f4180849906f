"""C2: accuracy vs device width, with the current mapping held fixed.

Wider devices need proportionally more current (I50 and window both linear in
width, ASSUMED constants, see sotcore.devices).  The network-to-current mapping
is fixed at the 20 um nominal device's scale for every width, so narrow devices
act as sharper (nearly deterministic) neurons and wide ones as smoother,
noisier ones; each mode is trained and tested per width on MNIST.  Writes
``results.json``, ``table.txt`` and ``c2_width.png`` into ``--out``.

    python python/c2_width_study.py --out results/c2          # full (about 25 min here)
    python python/c2_width_study.py --quick --out results/c2q
"""
import argparse
import json

from _study import mnist_study

from sotcore.devices import DEFAULT_I50_PER_UM, DEFAULT_WINDOW_FRACTION, WINDOW_PER_SCALE
from sotcore.experiments import compare_modes, format_table, summarize


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default="results/c2")
    ap.add_argument("--widths", default="5,10,20,40")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--variability", type=float, default=0.10)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    out, Xtr, ytr, Xte, yte, hidden, seeds, epochs = mnist_study(args)
    # Fixed mapping: one network unit = the 20 um nominal device's sigmoid scale.
    unit = DEFAULT_WINDOW_FRACTION * DEFAULT_I50_PER_UM * 20.0 / WINDOW_PER_SCALE
    records = []
    for w in [float(v) for v in args.widths.split(",")]:
        recs = compare_modes(Xtr, ytr, Xte, yte, width=w, variability=args.variability,
                             hidden_layer_sizes=hidden, n_samples=(1, 8, 32), seeds=seeds,
                             modes=("software", "ex-situ", "hardware-aware", "hil"),
                             estimator_params={"max_iter": epochs, "mapping_unit": unit})
        records.extend(recs)
        print(f"\nwidth {w} um (mapping unit {unit * 1e6:.2f} uA per network unit)")
        print(format_table(recs))
    (out / "results.json").write_text(json.dumps(
        {"records": records, "summary": summarize(records), "mapping_unit_A": unit,
         "settings": {"hidden": hidden, "epochs": epochs, "seeds": seeds,
                      "variability": args.variability,
                      "note": "device constants are assumptions, not the paper's figures"}},
        indent=1))
    with open(out / "table.txt", "w") as fh:
        for w in sorted({r["width"] for r in records}):
            fh.write(f"width {w} um\n" + format_table([r for r in records if r["width"] == w])
                     + "\n\n")
    try:
        from sotcore.plotting import plot_accuracy_vs_width
    except ImportError:
        return
    plot_accuracy_vs_width(records, out / "c2_width.png", T=32)


if __name__ == "__main__":
    main()
