"""One harness for side-by-side runs of the training modes (CLI, studies, sweeps).

Every mode sees the same data, the same device population and the same seeds.
``software`` and ``ex-situ`` share one training run: ex-situ *is* the software
run's weights evaluated on the devices (training is identical by construction).
:func:`run_main_job` is the computation of ``sotcore-eval``'s main job (the
CLI only parses, loads, prints and saves).
"""
import time

import numpy as np
from tqdm.auto import tqdm

from .devices import DevicePopulation
from .estimator import SOTClassifier
from .training import MODES

__all__ = ["compare_modes", "run_main_job", "estimate_main_job", "main_job_runs", "summarize",
           "format_table", "RUN_LABELS", "backend_from_factory", "measured_calibration"]

RUN_LABELS = {"software": "software", "ex-situ": "ex-situ", "hardware-aware": "hardware-aware",
              ("hil", "nominal"): "hil (nominal)", ("hil", "calibrated"): "hil (calibrated)",
              ("hil", "straight-through"): "hil (straight-through)"}


def _label(mode, surrogate):
    return RUN_LABELS[(mode, surrogate)] if mode == "hil" else RUN_LABELS[mode]


def backend_from_factory(spec):
    """Call an importable backend factory ``"package.module:function"`` (no arguments)
    and return the backend it makes, e.g. a lab's ``InstrumentBackend``.

    Used by ``sotcore-eval --instrument`` and sweeps (each worker makes its own)."""
    import importlib
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"an instrument factory must be 'module:function', got {spec!r}")
    mod, attr = spec.split(":")
    try:
        factory = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"instrument factory {spec}: cannot import it ({exc})") from None
    backend = factory()
    if not (hasattr(backend, "pulse") and hasattr(backend, "n_devices")):
        raise ValueError(f"instrument factory {spec} returned {type(backend).__name__}, not a "
                         "device backend (needs n_devices and pulse)")
    return backend


def measured_calibration(devices, seed, nominal=None, progress=False, **kw):
    """Curves of ``devices`` measured by pulse sweeps (``calibrate_backend``), never
    read from the truth: a population is measured through an emulator of it, a
    backend through its own pulses.  ``nominal``: the first guess (default: the
    devices' own nominal curve where known)."""
    from .backends import EmulatedBackend
    from .characterize import calibrate_backend
    from .training import nominal_curve
    backend = devices if hasattr(devices, "pulse") else EmulatedBackend(
        devices, random_state=10_000 + int(seed))
    if nominal is None:
        curves = backend.device_curves() if hasattr(backend, "device_curves") else None
        if curves is None:
            raise ValueError("the devices' curves are unknown: give a first guess nominal="
                             "(i50, scale)")
        nominal = nominal_curve(curves)
    return calibrate_backend(backend, tuple(nominal), progress=progress, **kw).population


def main_job_runs(modes=MODES, surrogates=("nominal",)):
    """The (mode, surrogate) runs of :func:`compare_modes`, in order: the offline
    modes on the nominal surrogate, then one HIL run per surrogate."""
    runs = [(m, "nominal") for m in ("software", "ex-situ", "hardware-aware") if m in modes]
    if "hil" in modes:
        runs.extend(("hil", s) for s in surrogates)
    return runs


def compare_modes(X_train, y_train, X_test, y_test, *, population=None, backend=None,
                  width=20.0, variability=0.10, hidden_layer_sizes=(500,),
                  modes=("software", "ex-situ", "hardware-aware", "hil"),
                  surrogates=("nominal",), n_samples=(1, 8, 32), seeds=(0,),
                  calibration=None, estimator_params=None, progress=True, on_record=None):
    """Train and score each mode for each seed; return a list of result records.

    Parameters
    ----------
    population : DevicePopulation or None
        The devices (the same for every seed).  None: drawn per seed from the
        default model at ``width`` (um) with ``variability``.
    backend : device backend, callable or None
        A user backend (e.g. an :class:`~sotcore.InstrumentBackend` around the
        lab's instrument), or ``f(seed) -> backend``.  Every mode then runs on
        it: software on ideal nominal neurons, ex-situ and hardware-aware
        predict through it, HIL trains through it.  Needs ``calibration``
        (for the nominal device, hardware-aware and the calibrated surrogate)
        or ``estimator_params["nominal_device"]``.
    surrogates : sequence of {"nominal", "calibrated", "straight-through"}
        HIL runs, one per surrogate.
    calibration : DevicePopulation, callable or None
        Measured curves of the devices, or ``f(devices, seed) -> population``
        (``devices``: the population, or the backend), e.g. a
        :func:`~sotcore.calibrate_backend` measurement.  Needed by
        ``hardware-aware`` and ``calibrated`` on a backend.
    n_samples : sequence of int
        Inference sample counts T at which each trained network is scored.
    estimator_params : dict
        Extra SOTClassifier parameters (max_iter, batch_size, mapping_unit, ...).
    on_record : callable, optional
        Called with each record as soon as it exists (incremental saving).

    Returns
    -------
    list of dict with keys ``run`` (label), ``mode``, ``surrogate``, ``seed``,
    ``T``, ``accuracy``, ``train_seconds``, ``epochs``, ``seconds_per_epoch``,
    ``loss_curve``, ``width``, ``variability``, ``pulses_per_device``.

    ``ex-situ`` is trained as its own estimator (``training="ex-situ"``):
    its weights are bit-identical to the software run's, and it predicts
    through the devices.
    """
    params = dict(estimator_params or {})
    hidden = tuple(hidden_layer_sizes)
    n_dev = sum(hidden)
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown mode(s) {sorted(unknown)}; choose from {', '.join(MODES)}")
    runs = main_job_runs(modes, surrogates)
    records = []
    bar = tqdm(total=len(runs) * len(seeds), desc="training runs", disable=not progress,
               unit="run")
    for seed in seeds:
        if backend is not None:
            devices = backend(seed) if callable(backend) and not hasattr(backend, "pulse") \
                else backend
            curves = devices.device_curves() if hasattr(devices, "device_curves") else None
        else:
            devices = population if population is not None else DevicePopulation.from_width(
                width, n_dev, variability=variability, random_state=seed)
            curves = devices
        calib = None
        need_calib = any(m == "hardware-aware" or s == "calibrated" for m, s in runs) or (
            backend is not None and curves is None and "nominal_device" not in params)
        if calibration is not None and (need_calib or backend is not None):
            calib = calibration(devices, seed) if callable(calibration) else calibration
        elif need_calib and backend is not None:
            raise ValueError("a backend that does not describe its devices needs "
                             "calibration= (e.g. a calibrate_backend measurement)")
        pop_width = None
        if curves is not None and np.isfinite(curves.width).any():
            pop_width = float(np.nanmedian(curves.width))
        for mode, surrogate in runs:
            kw = dict(params)
            if calib is not None and (mode == "hardware-aware" or surrogate == "calibrated"
                                      or backend is not None):
                kw["calibration"] = calib
            elif surrogate == "calibrated" and calibration is None:
                raise ValueError("the calibrated surrogate needs calibration=")
            bar.set_postfix_str(f"seed {seed}: {_label(mode, surrogate)}")
            clf = SOTClassifier(hidden_layer_sizes=hidden, devices=devices, training=mode,
                                surrogate=surrogate, random_state=seed, **kw)
            t0 = time.perf_counter()
            clf.fit(X_train, y_train)
            seconds = time.perf_counter() - t0
            for T in n_samples:
                clf.set_params(n_samples=int(T))
                rec = {"run": _label(mode, surrogate), "mode": mode,
                       "surrogate": surrogate if mode == "hil" else None, "seed": int(seed),
                       "T": int(T), "accuracy": float(clf.score(X_test, y_test)),
                       "train_seconds": seconds, "epochs": int(clf.n_iter_),
                       "seconds_per_epoch": seconds / max(clf.n_iter_, 1),
                       "loss_curve": [float(v) for v in clf.loss_curve_],
                       "width": pop_width, "variability": variability
                       if population is None and backend is None else
                       (curves.meta.get("model", {}).get("variability")
                        if curves is not None else None),
                       "n_hidden": list(hidden),
                       "pulses_per_device": int(clf.pulses_.max()) if clf.pulses_.size else 0}
                records.append(rec)
                if on_record is not None:
                    on_record(rec)
            bar.update(1)
    bar.close()
    return records


def summarize(records):
    """Mean, std and count of accuracy per (run, T), in first-seen order."""
    groups = {}
    for r in records:
        groups.setdefault((r["run"], r["T"]), []).append(r["accuracy"])
    return [{"run": run, "T": T, "mean": float(np.mean(a)), "std": float(np.std(a)),
             "n": len(a)} for (run, T), a in groups.items()]


def format_table(records):
    """A text table: one row per run, one column per T, 'mean ± std' in percent."""
    summ = summarize(records)
    Ts = sorted({s["T"] for s in summ})
    runs = list(dict.fromkeys(s["run"] for s in summ))
    cell = {(s["run"], s["T"]): s for s in summ}
    spe = {}
    for r in records:
        spe.setdefault(r["run"], []).append(r["seconds_per_epoch"])
    w = max(len(r) for r in runs) + 2
    head = "mode".ljust(w) + "".join(f"T={T}".rjust(16) for T in Ts) + "s/epoch".rjust(10)
    lines = [head, "-" * len(head)]
    for run in runs:
        row = run.ljust(w)
        for T in Ts:
            s = cell.get((run, T))
            row += (f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}" if s else "-").rjust(16)
        row += f"{np.mean(spe[run]):.3g}".rjust(10)
        lines.append(row)
    n = max(s["n"] for s in summ)
    lines.append(f"test accuracy in %, mean ± std over {n} seed(s)")
    return "\n".join(lines)


def run_main_job(X_train, y_train, X_test, y_test, *, hidden_layer_sizes, widths=(20.0,),
                 variability=0.10, population=None, backend=None, calibration=None,
                 surrogates=("nominal",), n_samples=(1, 8, 32), seeds=(0,),
                 estimator_params=None, progress=True, on_width=None):
    """The main job (``sotcore-eval``): every training mode side by side.

    One :func:`compare_modes` per device width -- populations drawn per seed
    at ``variability`` -- or a single one on ``population`` or ``backend``.

    Parameters
    ----------
    widths : sequence of float
        Device widths (um); ignored with ``population`` or ``backend``.
    calibration : DevicePopulation, callable or None
        The devices' measured curves; default :func:`measured_calibration`
        of each seed's devices (pulse sweeps, never the emulator's truth).
    on_width : callable ``f(width, records)`` or None
        Called after each width's runs (``width`` None on ``population`` or
        ``backend``), e.g. to print its table while the next one trains.
    hidden_layer_sizes, variability, population, backend, surrogates, n_samples, seeds,
    estimator_params, progress
        As :func:`compare_modes`.

    Returns
    -------
    list of dict
        The records of every width, as :func:`compare_modes` returns them.
    """
    if calibration is None:
        calibration = measured_calibration
    passes = [None] if population is not None or backend is not None else list(widths)
    records = []
    for w in passes:
        recs = compare_modes(X_train, y_train, X_test, y_test, population=population,
                             backend=backend, width=w if w is not None else 20.0,
                             variability=variability, hidden_layer_sizes=hidden_layer_sizes,
                             surrogates=surrogates, n_samples=n_samples, seeds=seeds,
                             calibration=calibration, estimator_params=estimator_params,
                             progress=progress)
        records.extend(recs)
        if on_width is not None:
            on_width(w, recs)
    return records


def estimate_main_job(X_train, n_score, *, hidden_layer_sizes, devices, surrogates=("nominal",),
                      estimator_params=None, nominal_device=None):
    """What one seed of :func:`run_main_job` would cost, per run, without a pulse.

    Parameters
    ----------
    devices : float, DevicePopulation or device backend
        As ``SOTClassifier(devices=)``.
    n_score : int
        Test rows scored after training.
    nominal_device : (i50, scale) or None
        A first guess of the nominal device (a backend that does not describe
        its devices); on a backend it also stands in for the calibration.

    Returns
    -------
    list of (mode, surrogate, CostEstimate)
    """
    extra = {"nominal_device": nominal_device} if nominal_device is not None else {}
    if hasattr(devices, "pulse") and nominal_device is not None:
        n = devices.n_devices
        extra["calibration"] = DevicePopulation(np.full(n, nominal_device[0]),
                                                np.full(n, nominal_device[1]))
    out = []
    for mode, sur in main_job_runs(MODES, surrogates):
        est = SOTClassifier(hidden_layer_sizes=hidden_layer_sizes, devices=devices,
                            training=mode, surrogate=sur, **dict(estimator_params or {}),
                            **extra)
        out.append((mode, sur, est.estimate_cost(X_train, n_score=n_score)))
    return out
