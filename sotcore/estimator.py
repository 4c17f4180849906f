"""SOTClassifier: a scikit-learn classifier whose hidden neurons are SOT devices."""
import hashlib
import io
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

from . import _kernels
from ._utils import seed_from_random_state
from .backends import EmulatedBackend
from .devices import DevicePopulation
from .network import CurrentMapping
from .training import MODES, SURROGATES, make_surrogate, nominal_curve, train_network

__all__ = ["SOTClassifier"]

MODEL_FORMAT = "sotcore.model"
MODEL_VERSION = 1

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
    def save(self, path):
        """Save a fitted model as ``path`` (JSON) plus ``path`` with suffix ``.npz``.

        The JSON holds the format version, the sotcore version, the
        parameters, classes, mapping, nominal device, seeds and the device
        population; the ``.npz`` the weights (its SHA-256 is in the JSON).
        No pickle: loading never executes code from the files.
        """
        from . import __version__
        check_is_fitted(self)
        path = Path(path)
        npz_path = path.with_suffix(".npz")
        arrays = {f"coef_{i}": c for i, c in enumerate(self.coefs_)}
        arrays.update({f"intercept_{i}": b for i, b in enumerate(self.intercepts_)})
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        blob = buf.getvalue()
        params = {k: v for k, v in self.get_params().items()
                  if k not in ("devices", "calibration", "random_state", "callbacks",
                               "checkpoint")}
        params["hidden_layer_sizes"] = self._hidden_sizes()
        classes = self.classes_
        meta = {
            "format": MODEL_FORMAT, "version": MODEL_VERSION, "sotcore_version": __version__,
            "params": params,
            "random_state": self.random_state if isinstance(self.random_state, int) else None,
            "classes": classes.tolist(), "classes_dtype": classes.dtype.str,
            "n_features_in": int(self.n_features_in_), "n_iter": int(self.n_iter_),
            "loss_curve": [float(v) for v in self.loss_curve_],
            "mapping": {"unit": self.mapping_.unit, "offset": self.mapping_.offset},
            "nominal": list(self._nominal), "seeds": [int(v) for v in self._seeds],
            "devices": None if self.devices_ is None else self.devices_.to_dict(),
            "weights": {"file": npz_path.name, "sha256": hashlib.sha256(blob).hexdigest(),
                        "n_layers": len(self.coefs_)},
        }
        for target, data in ((npz_path, blob), (path, json.dumps(meta, allow_nan=False).encode())):
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        return path

    @classmethod
    def load(cls, path, backend=None):
        """Load a model written by :meth:`save`.

        ``backend``: the device backend to predict with, for a model trained on
        a backend (instrument) whose devices the file cannot hold.
        """
        from .network import StochasticMLP
        path = Path(path)
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"model file not found: {path}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a sotcore model file (invalid JSON: {exc}); the "
                             "file may be truncated") from None
        if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
            raise ValueError(f"{path}: not a sotcore model file")
        version = meta.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError(f"{path}: missing or invalid format version {version!r}")
        if version > MODEL_VERSION:
            raise ValueError(f"{path}: model format version {version} is newer than this "
                             f"sotcore reads (<= {MODEL_VERSION}); upgrade sotcore")
        try:
            w = meta["weights"]
            npz_path = path.with_name(Path(w["file"]).name)
            blob = npz_path.read_bytes()
            if hashlib.sha256(blob).hexdigest() != w["sha256"]:
                raise ValueError(f"{npz_path}: weights do not match {path.name} (checksum "
                                 "differs; edited, truncated or from another model)")
            with np.load(io.BytesIO(blob), allow_pickle=False) as z:
                coefs = [np.ascontiguousarray(z[f"coef_{i}"], np.float32)
                         for i in range(w["n_layers"])]
                inter = [np.ascontiguousarray(z[f"intercept_{i}"], np.float32)
                         for i in range(w["n_layers"])]
            params = dict(meta["params"])
            devices = (None if meta["devices"] is None else
                       DevicePopulation.from_dict(meta["devices"], source=str(path)))
            est = cls(**params, random_state=meta.get("random_state"))
            est.set_params(devices=backend if backend is not None else devices)
            est.classes_ = np.asarray(meta["classes"], dtype=np.dtype(meta["classes_dtype"]))
            est.n_features_in_ = int(meta["n_features_in"])
            est.n_iter_ = int(meta["n_iter"])
            est.loss_curve_ = list(meta["loss_curve"])
            est.mapping_ = CurrentMapping(**meta["mapping"])
            est._nominal = tuple(float(v) for v in meta["nominal"])
            est._seeds = np.asarray(meta["seeds"], dtype=np.int64)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: its weights file {w.get('file')!r} is missing") \
                from None
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}: model file is missing or has invalid field {exc}") \
                from None
        sizes = [est.n_features_in_, *est._hidden_sizes(), max(len(est.classes_), 2)]
        net = StochasticMLP(sizes, est.mapping_)
        for k, (c, b) in enumerate(zip(coefs, inter)):
            if c.shape != tuple(sizes[k:k + 2]) or b.shape != (sizes[k + 1],) \
                    or not (np.isfinite(c).all() and np.isfinite(b).all()):
                raise ValueError(f"{path}: layer {k} weights have shape {c.shape} (expected "
                                 f"{tuple(sizes[k:k + 2])}) or are not finite")
        net.coefs, net.intercepts = coefs, inter
        est._network = net
        est.coefs_, est.intercepts_ = net.coefs, net.intercepts
        n = sum(est._hidden_sizes())
        est.devices_ = devices
        est._user_backend = backend
        i50n, sn = est._nominal
        est._nominal_pop = DevicePopulation(np.full(n, i50n), np.full(n, sn),
                                            meta={"nominal": True})
        est._label_encoder = LabelEncoder().fit(est.classes_)
        if backend is None and devices is None:
            raise ValueError(f"{path}: the model was trained on a device backend; pass "
                             "backend= to load it")
        return est
