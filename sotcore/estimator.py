"""SOTClassifier: a scikit-learn classifier whose hidden neurons are SOT devices."""
import hashlib
import json
import numbers
import os
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelEncoder
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from . import _io, _kernels
from ._utils import seed_from_random_state
from .backends import EmulatedBackend
from .devices import DevicePopulation
from .exceptions import InvalidInputError
from .network import CurrentMapping
from .training import MODES, SURROGATES, make_surrogate, nominal_curve, train_network

__all__ = ["SOTClassifier"]

MODEL_FORMAT = "sotcore.model"
MODEL_VERSION = 2

#: Width (um) of the devices drawn when ``devices=None``: ideal copies of the
#: default model's nominal device at this width (an ASSUMPTION, see devices.py).
DEFAULT_WIDTH_UM = 20.0


def _is_backend(obj):
    return hasattr(obj, "pulse") and hasattr(obj, "n_devices")


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


class SOTClassifier(ClassifierMixin, BaseEstimator):
    """Multilayer classifier of stochastic SOT-device neurons.

    Parameters
    ----------
    hidden_layer_sizes : tuple of int, default (500,)
        Hidden neurons per layer; each is one device.
    devices : DevicePopulation, float, device backend or None, default None
        The hidden neurons' devices.  A population (its first
        ``sum(hidden_layer_sizes)`` devices are used); a width in micrometres
        (a population is drawn from the default model with ``variability``);
        a device backend (e.g. :class:`~sotcore.InstrumentBackend`) used for
        the forward passes of ``hil`` training and for prediction; or None for
        ideal copies of the nominal 20 um device.
    training : {"hil", "software", "ex-situ", "hardware-aware"}, default "hil"
        See :mod:`sotcore.training`.
    surrogate : {"nominal", "calibrated", "straight-through"}, default "nominal"
        Backward surrogate for ``hil``.  ``calibrated`` needs ``calibration``.
    calibration : DevicePopulation or None
        Measured device curves for the ``calibrated`` surrogate.
    n_samples : int, default 32
        Stochastic samples T averaged at prediction.
    train_samples : int, default 1
        Samples per input in each training step.
    variability : float, default 0.10
        Device-to-device spread when ``devices`` is a width.
    hidden_layer_sizes, max_iter, batch_size, learning_rate_init, alpha, solver,
    momentum, early_stopping, validation_fraction, n_iter_no_change, tol,
    random_state, verbose
        As in scikit-learn's MLPClassifier (``max_iter`` counts epochs).
    mapping_unit : float or None
        Amperes per network unit; default the nominal device's sigmoid scale.
    nominal_device : tuple (i50, scale) in amperes, or None
        The nominal device the software model, the hidden-bias start and the
        nominal surrogate use.  Default: derived from the devices (see
        :func:`sotcore.training.nominal_curve`); required for a backend that
        does not describe its devices.
    n_threads : int or None
        Threads of the compiled kernels (results do not depend on it).
    checkpoint : path or None
        Write training checkpoints here (atomically, every epoch, every
        ``checkpoint_every`` batches, and before raising
        :class:`~sotcore.training.TrainingInterrupted` when a step fails).
        ``fit(X, y, resume_from=checkpoint)`` continues such a run exactly.
    checkpoint_every : int or None
        Also checkpoint every this many batches.
    callbacks : list of callables or None
        ``cb(epoch, info, network) -> bool`` after every epoch (``info``: loss,
        accuracies, seconds); returning True stops training.  E.g. periodic
        device recalibration, logging, custom stopping rules.

    Attributes
    ----------
    coefs_, intercepts_ : lists of ndarray
    classes_ : ndarray
    n_iter_ : int
    loss_curve_ : list of float
    validation_scores_ : list of float (with early_stopping)
    devices_ : DevicePopulation or None
        The population the hidden neurons were evaluated on (None for a
        backend that does not describe its devices).
    mapping_ : CurrentMapping
    """

    _parameter_constraints = {
        "hidden_layer_sizes": ["array-like", Interval(numbers.Integral, 1, None, closed="left")],
        # population, width or backend: checked in _resolve_devices
        "devices": "no_validation",
        "training": [StrOptions(set(MODES))],
        "surrogate": [StrOptions(set(SURROGATES))],
        "calibration": [DevicePopulation, None],
        "n_samples": [Interval(numbers.Integral, 1, None, closed="left")],
        "train_samples": [Interval(numbers.Integral, 1, None, closed="left")],
        "variability": [Interval(numbers.Real, 0, 5, closed="both")],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "learning_rate_init": [Interval(numbers.Real, 0, None, closed="neither")],
        "alpha": [Interval(numbers.Real, 0, None, closed="left")],
        "solver": [StrOptions({"adam", "sgd"})],
        "momentum": [Interval(numbers.Real, 0, 1, closed="both")],
        "early_stopping": ["boolean"],
        "validation_fraction": [Interval(numbers.Real, 0, 1, closed="neither")],
        "n_iter_no_change": [Interval(numbers.Integral, 1, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "mapping_unit": [Interval(numbers.Real, 0, None, closed="neither"), None],
        "nominal_device": ["array-like", None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "n_threads": [Interval(numbers.Integral, 1, None, closed="left"),
                      Interval(numbers.Integral, None, -1, closed="right"), None],
        "checkpoint": [str, os.PathLike, None],
        "checkpoint_every": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "callbacks": [list, tuple, None],
    }

    def __init__(self, hidden_layer_sizes=(500,), devices=None, training="hil",
                 surrogate="nominal", calibration=None, n_samples=32, train_samples=1,
                 variability=0.10, max_iter=30, batch_size=100, learning_rate_init=3e-3,
                 alpha=1e-4, solver="adam", momentum=0.9, early_stopping=False,
                 validation_fraction=0.1, n_iter_no_change=10, tol=1e-4, mapping_unit=None,
                 nominal_device=None, random_state=None, verbose=False, n_threads=None,
                 checkpoint=None, checkpoint_every=None, callbacks=None):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.devices = devices
        self.training = training
        self.surrogate = surrogate
        self.calibration = calibration
        self.n_samples = n_samples
        self.train_samples = train_samples
        self.variability = variability
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.learning_rate_init = learning_rate_init
        self.alpha = alpha
        self.solver = solver
        self.momentum = momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol
        self.mapping_unit = mapping_unit
        self.nominal_device = nominal_device
        self.random_state = random_state
        self.verbose = verbose
        self.n_threads = n_threads
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every
        self.callbacks = callbacks

    # -- set-up -------------------------------------------------------------------------
    def _hidden_sizes(self):
        h = self.hidden_layer_sizes
        sizes = [h] if isinstance(h, numbers.Integral) else list(h)
        if not sizes or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1
                            for s in sizes):
            raise ValueError(f"hidden_layer_sizes must be positive integers, got {h!r}")
        return [int(s) for s in sizes]

    def _resolve_devices(self, n_needed, seed):
        """Return (population or None, user backend or None)."""
        d = self.devices
        if d is None:
            pop = DevicePopulation.from_width(DEFAULT_WIDTH_UM, n_needed, variability=0.0,
                                              random_state=0)
            return pop, None
        if isinstance(d, DevicePopulation):
            if len(d) < n_needed:
                raise ValueError(f"devices has {len(d)} devices but hidden_layer_sizes needs "
                                 f"{n_needed}")
            return (d if len(d) == n_needed else d[:n_needed]), None
        if isinstance(d, numbers.Real) and not isinstance(d, bool):
            return DevicePopulation.from_width(float(d), n_needed, variability=self.variability,
                                               random_state=seed), None
        if _is_backend(d):
            if d.n_devices < n_needed:
                raise ValueError(f"the backend has {d.n_devices} devices but "
                                 f"hidden_layer_sizes needs {n_needed}")
            curves = d.device_curves() if hasattr(d, "device_curves") else None
            if curves is not None and len(curves) > n_needed:
                curves = curves[:n_needed]
            return curves, d
        raise TypeError("devices must be a DevicePopulation, a width in micrometres, a device "
                        f"backend or None; got {type(d).__name__}")

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
        return self._fit(X, y, incremental=False, resume=resume)

    def _checkpoint_params(self):
        keep = ("hidden_layer_sizes", "training", "surrogate", "n_samples", "train_samples",
                "variability", "max_iter", "batch_size", "learning_rate_init", "alpha", "solver",
                "momentum", "early_stopping", "validation_fraction", "n_iter_no_change", "tol",
                "mapping_unit")
        p = self.get_params()
        return json.loads(json.dumps({k: (list(p[k]) if isinstance(p[k], tuple) else p[k])
                                      for k in keep}))

    def partial_fit(self, X, y, classes=None):
        """One more epoch on (X, y) (``classes`` required on the first call)."""
        if not hasattr(self, "coefs_"):
            self._validate_params()
            if classes is None:
                raise ValueError("classes must be passed on the first call to partial_fit")
            self._partial_classes = np.asarray(classes)
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
        n_needed = sum(hidden)
        if self.training in ("ex-situ", "hardware-aware") and _is_backend(self.devices) \
                and self.devices.device_curves() is None:
            raise ValueError(f"training={self.training!r} needs known device curves; this "
                             "backend does not describe its devices")
        if first:
            self.__dict__.pop("_train_state", None)
            if resume is not None:
                self._seeds = np.asarray(resume["meta"]["extra"]["seeds"], dtype=np.int64)
            else:
                seed = seed_from_random_state(self.random_state)
                self._seeds = np.random.default_rng(seed).integers(0, 2**63, size=4)
            pop, user_backend = self._resolve_devices(n_needed, int(self._seeds[0]))
            self.devices_ = pop
            self._user_backend = user_backend
            if self.nominal_device is not None:
                nd = np.asarray(self.nominal_device, dtype=float)
                if nd.shape != (2,) or not np.all(np.isfinite(nd)) or not np.all(nd > 0):
                    raise ValueError("nominal_device must be (i50, scale) in amperes, both > 0; "
                                     f"got {self.nominal_device!r}")
                i50n, sn = float(nd[0]), float(nd[1])
            elif pop is not None:
                i50n, sn = nominal_curve(pop)
            else:
                raise ValueError("this backend does not describe its devices: pass "
                                 "nominal_device=(i50, scale) in amperes")
            unit = float(self.mapping_unit) if self.mapping_unit is not None else sn
            self.mapping_ = CurrentMapping(unit=unit)
            self._nominal = (i50n, sn)
            self._nominal_pop = DevicePopulation(np.full(n_needed, i50n), np.full(n_needed, sn),
                                                 meta={"nominal": True})
        i50n, sn = self._nominal
        train_backend, surrogate = self._training_setup()
        validation, Xt, yt = None, X, y_enc
        if self.early_stopping and not incremental:
            stratify = y_enc if np.bincount(y_enc).min() >= 2 else None
            Xt, Xv, yt, yv = train_test_split(X, y_enc, test_size=self.validation_fraction,
                                              random_state=int(self._seeds[2]) % 2**32,
                                              stratify=stratify)
            validation = (Xv, yv)
        state = getattr(self, "_train_state", None) if not first else None
        rng_seed = int(self._seeds[3]) + (0 if state is None else state["epoch"])
        result, optimizer = train_network(
            Xt, yt, n_classes, hidden_layer_sizes=hidden, backend=train_backend,
            surrogate=surrogate, mapping=self.mapping_, hidden_bias=i50n / self.mapping_.unit,
            train_samples=self.train_samples, max_iter=1 if incremental else self.max_iter,
            batch_size=min(self.batch_size, len(Xt)), learning_rate=self.learning_rate_init,
            alpha=self.alpha, solver=self.solver, momentum=self.momentum,
            validation=validation, early_stopping=self.early_stopping,
            n_iter_no_change=self.n_iter_no_change, tol=self.tol,
            eval_fn=lambda net, Xv: self._proba(net, Xv, evaluation=False),
            random_state=rng_seed, verbose=bool(self.verbose),
            callbacks=tuple(self.callbacks or ()),
            network=None if state is None else state["network"],
            optimizer=None if state is None else state["optimizer"],
            start_epoch=0 if state is None else state["epoch"],
            history=None if state is None else state["history"],
            checkpoint=self.checkpoint, checkpoint_every=self.checkpoint_every, resume=resume,
            extra_meta={"seeds": [int(v) for v in self._seeds],
                        "params": self._checkpoint_params()})
        self._network = result.network
        self._train_state = {"network": result.network, "optimizer": optimizer,
                             "epoch": result.n_iter, "history": result.history}
        self.coefs_ = result.network.coefs
        self.intercepts_ = result.network.intercepts
        self.n_iter_ = result.n_iter
        self.loss_curve_ = list(result.history["loss"])
        if self.early_stopping:
            self.validation_scores_ = list(result.history["val_accuracy"])
        self.n_layers_ = len(hidden) + 2
        self.n_outputs_ = n_classes
        return self

    def _training_setup(self):
        """(forward backend, surrogate) for the chosen training mode."""
        i50n, sn = self._nominal
        # A fresh device stream per (partial_)fit call, reproducible from random_state.
        state = getattr(self, "_train_state", None)
        seed = int(self._seeds[1]) + (state["epoch"] if state else 0)
        mode = self.training
        if mode in ("software", "ex-situ"):
            return (EmulatedBackend(self._nominal_pop, seed, self.n_threads),
                    make_surrogate("nominal", self.mapping_, i50n, sn))
        if mode == "hardware-aware":
            return (EmulatedBackend(self.devices_, seed, self.n_threads),
                    make_surrogate("calibrated", self.mapping_, i50n, sn, self.devices_))
        backend = self._user_backend or EmulatedBackend(self.devices_, seed, self.n_threads)
        curves = None
        if self.surrogate == "calibrated":
            if self.calibration is None:
                raise ValueError("surrogate='calibrated' needs calibration= (a DevicePopulation "
                                 "measured from the devices, e.g. sotcore.calibrate_backend)")
            curves = self.calibration
            if len(curves) < backend.n_devices and len(curves) < sum(self._hidden_sizes()):
                raise ValueError("calibration has fewer devices than the hidden layers")
        return backend, make_surrogate(self.surrogate, self.mapping_, i50n, sn, curves)

    # -- predict --------------------------------------------------------------------------
    def _eval_backend(self, evaluation=True):
        if self.training == "software":
            pop = self._nominal_pop
        elif self._user_backend is not None:
            return self._user_backend
        else:
            pop = self.devices_
        return EmulatedBackend(pop, int(self._seeds[1]) ^ 0x5EED, self.n_threads)

    def _proba(self, network, X, evaluation=True):
        # Inference noise keyed by each input's content (and the model's seed):
        # a row's prediction never depends on the rest of the batch.
        keys = _RowKeys(int(self._seeds[1]) % 2**32, X.shape[1])
        return network.predict_proba(X, self._eval_backend(evaluation), self.n_samples,
                                     n_threads=self.n_threads, row_keys=keys)

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
        params = {k: (None if k == "random_state" and not isinstance(rs, numbers.Integral)
                      else self._param_to_json(k, v))     # RandomState objects: not JSON
                  for k, v in self.get_params().items() if k not in self._UNSAVED_PARAMS}
        params["hidden_layer_sizes"] = self._hidden_sizes()
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
        extra = sorted(set(meta) - expected_fields)
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
        est.mapping_ = mapping
        est._nominal = nominal
        est._seeds = seeds
        est._network = net
        est.coefs_, est.intercepts_ = net.coefs, net.intercepts
        est.devices_ = devices
        est._user_backend = backend
        est.n_layers_ = L + 1
        est.n_outputs_ = sizes[-1]
        n = sum(hidden)
        est._nominal_pop = DevicePopulation(np.full(n, nominal[0]), np.full(n, nominal[1]),
                                            meta={"nominal": True})
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
