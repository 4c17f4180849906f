"""``sotcore-eval``: the command-line entry point.

::

    sotcore-eval [--data DIR] [--width UM ...] [--variability V] [--devices FILE]
                 [--seeds N] [--out DIR]   the main job: training modes side by side
    sotcore-eval train -o model.json [--data DIR] [--training hil] ...
    sotcore-eval sweep --out results.jsonl [--widths ...] [--backend dask --scheduler ADDR]
    sotcore-eval calibrate MEASUREMENTS.csv -o devices.json [--model auto] [--plots DIR]
                 [--method sigmoid|isotonic] [--fit-levels] [--summary CSV] [--stats JSON]
    sotcore-eval simulate -o measurements.csv [--width 20 [40 ...]] [--n-devices 100]
                 [--pulses 200] [--n-points 25] [--raw] [--truth truth.json] ...

Mistakes in the user's input (missing files, bad options, bad data) print
one line ``sotcore-eval: error: ...`` on stderr and exit with status 2 (bad
usage) or 1 (bad data or files), never a traceback.

Size: argparse definitions of five subcommands with help for every option,
and their printing; the computation lives in experiments.py, sweep.py and
the calibration package.
"""
import argparse
import math
import os
import sys
import warnings

from pathlib import Path

import numpy as np

from .exceptions import BackendError, TrainingInterrupted
from .training import MODES, SURROGATES

PROG = "sotcore-eval"


class _UsageError(Exception):
    """Bad command line (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line, handled by :func:`main`."""

    def error(self, message):
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def _number(kind, *, low=None, low_open=False, high=None):
    """argparse type: a finite int/float with bounds, with a message naming the bound."""
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low}, "
                                             f"got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text}")
        return value
    convert.__name__ = kind.__name__
    return convert


def build_parser():
    """The argument parser of ``sotcore-eval`` (subcommands ``calibrate`` and ``simulate``)."""
    parser = _Parser(prog=PROG, description="Stochastic SOT-device neurons: device "
                     "calibration, emulation and training. Without a subcommand, runs the "
                     "main job.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks (also SOTCORE_DEBUG=1)")
    job = parser.add_argument_group(
        "main job", "Train the modes (software, ex-situ, hardware-aware, hil with each "
        "surrogate) on one device population and print their test accuracy at T = 1, 8, 32. "
        "Default: scikit-learn's digits, an emulated 20 um population (assumed model "
        "constants), 3 seeds.")
    _add_data_options(job)
    job.add_argument("--width", type=_number(float, low=0, low_open=True), nargs="+",
                     default=[20.0], metavar="UM",
                     help="device width(s) in um (default 20); several give a width study")
    job.add_argument("--variability", type=_number(float, low=0, high=5), default=0.10,
                     help="device-to-device variability (default 0.10)")
    job.add_argument("--devices", metavar="DEVICES.json",
                     help="a (calibrated) population file to use instead of the width model")
    job.add_argument("--seeds", type=_number(int, low=1), default=3,
                     help="number of seeds (default 3)")
    job.add_argument("--surrogates", default="nominal,calibrated,straight-through",
                     help="comma-separated HIL surrogates (default all three)")
    job.add_argument("--samples", default="1,8,32", metavar="T,T,...",
                     help="inference sample counts (default 1,8,32)")
    job.add_argument("--device-width", type=_number(float, low=0, low_open=True),
                     metavar="UM", help="with --devices: use only the devices of this width")
    _add_lab_options(job)
    job.add_argument("--dry-run", action="store_true",
                     help="print each run's pulses per device and hardware time, send no pulse")
    job.add_argument("--out", metavar="DIR", help="directory for results.json and the PNG "
                     "figures (created if missing; default: print only)")
    job.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    tr = sub.add_parser("train", help="train one SOTClassifier and save it",
                        description="Train one network on the data and devices, report its "
                        "test accuracy and save the model (JSON + .npz).")
    _add_data_options(tr)
    tr.add_argument("-o", "--output", metavar="MODEL.json", required=True,
                    help="model file to write (JSON, with its weights beside it)")
    tr.add_argument("--training", choices=MODES, default="hil",
                    help="training mode (default hil)")
    tr.add_argument("--surrogate", choices=SURROGATES, default="nominal",
                    help="HIL backward surrogate (default nominal)")
    tr.add_argument("--width", type=_number(float, low=0, low_open=True), default=20.0,
                    metavar="UM", help="device width in um of the emulated population "
                    "(default 20)")
    tr.add_argument("--variability", type=_number(float, low=0, high=5), default=0.10,
                    help="device-to-device variability (default 0.10)")
    tr.add_argument("--devices", metavar="DEVICES.json",
                    help="a (calibrated) population file to use instead of the width model")
    tr.add_argument("--samples", type=_number(int, low=1), default=32, metavar="T",
                    help="samples per input at inference (default 32)")
    tr.add_argument("--seed", type=_number(int, low=0), default=0,
                    help="random seed of the run (default 0)")
    _add_lab_options(tr)
    tr.add_argument("--checkpoint", metavar="FILE", help="write training checkpoints here")
    tr.add_argument("--resume", metavar="FILE", help="continue the run in this checkpoint")
    tr.add_argument("--quiet", action="store_true", help="no progress bars")
    tr.set_defaults(handler=_run_train)

    sw = sub.add_parser("sweep", help="widths x variability x modes x seeds, on joblib or Dask",
                        description="Run a sweep; each finished task is appended to the "
                        "results file, so an interrupted sweep resumes where it stopped.")
    sw.add_argument("--out", metavar="DIR", required=True,
                    help="directory of the sweep (created if missing); records are appended "
                    "to DIR/results.jsonl, so rerunning resumes")
    sw.add_argument("--data", metavar="DIR", help="MNIST IDX directory (default: digits)")
    sw.add_argument("--widths", type=_number(float, low=0, low_open=True), nargs="+",
                    default=[5.0, 10.0, 20.0, 40.0], metavar="UM",
                    help="device widths in um (default 5 10 20 40)")
    sw.add_argument("--variabilities", type=_number(float, low=0, high=5), nargs="+",
                    default=[0.05, 0.10, 0.20], metavar="V",
                    help="device-to-device variabilities (default 0.05 0.10 0.20)")
    sw.add_argument("--runs", nargs="+", default=["software", "hardware-aware", "hil:nominal"],
                    metavar="RUN", help="software, hardware-aware, hil:nominal, "
                    "hil:straight-through (software also yields ex-situ; default software "
                    "hardware-aware hil:nominal)")
    sw.add_argument("--seeds", type=_number(int, low=1), default=3,
                    help="number of seeds (default 3)")
    sw.add_argument("--hidden", type=_number(int, low=1), nargs="+", default=None, metavar="H",
                    help="hidden layer sizes (default 200 on digits, 500 on MNIST)")
    sw.add_argument("--epochs", type=_number(int, low=1), default=None,
                    help="training epochs (default 30)")
    sw.add_argument("--instrument", metavar="MODULE:FACTORY",
                    help="run every task on your own device backend (see the main job's "
                    "--instrument); widths and variabilities then do not apply")
    sw.add_argument("--nominal", metavar="I50,SCALE",
                    help="with --instrument: first guess of the devices' curve (amperes)")
    sw.add_argument("--backend", choices=("joblib", "dask"), default="joblib",
                    help="where the tasks run (default joblib on this machine)")
    sw.add_argument("--n-jobs", type=_number(int, low=1), default=1,
                    help="joblib worker processes (default 1)")
    sw.add_argument("--scheduler", metavar="ADDRESS",
                    help="Dask scheduler address, e.g. tcp://10.0.0.5:8786")
    sw.add_argument("--quiet", action="store_true", help="no progress bars")
    sw.set_defaults(handler=_run_sweep)

    cal = sub.add_parser(
        "calibrate", help="fit switching curves to measured pulse data",
        description="Fit each device's switching curve to measured pulse data (a CSV with "
        "columns device, current [A], pulses, switched [, width in um]; or per-pulse rows "
        "device, current, switched 0/1), print the population summary, write the device "
        "population and figures.")
    cal.add_argument("measurements", metavar="MEASUREMENTS.csv", help="measurement CSV file")
    cal.add_argument("-o", "--output", metavar="DEVICES.json",
                     help="write the calibrated population here (DevicePopulation JSON)")
    cal.add_argument("--plots", metavar="DIR", help="write PNG figures into this directory "
                     "(needs matplotlib: pip install sotcore[plot])")
    cal.add_argument("--model", choices=("logistic", "probit", "thermal", "asymmetric",
                                          "isotonic", "table", "auto"), default=None,
                     help="switching-curve family: logistic (default), probit, thermal "
                     "(Neel-Brown), asymmetric (generalised logistic), isotonic (monotone "
                     "table), table (binned, any shape), or auto (per device by AIC/BIC)")
    cal.add_argument("--selection", choices=("aic", "bic"), default="aic",
                     help="criterion of --model auto (default aic)")
    cal.add_argument("--method", choices=("sigmoid", "isotonic"), default=None,
                     help="former name of --model: sigmoid = logistic")
    cal.add_argument("--max-error", type=_number(float, low=0, high=1), default=0.05,
                     metavar="P", help="flag a device unusable when its fitted curve misses "
                     "the measured probability by more than this (default 0.05)")
    cal.add_argument("--fit-levels", action="store_true",
                     help="also fit p_lo and p_hi per device (default: fixed at 0 and 1)")
    cal.add_argument("--width", type=_number(float, low=0, low_open=True), metavar="UM",
                     help="width in um of every device, for files without a width column")
    cal.add_argument("--confidence", type=_number(float, low=0, low_open=True, high=0.999999),
                     default=0.95, help="level of the confidence intervals (default 0.95)")
    cal.add_argument("--summary", metavar="CSV", help="write the per-device table here")
    cal.add_argument("--stats", metavar="JSON", help="write the population statistics here")
    cal.add_argument("--skip-invalid", action="store_true",
                     help="skip devices with fewer than 3 distinct currents (reported) "
                     "instead of stopping")
    cal.add_argument("--quiet", "--no-progress", dest="progress", action="store_false",
                     default=None, help="no progress bars (--no-progress: its former name)")
    cal.set_defaults(handler=_run_calibrate)

    sim = sub.add_parser(
        "simulate", help="virtual lab: write simulated measurements of a device population",
        description="Simulate a lab's switching measurements (binomial pulse counts) of a "
        "population drawn from the width model (assumed default constants, see "
        "sotcore.devices) or loaded from a population file, and write them as a CSV that "
        "'sotcore-eval calibrate' reads.")
    src = sim.add_mutually_exclusive_group()
    src.add_argument("--width", type=_number(float, low=0, low_open=True), nargs="+",
                     metavar="UM", help="device width(s) in um (default 20); n-devices each")
    src.add_argument("--population", metavar="DEVICES.json",
                     help="simulate this saved population instead of the width model")
    sim.add_argument("-o", "--output", metavar="MEASUREMENTS.csv", required=True,
                     help="CSV file to write")
    sim.add_argument("--n-devices", type=_number(int, low=1), default=100,
                     help="devices per width (default 100)")
    sim.add_argument("--variability", type=_number(float, low=0, high=5), default=0.10,
                     help="device-to-device coefficient of variation (default 0.10)")
    sim.add_argument("--window-variability", type=_number(float, low=0, high=5),
                     help="coefficient of variation of the window (default: --variability)")
    sim.add_argument("--stuck-fraction", type=_number(float, low=0, high=1), default=0.0,
                     help="fraction of stuck devices (default 0)")
    sim.add_argument("--read-error", type=_number(float, low=0, high=0.5), default=0.0,
                     help="read-error floor p_lo = 1 - p_hi (default 0)")
    sim.add_argument("--family", choices=("logistic", "probit", "thermal", "asymmetric"),
                     default="logistic", help="switching-curve family of the simulated devices "
                     "(default logistic)")
    sim.add_argument("--shape", type=_number(float, low=0, low_open=True, high=100),
                     default=1.0, help="nu of the asymmetric family (default 1)")
    sim.add_argument("--rollover", type=_number(float, low=0, high=100), nargs=2,
                     metavar=("ONSET", "FLOOR"), help="over-drive: beyond ONSET x I50 the "
                     "switching probability falls to FLOOR x its value at 2 ONSET x I50")
    sim.add_argument("--pulses", type=_number(int, low=1), default=200,
                     help="pulses per current (default 200)")
    sim.add_argument("--n-points", type=_number(int, low=3), default=25,
                     help="currents per sweep (default 25)")
    sim.add_argument("--span", type=_number(float, low=0, low_open=True), default=1.5,
                     help="sweep half-span in programming windows around I50 (default 1.5)")
    sim.add_argument("--sweep", choices=("device", "width"), default="device",
                     help="one sweep per device centred on its I50 (default), or one per "
                     "width covering all its devices")
    sim.add_argument("--raw", action="store_true",
                     help="write one row per pulse (switched 0/1) instead of counts")
    sim.add_argument("--seed", type=_number(int, low=0),
                     help="random seed (default: fresh randomness)")
    sim.add_argument("--truth", metavar="DEVICES.json",
                     help="also write the simulated (true) population here")
    sim.add_argument("--quiet", action="store_true", help="print nothing but errors")
    sim.set_defaults(handler=_run_simulate)
    return parser


# Presets per dataset: small data need more, smaller steps for the biases to absorb the
# devices' spread (see README, "Choosing settings").
DIGITS_PRESET = {"hidden": (200,), "params": {"max_iter": 30, "batch_size": 32}}
MNIST_PRESET = {"hidden": (500,), "params": {"max_iter": 30, "batch_size": 100}}


def _add_lab_options(group):
    group.add_argument("--instrument", metavar="MODULE:FACTORY",
                       help="run on your own device backend: an importable factory "
                       "(e.g. mylab.setup:make_backend) called with no arguments that "
                       "returns a sotcore backend such as InstrumentBackend")
    group.add_argument("--nominal", metavar="I50,SCALE",
                       help="first guess of the devices' curve in amperes (I50 any sign, "
                       "scale > 0), for --instrument: the calibration sweep starts there")
    group.add_argument("--max-current", type=_number(float), metavar="A",
                       help="with --instrument: never pulse above this current (amperes)")
    group.add_argument("--min-current", type=_number(float), metavar="A",
                       help="with --instrument: never pulse below this current (amperes)")
    group.add_argument("--device-map", choices=("round-robin",), default=None,
                       help="neurons -> devices when there are fewer devices than neurons "
                       "(default round-robin)")
    group.add_argument("--mapping-unit", metavar="A|auto",
                       help="amperes per network unit, or 'auto' (sotcore.suggest_mapping); "
                       "default: the nominal scale (held at the 20 um value in width studies)")


def _mapping_unit(text):
    if text is None or text == "auto":
        return text
    try:
        v = float(text)
    except ValueError:
        raise _UsageError(f"--mapping-unit must be a number of amperes or 'auto', got "
                          f"{text!r}") from None
    if not (np.isfinite(v) and v > 0):
        raise _UsageError(f"--mapping-unit must be > 0, got {text}")
    return v


def _instrument(args):
    """(backend or None, nominal (i50, scale) or None) from --instrument/--nominal."""
    nominal = None
    if args.nominal:
        vals = _csv_list(args.nominal, float, "--nominal")
        if len(vals) != 2 or not all(np.isfinite(vals)) or not vals[1] > 0:
            raise _UsageError(f"--nominal must be I50,SCALE in amperes with SCALE > 0, got "
                              f"{args.nominal!r}")
        nominal = (vals[0], vals[1])
    if not args.instrument:
        if args.nominal or args.max_current is not None or args.min_current is not None:
            raise _UsageError("--nominal, --max-current and --min-current need --instrument")
        return None, None
    from .experiments import backend_from_factory
    try:
        backend = backend_from_factory(args.instrument)
    except ValueError as exc:
        raise _UsageError(f"--instrument: {exc}") from None
    if nominal is None and getattr(backend, "device_curves", lambda: None)() is None:
        raise _UsageError("--instrument: this backend does not describe its devices; give "
                          "--nominal I50,SCALE (a first guess, amperes)")
    return backend, nominal


def _measure(backend, nominal, args):
    """Calibrate the instrument's devices by pulse sweeps (printed, with progress)."""
    from .characterize import calibrate_backend
    from .training import nominal_curve
    if nominal is None:
        nominal = nominal_curve(backend.device_curves())
    kw = {k: v for k, v in (("max_current", args.max_current),
                            ("min_current", args.min_current)) if v is not None}
    res = calibrate_backend(backend, nominal, progress=not getattr(args, "quiet", False), **kw)
    print(f"{PROG}: calibrated {backend.n_devices} device(s) through the instrument")
    return res.population


def _add_data_options(group):
    group.add_argument("--data", metavar="DIR", help="directory of MNIST-format IDX files "
                       "(train-images-idx3-ubyte[.gz] or train5k-..., t10k-...); default: "
                       "scikit-learn's embedded digits")
    group.add_argument("--hidden", type=_number(int, low=1), nargs="+", metavar="H",
                       help="hidden layer sizes (default 200 on digits, 500 on MNIST)")
    group.add_argument("--epochs", type=_number(int, low=1),
                       help="training epochs (default 30)")
    group.add_argument("--batch-size", type=_number(int, low=1),
                       help="minibatch size (default 32 on digits, 100 on MNIST)")
    group.add_argument("--max-train", type=_number(int, low=1), metavar="N",
                       help="use only the first N training samples")


def _load_data(args):
    """(X_train, y_train, X_test, y_test, name, preset) from --data or the digits."""
    from .datasets import load_digits, load_mnist
    if args.data:
        Xtr, ytr = load_mnist(args.data, "train")
        Xte, yte = load_mnist(args.data, "test")
        name, preset = f"MNIST-format data in {args.data}", MNIST_PRESET
    else:
        from sklearn.model_selection import train_test_split
        X, y = load_digits()
        Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
        name, preset = "scikit-learn digits (1,257 train / 540 test)", DIGITS_PRESET
    if args.max_train:
        Xtr, ytr = Xtr[:args.max_train], ytr[:args.max_train]
    hidden = tuple(args.hidden) if args.hidden else preset["hidden"]
    params = dict(preset["params"])
    if args.epochs:
        params["max_iter"] = args.epochs
    if args.batch_size:
        params["batch_size"] = args.batch_size
    return Xtr, ytr, Xte, yte, name, hidden, params


def _csv_list(text, kind, what):
    try:
        out = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise _UsageError(f"{what} must be a comma-separated list, got {text!r}") from None
    if not out:
        raise _UsageError(f"{what} is empty")
    return out


def _load_population(path, n_needed, width=None):
    """The devices of a population file the network uses, and a line saying which."""
    from .devices import DevicePopulation
    pop = DevicePopulation.load(path)
    if width is not None:
        sel = np.flatnonzero(np.isclose(pop.width, width))
        if sel.size == 0:
            have = sorted({float(w) for w in pop.width[np.isfinite(pop.width)]})
            raise ValueError(f"{path} has no devices of width {width:g} um (widths: "
                             f"{', '.join(f'{w:g}' for w in have) or 'none recorded'})")
        pop = pop[sel]
    used = min(len(pop), n_needed)
    note = (f"devices 0..{used - 1} of {len(pop)} in {path}"
            + (f" (width {width:g} um)" if width is not None else ""))
    if len(pop) < n_needed:
        note += f"; {n_needed} neurons share them round-robin"
    return (pop if len(pop) <= n_needed else pop[:n_needed]), note


def run_main_job(args):
    """The main job: the training modes side by side on one population or instrument
    (computed by :func:`sotcore.experiments.run_main_job`; printed and saved here)."""
    import json

    from . import experiments
    from .devices import DevicePopulation
    from .estimator import DEFAULT_WIDTH_UM
    from .experiments import format_table, summarize
    from .training import nominal_curve
    surrogates = _csv_list(args.surrogates, str, "--surrogates")
    bad = [x for x in surrogates if x not in SURROGATES]
    if bad:
        raise _UsageError(f"unknown surrogate(s) {', '.join(bad)}; choose from "
                          f"{', '.join(SURROGATES)}")
    Ts = _csv_list(args.samples, int, "--samples")
    if min(Ts) < 1:
        raise _UsageError("--samples must be positive")
    if args.device_width is not None and not args.devices:
        raise _UsageError("--device-width needs --devices")
    if args.instrument and (args.devices or len(args.width) > 1):
        raise _UsageError("--instrument runs on the instrument's devices: drop --devices and "
                          "--width")
    unit = _mapping_unit(args.mapping_unit)
    backend, nominal = _instrument(args)
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _check_writable(out / "results.json")
    Xtr, ytr, Xte, yte, name, hidden, params = _load_data(args)
    if args.device_map:
        params["device_map"] = args.device_map
    population, source = None, None
    if args.devices:
        population, source = _load_population(args.devices, sum(hidden), args.device_width)
    widths = [None] if population is not None or backend is not None else args.width
    if unit is None and len(widths) > 1:
        # A width study compares devices in one network: hold the mapping fixed (a
        # width-scaled mapping makes every width the same problem in network units).
        unit = nominal_curve(DevicePopulation.from_width(DEFAULT_WIDTH_UM, 1))[1]
        print(f"{PROG}: width study: mapping held at {unit:.4g} A per network unit (the "
              f"{DEFAULT_WIDTH_UM:g} um nominal scale) for every width; set --mapping-unit "
              "to change it")
    if unit is not None:
        params["mapping_unit"] = unit
    if backend is not None:
        where = f"instrument {args.instrument} ({backend.n_devices} devices)"
    elif population is not None:
        where = source
    else:
        where = (f"width {', '.join(map(str, widths))} um, variability "
                 f"{args.variability:.0%}")
    print(f"{PROG}: {name}; hidden layers {list(hidden)}; {where}; {args.seeds} seed(s)")
    if args.dry_run:
        devices = backend if backend is not None else population if population is not None \
            else float(widths[0])
        for mode, sur, cost in experiments.estimate_main_job(
                Xtr, len(Xte), hidden_layer_sizes=hidden, devices=devices,
                surrogates=surrogates, estimator_params=params, nominal_device=nominal):
            print(f"\n{mode}{' (' + sur + ')' if mode == 'hil' else ''}, per seed:\n{cost}")
        return 0
    measured = _measure(backend, nominal, args) if backend is not None else None

    def print_table(w, recs):
        if len(widths) > 1:
            print(f"\nwidth {w} um")
        print(format_table(recs))
    records = experiments.run_main_job(
        Xtr, ytr, Xte, yte, hidden_layer_sizes=hidden, widths=widths,
        variability=args.variability, population=population, backend=backend,
        calibration=measured, surrogates=surrogates, n_samples=Ts, seeds=range(args.seeds),
        estimator_params=params, progress=not args.quiet, on_width=print_table)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(
            {"data": name, "hidden": list(hidden), "devices": where,
             "estimator_params": {k: v for k, v in params.items()},
             "records": records, "summary": summarize(records),
             "note": "instrument" if backend is not None else
             "emulated devices from assumed model constants"}, indent=1, default=str))
        written = ["results.json"]
        try:
            from .plotting import (plot_accuracy_vs_T, plot_accuracy_vs_width,
                                   plot_learning_curves)
            plot_learning_curves(records, out / "learning_curves.png")
            plot_accuracy_vs_T(records, out / "accuracy_vs_T.png")
            written += ["learning_curves.png", "accuracy_vs_T.png"]
            if len(widths) > 1:
                plot_accuracy_vs_width(records, out / "accuracy_vs_width.png", T=max(Ts))
                written.append("accuracy_vs_width.png")
        except ImportError:
            print(f"{PROG}: matplotlib not installed: figures skipped "
                  "(pip install sotcore[plot])")
        print(f"{PROG}: wrote {', '.join(written)} to {out}")
    return 0


def _run_train(args):
    from .estimator import SOTClassifier
    _check_writable(args.output)
    unit = _mapping_unit(args.mapping_unit)
    backend, nominal = _instrument(args)
    Xtr, ytr, Xte, yte, name, hidden, params = _load_data(args)
    if args.device_map:
        params["device_map"] = args.device_map
    if unit is not None:
        params["mapping_unit"] = unit
    if backend is not None:
        if args.devices:
            raise _UsageError("--instrument runs on the instrument's devices: drop --devices")
        devices = backend
    elif args.devices:
        devices, source = _load_population(args.devices, sum(hidden))
        print(f"{PROG}: using {source}")
    else:
        devices = args.width
    calibration = None
    needs = args.training == "hardware-aware" or (args.training == "hil"
                                                  and args.surrogate == "calibrated")
    if backend is not None and (needs or nominal is not None):
        calibration = _measure(backend, nominal, args)
    elif needs and args.training == "hil":
        from .backends import EmulatedBackend
        from .characterize import calibrate_backend
        from .devices import DevicePopulation
        from .training import nominal_curve
        pop = devices if isinstance(devices, DevicePopulation) else \
            DevicePopulation.from_width(devices, sum(hidden), variability=args.variability,
                                        random_state=args.seed)
        devices = pop
        calibration = calibrate_backend(EmulatedBackend(pop, random_state=10_000 + args.seed),
                                        nominal_curve(pop)).population
    clf = SOTClassifier(hidden_layer_sizes=hidden, devices=devices, training=args.training,
                        surrogate=args.surrogate, calibration=calibration,
                        variability=args.variability, n_samples=args.samples,
                        random_state=args.seed, checkpoint=args.checkpoint,
                        verbose=not args.quiet, progress=False if args.quiet else None,
                        **params)
    clf.fit(Xtr, ytr, resume_from=args.resume)
    acc = clf.score(Xte, yte)
    clf.save(args.output)
    print(f"{PROG}: {args.training} on {name}: test accuracy {100 * acc:.2f} % at "
          f"T={args.samples}; model written to {args.output}")
    return 0


def _run_sweep(args):
    from .experiments import format_table
    from .sweep import run_sweep, sweep_tasks
    if args.backend == "dask" and not args.scheduler:
        raise _UsageError("--backend dask needs --scheduler ADDRESS")
    dataset = args.data or "digits"
    preset = MNIST_PRESET if args.data else DIGITS_PRESET
    params = dict(preset["params"])
    if args.epochs:
        params["max_iter"] = args.epochs
    nominal = None
    if args.instrument:
        if args.n_jobs > 1 or args.backend == "dask":
            raise _UsageError("--instrument: one instrument serves one process; use "
                              "--n-jobs 1 and the joblib backend")
        if args.nominal:
            nominal = _csv_list(args.nominal, float, "--nominal")
            if len(nominal) != 2 or not nominal[1] > 0:
                raise _UsageError("--nominal must be I50,SCALE in amperes with SCALE > 0")
        from .experiments import backend_from_factory
        try:
            backend_from_factory(args.instrument)       # fail now, not in the first task
        except ValueError as exc:
            raise _UsageError(f"--instrument: {exc}") from None
    elif args.nominal:
        raise _UsageError("--nominal needs --instrument")
    tasks = sweep_tasks(args.widths, args.variabilities, args.runs, range(args.seeds),
                        dataset=dataset, hidden=args.hidden or preset["hidden"],
                        estimator_params=params, instrument=args.instrument, nominal=nominal)
    out = _sweep_results_path(args.out)
    recs = run_sweep(tasks, out, backend=args.backend, n_jobs=args.n_jobs,
                     scheduler=args.scheduler, progress=not args.quiet)
    if args.instrument:
        print(f"\ninstrument {args.instrument}")
        print(format_table(recs))
    for w in [] if args.instrument else sorted({r["width"] for r in recs}):
        for v in sorted({r["variability"] for r in recs}):
            sel = [r for r in recs if r["width"] == w and r["variability"] == v]
            if sel:
                print(f"\nwidth {w} um, variability {v:.0%}")
                print(format_table(sel))
    print(f"{PROG}: {len(recs)} records in {out}")
    return 0


def _sweep_results_path(out):
    """DIR/results.jsonl for ``sweep --out DIR`` (the directory is made if missing)."""
    out = Path(out)
    if out.suffix == ".jsonl" or out.is_file():
        raise _UsageError(f"--out is a directory (the records go to DIR/results.jsonl), got "
                          f"the file name {str(out)!r}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _UsageError(f"--out: cannot create directory {out}: {exc.strerror}") from None
    return out / "results.jsonl"


def _check_writable(*paths):
    """Fail before the work, not after it, when an output directory is missing."""
    for p in paths:
        if p is not None:
            parent = Path(p).resolve().parent
            if not parent.is_dir():
                raise FileNotFoundError(f"cannot write {p}: directory {parent} does not exist")
            if Path(p).is_dir():
                raise IsADirectoryError(f"cannot write {p}: it is a directory")


def _run_calibrate(args):
    from .calibration import calibrate
    _check_writable(args.output, args.summary, args.stats)
    if args.plots is not None:
        from .plotting import _matplotlib
        _matplotlib()  # fail before the fit, not after it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = calibrate(args.measurements, model=args.model, method=args.method,
                           levels="fit" if args.fit_levels else (0.0, 1.0), width=args.width,
                           confidence=args.confidence, skip_invalid=args.skip_invalid,
                           selection=args.selection, max_error_tolerance=args.max_error,
                           progress=args.progress)
    for w in caught:
        if issubclass(w.category, UserWarning):
            _message("warning", str(w.message))
    print(result.report())
    print()
    if args.output is not None:
        result.save(args.output, summary=args.summary, stats=args.stats)
        print(f"wrote {args.output} (population of {len(result.population)} devices)")
    else:
        if args.summary is not None:
            result.save_summary(args.summary)
        if args.stats is not None:
            result.save_stats(args.stats)
    for name, path in (("per-device table", args.summary), ("statistics", args.stats)):
        if path is not None:
            print(f"wrote {path} ({name})")
    if args.plots is not None:
        from .plotting import save_calibration_figures
        paths = save_calibration_figures(result, args.plots)
        print(f"wrote {len(paths)} figure(s) to {args.plots}: "
              f"{', '.join(p.name for p in paths)}")
    return 0


def _run_simulate(args):
    import numpy as np

    from .calibration import simulate_measurements
    from .devices import DevicePopulation
    _check_writable(args.output, args.truth)
    if args.population is not None:
        pop = DevicePopulation.load(args.population)
        how = f"the population in {args.population}"
    else:
        widths = args.width or [20.0]
        w = np.repeat(np.asarray(widths, dtype=float), args.n_devices)
        pop = DevicePopulation.from_width(
            w, w.size, variability=args.variability,
            window_variability=args.window_variability, stuck_fraction=args.stuck_fraction,
            read_error=args.read_error,
            random_state=None if args.seed is None else args.seed)
        how = (f"{args.n_devices} device(s) per width {', '.join(f'{v:g}' for v in widths)} "
               f"um from the default model (assumed constants), variability "
               f"{args.variability:g}")
        if args.family != "logistic" or args.rollover is not None:
            from .calibration import family_population
            pop = family_population(args.family, pop.i50, pop.window, shape=args.shape,
                                    p_lo=pop.p_lo, p_hi=pop.p_hi, width=pop.width,
                                    rollover=args.rollover)
            how += f", {args.family} curves" + (
                f" with over-drive roll-over {args.rollover}" if args.rollover else "")
    table = simulate_measurements(pop, pulses=args.pulses, n_points=args.n_points,
                                  span=args.span, sweep=args.sweep, raw=args.raw,
                                  random_state=None if args.seed is None else args.seed + 1,
                                  path=args.output)
    n_rows = table["device"].shape[0]
    say = (lambda *a: None) if args.quiet else print
    say(f"wrote {args.output}: {n_rows:,} rows, {len(pop)} devices x {args.n_points} "
          f"currents x {args.pulses} pulses ({'per-pulse rows' if args.raw else 'counts'}); "
          f"{how}")
    if args.truth is not None:
        pop.save(args.truth)
        say(f"wrote {args.truth} (the true population)")
    return 0


def _message(kind, text):
    text = " ".join(str(text).split())  # one line
    print(f"{PROG}: {kind}: {text}", file=sys.stderr)


def _describe(exc):
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename}"
    return str(exc) or type(exc).__name__


def main(argv=None):
    """Run ``sotcore-eval`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("SOTCORE_DEBUG", "") not in ("", "0")
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help / --version
            return exc.code if isinstance(exc.code, int) else 0
        handler = getattr(args, "handler", None)
        if handler is not None:
            # Main-job options before a subcommand would be silently ignored: refuse them.
            sub = argv.index(args.command)
            stray = [a for a in argv[:sub] if a.startswith("-") and a != "--debug"]
            if stray:
                raise _UsageError(f"{' '.join(stray)} before '{args.command}' belong(s) to "
                                  f"the main job; put {args.command}'s options after it")
        if handler is None:
            return run_main_job(args)
        return handler(args)
    except _UsageError as exc:
        if debug:
            raise
        _message("error", exc)
        return 2
    except (TrainingInterrupted, BackendError) as exc:
        if debug:
            raise
        _message("error", exc)
        return 3
    except (ValueError, TypeError, OSError, ImportError) as exc:
        # User errors (bad files, options, data) are one line; --debug shows where.
        if debug:
            raise
        _message("error", _describe(exc))
        return 1
    except KeyboardInterrupt:
        _message("error", "interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
