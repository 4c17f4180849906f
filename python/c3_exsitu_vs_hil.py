"""C3: ex-situ vs hardware-in-loop training on MNIST (784-500-10).

Trains every mode on the 5,000-image MNIST training subset, tests on the
official 10,000 test images, with a population drawn from the default device
model (ASSUMED constants, see sotcore.devices) at 20 um, for several seeds and
device-to-device variabilities.  Writes ``results.json``, ``table.txt`` and
``c3_learning_curves.png`` / ``c3_variability.png`` into ``--out``.

    python python/c3_exsitu_vs_hil.py --out results/c3            # full (about 15 min here)
    python python/c3_exsitu_vs_hil.py --quick --out results/c3q   # a 1-minute smoke run
"""
import argparse
import json

from _study import mnist_study


import sotcore
from sotcore.experiments import compare_modes, format_table, summarize


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="MNIST IDX directory (default ../shared/data/mnist)")
    ap.add_argument("--out", default="results/c3")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--width", type=float, default=20.0)
    ap.add_argument("--variabilities", default="0.10,0.05,0.20")
    ap.add_argument("--surrogates", default="nominal,calibrated,straight-through")
    ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    args = ap.parse_args(argv)
    out, Xtr, ytr, Xte, yte, hidden, seeds, epochs = mnist_study(args)
    surrogates = [s for s in args.surrogates.split(",") if s]
    calib = None
    if "calibrated" in surrogates:
        from sotcore.characterize import calibrate_backend
        from sotcore.training import nominal_curve

        def calib(pop, seed):
            # Measured through the emulator like a lab would (pulse sweeps), then fitted.
            return calibrate_backend(sotcore.EmulatedBackend(pop, random_state=10_000 + seed),
                                     nominal_curve(pop), progress=False).population
    records = []
    variabilities = [float(v) for v in args.variabilities.split(",")]

    def save():
        (out / "results.json").write_text(json.dumps(
            {"records": records, "summary": summarize(records),
             "settings": {"hidden": hidden, "epochs": epochs, "seeds": seeds,
                          "width": args.width, "train": len(Xtr), "test": len(Xte),
                          "note": "device constants are assumptions, not the paper's figures"}},
            indent=1))
    for var in variabilities:
        main_run = abs(var - 0.10) < 1e-9 or len(variabilities) == 1
        recs = compare_modes(
            Xtr, ytr, Xte, yte, width=args.width, variability=var, hidden_layer_sizes=hidden,
            modes=("software", "ex-situ", "hardware-aware", "hil") if main_run
            else ("software", "ex-situ", "hil"),
            surrogates=surrogates if main_run else ["nominal"], n_samples=(1, 8, 32),
            seeds=seeds, calibration=calib, estimator_params={"max_iter": epochs})
        records.extend(recs)
        print(f"\nvariability {var:.0%}, width {args.width} um")
        print(format_table(recs), flush=True)
        save()
    with open(out / "table.txt", "w") as fh:
        for var in variabilities:
            fh.write(f"variability {var:.0%}\n")
            fh.write(format_table([r for r in records if r["variability"] == var]) + "\n\n")
    try:
        from sotcore.plotting import plot_learning_curves, plot_variability_gap
    except ImportError:
        return
    main_recs = [r for r in records if abs(r["variability"] - 0.10) < 1e-9] or records
    plot_learning_curves(main_recs, out / "c3_learning_curves.png")
    if len(variabilities) > 1:
        plot_variability_gap(records, out / "c3_variability.png")


if __name__ == "__main__":
    main()
