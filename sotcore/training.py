"""The training modes: software, ex-situ, hardware-aware and hardware-in-loop.

One harness serves every mode (same data, devices, seeds); only the forward
backend, the surrogate derivative and the evaluation devices change:

=================  =================================  ===============================  ==================
mode               forward (training)                 backward surrogate               evaluated on
=================  =================================  ===============================  ==================
software           nominal neurons (emulated)         nominal curve                    nominal neurons
ex-situ            nominal neurons (emulated)         nominal curve                    the devices
hardware-aware     the devices' known curves          each device's exact derivative   the devices
hil                bits from the device backend       nominal | calibrated | straight  the devices
=================  =================================  ===============================  ==================

The ``calibrated`` surrogate uses a calibration *measured through the backend*
(pulse sweeps fitted by :func:`sotcore.calibrate`), never the emulator's
hidden ground truth.

:class:`Trainer` runs the training of every mode (and of ``SOTClassifier.fit``
and ``partial_fit``); its checkpoint file format is in ``_checkpoint.py``, the
optimisers in ``_optim.py``.

Size: ~720 lines; the Trainer (state, loop, stopping rules, failure handling)
is one unit, next to the mode setup it trains with (surrogates, mappings).
"""
import copy
import signal
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from . import _kernels
from ._checkpoint import load_checkpoint, save_checkpoint
from ._optim import SGD, Adam
from ._utils import effective_n_threads
from .devices import DevicePopulation
from .exceptions import BackendError, TrainingInterrupted
from .network import CurrentMapping, StochasticMLP, nominal_derivative, sparse_product_tn

__all__ = ["MODES", "SURROGATES", "Adam", "SGD", "TrainConfig", "TrainResult", "Trainer",
           "TrainingInterrupted", "save_checkpoint", "load_checkpoint", "nominal_curve",
           "nominal_population", "make_surrogate", "suggest_mapping"]

MODES = ("software", "ex-situ", "hardware-aware", "hil")
SURROGATES = ("nominal", "calibrated", "straight-through")


def nominal_curve(population):
    """(I50, scale) of the nominal device of a population.

    The generative model's nominal values when the population came from
    ``DevicePopulation.from_width`` with one width; otherwise the medians of
    the non-stuck devices.
    """
    model = population.meta.get("model") if isinstance(population.meta, dict) else None
    if model and isinstance(model.get("width_um"), (int, float)):
        i50 = model["i50_per_um"] * model["width_um"]
        return float(i50), float(model["window_fraction"] * i50 / (2 * np.log(9.0)))
    ok = ~population.stuck
    if not ok.any():
        ok = np.ones(len(population), bool)
    return float(np.median(population.i50[ok])), float(np.median(population.scale[ok]))


def nominal_population(population):
    """Ideal copies of the nominal device, one per device of ``population``."""
    i50, scale = nominal_curve(population)
    n = len(population)
    return DevicePopulation(np.full(n, i50), np.full(n, scale), 0.0, 1.0, population.width,
                            meta={"nominal_of": population.meta.get("model", {})})


#: ``suggest_mapping`` keeps the devices' spread of I50 at about this many network units.
TARGET_SPREAD_UNITS = 1.0


def suggest_mapping(calibration, nominal=None, *, target_spread=TARGET_SPREAD_UNITS):
    """A network-to-current mapping for these devices (``mapping_unit="auto"``).

    Rationale: pre-activations of a Glorot-initialised layer are O(1)
    network units, and every hidden bias starts at the nominal I50.  A
    device whose I50 lies ``k`` units away is off by ``k`` units: ex-situ it
    stays off, and HIL training must move its bias ``k`` units (Adam moves a
    bias about ``learning_rate_init`` units per step).  With the default
    unit (one nominal sigmoid scale) a 10 % I50 spread at 20 um is ~3 units.
    This rule picks the larger of the nominal scale and ``robust_sd(I50) /
    target_spread``, so the devices' spread is at most ``target_spread``
    units while a neuron is never made *flatter* than the nominal device in
    network units.  ``robust_sd`` is 1.4826 x the median absolute deviation
    of the non-stuck devices' I50 (one outlier device does not move it).
    The offset is 0 (currents ``I = unit * z``; biases carry the I50).

    Parameters
    ----------
    calibration : DevicePopulation
        Measured (or known) curves of the devices.
    nominal : (i50, scale) or None
        The nominal device; default :func:`nominal_curve` of ``calibration``.
    target_spread : float, default 1.0

    Returns
    -------
    CurrentMapping
    """
    if not isinstance(calibration, DevicePopulation):
        raise TypeError(f"calibration must be a DevicePopulation, got "
                        f"{type(calibration).__name__}")
    if not (np.isfinite(target_spread) and target_spread > 0):
        raise ValueError(f"target_spread must be > 0, got {target_spread!r}")
    i50n, sn = nominal_curve(calibration) if nominal is None else (float(nominal[0]),
                                                                    float(nominal[1]))
    ok = ~calibration.stuck
    i50 = calibration.i50[ok] if ok.any() else calibration.i50
    spread = 1.4826 * float(np.median(np.abs(i50 - np.median(i50))))
    return CurrentMapping(unit=max(sn, spread / target_spread), offset=0.0)


def make_surrogate(kind, mapping, i50_nominal, scale_nominal, curves=None):
    """Return ``fn(currents, device_slice) -> dP/dz`` (per network unit, float32).

    ``nominal``: the nominal curve's derivative.  ``calibrated``: each
    device's own derivative from ``curves`` (a DevicePopulation).
    ``straight-through``: the nominal peak slope inside the nominal
    programming window (|I - I50| <= window), zero outside.
    """
    unit = mapping.unit
    if kind == "nominal":
        def fn(cur, sl):
            return nominal_derivative(cur, np.float32(i50_nominal), np.float32(scale_nominal),
                                      np.float32(unit)).astype(np.float32, copy=False)

        def mul_inplace(g, cur, sl):
            # g *= fn(cur, sl) in one compiled float32 pass (training's hot path)
            _kernels.sigmoid_deriv_mul(g.reshape(-1), cur.reshape(-1), i50_nominal,
                                       scale_nominal, unit / scale_nominal, 1)
        fn.mul_inplace = mul_inplace
        fn.nominal = (float(i50_nominal), float(scale_nominal), float(unit / scale_nominal))
    elif kind == "calibrated":
        if curves is None:
            raise ValueError("the calibrated surrogate needs device curves (a calibration)")
        subs = {}

        def fn(cur, sl):
            key = (sl.start, sl.stop)
            if key not in subs:
                subs[key] = curves[sl]
            return (unit * subs[key].derivative(cur)).astype(np.float32)
    elif kind == "straight-through":
        peak = np.float32(unit / (4.0 * scale_nominal))
        half = np.float32(2.0 * np.log(9.0) * scale_nominal)

        def fn(cur, sl):
            return np.where(np.abs(cur - np.float32(i50_nominal)) <= half, peak,
                            np.float32(0.0)).astype(np.float32)
    else:
        raise ValueError(f"surrogate must be one of {SURROGATES}, got {kind!r}")
    return fn


@dataclass
class TrainResult:
    network: StochasticMLP
    history: dict = field(default_factory=dict)
    n_iter: int = 0
    stopped_early: bool = False
    best_loss: float = np.inf


def _mixture_grad(probs, y):
    """Loss and d loss / d logits for -log(mean_t softmax_t[y]) (softmax averaged over T)."""
    n, T, C = probs.shape
    py = probs[np.arange(n), :, y]                        # (n, T)
    pbar = py.mean(axis=1)                                # (n,)
    loss = -np.log(np.maximum(pbar, 1e-12)).mean()
    w = py / (T * np.maximum(pbar, 1e-12)[:, None])       # (n, T), rows sum to 1
    g = probs * w[:, :, None]
    g[np.arange(n), :, y] -= w
    return float(loss), (g / n).reshape(n * T, C).astype(np.float32)


def _fast_step_buffers(network, X, batch_size, T):
    """Buffers of the one-hidden-layer fast step, or None where it does not apply
    (deeper networks, non-float32 weights or data)."""
    if len(network.coefs) != 2 or not (isinstance(X, np.ndarray) and X.dtype == np.float32):
        return None
    if any(a.dtype != np.float32 or not a.flags.c_contiguous
           for a in network.coefs + network.intercepts):
        return None
    H, C = network.coefs[1].shape
    Cp = (C + 15) // 16 * 16
    return {"z1": np.empty((batch_size, H), np.float32),
            "g1": np.empty((batch_size, H), np.float32),
            "W2p": np.zeros((H, Cp), np.float32), "W2T": np.empty((C, H), np.float32),
            "b2p": np.zeros(Cp, np.float32), "gW2": np.empty((H, Cp), np.float32),
            "gb2": np.empty(Cp, np.float32), "gb1": np.empty(H, np.float32), "C": C,
            "scratch": np.empty(_kernels.train_output_scratch(batch_size, T, H, Cp), np.float32)}


def _fast_output_step(fast, network, bits, cur, yb, T, surrogate, sl, grads_w, grads_b):
    """Output layer, mixture loss and backward pass in one compiled pass
    (``_kernels.train_output_step``); fills the gradients of layer 1 and
    ``grads_b[0]``, returns (summed loss, correct, d loss / d z1)."""
    C, nb = fast["C"], len(yb)
    W2 = network.coefs[1]
    fast["W2p"][:, :C] = W2
    np.copyto(fast["W2T"], W2.T)
    fast["b2p"][:C] = network.intercepts[1]
    nominal = getattr(surrogate, "nominal", None)
    deriv = None
    if nominal is None:
        deriv = np.ascontiguousarray(surrogate(cur, sl), dtype=np.float32)
        nominal = (0.0, 1.0, 1.0)
    g1 = fast["g1"][:nb]
    loss_sum, ok = _kernels.train_output_step(
        np.ascontiguousarray(bits, dtype=np.uint8), T, fast["W2p"], fast["W2T"], fast["b2p"],
        np.ascontiguousarray(yb, dtype=np.int64), cur, deriv, *nominal, g1, fast["gW2"],
        fast["gb2"], fast["gb1"], fast["scratch"])
    grads_w[1] = np.ascontiguousarray(fast["gW2"][:, :C])
    grads_b[1] = fast["gb2"][:C].copy()
    grads_b[0] = fast["gb1"]
    return loss_sum, ok, g1


class _DeferredInterrupt:
    """Ctrl-C during training: finish the current step, checkpoint, then raise.

    In the main thread SIGINT only sets ``requested``; the loop checks it between
    steps, where the state is consistent.  A second Ctrl-C interrupts at once.
    Elsewhere (no signal handlers off the main thread) it does nothing.
    """

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            try:
                self._old = signal.signal(signal.SIGINT, self._handler)
            except (ValueError, OSError):   # pragma: no cover - embedded interpreters
                self._old = None
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        signal.signal(signal.SIGINT, self._old or signal.default_int_handler)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def _interrupted(exc, epoch, s, where):
    """The exception to raise after a failed step (checkpoint ``where`` written or None).

    Backend faults become :class:`TrainingInterrupted`; anything else (our own
    bug, a user callback) is re-raised as it is, with a note on the checkpoint.
    """
    ck = (f"; checkpoint written to {where}" if where else "; no checkpoint path was set")
    if isinstance(exc, BackendError):
        return TrainingInterrupted(f"training stopped in epoch {epoch + 1} at sample {s}: "
                                   f"{type(exc).__name__}: {exc}{ck}", where)
    exc.add_note(f"sotcore: training stopped in epoch {epoch + 1} at sample {s}{ck}")
    return exc


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of a run (fixed while it runs).

    Parameters
    ----------
    solver : {"adam", "sgd"}
    learning_rate : float
    momentum : float
        SGD's momentum.
    beta1, beta2, eps : float
        Adam's moment decays and denominator term.
    nesterov : bool
        SGD with Nesterov momentum.
    batch_size : int
    train_samples : int
        Stochastic samples per input in each training step; the loss is
        ``-log`` of the softmax averaged over them (as at inference).
    alpha : float
        L2 penalty on the weights (not on biases), ``alpha / batch rows``.
    shuffle : bool
        Draw a new sample order every epoch (else the data's order).
    early_stopping : bool
        As MLPClassifier: stop when the validation accuracy has not improved
        by ``tol`` for more than ``n_iter_no_change`` epochs; each
        :meth:`Trainer.fit` ends on the best weights.
    loss_stopping : bool
        Without early stopping, stop (as MLPClassifier) when the training loss
        has not improved by ``tol`` for more than ``n_iter_no_change`` epochs.
    n_iter_no_change : int
    tol : float
    """
    solver: str = "adam"
    learning_rate: float = 3e-3
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    nesterov: bool = True
    batch_size: int = 100
    train_samples: int = 1
    alpha: float = 1e-4
    shuffle: bool = True
    early_stopping: bool = False
    loss_stopping: bool = False
    n_iter_no_change: int = 10
    tol: float = 1e-4

    def __post_init__(self):
        if self.solver not in ("adam", "sgd"):
            raise ValueError(f"solver must be 'adam' or 'sgd', got {self.solver!r}")

    def make_optimizer(self, params):
        """A fresh optimiser of this configuration for ``params``."""
        if self.solver == "adam":
            return Adam(params, lr=self.learning_rate, beta1=self.beta1, beta2=self.beta2,
                        eps=self.eps)
        return SGD(params, lr=self.learning_rate, momentum=self.momentum,
                   nesterov=self.nesterov)


def _opt_hyper(optimizer):
    if isinstance(optimizer, Adam):
        return {"lr": optimizer.lr, "beta1": optimizer.beta1, "beta2": optimizer.beta2,
                "eps": optimizer.eps}
    return {"lr": optimizer.lr, "momentum": optimizer.momentum,
            "nesterov": optimizer.nesterov}


class Trainer:
    """Minibatch training of a :class:`StochasticMLP` through a device backend.

    One object holds a run: its fixed configuration (given here) and its
    mutable state -- network, optimiser, generator, epoch, the position
    inside the epoch (sample order, next batch, running loss and correct
    count), history, best weights and the stopping counters.  :meth:`fit`
    trains from wherever that state is; :meth:`state_dict` and
    :meth:`load_state_dict` take and restore it (the content of a checkpoint
    file, see :func:`save_checkpoint` / :func:`load_checkpoint`), so a run
    resumed from any step ends bit-identical to one never interrupted.

    Parameters
    ----------
    network : StochasticMLP or sequence of int
        The network to train further (and its weights), or the layer sizes
        ``[n_features, *hidden, n_classes]`` of a new one, initialised from
        ``random_state`` with hidden biases ``hidden_bias``.
    backend : device backend used in the forward pass
    surrogate : callable ``(currents, neuron_slice) -> dP/dz`` (see ``make_surrogate``)
    config : TrainConfig or None
        Optimisation settings (default ``TrainConfig()``).
    mapping : CurrentMapping or None
        Network-to-current mapping of a new network (required with layer sizes).
    hidden_bias : float
        Initial hidden bias of a new network, in network units.
    device_map : DeviceMap or None
        Physical device of each hidden neuron of a new network (default: one
        per neuron); a network restored by ``load_state_dict`` gets this
        trainer's network's map.
    validation : (X_val, y_val) or None
        Scored after every epoch with ``eval_fn(network, X_val) -> proba``.
    eval_fn : callable or None
    callbacks : sequence of callables ``cb(epoch, info, network) -> bool``
        Called after every epoch; returning True stops training.
    checkpoint : path or None
        Where to write checkpoints: at the end of every epoch, every
        ``checkpoint_every`` batches if set, and -- before raising -- whenever
        a step, the validation or a callback fails, or on Ctrl-C (the current
        step finishes first).  Backend faults raise :class:`TrainingInterrupted`.
    checkpoint_every : int or None
    extra_meta : dict or None
        JSON-serialisable data stored in every checkpoint (``meta["extra"]``).
    verbose : bool
        A bar per epoch and one line per epoch.
    progress : bool
        One bar over all batches of a :meth:`fit`, with an ETA (slow instruments).
    random_state : int, Generator state seed or None
        Seeds the generator of the initialisation and of the sample orders.
    optimizer : Adam, SGD or None
        Continue with this optimiser's state (default: a fresh one from ``config``).
    epoch : int
        Epochs already trained (continuing a run with a new configuration).
    history : dict or None
        The run's history so far (lists ``loss``, ``train_accuracy``,
        ``val_accuracy``, ``seconds``); appended to in place.
    n_threads : int or None
        Threads of the compiled first-layer kernels (forward ``X W`` and the
        gradient ``X^T G``, zeros of the inputs skipped; their results do not
        depend on the thread count); None: OpenMP's default.
    """

    def __init__(self, network, *, backend, surrogate, config=None, mapping=None,
                 hidden_bias=0.0, device_map=None, validation=None, eval_fn=None, callbacks=(),
                 checkpoint=None, checkpoint_every=None, extra_meta=None, verbose=False,
                 progress=False, random_state=None, optimizer=None, epoch=0, history=None,
                 n_threads=None):
        self.config = TrainConfig() if config is None else config
        self.n_threads = n_threads
        if not isinstance(self.config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.backend, self.surrogate = backend, surrogate
        self.validation, self.eval_fn, self.callbacks = validation, eval_fn, tuple(callbacks)
        self.checkpoint, self.checkpoint_every = checkpoint, checkpoint_every
        self.extra_meta, self.verbose, self.progress = extra_meta, verbose, progress
        self.rng = np.random.default_rng(random_state)
        if not isinstance(network, StochasticMLP):
            if mapping is None:
                raise ValueError("a new network (layer sizes) needs mapping=")
            network = StochasticMLP(list(network), mapping, device_map=device_map)
            network.initialize(self.rng, hidden_bias)
        self.network = network
        self.optimizer = (self.config.make_optimizer(network.coefs + network.intercepts)
                          if optimizer is None else optimizer)
        self.epoch = self.end_epoch = int(epoch)
        self.history = history if history is not None else {
            "loss": [], "train_accuracy": [], "val_accuracy": [], "seconds": []}
        self.n_rows = None
        self._resumed = False
        # The position inside an epoch: an empty order means "at an epoch boundary".
        self.order, self.batch_start = np.zeros(0, np.int64), 0
        self.tot_loss, self.correct = 0.0, 0
        self.best_score, self.best_weights, self.no_improve = -np.inf, None, 0
        self.best_loss, self.no_improve_loss, self.stopped = np.inf, 0, False
        # Backend state of the last consistent point when the backend failed after it.
        self._backend_state = None

    # -- state ----------------------------------------------------------------------------
    def _state(self, backend_state):
        """The run's state by reference (what a checkpoint holds)."""
        net = self.network
        return {"network": net, "optimizer": self.optimizer, "order": self.order,
                "best": self.best_weights,
                "meta": {"epoch": self.epoch, "batch_start": self.batch_start,
                         # (the file format's key for the number of training rows)
                         "end_epoch": self.end_epoch, "n_samples": self.n_rows,
                         "rng_state": self.rng.bit_generator.state, "history": self.history,
                         "tot_loss": self.tot_loss, "correct": self.correct,
                         "best_score": self.best_score, "no_improve": self.no_improve,
                         "best_loss": self.best_loss, "no_improve_loss": self.no_improve_loss,
                         "stopped": self.stopped, "backend_state": backend_state,
                         "opt_hyper": _opt_hyper(self.optimizer), "extra": self.extra_meta,
                         "mapping": {"unit": net.mapping.unit, "offset": net.mapping.offset}}}

    def _backend_get_state(self):
        get = getattr(self.backend, "get_state", None)
        return None if get is None else get()

    def state_dict(self):
        """A copy of the run's state: what :func:`save_checkpoint` writes.

        A dict with ``network``, ``optimizer``, ``order``, ``best`` and
        ``meta`` (epoch, position, generator and backend state -- from
        ``backend.get_state()``, or the one before a failed step --, history,
        stopping counters, ...), as :func:`load_checkpoint` returns it.
        Take it between :meth:`fit` calls or after one raised; inside a
        callback the epoch is still open (use ``checkpoint=`` for the files
        written during a run).
        """
        bstate = self._backend_state if self._backend_state is not None \
            else self._backend_get_state()
        return copy.deepcopy(self._state(bstate))

    def load_state_dict(self, state):
        """Restore a state from :meth:`state_dict` or :func:`load_checkpoint` (copied).

        The network keeps this trainer's device map; the backend's state is
        restored by ``backend.set_state``.  A finished or stopped run stays so:
        ``fit(X, y)`` then trains nothing.

        Raises
        ------
        ValueError
            The state is for other layer sizes, or for another number of
            training samples than this trainer has trained on.
        """
        meta = state["meta"]
        sizes, have = list(self.network.layer_sizes), list(state["network"].layer_sizes)
        if have != sizes:
            raise ValueError(f"checkpoint is for layer sizes {have}, this run has {sizes}")
        if self.n_rows is not None and meta["n_samples"] != self.n_rows:
            raise ValueError(f"checkpoint was taken on {meta['n_samples']} training samples, "
                             f"this run has {self.n_rows}")
        state = copy.deepcopy(state)
        meta = state["meta"]
        network = state["network"]
        network.device_map = self.network.device_map
        self.network, self.optimizer = network, state["optimizer"]
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = meta["rng_state"]
        self.history = meta["history"]
        self.epoch, self.end_epoch = meta["epoch"], meta["end_epoch"]
        self.n_rows, self._resumed = meta["n_samples"], True
        self.order, self.batch_start = state["order"], meta["batch_start"]
        self.tot_loss, self.correct = meta["tot_loss"], meta["correct"]
        self.best_score, self.best_weights = meta["best_score"], state["best"]
        self.no_improve = meta["no_improve"]
        self.best_loss = float(meta.get("best_loss", np.inf))
        self.no_improve_loss = int(meta.get("no_improve_loss", 0))
        self.stopped = bool(meta.get("stopped", False))
        self._backend_state = None
        if meta.get("backend_state") is not None and hasattr(self.backend, "set_state"):
            self.backend.set_state(meta["backend_state"])

    def _save(self, backend_state):
        if self.checkpoint is None:
            return None
        return save_checkpoint(self.checkpoint, self._state(backend_state))

    def result(self):
        """The run so far as a :class:`TrainResult`."""
        return TrainResult(self.network, self.history, n_iter=self.epoch,
                           stopped_early=self.stopped, best_loss=self.best_loss)

    # -- training -------------------------------------------------------------------------
    def fit(self, X, y, epochs=None):
        """Train ``epochs`` more epochs from the current state; return :meth:`result`.

        An epoch in progress (after :meth:`load_state_dict`) counts as the
        first one.  ``epochs=None`` finishes the run a checkpoint was taken
        in (up to its ``end_epoch``; nothing if it had stopped); a number of
        epochs trains them even after a stop.  Calls in a row train exactly as
        one call of as many epochs, except that with early stopping every
        call ends on the best weights seen.

        Parameters
        ----------
        X : float32 array (n, d); y : int array (n,) of labels in [0, n_classes)
            The same rows as the state's when it is in an epoch or restored.
        epochs : int or None

        Raises
        ------
        ValueError
            ``X`` has another number of rows than a restored or unfinished
            epoch's state.
        """
        n, d = X.shape
        if self.n_rows is not None and n != self.n_rows and (self._resumed
                                                                    or len(self.order)):
            raise ValueError(f"checkpoint was taken on {self.n_rows} training samples, "
                             f"this run has {n}")
        if epochs is None:
            end = self.epoch if self.stopped else max(self.end_epoch, self.epoch)
        else:
            self.stopped, end = False, self.epoch + int(epochs)
        self.n_rows, self.end_epoch, self._backend_state = n, end, None
        cfg = self.config
        batch_size, T = cfg.batch_size, int(cfg.train_samples)
        network, optimizer, rng = self.network, self.optimizer, self.rng
        backend, surrogate = self.backend, self.surrogate
        params = network.coefs + network.intercepts
        L = len(network.coefs)
        get_bstate = self._backend_get_state
        mul_inplace = getattr(surrogate, "mul_inplace", None)
        slices = network.device_slices()
        # Reused per-batch buffers: the gathered inputs and the first layer's gradient.
        xbuf = (np.empty((batch_size, d), X.dtype)
                if isinstance(X, np.ndarray) and X.flags.c_contiguous else None)
        gw0 = (np.empty(network.coefs[0].shape, np.float32)
               if network.coefs[0].dtype == np.float32 and X.dtype == np.float32 else None)
        fast = _fast_step_buffers(network, X, batch_size, T)
        nt = effective_n_threads(self.n_threads)
        n_batches = -(-n // batch_size)
        run_bar = tqdm(total=max(0, end - self.epoch) * n_batches, desc="training",
                       unit="batch", disable=not self.progress, leave=False)
        run_bar.update(-(-self.batch_start // batch_size) if len(self.order) else 0)
        with _DeferredInterrupt() as sigint:
            while self.epoch < end:
                epoch = self.epoch
                t0 = time.perf_counter()
                # A mid-epoch state carries the epoch's order; an epoch boundary does not.
                if len(self.order) == 0:
                    self.order = rng.permutation(n) if cfg.shuffle else np.arange(n)
                    self.tot_loss, self.correct, self.batch_start = 0.0, 0, 0
                order = self.order
                bar = tqdm(range(self.batch_start, n, batch_size), desc=f"epoch {epoch + 1}",
                           leave=False, disable=not self.verbose or self.progress,
                           unit="batch")
                for bi, s in enumerate(bar):
                    self.batch_start = s
                    bstate = get_bstate()
                    if sigint.requested:
                        where = self._save(bstate)
                        run_bar.close()
                        raise KeyboardInterrupt(
                            f"training interrupted in epoch {epoch + 1} at sample {s}" +
                            (f"; checkpoint written to {where}" if where else ""))
                    if self.checkpoint is not None and self.checkpoint_every and bi and \
                            bi % self.checkpoint_every == 0:
                        self._save(bstate)
                    idx = order[s:s + batch_size]
                    nb = len(idx)
                    Xb = (np.take(X, idx, axis=0, out=xbuf[:nb], mode="clip")
                          if xbuf is not None else X[idx])
                    yb = y[idx]
                    try:
                        if fast is not None:
                            # One hidden layer: first layer and the devices here, the rest
                            # in one kernel.
                            z1 = fast["z1"][:nb]
                            _kernels.sparse_matmul(Xb, network.coefs[0], z1, nt)
                            z1 += network.intercepts[0]
                            cur = network._to_current(z1)
                            bits = network.pulse_layer(
                                backend, np.repeat(cur, T, axis=0) if T > 1 else cur, 0)
                        else:
                            probs, cache = network.forward(Xb, backend, T, nt)
                    except Exception as exc:
                        self._backend_state = bstate
                        where = self._save(bstate)
                        bar.close()
                        run_bar.close()
                        raise _interrupted(exc, epoch, s, where) from exc
                    grads_w = [None] * L
                    grads_b = [None] * L
                    if fast is not None:
                        loss_sum, ok, g = _fast_output_step(fast, network, bits, cur, yb, T,
                                                            surrogate, slices[0], grads_w,
                                                            grads_b)
                        self.tot_loss += loss_sum
                        self.correct += ok
                    else:
                        loss, g = _mixture_grad(probs, yb)
                        self.tot_loss += loss * nb
                        self.correct += int((probs.mean(axis=1).argmax(axis=1) == yb).sum())
                        g = _backward_hidden(network, cache, g, grads_w, grads_b, nb, T,
                                             surrogate, mul_inplace, slices, nt)
                    grads_w[0] = sparse_product_tn(Xb, g, nt, out=gw0)
                    # The L2 penalty is folded into the optimiser's single pass.
                    l2 = [cfg.alpha / nb] * L + [0.0] * L if cfg.alpha else None
                    optimizer.step(params, grads_w + grads_b, l2=l2)
                    self.batch_start = min(s + batch_size, n)
                    run_bar.update(1)
                    if self.verbose or self.progress:
                        post = f"{self.tot_loss / min(s + batch_size, n):.4f}"
                        (run_bar if self.progress else bar).set_postfix(loss=post,
                                                                        refresh=False)
                self.batch_start = n
                info = {"epoch": epoch + 1, "loss": self.tot_loss / n,
                        "train_accuracy": self.correct / n, "seconds": time.perf_counter() - t0}
                self._end_epoch(info, run_bar)
                # End of epoch: the next epoch starts from a fresh permutation.
                self.epoch += 1
                self.order, self.batch_start = np.zeros(0, np.int64), 0
                self.tot_loss, self.correct = 0.0, 0
                self._save(get_bstate())
                if self.stopped:
                    break
        run_bar.close()
        if cfg.early_stopping and self.best_weights is not None:
            network.coefs[:] = [a.copy() for a in self.best_weights[:L]]
            network.intercepts[:] = [a.copy() for a in self.best_weights[L:]]
        return self.result()

    def _end_epoch(self, info, run_bar):
        """Validation, history, stopping rules and callbacks after an epoch's training.

        They can fail (a backend fault, a user's bug): the state then goes back
        to the end of the epoch's training, checkpointed, to be evaluated on resume.
        """
        cfg, network, history = self.config, self.network, self.history
        pre = (len(history["loss"]), self.best_score, self.best_weights, self.no_improve,
               self.best_loss, self.no_improve_loss)
        bstate = self._backend_get_state()
        try:
            if self.validation is not None and self.eval_fn is not None:
                Xv, yv = self.validation
                info["val_accuracy"] = float((self.eval_fn(network, Xv).argmax(axis=1)
                                              == yv).mean())
            for key in history:
                history[key].append(info.get(key, np.nan))
            if self.verbose:
                msg = ", ".join(f"{k}={v:.4g}" for k, v in info.items() if k != "epoch")
                tqdm.write(f"epoch {info['epoch']}: {msg}")
            if cfg.early_stopping and "val_accuracy" in info:
                if info["val_accuracy"] > self.best_score + cfg.tol:
                    self.best_score = info["val_accuracy"]
                    self.best_weights = [a.copy() for a in network.coefs + network.intercepts]
                    self.no_improve = 0
                else:
                    self.no_improve += 1
                self.stopped = self.no_improve > cfg.n_iter_no_change
            if info["loss"] > self.best_loss - cfg.tol:
                self.no_improve_loss += 1
            else:
                self.no_improve_loss = 0
            self.best_loss = min(self.best_loss, info["loss"])
            if cfg.loss_stopping and not cfg.early_stopping and \
                    self.no_improve_loss > cfg.n_iter_no_change:
                self.stopped = True
            if any([bool(cb(info["epoch"], info, network)) for cb in self.callbacks]):
                self.stopped = True
        except Exception as exc:
            n_hist, self.best_score, self.best_weights, self.no_improve, self.best_loss, \
                self.no_improve_loss = pre
            for key in history:
                del history[key][n_hist:]
            self.stopped = False
            self._backend_state = bstate
            where = self._save(bstate)
            run_bar.close()
            raise _interrupted(exc, info["epoch"] - 1, self.n_rows, where) from exc


def _backward_hidden(network, cache, g, grads_w, grads_b, nb, T, surrogate, mul_inplace,
                     slices, n_threads=None):
    """Backward pass of the NumPy path through layers L-1..1; fills their gradients
    and ``grads_b[0]``, returns d loss / d z1."""
    hidden = cache["hidden"]
    for k in range(len(network.coefs) - 1, 0, -1):
        grads_w[k] = sparse_product_tn(hidden[k - 1], g, n_threads)
        grads_b[k] = g.sum(axis=0)
        gh = g @ network.coefs[k].T
        cur = cache["currents"][k - 1]
        if k - 1 == 0 and T > 1:
            # First layer: currents are shared by the T samples of an input.
            gh = gh.reshape(nb, T, -1).sum(axis=1)
        if mul_inplace is not None and gh.dtype == np.float32 \
                and gh.flags.c_contiguous and cur.dtype == np.float32 \
                and cur.flags.c_contiguous:
            mul_inplace(gh, cur, slices[k - 1])
            g = gh
        else:
            g = gh * surrogate(cur, slices[k - 1])
    grads_b[0] = g.sum(axis=0)
    return g

