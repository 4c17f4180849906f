"""C4 (reliability): devices that drift under HIL training, with and without recalibration.

Devices age with use (``sotcore.devices.DeviceAging``; ASSUMED rates, not
measured ones): I50 and the window drift up with pulse count at a
device-specific rate, and a few devices become stuck.  Each seed trains the
same HIL network four ways and tests it after a further ``--service`` pulses
per device of time in service:

* ``no drift``       the devices do not age (reference);
* ``drift``          devices age, no correction;
* ``drift + recal``  every epoch, and before testing, the devices are re-fitted
                     from the pulses recorded by a RecordingBackend, and a
                     CompensatedBackend maps each device's currents so it
                     behaves like its initial (measured) calibration.
* ``drift + recal (test only)``  recalibration only before testing.

Writes ``results.json`` and ``table.txt`` into ``--out``.

    python python/c4_drift_recalibration.py --out results/c4            # MNIST
    python python/c4_drift_recalibration.py --digits --out results/c4d  # quick
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np

import sotcore
from sotcore import datasets
from sotcore.backends import CompensatedBackend, EmulatedBackend, RecordingBackend
from sotcore.characterize import calibrate_backend, recalibrate
from sotcore.devices import DeviceAging
from sotcore.training import nominal_curve


def run(scenario, pop, aging, data, args, seed):
    Xtr, ytr, Xte, yte = data
    emu = EmulatedBackend(pop, random_state=1000 + seed,
                          aging=None if scenario == "no drift" else aging)
    backend, comp, rec, callbacks = emu, None, None, []
    if scenario.startswith("drift + recal"):
        # Reference = a lab-style calibration of the fresh devices (not the hidden truth).
        calib = calibrate_backend(emu, nominal_curve(pop)).population
        rec = RecordingBackend(emu)
        comp = CompensatedBackend(rec, calib)
        backend = comp
        if scenario == "drift + recal":
            def recal(epoch, info, net):
                recalibrate(comp, rec.records())
                rec.log.clear()
                return False
            callbacks = [recal]
    clf = sotcore.SOTClassifier(hidden_layer_sizes=(args.hidden,), devices=backend,
                                training="hil", max_iter=args.epochs, batch_size=args.batch,
                                n_samples=args.T, random_state=seed, callbacks=callbacks,
                                nominal_device=nominal_curve(pop))
    t0 = time.perf_counter()
    clf.fit(Xtr, ytr)
    out = {"scenario": scenario, "seed": seed, "train_seconds": time.perf_counter() - t0,
           "pulses_per_device_training": int(emu.pulse_counts.max())}
    out["accuracy_after_training"] = float(clf.score(Xte, yte))
    emu.age(args.service)
    if emu.aging is not None:
        shift = (emu.population.i50 - pop.i50) / pop.scale
        out["i50_shift_in_scales"] = {"mean": float(shift.mean()), "std": float(shift.std())}
        out["stuck_devices"] = int(emu.population.stuck.sum())
    if comp is not None:
        # Recalibration burst: unlabeled inputs through the network, pulses recorded.
        for _ in range(args.recal_rounds):
            rec.log.clear()
            clf.set_params(n_samples=8)
            clf.predict_proba(Xtr[:args.recal_inputs])
            out.setdefault("recalibrated_devices", []).append(
                int(recalibrate(comp, rec.records()).sum()))
        rec.log.clear()
        clf.set_params(n_samples=args.T)
    out["accuracy_in_service"] = float(clf.score(Xte, yte))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/c4")
    ap.add_argument("--data", default=None, help="MNIST directory (default ../shared/data/mnist)")
    ap.add_argument("--digits", action="store_true", help="scikit-learn digits (quick)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--T", type=int, default=32)
    ap.add_argument("--i50-drift", type=float, default=0.10,
                    help="mean relative I50 drift per 1e6 pulses (default 0.10)")
    ap.add_argument("--window-drift", type=float, default=0.05)
    ap.add_argument("--drift-spread", type=float, default=0.5)
    ap.add_argument("--stuck-rate", type=float, default=0.02,
                    help="stuck events per device per 1e6 pulses (default 0.02)")
    ap.add_argument("--service", type=int, default=1_000_000,
                    help="pulses per device between training and test (default 1e6)")
    ap.add_argument("--recal-inputs", type=int, default=1000)
    ap.add_argument("--recal-rounds", type=int, default=3)
    args = ap.parse_args(argv)
    if args.digits:
        from sklearn.model_selection import train_test_split
        X, y = datasets.load_digits()
        Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
        args.hidden, args.batch = args.hidden or 200, args.batch or 32
    else:
        Xtr, ytr = datasets.load_mnist(args.data, "train")
        Xte, yte = datasets.load_mnist(args.data, "test")
        args.hidden, args.batch = args.hidden or 500, args.batch or 100
    aging = DeviceAging(i50_drift=args.i50_drift, window_drift=args.window_drift,
                        drift_spread=args.drift_spread, stuck_rate=args.stuck_rate)
    scenarios = ["no drift", "drift", "drift + recal", "drift + recal (test only)"]
    records = []
    for seed in range(args.seeds):
        pop = sotcore.DevicePopulation.from_width(20.0, args.hidden, variability=0.10,
                                                  random_state=seed)
        for sc in scenarios:
            r = run(sc, pop, aging, (Xtr, ytr, Xte, yte), args, seed)
            records.append(r)
            print(json.dumps(r), flush=True)
    lines = [f"{'scenario':28s}{'after training':>18s}{'in service':>18s}"]
    for sc in scenarios:
        a = [r["accuracy_after_training"] for r in records if r["scenario"] == sc]
        b = [r["accuracy_in_service"] for r in records if r["scenario"] == sc]
        lines.append(f"{sc:28s}{100 * np.mean(a):10.2f} ± {100 * np.std(a):4.2f}"
                     f"{100 * np.mean(b):10.2f} ± {100 * np.std(b):4.2f}")
    lines.append(f"test accuracy (%) at T={args.T}, mean ± std over {args.seeds} seeds; "
                 f"aging {aging!r}; {args.service} pulses per device in service")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"records": records, "args": vars(args),
                                                  "aging": repr(aging)}, indent=1))
    (out / "table.txt").write_text(table + "\n")


if __name__ == "__main__":
    main()
