"""SOTClassifier: a scikit-learn classifier whose hidden neurons are SOT devices.

Size: SOTClassifier's scikit-learn surface (parameters and their validation,
fit/partial_fit/predict, save/load with every field checked, cost estimates)
is one class; its training loop, checkpoints and optimisers already live in
training.py, _checkpoint.py and _optim.py.
"""
import contextlib
import hashlib
import json
import numbers
import os
import warnings
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context, clone
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelEncoder
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from . import _io, _kernels
from ._fused import EVAL_SALT
from ._threads import blas_limit
from ._utils import seed_from_random_state
from .backends import EmulatedBackend
from .devices import DevicePopulation
from .exceptions import InvalidInputError
from .network import CurrentMapping, DeviceMap, layer_slices
from .training import (MODES, SURROGATES, TrainConfig, Trainer, make_surrogate, nominal_curve,
                       suggest_mapping)

__all__ = ["SOTClassifier", "CostEstimate"]

MODEL_FORMAT = "sotcore.model"
MODEL_VERSION = 2

#: Width (um) of the devices drawn when ``devices=None``: ideal copies of the
#: default model's nominal device at this width (an ASSUMPTION, see devices.py).
DEFAULT_WIDTH_UM = 20.0

#: What early-stopping validation evaluates on, per training stage: ex-situ is
#: exactly the software run; hardware-aware training stays offline.
_VALIDATE_ON = {"software": "nominal", "ex-situ": "nominal", "hardware-aware": "curves",
                "hil": "devices"}

#: ``fit`` warns when a device's I50 lies more than this many network units from
#: the nominal I50 where the hidden biases start (see ``_warn_far_devices``).
FAR_UNITS = 10.0


def _is_backend(obj):
    return hasattr(obj, "pulse") and hasattr(obj, "n_devices")


@contextlib.contextmanager
def _checkpoint_lock(path):
    """Hold an exclusive lock on ``<checkpoint>.lock`` while a fit writes ``path``.

    Two fits writing one checkpoint (e.g. ``cross_val_score(n_jobs=2)`` on clones
    that share ``checkpoint=``) would overwrite each other's state: the second
    one is refused with a clear error instead.  The lock dies with its process.
    """
    if path is None:
        yield
        return
    lock = Path(str(path) + ".lock")
    if not lock.resolve().parent.is_dir():
        raise ValueError(f"checkpoint: directory {lock.resolve().parent} does not exist")
    with _io.exclusive_lock(lock, f"checkpoint {path} is being written by another fit; give "
                            "each estimator its own checkpoint path (clones share it: e.g. "
                            "cross_val_score with checkpoint= set)"):
        yield


class _RowKeys:
    """A 64-bit key per row that depends only on the row's values and ``seed``.

    Used to draw inference noise per input, so predictions do not depend on
    which other rows are in the batch or in which order.  The hash: the
    rows' float32 bit patterns times per-column odd multipliers, summed mod
    2**64, then mixed (compiled, no temporaries: ``_kernels.row_hash``).
    Callable on any block of rows, so the network can hash block by block
    in its worker threads.
    """

    def __init__(self, seed, n_features):
        self.mult = np.random.default_rng(seed).integers(1, 2**63, size=n_features,
                                                         dtype=np.uint64)
        self.mult |= np.uint64(1)

    def __call__(self, X):
        Xc = np.ascontiguousarray(X, dtype=np.float32)
        keys = np.empty(Xc.shape[0], dtype=np.uint64)
        _kernels.row_hash(Xc.reshape(Xc.shape[0], -1).view(np.uint32), self.mult, keys, 1)
        return keys


def _row_keys(X, seed):
    """The content keys of the rows of X (see ``_RowKeys``)."""
    return _RowKeys(seed, np.shape(X)[1])(X)


class CostEstimate(dict):
    """What a ``fit`` (and a ``score`` on ``n_score`` rows) will cost, before any pulse.

    Keys: ``fit_pulses`` / ``score_pulses`` (int64 per physical device),
    ``fit_requests`` / ``score_requests`` (backend calls), ``fit_hardware_time`` /
    ``score_hardware_time`` (seconds by the backend's time model, or None if
    the backend has none), ``hil_epochs``, ``n_devices``.
    """

    def __str__(self):
        def t(v):
            return "n/a" if v is None else f"{v:.3g} s"
        fp, sp = self["fit_pulses"], self["score_pulses"]
        return (f"fit: {int(fp.sum()):,} pulses on {self['n_devices']} devices "
                f"(max {int(fp.max()):,} per device), {self['fit_requests']:,} requests, "
                f"hardware time {t(self['fit_hardware_time'])}\n"
                f"score on {self['n_score']:,} rows: {int(sp.sum()):,} pulses "
                f"(max {int(sp.max()):,} per device), hardware time "
                f"{t(self['score_hardware_time'])}")


class SOTClassifier(ClassifierMixin, BaseEstimator):
    """Multilayer classifier of stochastic SOT-device neurons.

    Parameters
    ----------
    hidden_layer_sizes : tuple of int, default (500,)
        Hidden neurons per layer; each is pulsed on one physical device (see
        ``device_map``).
    devices : DevicePopulation, float, device backend or None, default None
        The physical devices.  A population; a width in micrometres (a
        population of ``sum(hidden_layer_sizes)`` devices is drawn from the
        default model with ``variability``); a device backend (e.g.
        :class:`~sotcore.InstrumentBackend`) used for every pulse that goes to
        the devices (HIL training, and prediction in every mode but
        ``software``); or None for ideal copies of the nominal 20 um device.
        A backend is a shared resource: ``sklearn.base.clone`` keeps the same
        object (a socket or VISA session cannot be copied).
    training : {"hil", "software", "ex-situ", "hardware-aware"}, default "hil"
        ``software``: trained and evaluated on ideal nominal neurons (the
        devices are never pulsed).  ``ex-situ``: trained exactly as software,
        then predicts through the devices.  ``hardware-aware``: trained
        offline on known curves (``calibration=``, else the devices' own
        curves), predicts through the devices.  ``hil``: forward passes
        through the devices, backward with ``surrogate``.
    surrogate : {"nominal", "calibrated", "straight-through"}, default "nominal"
        Backward surrogate for ``hil``.  ``calibrated`` needs ``calibration``.
    calibration : DevicePopulation or None
        Measured curves, one per physical device (e.g.
        :func:`sotcore.calibrate_backend`): used by the calibrated surrogate,
        hardware-aware training and ``pretrain``, and -- when
        ``nominal_device`` is not given -- for the nominal device.
    device_map : "round-robin", array of int, or None, default None
        Physical device of each hidden neuron (neurons numbered across the
        layers).  None / "round-robin": neuron ``k`` -> device ``k mod
        n_devices`` (one device per neuron, in order, when there are enough).
        Neurons that share a device share its curve; their bits are
        independent (the device is reset between pulses).
    n_samples : int, default 32
        Stochastic samples T averaged at prediction.
    train_samples : int, default 1
        Samples per input in each training step.
    variability : float, default 0.10
        Device-to-device spread when ``devices`` is a width.
    hidden_layer_sizes, max_iter, batch_size, learning_rate_init, alpha, solver,
    momentum, nesterovs_momentum, beta_1, beta_2, epsilon, shuffle, early_stopping,
    validation_fraction, n_iter_no_change, tol, random_state, verbose
        As in scikit-learn's MLPClassifier (``max_iter`` counts epochs;
        ``batch_size="auto"`` is ``min(200, n_samples)``; the default is 100).
        Parameters after ``hidden_layer_sizes`` are keyword-only.
        Without early stopping, training stops when the training loss has
        not improved by ``tol`` for ``n_iter_no_change`` epochs.
    mapping_unit : float, "auto" or None
        Amperes per network unit (currents ``I = mapping_offset + unit * z``).
        None: the nominal device's sigmoid scale.  "auto":
        :func:`sotcore.suggest_mapping` on the known curves.
    mapping_offset : float, default 0.0
        Amperes at ``z = 0`` (any sign: p-bit devices switch around 0 A).
    nominal_device : tuple (i50, scale) in amperes, or None
        The nominal device (software neurons, the hidden-bias start, the
        nominal surrogate); ``i50`` any real number, ``scale > 0``.  Default:
        from ``calibration``, else from the devices' curves
        (:func:`sotcore.training.nominal_curve`).
    pretrain : {"hardware-aware"} or None
        With ``training="hil"``: first ``max_iter`` epochs of hardware-aware
        training on ``calibration`` (no device pulses), then ``hil_epochs``
        epochs on the devices -- a fraction of full HIL's pulses.
    hil_epochs : int or None
        HIL epochs after ``pretrain`` (default ``max_iter``).
    hil_learning_rate : float or None
        With ``pretrain``: the HIL fine-tuning starts a fresh optimiser at this
        rate (later ``partial_fit`` calls continue it).  None:
        ``learning_rate_init / 10`` (measured in C5, see the README).
    progress : bool or None
        Progress bars with ETA for fit, predict and score; None: on for a
        backend that is not the emulator (a slow instrument), off otherwise.
    n_threads : int or None
        Threads of the compiled kernels (results do not depend on it).
    checkpoint : path or None
        Write training checkpoints here (atomically, every epoch, every
        ``checkpoint_every`` batches, and before raising
        :class:`~sotcore.TrainingInterrupted` when a step fails or on
        Ctrl-C).  ``fit(X, y, resume_from=checkpoint)`` continues exactly.
    checkpoint_every : int or None
        Also checkpoint every this many batches.
    callbacks : list of callables or None
        ``cb(epoch, info, network) -> bool`` after every epoch; returning
        True stops training.

    Attributes
    ----------
    coefs_, intercepts_ : lists of ndarray
    classes_ : ndarray
    n_iter_ : int
    loss_curve_ : list of float
    best_loss_ : float
    validation_scores_ : list of float (with early_stopping)
    devices_ : DevicePopulation or None
        The physical devices' curves where known (None for a backend that
        does not describe its devices).
    device_map_ : DeviceMap
    mapping_ : CurrentMapping
    nominal_device_ : tuple (i50, scale)
    pulses_ : ndarray of int64
        Pulses sent to each physical device by the last fit.
    """

    _parameter_constraints = {
        "hidden_layer_sizes": ["array-like", Interval(numbers.Integral, 1, None, closed="left")],
        # population, width or backend: checked in _resolve_devices
        "devices": "no_validation",
        "training": [StrOptions(set(MODES))],
        "surrogate": [StrOptions(set(SURROGATES))],
        "calibration": [DevicePopulation, None],
        "device_map": [StrOptions({"round-robin"}), "array-like", None],
        "n_samples": [Interval(numbers.Integral, 1, None, closed="left")],
        "train_samples": [Interval(numbers.Integral, 1, None, closed="left")],
        "variability": [Interval(numbers.Real, 0, 5, closed="both")],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left"),
                       StrOptions({"auto"})],
        "learning_rate_init": [Interval(numbers.Real, 0, None, closed="neither")],
        "alpha": [Interval(numbers.Real, 0, None, closed="left")],
        "solver": [StrOptions({"adam", "sgd"})],
        "momentum": [Interval(numbers.Real, 0, 1, closed="both")],
        "nesterovs_momentum": ["boolean"],
        "beta_1": [Interval(numbers.Real, 0, 1, closed="left")],
        "beta_2": [Interval(numbers.Real, 0, 1, closed="left")],
        "epsilon": [Interval(numbers.Real, 0, None, closed="neither")],
        "shuffle": ["boolean"],
        "early_stopping": ["boolean"],
        "validation_fraction": [Interval(numbers.Real, 0, 1, closed="neither")],
        "n_iter_no_change": [Interval(numbers.Integral, 1, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "mapping_unit": [Interval(numbers.Real, 0, None, closed="neither"),
                         StrOptions({"auto"}), None],
        "mapping_offset": [Interval(numbers.Real, None, None, closed="neither")],
        "nominal_device": ["array-like", None],
        "pretrain": [StrOptions({"hardware-aware"}), None],
        "hil_epochs": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "hil_learning_rate": [Interval(numbers.Real, 0, None, closed="neither"), None],
        "progress": ["boolean", None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "n_threads": [Interval(numbers.Integral, 1, 4096, closed="both"),
                      Interval(numbers.Integral, -4096, -1, closed="both"), None],
        "checkpoint": [str, os.PathLike, None],
        "checkpoint_every": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "callbacks": [list, tuple, None],
    }

    def __init__(self, hidden_layer_sizes=(500,), *, devices=None, training="hil",
                 surrogate="nominal", calibration=None, device_map=None, n_samples=32,
                 train_samples=1, variability=0.10, max_iter=30, batch_size=100,
                 learning_rate_init=3e-3, alpha=1e-4, solver="adam", momentum=0.9,
                 nesterovs_momentum=True, beta_1=0.9, beta_2=0.999, epsilon=1e-8, shuffle=True,
                 early_stopping=False, validation_fraction=0.1, n_iter_no_change=10, tol=1e-4,
                 mapping_unit=None, mapping_offset=0.0, nominal_device=None, pretrain=None,
                 hil_epochs=None, hil_learning_rate=None, progress=None, random_state=None,
                 verbose=False,
                 n_threads=None, checkpoint=None, checkpoint_every=None, callbacks=None):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.devices = devices
        self.training = training
        self.surrogate = surrogate
        self.calibration = calibration
        self.device_map = device_map
        self.n_samples = n_samples
        self.train_samples = train_samples
        self.variability = variability
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.learning_rate_init = learning_rate_init
        self.alpha = alpha
        self.solver = solver
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.shuffle = shuffle
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol
        self.mapping_unit = mapping_unit
        self.mapping_offset = mapping_offset
        self.nominal_device = nominal_device
        self.pretrain = pretrain
        self.hil_epochs = hil_epochs
        self.hil_learning_rate = hil_learning_rate
        self.progress = progress
        self.random_state = random_state
        self.verbose = verbose
        self.n_threads = n_threads
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every
        self.callbacks = callbacks

    def __sklearn_clone__(self):
        # A backend is a shared resource (an instrument session): keep the object.
        params = self.get_params(deep=False)
        kept = {"devices": params.pop("devices")} if _is_backend(self.devices) else {}
        return type(self)(**{k: clone(v, safe=False) for k, v in params.items()}, **kept)

    # -- set-up -------------------------------------------------------------------------
    def _hidden_sizes(self):
        h = self.hidden_layer_sizes
        sizes = [h] if isinstance(h, numbers.Integral) else list(np.ravel(h)) \
            if isinstance(h, np.ndarray) else list(h)
        if not sizes or any(isinstance(s, (bool, np.bool_)) or not isinstance(s, numbers.Integral)
                            or s < 1 for s in sizes):
            raise ValueError(f"hidden_layer_sizes must be positive integers, got {h!r}")
        return [int(s) for s in sizes]

    def _resolve_devices(self, n_needed, seed):
        """Return (physical population or None, user backend or None, n_physical)."""
        d = self.devices
        explicit_map = self.device_map is not None and not isinstance(self.device_map, str)
        if d is None:
            pop = DevicePopulation.from_width(DEFAULT_WIDTH_UM, n_needed, variability=0.0,
                                              random_state=0)
            return pop, None, n_needed
        if isinstance(d, DevicePopulation):
            n = len(d) if explicit_map else min(len(d), n_needed)
            return (d if len(d) == n else d[:n]), None, n
        if isinstance(d, numbers.Real) and not isinstance(d, (bool, np.bool_)):
            return DevicePopulation.from_width(float(d), n_needed, variability=self.variability,
                                               random_state=seed), None, n_needed
        if _is_backend(d):
            n = int(d.n_devices)
            curves = d.device_curves() if hasattr(d, "device_curves") else None
            return curves, d, n
        raise TypeError("devices must be a DevicePopulation, a width in micrometres, a device "
                        f"backend or None; got {type(d).__name__}")

    def _resolve_nominal(self, curves):
        if self.nominal_device is not None:
            nd = np.asarray(self.nominal_device, dtype=float) \
                if not isinstance(self.nominal_device, str) else np.zeros(0)
            if nd.shape != (2,) or not np.all(np.isfinite(nd)) or not nd[1] > 0:
                raise ValueError("nominal_device must be (i50, scale) in amperes: i50 any finite "
                                 f"number, scale > 0; got {self.nominal_device!r}")
            return float(nd[0]), float(nd[1])
        if self.calibration is not None:
            return nominal_curve(self.calibration)
        if curves is not None:
            return nominal_curve(curves)
        raise ValueError("this backend does not describe its devices: pass calibration= (e.g. "
                         "sotcore.calibrate_backend(backend, ...).population) or "
                         "nominal_device=(i50, scale) in amperes")

    def _known_curves(self):
        """Per-physical-device curves: the calibration if given, else the devices' own."""
        return self._calib_ if self._calib_ is not None else self.devices_

    def _setup(self, n_needed):
        """First fit: devices, device map, nominal device, mapping (fitted attributes)."""
        pop, user_backend, n_phys = self._resolve_devices(n_needed, int(self._seeds[0]))
        dmap = DeviceMap.resolve(self.device_map, n_needed, n_phys)
        calib = self.calibration
        if calib is not None:
            used = int(dmap.index.max()) + 1
            if len(calib) < used:
                raise ValueError(f"calibration has {len(calib)} devices but the device map uses "
                                 f"{used} (one calibrated curve per physical device)")
            calib = calib if len(calib) == n_phys else calib[:min(len(calib), n_phys)]
        self.devices_, self._user_backend, self.device_map_ = pop, user_backend, dmap
        self._calib_ = calib
        i50n, sn = self._resolve_nominal(pop)
        if isinstance(self.mapping_unit, str):
            curves = self._known_curves()
            unit = suggest_mapping(curves, (i50n, sn)).unit if curves is not None else sn
        else:
            unit = float(self.mapping_unit) if self.mapping_unit is not None else sn
        self.mapping_ = CurrentMapping(unit=unit, offset=float(self.mapping_offset))
        self._nominal = (i50n, sn)
        self.nominal_device_ = (i50n, sn)
        self._nominal_pop = DevicePopulation(np.full(n_phys, i50n), np.full(n_phys, sn),
                                             meta={"nominal": True})
        self._eval_on = "nominal" if self.training == "software" else "devices"

    def _warn_far_devices(self):
        """UserWarning when known device I50s lie > FAR_UNITS network units from the
        nominal I50 where the biases start: training (HIL: Adam moves a bias about
        ``learning_rate_init`` units per step) or deployment (ex-situ) then has to
        cover that distance; a larger ``mapping_unit`` (or "auto") shrinks it."""
        curves = self._known_curves()
        if curves is None or self.training == "software":
            return
        used = np.unique(self.device_map_.index)
        du = (curves.i50[used] - self._nominal[0]) / self.mapping_.unit
        far = used[np.abs(du) > FAR_UNITS]
        if far.size:
            names = ", ".join(str(int(v)) for v in far[:8]) + (" ..." if far.size > 8 else "")
            warnings.warn(f"{far.size} device(s) have I50 more than {FAR_UNITS:g} network units "
                          f"from the nominal I50 where the hidden biases start (devices {names}; "
                          f"up to {np.abs(du).max():.3g} units at mapping_unit="
                          f"{self.mapping_.unit:.3g} A); consider mapping_unit='auto' "
                          "(see sotcore.suggest_mapping)", UserWarning, stacklevel=3)

    def _is_slow(self):
        return self._user_backend is not None and not isinstance(self._user_backend,
                                                                 EmulatedBackend)

    def _show_progress(self):
        return self._is_slow() if self.progress is None else bool(self.progress)

    # -- fit ------------------------------------------------------------------------------
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, resume_from=None):
        """Train on (X, y) from scratch, or continue the run in checkpoint ``resume_from``.

        Resuming needs the same data and parameters as the interrupted run; the
        final weights are then identical to a run that was never interrupted.
        """
        resume = None
        if resume_from is not None:
            from .training import load_checkpoint
            resume = load_checkpoint(resume_from)
            extra = resume["meta"].get("extra") or {}
            if extra.get("params") != self._checkpoint_params():
                raise ValueError(f"{resume_from}: checkpoint was written with other estimator "
                                 "parameters; resume with the same parameters")
            if extra.get("stage", 0) >= len(self._stages(False)):
                raise InvalidInputError(f"{resume_from}: field 'extra.stage' is "
                                        f"{extra['stage']} but this fit has one stage")
        for key in ("_train_state", "_network"):
            self.__dict__.pop(key, None)
        with blas_limit(1), _checkpoint_lock(self.checkpoint):
            return self._fit(X, y, incremental=False, resume=resume)

    def _checkpoint_params(self):
        keep = ("hidden_layer_sizes", "training", "surrogate", "n_samples", "train_samples",
                "variability", "max_iter", "batch_size", "learning_rate_init", "alpha", "solver",
                "nesterovs_momentum", "beta_1", "beta_2", "epsilon", "shuffle",
                "momentum", "early_stopping", "validation_fraction", "n_iter_no_change", "tol",
                "mapping_unit", "mapping_offset", "device_map", "pretrain", "hil_epochs",
                "hil_learning_rate")
        p = self.get_params()
        return json.loads(json.dumps({k: self._param_to_json(k, p[k]) for k in keep}))

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y, classes=None):
        """One more epoch on (X, y) (``classes`` required on the first call).

        After :meth:`load`, continues from the loaded weights (with a fresh
        optimiser state: the model file does not hold Adam's moments).
        """
        # scikit-learn skips validation on later partial_fit calls; parameters can
        # change between calls (set_params), so validate every time.
        self._validate_params()
        if not hasattr(self, "coefs_"):
            if classes is None:
                raise ValueError("classes must be passed on the first call to partial_fit")
            self._partial_classes = np.asarray(classes)
        elif self._hidden_sizes() != list(self.n_hidden_):
            raise ValueError(f"hidden_layer_sizes is {self._hidden_sizes()} but the model was "
                             f"fitted with {list(self.n_hidden_)}; call fit to start again")
        with blas_limit(1), _checkpoint_lock(self.checkpoint):
            return self._fit(X, y, incremental=True)

    def _fit(self, X, y, incremental, resume=None):
        first = not (incremental and hasattr(self, "coefs_"))
        X, y = validate_data(self, X, y, reset=first, dtype=np.float32)
        check_classification_targets(y)
        if first:
            self._label_encoder = LabelEncoder()
            if incremental:
                self._label_encoder.fit(self._partial_classes)
            else:
                self._label_encoder.fit(y)
            self.classes_ = self._label_encoder.classes_
        unknown = np.setdiff1d(np.unique(y), self.classes_)
        if unknown.size:
            raise ValueError(f"y contains labels not seen in classes: {unknown[:5].tolist()}")
        y_enc = self._label_encoder.transform(y)
        n_classes = max(len(self.classes_), 2)
        hidden = self._hidden_sizes()
        if first:
            self.__dict__.pop("_train_state", None)
            if resume is not None:
                self._seeds = np.asarray(resume["meta"]["extra"]["seeds"], dtype=np.int64)
            else:
                seed = seed_from_random_state(self.random_state)
                self._seeds = np.random.default_rng(seed).integers(0, 2**63, size=4)
            self._setup(sum(hidden))
        self._check_mode()
        if first:
            self._warn_far_devices()
        if self.checkpoint is not None:
            parent = Path(self.checkpoint).resolve().parent
            if not parent.is_dir():
                raise ValueError(f"checkpoint: directory {parent} does not exist")
        i50n, _ = self._nominal
        validation, Xt, yt = None, X, y_enc
        if self.early_stopping and not incremental:
            stratify = y_enc if np.bincount(y_enc).min() >= 2 else None
            Xt, Xv, yt, yv = train_test_split(X, y_enc, test_size=self.validation_fraction,
                                              random_state=int(self._seeds[2]) % 2**32,
                                              stratify=stratify)
            validation = (Xv, yv)
        # The run so far, continued by this call: a Trainer's network, optimiser,
        # epoch count and history (partial_fit), or the loaded model's weights.
        state = getattr(self, "_train_state", None) if not first else None
        if state is None and not first:
            # After load(): continue from the loaded weights with a fresh optimiser.
            state = {"network": self._network, "optimizer": None, "epoch": int(self.n_iter_),
                     "history": {"loss": list(self.loss_curve_), "train_accuracy": [np.nan]
                                 * len(self.loss_curve_), "val_accuracy": [np.nan]
                                 * len(self.loss_curve_), "seconds": [np.nan]
                                 * len(self.loss_curve_)}}
        counts0 = self._device_counts()
        emulated_pulses = np.zeros(self.device_map_.n_devices, np.int64)
        stages = self._stages(incremental)
        resume_stage = 0 if resume is None else (resume["meta"]["extra"] or {}).get("stage", 0)
        for k, (mode, epochs) in enumerate(stages):
            if k < resume_stage:
                continue            # finished before the checkpoint was written
            epoch0 = 0 if state is None else state["epoch"]
            if resume is not None and k > 0:
                # the stage began ``epochs`` before the end epoch it was given
                epoch0 = resume["meta"]["end_epoch"] - int(epochs)
            train_backend, surrogate = self._training_setup(mode, epoch0)
            lr = float(self.learning_rate_init)
            if k > 0:
                # Fine-tuning after pretraining: a fresh optimiser at a lower rate (C5:
                # continuing the pretraining's Adam at full rate lost 0.7-1.0 points).
                state = None if state is None else dict(state, optimizer=None)
                lr = float(self.hil_learning_rate) if self.hil_learning_rate is not None \
                    else lr / 10
            config = TrainConfig(
                solver=self.solver, learning_rate=lr, momentum=float(self.momentum),
                beta1=float(self.beta_1), beta2=float(self.beta_2), eps=float(self.epsilon),
                nesterov=bool(self.nesterovs_momentum), batch_size=self._batch(len(Xt)),
                train_samples=int(self.train_samples), alpha=float(self.alpha),
                shuffle=bool(self.shuffle), early_stopping=self.early_stopping and not incremental,
                loss_stopping=not incremental, n_iter_no_change=int(self.n_iter_no_change),
                tol=float(self.tol))
            trainer = Trainer(
                [X.shape[1], *hidden, n_classes] if state is None else state["network"],
                backend=train_backend, surrogate=surrogate, config=config,
                mapping=self.mapping_,
                hidden_bias=(i50n - self.mapping_.offset) / self.mapping_.unit,
                device_map=self.device_map_, validation=validation,
                eval_fn=lambda net, Xv, mode=mode: self._proba(net, Xv, progress=False,
                                                               target=_VALIDATE_ON[mode]),
                callbacks=tuple(self.callbacks or ()),
                checkpoint=self.checkpoint, checkpoint_every=self.checkpoint_every,
                extra_meta={"seeds": [int(v) for v in self._seeds],
                            "params": self._checkpoint_params(), "stage": k},
                verbose=bool(self.verbose), progress=self._show_progress() and mode == "hil",
                random_state=int(self._seeds[3]) + epoch0,
                optimizer=None if state is None else state["optimizer"], epoch=epoch0,
                history=None if state is None else state["history"], n_threads=self.n_threads)
            if resume is not None:
                # Finish the interrupted run (its own end epoch), bit-exactly.
                trainer.load_state_dict(resume)
                result = trainer.fit(Xt, yt)
            else:
                result = trainer.fit(Xt, yt, int(epochs))
            resume = None
            if mode == "hil" and self._user_backend is None:
                emulated_pulses += train_backend.pulse_counts
            optimizer = trainer.optimizer
            state = {"network": trainer.network, "optimizer": optimizer,
                     "epoch": trainer.epoch, "history": trainer.history}
            self.best_loss_ = result.best_loss
            if result.stopped_early and not incremental:
                break
        self._network = result.network
        self._train_state = state
        self.coefs_ = result.network.coefs
        self.intercepts_ = result.network.intercepts
        self.n_iter_ = result.n_iter
        self.t_ = int(getattr(optimizer, "t", 0))
        self.loss_curve_ = list(result.history["loss"])
        if self.early_stopping:
            self.validation_scores_ = list(result.history["val_accuracy"])
        self.n_layers_ = len(hidden) + 2
        self.n_outputs_ = n_classes
        self.n_hidden_ = tuple(hidden)
        # Pulses sent to the physical devices: counted by a user backend itself
        # (training and validation), else the emulated HIL training pulses.
        self.pulses_ = self._device_counts() - counts0 + emulated_pulses
        return self

    def _batch(self, n):
        """Minibatch rows: ``batch_size``, or as MLPClassifier ``min(200, n)`` for "auto"."""
        b = 200 if isinstance(self.batch_size, str) else int(self.batch_size)
        return int(min(b, n))

    def _stages(self, incremental):
        """[(mode, epochs)]: what this (partial_)fit call trains, in order."""
        if incremental:
            return [(self.training, 1)]
        if self.pretrain is not None and self.training == "hil":
            return [("hardware-aware", self.max_iter),
                    ("hil", self.hil_epochs if self.hil_epochs is not None else self.max_iter)]
        if self.training == "hil" and self.hil_epochs is not None:
            return [("hil", self.hil_epochs)]
        return [(self.training, self.max_iter)]

    def _check_mode(self):
        """Errors a fit would hit later, raised before any pulse is sent."""
        if self.pretrain is not None and self.training != "hil":
            raise ValueError("pretrain= applies to training='hil' only")
        needs_curves = self.training == "hardware-aware" or self.pretrain is not None
        if needs_curves and self._known_curves() is None:
            raise ValueError(f"{'pretrain' if self.pretrain else 'training'}='hardware-aware' "
                             "needs device curves: pass calibration= (e.g. "
                             "sotcore.calibrate_backend(backend, ...).population)")
        if self.training == "hil" and self.surrogate == "calibrated" and self._calib_ is None:
            raise ValueError("surrogate='calibrated' needs calibration= (a DevicePopulation "
                             "measured from the devices, e.g. sotcore.calibrate_backend)")

    def _device_counts(self):
        b = self._user_backend
        if b is not None and hasattr(b, "pulse_counts"):
            return np.array(b.pulse_counts, dtype=np.int64, copy=True)
        return np.zeros(self.device_map_.n_devices, np.int64)

    def _training_setup(self, mode, epoch=0):
        """(forward backend, surrogate) for a training mode, from epoch ``epoch`` on."""
        i50n, sn = self._nominal
        # A fresh device stream per (partial_)fit call, reproducible from random_state.
        seed = int(self._seeds[1]) + int(epoch)
        index = self.device_map_.index
        if mode in ("software", "ex-situ"):
            return (EmulatedBackend(self._nominal_pop, seed, self.n_threads),
                    make_surrogate("nominal", self.mapping_, i50n, sn))
        if mode == "hardware-aware":
            curves = self._known_curves()
            return (EmulatedBackend(curves, seed, self.n_threads),
                    make_surrogate("calibrated", self.mapping_, i50n, sn, curves[index]))
        backend = self._device_backend(seed)
        curves = self._calib_[index] if self.surrogate == "calibrated" else None
        return backend, make_surrogate(self.surrogate, self.mapping_, i50n, sn, curves)

    def _device_backend(self, seed):
        return self._user_backend or EmulatedBackend(self.devices_, seed, self.n_threads)

    # -- cost -----------------------------------------------------------------------------
    def estimate_cost(self, X, n_score=None):
        """Pulses per physical device and hardware time of ``fit(X, ...)`` and of a
        ``score`` on ``n_score`` rows (default ``len(X)``), before any pulse is sent.

        Counts what this estimator's parameters make ``fit`` send to the devices:
        HIL epochs x rows x ``train_samples`` per neuron, plus -- with early
        stopping -- the validation passes (``n_samples`` per row per epoch, an
        upper bound when training stops early).  Modes that never pulse the
        devices during fit (software, ex-situ, hardware-aware) cost 0.  With
        ``loss``-based stopping a run may end earlier: the figure is the most
        it will cost.  Hardware time uses the backend's ``request_time`` model
        (:class:`~sotcore.InstrumentBackend`), None where the backend has none.
        """
        self._validate_params()
        n = int(np.shape(X)[0])
        n_score = n if n_score is None else int(n_score)
        hidden = self._hidden_sizes()
        # Resolve devices, map and mapping on a clone (it keeps a backend object):
        # this estimator's fitted state stays as it is, and nothing is pulsed.
        probe = clone(self)
        probe._seeds = np.zeros(4, np.int64)
        probe._setup(sum(hidden))
        dmap, backend = probe.device_map_, probe._user_backend
        stages = probe._stages(False)
        n_train, n_val = n, 0
        if self.early_stopping:
            n_val = int(np.ceil(n * self.validation_fraction))
            n_train = n - n_val
        hil_ep = sum(e for m, e in stages if m == "hil")
        val_ep = hil_ep            # validation pulses the devices in HIL stages only
        per_neuron_fit = hil_ep * n_train * self.train_samples + val_ep * n_val * self.n_samples
        per_neuron_score = 0 if self.training == "software" else n_score * self.n_samples
        batch = self._batch(max(n_train, 1))
        accepts = getattr(backend, "accepts_repeated_devices", False)
        timed = backend is not None and hasattr(backend, "request_time")
        max_batch = int(getattr(backend, "max_batch", 0) or 0)

        def cost_of(row_counts):
            """(instrument calls, hardware seconds) of pulsing every layer for each
            entry of ``row_counts`` (rows per network-level request)."""
            calls, secs = 0, 0.0
            for sl in layer_slices(hidden):
                plan = dmap.plan(sl)
                groups = [(1, sl.stop - sl.start)] if plan.distinct or accepts else \
                    [(g.shape[0], d.size) for g, d in plan.groups]
                for q, m in groups:
                    for r in row_counts:
                        calls += -(-(r * q) // max_batch) if max_batch else 1
                        if timed:
                            secs += backend.request_time(r * q, m)
            return calls, (secs if timed else None)

        def blocks(n_rows, size):
            return [size] * (n_rows // size) + ([n_rows % size] if n_rows % size else [])
        T, Ts = int(self.n_samples), int(self.train_samples)
        fit_rows = [r * Ts for r in blocks(n_train, batch)] * hil_ep
        pb = max(1, 2 ** 19 // (T * max(hidden)))        # predict's block (network.py)
        if n_val:
            fit_rows += [r * T for r in blocks(n_val, pb)] * val_ep
        score_rows = [] if self.training == "software" else \
            [r * T for r in blocks(n_score, pb)]
        fit_req, fit_time = cost_of(fit_rows)
        sc_req, sc_time = cost_of(score_rows)
        return CostEstimate(
            fit_pulses=dmap.pulses_per_device(per_neuron_fit),
            score_pulses=dmap.pulses_per_device(per_neuron_score),
            fit_requests=int(fit_req), score_requests=int(sc_req),
            fit_hardware_time=fit_time, score_hardware_time=sc_time, hil_epochs=int(hil_ep),
            n_devices=dmap.n_devices, n_score=n_score)

    # -- predict --------------------------------------------------------------------------
    def _eval_backend(self, target):
        seed = int(self._seeds[1]) ^ EVAL_SALT
        if target == "nominal":
            return EmulatedBackend(self._nominal_pop, seed, self.n_threads)
        if target == "curves":
            return EmulatedBackend(self._known_curves(), seed, self.n_threads)
        if self._user_backend is not None:
            return self._user_backend
        return EmulatedBackend(self.devices_, seed, self.n_threads)

    def _proba(self, network, X, progress=None, target=None):
        """Probabilities on ``target`` ("nominal", "curves", "devices"; default: what
        this model predicts on, fixed at fit time)."""
        target = self._eval_on if target is None else target
        # Inference noise keyed by each input's content (and the model's seed):
        # a row's prediction never depends on the rest of the batch.
        keys = _RowKeys(int(self._seeds[1]) % 2**32, X.shape[1])
        show = self._show_progress() if progress is None else progress
        # Backend faults arrive as BackendError (DeviceMap's request plan wraps them).
        return network.predict_proba(X, self._eval_backend(target), self.n_samples,
                                     n_threads=self.n_threads, row_keys=keys,
                                     progress=show and target == "devices")

    def predict_proba(self, X):
        """Class probabilities: the softmax averaged over ``n_samples`` stochastic passes."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float32)
        proba = self._proba(self._network, X)
        if len(self.classes_) == 1:
            return np.ones((X.shape[0], 1))
        return proba

    def predict(self, X):
        """Most probable class per row."""
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = self._user_backend is not None if hasattr(
            self, "_user_backend") else False
        return tags

    # -- persistence ----------------------------------------------------------------------
    def _finish_load(self, devices, backend):
        """Fitted device attributes of a loaded model (its network is ``_network``)."""
        hidden = self._hidden_sizes()
        n_needed = sum(hidden)
        if backend is not None:
            n_phys = int(backend.n_devices)
        elif devices is not None:
            n_phys = len(devices)
        else:
            n_phys = n_needed
        self.devices_, self._user_backend, self._calib_ = devices, backend, None
        self.device_map_ = DeviceMap.resolve(self.device_map, n_needed, n_phys)
        self._network.device_map = self.device_map_
        self.nominal_device_ = tuple(self._nominal)
        self._nominal_pop = DevicePopulation(np.full(n_phys, self._nominal[0]),
                                             np.full(n_phys, self._nominal[1]),
                                             meta={"nominal": True})
        self._eval_on = "nominal" if self.training == "software" else "devices"
        self.n_hidden_ = tuple(hidden)

    #: Parameters not saved: objects (devices are saved as their population,
    #: callbacks are code) and file-system paths (a model never names a path
    #: that a later run writes to).
    _UNSAVED_PARAMS = ("devices", "calibration", "callbacks", "checkpoint")
    #: ASSUMPTION: no trained weight exceeds this magnitude (trained values are
    #: < 1e3); larger ones overflow float32 pre-activations, so refuse them.
    _MAX_ABS_WEIGHT = 1e6
    #: Largest layer (neurons or features) a model file may declare.
    _MAX_LAYER = 1 << 24
    #: Most inference samples a model file may ask for (each costs a full pass).
    _MAX_FILE_SAMPLES = 1 << 16

    @staticmethod
    def _weights_files(path):
        """The two weight slots of model ``path`` (derived from it, never read from a file)."""
        return {"a": path.with_suffix(".npz"), "b": path.with_suffix(".npz").with_name(
            path.with_suffix(".npz").name + ".1")}

    @staticmethod
    def _param_to_json(name, value):
        """A get_params() value as JSON (NumPy scalars/arrays and tuples become lists)."""
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in "biuf" or value.ndim > 2:
                raise ValueError(f"cannot save parameter {name!r}: array of dtype "
                                 f"{value.dtype}, shape {value.shape}")
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, (list, tuple)):
            return [SOTClassifier._param_to_json(name, v) for v in value]
        if isinstance(value, float) and not np.isfinite(value):
            raise ValueError(f"cannot save parameter {name!r}: {value} is not finite")
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise ValueError(f"cannot save parameter {name!r}: a {type(value).__name__} is not "
                         "a JSON value (set it to a number, string, list or None)")

    @staticmethod
    def _meta_checksum(meta):
        body = {k: v for k, v in meta.items() if k != "checksum"}
        return hashlib.sha256(_io.json_bytes(body)).hexdigest()

    def save(self, path):
        """Save a fitted model as ``path`` (JSON) plus a weights file (``.npz``).

        The JSON holds the format version, the sotcore version, the
        parameters, classes, mapping, nominal device, seeds and the device
        population, the weights' SHA-256 and a SHA-256 over all of it.  The
        weights go to one of two slots next to ``path`` (``<stem>.npz`` or
        ``<stem>.npz.1``), the one the current JSON does not use; the JSON is
        then replaced atomically, so a failure at any point leaves the previous
        model loadable.  No pickle: loading never executes code from the files.
        Parameters that are paths or objects (``devices`` is saved as its
        population; ``calibration``, ``callbacks``, ``checkpoint``) are not
        saved; the loaded model has them at None.
        """
        from . import __version__
        check_is_fitted(self)
        path = Path(path)
        slots = self._weights_files(path)
        if path.suffix == ".npz" or path.name.endswith(".npz.1"):
            raise InvalidInputError(f"{path}: a model path must not end in .npz (its weights "
                                    "file is named after it); use e.g. model.json")
        arrays = {f"coef_{i}": np.ascontiguousarray(c, np.float32)
                  for i, c in enumerate(self.coefs_)}
        arrays.update({f"intercept_{i}": np.ascontiguousarray(b, np.float32)
                       for i, b in enumerate(self.intercepts_)})
        blob = _io.npz_bytes(arrays)
        rs = self.random_state
        saved = {k: v for k, v in self.get_params().items() if k not in self._UNSAVED_PARAMS}
        params = {k: (None if k == "random_state" and not isinstance(rs, numbers.Integral)
                      else self._param_to_json(k, v))     # RandomState objects: not JSON
                  for k, v in saved.items()}
        h = self.hidden_layer_sizes
        params["hidden_layer_sizes"] = int(h) if isinstance(h, numbers.Integral) \
            else self._hidden_sizes()
        # JSON has no tuples: the names of the tuple-valued parameters come back as tuples.
        tuples = sorted(k for k, v in saved.items() if isinstance(v, tuple))
        best_loss = float(getattr(self, "best_loss_", np.nan))
        classes = self.classes_
        current = None
        try:       # the slot the existing (valid) model uses must not be overwritten
            old = _io.read_json(path, fmt=MODEL_FORMAT, what="model file")
            current = old.get("weights", {}).get("slot")
        except (ValueError, OSError, AttributeError):
            pass
        if not isinstance(current, str):
            current = None
        slot = "b" if current == "a" else "a"
        meta = {
            "format": MODEL_FORMAT, "version": MODEL_VERSION, "sotcore_version": __version__,
            "params": params,
            "classes": classes.tolist(), "classes_dtype": classes.dtype.str,
            "n_features_in": int(self.n_features_in_), "n_iter": int(self.n_iter_),
            "loss_curve": [float(v) for v in self.loss_curve_],
            "mapping": {"unit": float(self.mapping_.unit), "offset": float(self.mapping_.offset)},
            "nominal": [float(v) for v in self._nominal], "seeds": [int(v) for v in self._seeds],
            "devices": None if self.devices_ is None else self.devices_.to_dict(),
            "weights": {"slot": slot, "sha256": hashlib.sha256(blob).hexdigest(),
                        "n_layers": len(self.coefs_)},
            "tuples": tuples, "t": int(getattr(self, "t_", 0)),
            "best_loss": best_loss if np.isfinite(best_loss) else None,
        }
        meta["checksum"] = self._meta_checksum(meta)
        text = _io.json_bytes(meta)
        _io.atomic_write(slots[slot], blob)
        try:
            _io.atomic_write(path, text)
        except BaseException:
            slots[slot].unlink(missing_ok=True)     # unreferenced: the old pair is intact
            raise
        if current in slots and current != slot:
            slots[current].unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path, backend=None):
        """Load a model written by :meth:`save`.

        Every field is checked (types, ranges, the checksum over the JSON, the
        weights' checksum, shapes, finite and bounded weights, the parameters
        through the estimator's own validation), and the model must predict:
        otherwise ``InvalidInputError`` names the file and the field.

        ``backend``: the device backend to predict with, for a model trained on
        a backend (instrument) whose devices the file cannot hold.
        """
        from .network import StochasticMLP
        path = Path(path)
        meta = _io.read_json(path, fmt=MODEL_FORMAT, version=MODEL_VERSION, what="model file")

        def bad(msg):
            return InvalidInputError(f"{path}: {msg}")
        if meta["version"] < 2:
            raise bad("model format version 1 (written before checksums): re-save the model "
                      "with this sotcore")
        expected_fields = {"format", "version", "sotcore_version", "params", "classes",
                           "classes_dtype", "n_features_in", "n_iter", "loss_curve", "mapping",
                           "nominal", "seeds", "devices", "weights", "checksum"}
        missing = sorted(expected_fields - set(meta))
        if missing:
            raise bad(f"model file is missing field(s) {', '.join(missing)}")
        # Added in 0.1 without a format change: files written before lack them.
        optional_fields = {"tuples", "t", "best_loss"}
        extra = sorted(set(meta) - expected_fields - optional_fields)
        if extra:
            raise bad(f"model file has unknown field(s) {', '.join(extra)[:200]}")
        if meta["checksum"] != cls._meta_checksum(meta):
            raise bad("model file checksum differs (the JSON was edited or corrupted)")
        ci, cf = _io.check_int, _io.check_float
        # -- parameters, through the estimator's own validation
        params = meta["params"]
        if not isinstance(params, dict):
            raise bad("field 'params' must be an object")
        unknown = sorted(set(params) - set(cls._get_param_names()))
        if unknown or set(params) & set(cls._UNSAVED_PARAMS):
            raise bad(f"field 'params' has unknown or unsaved parameter(s) "
                      f"{', '.join(unknown or sorted(set(params) & set(cls._UNSAVED_PARAMS)))}")
        tuples = meta.get("tuples", [])
        if not isinstance(tuples, list) or not all(
                isinstance(k, str) and isinstance(params.get(k), list) for k in tuples):
            raise bad("field 'tuples' must list parameters whose values are lists")
        params = {k: (tuple(v) if k in tuples else v) for k, v in params.items()}
        est = cls(**params)
        try:
            est._validate_params()
            for k, v in params.items():   # sklearn's Integral intervals let True through
                allowed = [c for c in cls._parameter_constraints.get(k, ())
                           if c in ("boolean", "verbose", bool)]
                if isinstance(v, bool) and not allowed:
                    raise ValueError(f"parameter {k!r} must not be a boolean, got {v}")
            hidden = est._hidden_sizes()
            if est.nominal_device is not None:
                nd = np.asarray(est.nominal_device, dtype=float)
                if nd.shape != (2,) or not (np.isfinite(nd).all() and (nd > 0).all()):
                    raise ValueError("nominal_device must be (i50, scale), both > 0")
        except (ValueError, TypeError) as exc:
            raise bad(f"field 'params': {exc}") from None
        if est.n_samples > cls._MAX_FILE_SAMPLES:
            raise bad(f"field 'params.n_samples' is {est.n_samples} (a model file may ask for "
                      f"at most {cls._MAX_FILE_SAMPLES} samples per prediction)")
        # -- fitted state
        n_features = ci(meta["n_features_in"], path, "n_features_in", 1, cls._MAX_LAYER)
        if any(h > cls._MAX_LAYER for h in hidden):
            raise bad(f"field 'params.hidden_layer_sizes': a layer exceeds {cls._MAX_LAYER}")
        classes_dtype = meta["classes_dtype"]
        if not isinstance(classes_dtype, str) or len(classes_dtype) > 12:
            raise bad("field 'classes_dtype' must be a short NumPy dtype string")
        try:
            cdt = np.dtype(classes_dtype)
        except TypeError:
            raise bad(f"field 'classes_dtype' is not a dtype: {classes_dtype!r}") from None
        if cdt.kind not in "biufU" or cdt.itemsize > 4096:
            raise bad(f"field 'classes_dtype': {classes_dtype!r} is not a label dtype")
        raw_classes = meta["classes"]
        if not isinstance(raw_classes, list) or not raw_classes \
                or len(raw_classes) > cls._MAX_LAYER:
            raise bad("field 'classes' must be a non-empty list")
        if not all(isinstance(c, (str, int, float)) for c in raw_classes):
            raise bad("field 'classes' must hold numbers or strings")
        try:
            classes = np.asarray(raw_classes, dtype=cdt)
        except (TypeError, ValueError, OverflowError):
            raise bad(f"field 'classes' does not fit dtype {classes_dtype!r}") from None
        if classes.ndim != 1 or classes.tolist() != raw_classes:
            raise bad(f"field 'classes' does not round-trip through dtype {classes_dtype!r}")
        if len(np.unique(classes)) != len(classes) or not (classes[1:] > classes[:-1]).all():
            raise bad("field 'classes' must be sorted and free of duplicates")
        n_iter = ci(meta["n_iter"], path, "n_iter", 0, 10**9)
        curve = meta["loss_curve"]
        if not isinstance(curve, list):
            raise bad("field 'loss_curve' must be a list")
        curve = [cf(v, path, "loss_curve") for v in curve]
        m = meta["mapping"]
        if not isinstance(m, dict) or set(m) != {"unit", "offset"}:
            raise bad("field 'mapping' must be {unit, offset}")
        mapping = CurrentMapping(unit=cf(m["unit"], path, "mapping.unit", 0, low_open=True),
                                 offset=cf(m["offset"], path, "mapping.offset"))
        nominal = meta["nominal"]
        if not isinstance(nominal, list) or len(nominal) != 2:
            raise bad("field 'nominal' must be [i50, scale]")
        nominal = tuple(cf(v, path, "nominal", 0, low_open=True) for v in nominal)
        seeds = meta["seeds"]
        if not isinstance(seeds, list) or len(seeds) != 4:
            raise bad("field 'seeds' must be a list of 4 integers")
        seeds = np.asarray([ci(v, path, "seeds", 0, 2**63 - 1) for v in seeds], np.int64)
        devices = None
        if meta["devices"] is not None:
            devices = DevicePopulation.from_dict(meta["devices"], source=f"{path}: field "
                                                 "'devices'")
        if backend is None and devices is None:
            raise bad("the model was trained on a device backend; pass backend= to load it")
        # -- weights: the layer sizes fix every shape before anything is read
        sizes = [n_features, *hidden, max(len(classes), 2)]
        L = len(sizes) - 1
        if 4 * sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:])) > _io.MAX_ARRAY_BYTES:
            raise bad(f"layer sizes {sizes} exceed the weights limit of {_io.MAX_ARRAY_BYTES} "
                      "bytes")
        w = meta["weights"]
        if not isinstance(w, dict) or set(w) != {"slot", "sha256", "n_layers"}:
            raise bad("field 'weights' must be {slot, sha256, n_layers}")
        slots = cls._weights_files(path)
        if not isinstance(w["slot"], str) or w["slot"] not in slots:
            raise bad("field 'weights.slot' must be 'a' or 'b'")
        if ci(w["n_layers"], path, "weights.n_layers", 1, 1000) != L:
            raise bad(f"field 'weights.n_layers' is {w['n_layers']} but the layer sizes "
                      f"{sizes} have {L} layers")
        digest = w["sha256"]
        if not isinstance(digest, str) or len(digest) != 64:
            raise bad("field 'weights.sha256' must be a SHA-256 hex digest")
        npz = slots[w["slot"]]
        shapes = {f"coef_{k}": (sizes[k], sizes[k + 1]) for k in range(L)}
        shapes.update({f"intercept_{k}": (sizes[k + 1],) for k in range(L)})

        def expect(name, shape, dtype):
            if name not in shapes or shape != shapes[name] or dtype != np.float32:
                raise InvalidInputError(
                    f"{npz}: array {name!r} has shape {shape} and dtype {dtype}; this model "
                    f"expects {shapes.get(name, 'no such array')} float32")
        blob = _io.read_bytes(npz, max_bytes=_io.MAX_ARRAY_BYTES + (1 << 20),
                              what=f"weights file of {path.name}")
        if hashlib.sha256(blob).hexdigest() != digest:
            raise InvalidInputError(f"{npz}: weights do not match {path.name} (checksum "
                                    "differs; edited, truncated or from another model)")
        arrays = _io.read_npz(blob, expected=expect, required=shapes, what=str(npz))
        coefs = [arrays[f"coef_{k}"] for k in range(L)]
        inter = [arrays[f"intercept_{k}"] for k in range(L)]
        for k, a in enumerate(coefs + inter):
            if not np.isfinite(a).all() or np.abs(a).max(initial=0) > cls._MAX_ABS_WEIGHT:
                raise InvalidInputError(f"{npz}: layer {k % L} weights are not finite or "
                                        f"exceed {cls._MAX_ABS_WEIGHT:g} in magnitude")
        net = StochasticMLP(sizes, mapping)
        net.coefs, net.intercepts = coefs, inter
        if backend is not None:
            est.set_params(devices=backend)
        elif devices is not None:
            est.set_params(devices=devices)
        est.classes_ = classes
        est.n_features_in_ = n_features
        est.n_iter_ = n_iter
        est.loss_curve_ = curve
        est.t_ = ci(meta.get("t", 0), path, "t", 0, 10**15)
        if meta.get("best_loss") is not None:
            est.best_loss_ = cf(meta["best_loss"], path, "best_loss")
        est.mapping_ = mapping
        est._nominal = nominal
        est._seeds = seeds
        est._network = net
        est.coefs_, est.intercepts_ = net.coefs, net.intercepts
        est.n_layers_ = L + 1
        est.n_outputs_ = sizes[-1]
        try:
            est._finish_load(devices, backend)
        except (ValueError, TypeError) as exc:      # e.g. an edited device_map
            raise bad(f"inconsistent devices: {exc}") from None
        est._label_encoder = LabelEncoder().fit(classes)
        if backend is None:
            # Nothing loads that cannot predict: one probe row through the real path.
            # One sample is enough to exercise every layer and device.
            est.n_samples, n_samples = 1, est.n_samples
            try:
                probe = est.predict_proba(np.zeros((1, n_features), np.float32))
            except Exception as exc:     # noqa: BLE001 -- any failure means a bad file
                raise bad(f"the model cannot predict ({type(exc).__name__}: {exc}); its "
                          "fields are inconsistent") from None
            finally:
                est.n_samples = n_samples
            if not np.isfinite(probe).all():
                raise bad("the model predicts non-finite probabilities")
        return est
