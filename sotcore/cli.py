"""``sotcore-eval``: the command-line entry point.

::

    sotcore-eval                      the main job (see run_main_job)
    sotcore-eval calibrate MEASUREMENTS.csv -o devices.json [--plots DIR]
                 [--method sigmoid|isotonic] [--fit-levels] [--summary CSV] [--stats JSON]
    sotcore-eval simulate -o measurements.csv [--width 20 [40 ...]] [--n-devices 100]
                 [--pulses 200] [--n-points 25] [--raw] [--truth truth.json] ...

Mistakes in the user's input (missing files, bad options, bad data) print
one line ``sotcore-eval: error: ...`` on stderr and exit with status 2 (bad
usage) or 1 (bad data or files), never a traceback.
"""
import argparse
import math
import sys
import warnings

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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

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
    cal.add_argument("--method", choices=("sigmoid", "isotonic"), default="sigmoid",
                     help="sigmoid maximum-likelihood fit (default) or monotone "
                     "non-parametric table")
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
    cal.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                     help="never show a progress bar")
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
    sim.set_defaults(handler=_run_simulate)
    return parser


def run_main_job(args):
    """The default job (no subcommand): not implemented yet."""
    print(f"{PROG}: the main job (training modes compared on the embedded digits) is not "
          f"implemented yet; see '{PROG} --help' for the available subcommands")
    return 1


def _check_writable(*paths):
    """Fail before the work, not after it, when an output directory is missing."""
    from pathlib import Path
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
        result = calibrate(args.measurements, method=args.method,
                           levels="fit" if args.fit_levels else (0.0, 1.0), width=args.width,
                           confidence=args.confidence, skip_invalid=args.skip_invalid,
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
    table = simulate_measurements(pop, pulses=args.pulses, n_points=args.n_points,
                                  span=args.span, sweep=args.sweep, raw=args.raw,
                                  random_state=None if args.seed is None else args.seed + 1,
                                  path=args.output)
    n_rows = table["device"].shape[0]
    print(f"wrote {args.output}: {n_rows:,} rows, {len(pop)} devices x {args.n_points} "
          f"currents x {args.pulses} pulses ({'per-pulse rows' if args.raw else 'counts'}); "
          f"{how}")
    if args.truth is not None:
        pop.save(args.truth)
        print(f"wrote {args.truth} (the true population)")
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
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help / --version
            return exc.code if isinstance(exc.code, int) else 0
        handler = getattr(args, "handler", None)
        if handler is None:
            return run_main_job(args)
        return handler(args)
    except _UsageError as exc:
        _message("error", exc)
        return 2
    except (ValueError, TypeError, OSError, ImportError) as exc:
        _message("error", _describe(exc))
        return 1
    except KeyboardInterrupt:
        _message("error", "interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
