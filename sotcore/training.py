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
"""
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from .backends import EmulatedBackend
from .devices import DevicePopulation
from .network import CurrentMapping, StochasticMLP, nominal_derivative

__all__ = ["MODES", "SURROGATES", "Adam", "SGD", "TrainResult", "train_network",
           "nominal_curve", "nominal_population", "make_surrogate"]

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


class Adam:
    """Adam (Kingma & Ba 2015) on a list of arrays, updated in place."""

    def __init__(self, params, lr=3e-3, beta1=0.9, beta2=0.999, eps=1e-8):
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, params, grads):
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        lr = self.lr * np.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        for p, g, m, v in zip(params, grads, self.m, self.v):
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * (g * g)
            p -= (lr * m / (np.sqrt(v) + self.eps)).astype(p.dtype, copy=False)

    def state(self):
        return {"t": self.t, "m": self.m, "v": self.v}


class SGD:
    """SGD with (Nesterov) momentum on a list of arrays, updated in place."""

    def __init__(self, params, lr=1e-2, momentum=0.9, nesterov=True):
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
        self.vel = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, params, grads):
        self.t += 1
        for p, g, v in zip(params, grads, self.vel):
            v *= self.momentum
            v -= self.lr * g
            if self.nesterov:
                p += self.momentum * v - self.lr * g
            else:
                p += v

    def state(self):
        return {"t": self.t, "vel": self.vel}


@dataclass
class TrainResult:
    network: StochasticMLP
    history: dict = field(default_factory=dict)
    n_iter: int = 0
    stopped_early: bool = False


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


def train_network(X, y, n_classes, *, hidden_layer_sizes, backend, surrogate, mapping,
                  hidden_bias, train_samples=1, max_iter=30, batch_size=100,
                  learning_rate=3e-3, alpha=1e-4, solver="adam", momentum=0.9,
                  validation=None, early_stopping=False, n_iter_no_change=10, tol=1e-4,
                  eval_fn=None, random_state=None, verbose=False, callbacks=(),
                  network=None, optimizer=None, start_epoch=0, history=None):
    """Minibatch training of a :class:`StochasticMLP` through a device backend.

    Parameters
    ----------
    X : float32 array (n, d); y : int array (n,) of labels in [0, n_classes)
    backend : device backend used in the forward pass
    surrogate : callable ``(currents, device_slice) -> dP/dz`` (see ``make_surrogate``)
    mapping : CurrentMapping
    hidden_bias : float
        Initial hidden bias in network units (the nominal I50 mapped to units).
    train_samples : int
        Stochastic samples per input in each training step; the loss is
        ``-log`` of the softmax averaged over them (as at inference).
    validation : (X_val, y_val) or None
        Scored after every epoch with ``eval_fn(network, X_val) -> proba``.
    early_stopping : bool
        Stop when the validation accuracy has not improved by ``tol`` for
        ``n_iter_no_change`` epochs, and restore the best weights.
    callbacks : sequence of callables ``cb(epoch, info, network) -> bool``
        Called after every epoch; returning True stops training.
    network, optimizer, start_epoch, history
        Resume a run (``partial_fit`` and checkpoints).
    """
    rng = np.random.default_rng(random_state)
    n, d = X.shape
    sizes = [d, *hidden_layer_sizes, n_classes]
    if network is None:
        network = StochasticMLP(sizes, mapping)
        network.initialize(rng, hidden_bias)
    params = network.coefs + network.intercepts
    if optimizer is None:
        if solver == "adam":
            optimizer = Adam(params, lr=learning_rate)
        elif solver == "sgd":
            optimizer = SGD(params, lr=learning_rate, momentum=momentum)
        else:
            raise ValueError(f"solver must be 'adam' or 'sgd', got {solver!r}")
    history = history if history is not None else {"loss": [], "train_accuracy": [],
                                                     "val_accuracy": [], "seconds": []}
    T = int(train_samples)
    slices = network.device_slices()
    L = len(network.coefs)
    best = (-np.inf, None)
    no_improve = 0
    stopped = False
    epoch = start_epoch
    for epoch in range(start_epoch, start_epoch + max_iter):
        t0 = time.perf_counter()
        order = rng.permutation(n)
        tot_loss, correct = 0.0, 0
        bar = tqdm(range(0, n, batch_size), desc=f"epoch {epoch + 1}", leave=False,
                   disable=not verbose, unit="batch")
        for s in bar:
            idx = order[s:s + batch_size]
            Xb, yb = X[idx], y[idx]
            probs, cache = network.forward(Xb, backend, T)
            loss, g = _mixture_grad(probs, yb)
            tot_loss += loss * len(idx)
            correct += int((probs.mean(axis=1).argmax(axis=1) == yb).sum())
            grads_w = [None] * L
            grads_b = [None] * L
            bits = cache["bits"]
            for k in range(L - 1, 0, -1):
                h = bits[k - 1].astype(np.float32)
                grads_w[k] = h.T @ g
                grads_b[k] = g.sum(axis=0)
                gh = g @ network.coefs[k].T
                cur = cache["currents"][k - 1]
                if k - 1 == 0:
                    # First layer: currents are shared by the T samples of an input.
                    gh = gh.reshape(len(idx), T, -1).sum(axis=1)
                g = gh * surrogate(cur, slices[k - 1])
            grads_w[0] = Xb.T @ g
            grads_b[0] = g.sum(axis=0)
            if alpha:
                for k in range(L):
                    grads_w[k] += (alpha / len(idx)) * network.coefs[k]
            optimizer.step(params, grads_w + grads_b)
            if verbose:
                bar.set_postfix(loss=f"{tot_loss / min(s + batch_size, n):.4f}")
        info = {"epoch": epoch + 1, "loss": tot_loss / n, "train_accuracy": correct / n,
                "seconds": time.perf_counter() - t0}
        if validation is not None and eval_fn is not None:
            Xv, yv = validation
            info["val_accuracy"] = float((eval_fn(network, Xv).argmax(axis=1) == yv).mean())
        for key in history:
            history[key].append(info.get(key, np.nan))
        if verbose:
            msg = ", ".join(f"{k}={v:.4g}" for k, v in info.items() if k != "epoch")
            tqdm.write(f"epoch {epoch + 1}: {msg}")
        if early_stopping and "val_accuracy" in info:
            if info["val_accuracy"] > best[0] + tol:
                best = (info["val_accuracy"], ([c.copy() for c in network.coefs],
                                               [b.copy() for b in network.intercepts]))
                no_improve = 0
            else:
                no_improve += 1
                if no_improve >= n_iter_no_change:
                    stopped = True
        if any(cb(epoch + 1, info, network) for cb in callbacks):
            stopped = True
        if stopped:
            break
    if early_stopping and best[1] is not None:
        network.coefs[:] = best[1][0]
        network.intercepts[:] = best[1][1]
        params[:] = network.coefs + network.intercepts
    return TrainResult(network, history, n_iter=epoch + 1, stopped_early=stopped), optimizer


def default_mapping(population):
    """The trainers' default mapping: one network unit = the nominal scale."""
    return CurrentMapping.for_nominal(nominal_curve(population)[1])


def emulator(population, seed, n_threads=None):
    return EmulatedBackend(population, random_state=seed, n_threads=n_threads)
