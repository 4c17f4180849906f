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
import json
import signal
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from . import _io, _kernels
from .backends import EmulatedBackend
from .devices import DevicePopulation
from .exceptions import BackendError, InvalidInputError, TrainingInterrupted
from .network import CurrentMapping, StochasticMLP, nominal_derivative

__all__ = ["MODES", "SURROGATES", "Adam", "SGD", "TrainResult", "TrainingInterrupted",
           "train_network", "save_checkpoint", "load_checkpoint", "nominal_curve",
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


def _kernel_ok(*arrays):
    """True if the compiled update applies: float32, C-contiguous, one shape."""
    a0 = arrays[0]
    return all(isinstance(a, np.ndarray) and a.dtype == np.float32 and a.flags.c_contiguous
               and a.shape == a0.shape for a in arrays) and a0.flags.writeable


class Adam:
    """Adam (Kingma & Ba 2015) on a list of arrays, updated in place.

    float32 parameters are updated by one compiled pass per array
    (``_kernels.adam_update``: moments, bias-corrected step and the optional
    L2 term together), on the calling thread: training alternates the
    update with BLAS calls, and an OpenMP team next to BLAS's busy-waiting
    threads made an epoch ~10x slower on 2 cores.  Other dtypes by NumPy.
    """

    def __init__(self, params, lr=3e-3, beta1=0.9, beta2=0.999, eps=1e-8):
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, params, grads, l2=None):
        """One step; ``l2`` (one coefficient per array, or None) adds ``l2 * p`` to the gradient."""
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        lr = self.lr * np.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        for k, (p, g, m, v) in enumerate(zip(params, grads, self.m, self.v)):
            c = 0.0 if l2 is None else float(l2[k])
            if _kernel_ok(p, g, m, v):
                _kernels.adam_update(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1),
                                     lr, b1, b2, self.eps, c, 1)
                continue
            if c:
                g = g + c * p
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * (g * g)
            p -= (lr * m / (np.sqrt(v) + self.eps)).astype(p.dtype, copy=False)

    def state(self):
        return {"t": self.t, "m": self.m, "v": self.v}


class SGD:
    """SGD with (Nesterov) momentum on a list of arrays, updated in place
    (float32 by one compiled pass per array, ``_kernels.sgd_update``)."""

    def __init__(self, params, lr=1e-2, momentum=0.9, nesterov=True):
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
        self.vel = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, params, grads, l2=None):
        """One step; ``l2`` (one coefficient per array, or None) adds ``l2 * p`` to the gradient."""
        self.t += 1
        for k, (p, g, v) in enumerate(zip(params, grads, self.vel)):
            c = 0.0 if l2 is None else float(l2[k])
            if _kernel_ok(p, g, v):
                _kernels.sgd_update(p.reshape(-1), g.reshape(-1), v.reshape(-1), self.lr,
                                    self.momentum, bool(self.nesterov), c, 1)
                continue
            if c:
                g = g + c * p
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


CHECKPOINT_FORMAT = "sotcore.checkpoint"
CHECKPOINT_VERSION = 1


def _optimizer_arrays(optimizer):
    if isinstance(optimizer, Adam):
        return {"m": optimizer.m, "v": optimizer.v}
    return {"vel": optimizer.vel}


def save_checkpoint(path, state):
    """Write a training checkpoint atomically (write, fsync, rename; no pickle).

    ``state``: dict with ``network``, ``optimizer``, ``meta`` (JSON-able) and
    ``order`` (the epoch's sample order).  A kill at any moment leaves either
    the previous checkpoint or the new one, never a partial file.  The
    archive's ``checksum`` member is a SHA-256 over every other member.
    """
    net, opt = state["network"], state["optimizer"]
    arrays = {f"coef_{i}": c for i, c in enumerate(net.coefs)}
    arrays.update({f"intercept_{i}": b for i, b in enumerate(net.intercepts)})
    for name, lst in _optimizer_arrays(opt).items():
        arrays.update({f"opt_{name}_{i}": a for i, a in enumerate(lst)})
    if state.get("best") is not None:
        arrays.update({f"best_{i}": a for i, a in enumerate(state["best"])})
    arrays["order"] = np.asarray(state["order"], dtype=np.int64)
    meta = dict(state["meta"], format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION,
                layer_sizes=[int(v) for v in net.layer_sizes], optimizer=type(opt).__name__,
                opt_t=int(opt.t), n_best=0 if state.get("best") is None else len(state["best"]))
    arrays["meta"] = np.array(json.dumps(meta))
    arrays["checksum"] = np.array(_io.array_digest(arrays))
    _io.atomic_write(path, _io.npz_bytes(arrays))
    return path


#: Most epochs a checkpoint may declare (ASSUMPTION: far above any run here;
#: a larger ``end_epoch`` in a file would train for ever).
MAX_CHECKPOINT_EPOCHS = 10**6


def _check_checkpoint_meta(meta, src):
    """Validate a checkpoint's JSON ``meta``; return the per-array expected shapes."""
    ci, cf = _io.check_int, _io.check_float

    def bad(msg):
        return InvalidInputError(f"{src}: {msg}")
    fields = {"format", "version", "layer_sizes", "optimizer", "opt_t", "n_best", "epoch",
              "batch_start", "end_epoch", "n_samples", "rng_state", "history", "tot_loss",
              "correct", "best_score", "no_improve", "backend_state", "opt_hyper", "extra",
              "mapping"}
    missing = sorted(fields - set(meta))
    if missing:
        raise bad(f"checkpoint is missing field(s) {', '.join(missing)}")
    sizes = meta["layer_sizes"]
    if not isinstance(sizes, list) or not 2 <= len(sizes) <= 1000:
        raise bad("field 'layer_sizes' must be a list of 2 to 1000 integers")
    sizes = [ci(v, src, "layer_sizes", 1, 1 << 24) for v in sizes]
    L = len(sizes) - 1
    if 4 * sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:])) > _io.MAX_ARRAY_BYTES:
        raise bad(f"field 'layer_sizes' {sizes} exceeds the weights limit")
    n = ci(meta["n_samples"], src, "n_samples", 1, 1 << 40)
    epoch = ci(meta["epoch"], src, "epoch", 0, MAX_CHECKPOINT_EPOCHS)
    end = ci(meta["end_epoch"], src, "end_epoch", epoch, MAX_CHECKPOINT_EPOCHS)
    extra = meta["extra"]
    if extra is not None and not isinstance(extra, dict):
        raise bad("field 'extra' must be an object or null")
    extra = extra or {}
    params = extra.get("params")
    if params is not None and not isinstance(params, dict):
        raise bad("field 'extra.params' must be an object")
    max_iter = (params or {}).get("max_iter")
    if max_iter is not None:
        max_iter = ci(max_iter, src, "extra.params.max_iter", 1)
        # fit ends at max_iter; a partial_fit step ends one epoch after it began
        if end > max(max_iter, epoch + 1):
            raise bad(f"field 'end_epoch' is {end} but the run has max_iter={max_iter}")
    if "seeds" in extra:
        s = extra["seeds"]
        if not isinstance(s, list) or len(s) != 4:
            raise bad("field 'extra.seeds' must be a list of 4 integers")
        for v in s:
            ci(v, src, "extra.seeds", 0, 2**63 - 1)
    ci(meta["batch_start"], src, "batch_start", 0, n)
    ci(meta["correct"], src, "correct", 0, n * MAX_CHECKPOINT_EPOCHS)
    ci(meta["no_improve"], src, "no_improve", 0, MAX_CHECKPOINT_EPOCHS)
    ci(meta["opt_t"], src, "opt_t", 0, 2**62)
    cf(meta["tot_loss"], src, "tot_loss", 0)
    best = cf(meta["best_score"], src, "best_score", finite=False)
    if np.isnan(best) or best == np.inf:
        raise bad("field 'best_score' must be finite or -Infinity")
    hist = meta["history"]
    if not isinstance(hist, dict) or not all(isinstance(v, list) for v in hist.values()):
        raise bad("field 'history' must map names to lists")
    for k, lst in hist.items():
        for v in lst:
            cf(v, src, f"history.{k}", finite=False)
    m = meta["mapping"]
    if not isinstance(m, dict) or set(m) != {"unit", "offset"}:
        raise bad("field 'mapping' must be {unit, offset}")
    cf(m["unit"], src, "mapping.unit", 0, low_open=True)
    cf(m["offset"], src, "mapping.offset")
    hyper = meta["opt_hyper"]
    if meta["optimizer"] == "Adam":
        keys = {"lr", "beta1", "beta2", "eps"}
    elif meta["optimizer"] == "SGD":
        keys = {"lr", "momentum", "nesterov"}
    else:
        raise bad(f"field 'optimizer' must be 'Adam' or 'SGD', got {str(meta['optimizer'])[:20]!r}")
    if not isinstance(hyper, dict) or set(hyper) != keys:
        raise bad(f"field 'opt_hyper' must have exactly {', '.join(sorted(keys))}")
    for k in keys - {"nesterov"}:
        cf(hyper[k], src, f"opt_hyper.{k}", 0, 1e3 if k == "lr" else 1.0, low_open=k in (
            "lr", "eps"))
    if "nesterov" in keys and not isinstance(hyper["nesterov"], bool):
        raise bad("field 'opt_hyper.nesterov' must be true or false")
    rs = meta["rng_state"]
    try:
        if not isinstance(rs, dict) or rs.get("bit_generator") != "PCG64":
            raise ValueError("not a PCG64 state")
        np.random.default_rng().bit_generator.state = rs
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise bad(f"field 'rng_state' is not a valid generator state ({exc})") from None
    n_best = ci(meta["n_best"], src, "n_best", 0, 2 * L)
    if n_best not in (0, 2 * L):
        raise bad(f"field 'n_best' must be 0 or {2 * L}")
    pshapes = [(a, b) for a, b in zip(sizes[:-1], sizes[1:])] + [(b,) for b in sizes[1:]]
    shapes = {f"coef_{k}": pshapes[k] for k in range(L)}
    shapes.update({f"intercept_{k}": pshapes[L + k] for k in range(L)})
    for name in (("m", "v") if meta["optimizer"] == "Adam" else ("vel",)):
        shapes.update({f"opt_{name}_{k}": pshapes[k] for k in range(2 * L)})
    shapes.update({f"best_{k}": pshapes[k] for k in range(n_best)})
    return shapes, n, sizes


def load_checkpoint(path):
    """Read a checkpoint written by :func:`save_checkpoint` (never unpickles).

    Every field is checked before the run can resume: the checksum, the JSON
    meta (types, ranges, epochs <= ``MAX_CHECKPOINT_EPOCHS`` and the run's
    ``max_iter``, a valid generator state), and each array's shape (declared
    header, before reading it), dtype and finiteness; ``order`` must be a
    permutation of the training samples.  Any problem raises
    ``InvalidInputError`` naming the file and the field.
    """
    src = str(path)
    head = _io.read_npz(path, members={"meta"}, required={"meta"}, what="checkpoint",
                        max_bytes=_io.MAX_JSON_BYTES)
    if head["meta"].shape != () or head["meta"].dtype.kind != "U":
        raise InvalidInputError(f"{src}: checkpoint member 'meta' is not a JSON string")
    meta = _io.parse_json(str(head["meta"]), f"{src} (meta)", allow_nan=True)
    _io.check_format(meta, src, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "sotcore checkpoint")
    shapes, n, sizes = _check_checkpoint_meta(meta, src)
    allowed = dict(shapes, meta=None, checksum=None, order=None)

    def expect(name, shape, dtype):
        if name not in allowed:
            raise InvalidInputError(f"{src}: unexpected checkpoint array {name!r}")
        if name == "order":
            if shape not in ((n,), (0,)) or dtype.kind not in "iu":
                raise InvalidInputError(f"{src}: array 'order' has shape {shape}, dtype "
                                        f"{dtype}; expected ({n},) integers")
        elif name == "checksum":
            if shape != () or dtype.kind != "U" or dtype.itemsize > 4 * 64:
                raise InvalidInputError(f"{src}: array 'checksum' is not a digest")
        elif name != "meta" and (shape != shapes[name] or dtype != np.float32):
            raise InvalidInputError(f"{src}: array {name!r} has shape {shape}, dtype {dtype}; "
                                    f"layer sizes {sizes} need {shapes[name]} float32")
    arrays = _io.read_npz(path, expected=expect, required=allowed, what="checkpoint")
    digest = str(arrays.pop("checksum"))
    if digest != _io.array_digest(arrays):
        raise InvalidInputError(f"{src}: checkpoint checksum differs (edited or corrupted)")
    for name, a in arrays.items():
        if a.dtype == np.float32 and not np.isfinite(a).all():
            raise InvalidInputError(f"{src}: array {name!r} has NaN or infinite values")
    order = arrays["order"]
    if order.size and not np.array_equal(np.sort(order), np.arange(n)):
        raise InvalidInputError(f"{src}: array 'order' is not a permutation of the "
                                f"{n} training samples")
    L = len(sizes) - 1
    net = StochasticMLP(sizes, CurrentMapping(**meta["mapping"]))
    net.coefs = [arrays[f"coef_{i}"] for i in range(L)]
    net.intercepts = [arrays[f"intercept_{i}"] for i in range(L)]
    params = net.coefs + net.intercepts
    if meta["optimizer"] == "Adam":
        opt = Adam(params, **meta["opt_hyper"])
        opt.m = [arrays[f"opt_m_{i}"] for i in range(2 * L)]
        opt.v = [arrays[f"opt_v_{i}"] for i in range(2 * L)]
        if any((v < 0).any() for v in opt.v):
            raise InvalidInputError(f"{src}: Adam second moments (opt_v) must be >= 0")
    else:
        opt = SGD(params, **meta["opt_hyper"])
        opt.vel = [arrays[f"opt_vel_{i}"] for i in range(2 * L)]
    opt.t = meta["opt_t"]
    best = [arrays[f"best_{i}"] for i in range(meta["n_best"])] or None
    return {"network": net, "optimizer": opt, "meta": meta, "order": order.astype(np.int64),
            "best": best}


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


def train_network(X, y, n_classes, *, hidden_layer_sizes, backend, surrogate, mapping,
                  hidden_bias, device_map=None, train_samples=1, max_iter=30, batch_size=100,
                  learning_rate=3e-3, alpha=1e-4, solver="adam", momentum=0.9,
                  validation=None, early_stopping=False, n_iter_no_change=10, tol=1e-4,
                  loss_stopping=False, eval_fn=None, random_state=None, verbose=False,
                  progress=False, shuffle=True, optimizer_params=None, callbacks=(), network=None, optimizer=None, start_epoch=0,
                  history=None, checkpoint=None, checkpoint_every=None, resume=None,
                  extra_meta=None):
    """Minibatch training of a :class:`StochasticMLP` through a device backend.

    Parameters
    ----------
    X : float32 array (n, d); y : int array (n,) of labels in [0, n_classes)
    backend : device backend used in the forward pass
    surrogate : callable ``(currents, neuron_slice) -> dP/dz`` (see ``make_surrogate``)
    mapping : CurrentMapping
    hidden_bias : float
        Initial hidden bias in network units (the nominal I50 mapped to units).
    device_map : DeviceMap or None
        Physical device of each hidden neuron (default: one per neuron).
    train_samples : int
        Stochastic samples per input in each training step; the loss is
        ``-log`` of the softmax averaged over them (as at inference).
    validation : (X_val, y_val) or None
        Scored after every epoch with ``eval_fn(network, X_val) -> proba``.
    early_stopping : bool
        As MLPClassifier: stop when the validation accuracy has not improved
        by ``tol`` for more than ``n_iter_no_change`` epochs; restore the best weights.
    loss_stopping : bool
        Without early stopping, stop (as MLPClassifier) when the training loss
        has not improved by ``tol`` for more than ``n_iter_no_change`` epochs.
    progress : bool
        One bar over all batches of the run, with an ETA (slow instruments).
    shuffle : bool
        Draw a new sample order every epoch (else the data's order).
    optimizer_params : dict or None
        ``beta1``, ``beta2``, ``eps`` (Adam) and ``nesterov`` (SGD).
    callbacks : sequence of callables ``cb(epoch, info, network) -> bool``
        Called after every epoch; returning True stops training.
    network, optimizer, start_epoch, history
        Continue a run (``partial_fit``).
    checkpoint : path or None
        Where to write checkpoints: at the end of every epoch, every
        ``checkpoint_every`` batches if set, and -- before raising -- whenever
        a step, the validation or a callback fails, or on Ctrl-C (the current
        step finishes first).  Backend faults raise :class:`TrainingInterrupted`.
    resume : dict or None
        A checkpoint from :func:`load_checkpoint`; training continues from
        the step it was written before, bit-exactly.
    extra_meta : dict or None
        JSON-serialisable data stored in every checkpoint (``meta["extra"]``).
    """
    n, d = X.shape
    sizes = [d, *hidden_layer_sizes, n_classes]
    T = int(train_samples)
    best_loss, no_improve_loss = np.inf, 0
    if resume is not None:
        meta = resume["meta"]
        if meta["layer_sizes"] != sizes:
            raise ValueError(f"checkpoint is for layer sizes {meta['layer_sizes']}, this run "
                             f"has {sizes}")
        if meta["n_samples"] != n:
            raise ValueError(f"checkpoint was taken on {meta['n_samples']} training samples, "
                             f"this run has {n}")
        network, optimizer = resume["network"], resume["optimizer"]
        if device_map is not None:
            network.device_map = device_map
        rng = np.random.default_rng()
        rng.bit_generator.state = meta["rng_state"]
        history = meta["history"]
        start_epoch, start_batch = meta["epoch"], meta["batch_start"]
        order = resume["order"]
        acc0 = (meta["tot_loss"], meta["correct"])
        best = (meta["best_score"], None if resume["best"] is None else
                (resume["best"][:len(sizes) - 1], resume["best"][len(sizes) - 1:]))
        no_improve = meta["no_improve"]
        best_loss = float(meta.get("best_loss", np.inf))
        no_improve_loss = int(meta.get("no_improve_loss", 0))
        if meta.get("backend_state") is not None and hasattr(backend, "set_state"):
            backend.set_state(meta["backend_state"])
        # A finished or stopped run stays finished.
        max_iter = 0 if meta.get("stopped") else meta["end_epoch"] - start_epoch
    else:
        rng = np.random.default_rng(random_state)
        start_batch, order, acc0 = 0, None, (0.0, 0)
        best, no_improve = (-np.inf, None), 0
        if network is None:
            network = StochasticMLP(sizes, mapping, device_map=device_map)
            network.initialize(rng, hidden_bias)
    params = network.coefs + network.intercepts
    if optimizer is None:
        if solver == "adam":
            op = optimizer_params or {}
            optimizer = Adam(params, lr=learning_rate, beta1=op.get("beta1", 0.9),
                             beta2=op.get("beta2", 0.999), eps=op.get("eps", 1e-8))
        elif solver == "sgd":
            optimizer = SGD(params, lr=learning_rate, momentum=momentum,
                            nesterov=(optimizer_params or {}).get("nesterov", True))
        else:
            raise ValueError(f"solver must be 'adam' or 'sgd', got {solver!r}")
    opt_hyper = ({"lr": optimizer.lr, "beta1": optimizer.beta1, "beta2": optimizer.beta2,
                  "eps": optimizer.eps} if isinstance(optimizer, Adam) else
                 {"lr": optimizer.lr, "momentum": optimizer.momentum,
                  "nesterov": optimizer.nesterov})
    history = history if history is not None else {"loss": [], "train_accuracy": [],
                                                     "val_accuracy": [], "seconds": []}
    L = len(network.coefs)
    end_epoch = start_epoch + max_iter
    stopped = False
    done = start_epoch

    def snapshot(epoch, batch_start, order, tot_loss, correct, rng_state, backend_state):
        return {"network": network, "optimizer": optimizer, "order": order,
                "best": None if best[1] is None else best[1][0] + best[1][1],
                "meta": {"epoch": epoch, "batch_start": batch_start, "end_epoch": end_epoch,
                         "n_samples": n, "rng_state": rng_state, "history": history,
                         "tot_loss": tot_loss, "correct": correct, "best_score": best[0],
                         "no_improve": no_improve, "best_loss": best_loss,
                         "no_improve_loss": no_improve_loss, "stopped": stopped,
                         "backend_state": backend_state,
                         "opt_hyper": opt_hyper, "extra": extra_meta,
                         "mapping": {"unit": network.mapping.unit,
                                     "offset": network.mapping.offset}}}

    def save(*args):
        return None if checkpoint is None else save_checkpoint(checkpoint, snapshot(*args))

    get_bstate = getattr(backend, "get_state", lambda: None)
    mul_inplace = getattr(surrogate, "mul_inplace", None)
    slices = network.device_slices()
    # Reused per-batch buffers: the gathered inputs and the first layer's gradient.
    xbuf = (np.empty((batch_size, d), X.dtype)
            if isinstance(X, np.ndarray) and X.flags.c_contiguous else None)
    gw0 = (np.empty(network.coefs[0].shape, np.float32)
           if network.coefs[0].dtype == np.float32 and X.dtype == np.float32 else None)
    fast = _fast_step_buffers(network, X, batch_size, T)
    n_batches = -(-n // batch_size)
    run_bar = tqdm(total=max(0, end_epoch - start_epoch) * n_batches, desc="training",
                   unit="batch", disable=not progress, leave=False)
    run_bar.update(-(-start_batch // batch_size) if resume is not None else 0)
    with _DeferredInterrupt() as sigint:
        for epoch in range(start_epoch, end_epoch):
            t0 = time.perf_counter()
            # A mid-epoch checkpoint carries the epoch's order; an epoch-end one does not.
            if resume is None or epoch != start_epoch or len(order) == 0:
                order = rng.permutation(n) if shuffle else np.arange(n)
                tot_loss, correct = 0.0, 0
                first_batch = 0
            else:
                (tot_loss, correct), first_batch = acc0, start_batch
            rng_state = rng.bit_generator.state
            bar = tqdm(range(first_batch, n, batch_size), desc=f"epoch {epoch + 1}",
                       leave=False, disable=not verbose or progress, unit="batch")
            for bi, s in enumerate(bar):
                bstate = get_bstate()
                if sigint.requested:
                    where = save(epoch, s, order, tot_loss, correct, rng_state, bstate)
                    run_bar.close()
                    raise KeyboardInterrupt(
                        f"training interrupted in epoch {epoch + 1} at sample {s}" +
                        (f"; checkpoint written to {where}" if where else ""))
                if checkpoint is not None and checkpoint_every and bi and \
                        bi % checkpoint_every == 0:
                    save(epoch, s, order, tot_loss, correct, rng_state, bstate)
                idx = order[s:s + batch_size]
                nb = len(idx)
                Xb = (np.take(X, idx, axis=0, out=xbuf[:nb], mode="clip") if xbuf is not None
                      else X[idx])
                yb = y[idx]
                try:
                    if fast is not None:
                        # One hidden layer: first layer and the devices here, the rest in one
                        # kernel.
                        z1 = np.matmul(Xb, network.coefs[0], out=fast["z1"][:nb])
                        z1 += network.intercepts[0]
                        cur = network._to_current(z1)
                        bits = network.pulse_layer(
                            backend, np.repeat(cur, T, axis=0) if T > 1 else cur, 0)
                    else:
                        probs, cache = network.forward(Xb, backend, T)
                except Exception as exc:
                    where = save(epoch, s, order, tot_loss, correct, rng_state, bstate)
                    bar.close()
                    run_bar.close()
                    raise _interrupted(exc, epoch, s, where) from exc
                grads_w = [None] * L
                grads_b = [None] * L
                if fast is not None:
                    loss_sum, ok, g = _fast_output_step(fast, network, bits, cur, yb, T,
                                                        surrogate, slices[0], grads_w, grads_b)
                    tot_loss += loss_sum
                    correct += ok
                else:
                    loss, g = _mixture_grad(probs, yb)
                    tot_loss += loss * nb
                    correct += int((probs.mean(axis=1).argmax(axis=1) == yb).sum())
                    hidden = cache["hidden"]
                    for k in range(L - 1, 0, -1):
                        grads_w[k] = hidden[k - 1].T @ g
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
                if gw0 is not None and g.dtype == np.float32:
                    grads_w[0] = np.matmul(Xb.T, g, out=gw0)
                else:
                    grads_w[0] = Xb.T @ g
                # The L2 penalty is folded into the optimiser's single pass.
                l2 = [alpha / nb] * L + [0.0] * L if alpha else None
                optimizer.step(params, grads_w + grads_b, l2=l2)
                run_bar.update(1)
                if verbose or progress:
                    post = f"{tot_loss / min(s + batch_size, n):.4f}"
                    (run_bar if progress else bar).set_postfix(loss=post, refresh=False)
            info = {"epoch": epoch + 1, "loss": tot_loss / n, "train_accuracy": correct / n,
                    "seconds": time.perf_counter() - t0}
            # Validation and callbacks can fail (a backend fault, a user's bug): the
            # checkpoint then holds the epoch's training, to be evaluated on resume.
            pre = (len(history["loss"]), best, no_improve, best_loss, no_improve_loss)
            bstate = get_bstate()
            try:
                if validation is not None and eval_fn is not None:
                    Xv, yv = validation
                    info["val_accuracy"] = float((eval_fn(network, Xv).argmax(axis=1)
                                                  == yv).mean())
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
                    stopped = no_improve > n_iter_no_change
                if info["loss"] > best_loss - tol:
                    no_improve_loss += 1
                else:
                    no_improve_loss = 0
                best_loss = min(best_loss, info["loss"])
                if loss_stopping and not early_stopping and no_improve_loss > n_iter_no_change:
                    stopped = True
                if any([bool(cb(epoch + 1, info, network)) for cb in callbacks]):
                    stopped = True
            except Exception as exc:
                n_hist, best, no_improve, best_loss, no_improve_loss = pre
                for key in history:
                    del history[key][n_hist:]
                stopped = False
                where = save(epoch, n, order, tot_loss, correct, rng_state, bstate)
                run_bar.close()
                raise _interrupted(exc, epoch, n, where) from exc
            done = epoch + 1
            # End of epoch: the next epoch starts from a fresh permutation.
            save(epoch + 1, 0, np.zeros(0, np.int64), 0.0, 0, rng.bit_generator.state,
                 get_bstate())
            if stopped:
                break
    run_bar.close()
    if early_stopping and best[1] is not None:
        network.coefs[:] = best[1][0]
        network.intercepts[:] = best[1][1]
        params[:] = network.coefs + network.intercepts
    stopped = stopped or bool(resume is not None and resume["meta"].get("stopped"))
    return TrainResult(network, history, n_iter=done, stopped_early=stopped,
                       best_loss=best_loss), optimizer


def default_mapping(population):
    """The trainers' default mapping: one network unit = the nominal scale."""
    return CurrentMapping.for_nominal(nominal_curve(population)[1])


def emulator(population, seed, n_threads=None):
    return EmulatedBackend(population, random_state=seed, n_threads=n_threads)
