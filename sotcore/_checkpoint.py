"""Training checkpoints: the file format (an ``.npz`` without pickles) and its reader.

A checkpoint holds a :class:`~sotcore.training.Trainer`'s ``state_dict()``:
network, optimiser, the epoch's sample order, best weights and a JSON
``meta`` (position, generator and backend state, history, counters).  The
reader treats every file as untrusted input: each field is validated and a
problem raises ``InvalidInputError`` naming the file and the field.
"""
import json

import numpy as np

from . import _io
from ._optim import SGD, Adam
from .exceptions import InvalidInputError
from .network import CurrentMapping, StochasticMLP

__all__ = ["save_checkpoint", "load_checkpoint", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION",
           "MAX_CHECKPOINT_EPOCHS"]

CHECKPOINT_FORMAT = "sotcore.checkpoint"
CHECKPOINT_VERSION = 1


def _optimizer_arrays(optimizer):
    if isinstance(optimizer, Adam):
        return {"m": optimizer.m, "v": optimizer.v}
    return {"vel": optimizer.vel}


def save_checkpoint(path, state):
    """Write a training checkpoint atomically (write, fsync, rename; no pickle).

    ``state``: a :meth:`Trainer.state_dict() <sotcore.training.Trainer.state_dict>`
    -- a dict with ``network``, ``optimizer``, ``meta`` (JSON-able), ``order``
    (the epoch's sample order) and ``best`` (best weights or None).  A kill at any moment leaves either
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
        hil = params.get("hil_epochs")
        hil = None if hil is None else ci(hil, src, "extra.params.hil_epochs", 1)
        # fit ends at max_iter, at hil_epochs (HIL alone) or at max_iter + HIL epochs
        # after pretraining (SOTClassifier._stages); a partial_fit step ends one epoch
        # after it began
        last = max(max_iter, hil or 0)
        if params.get("pretrain") is not None:
            last = max_iter + (max_iter if hil is None else hil)
        if end > max(last, epoch + 1):
            raise bad(f"field 'end_epoch' is {end} but the run has max_iter={max_iter}"
                      + (f", hil_epochs={hil}" if hil is not None else "")
                      + (", pretrain" if params.get("pretrain") is not None else ""))
    stage = extra.get("stage", 0)
    ci(stage, src, "extra.stage", 0, 1)
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

    Returns the state as :meth:`Trainer.state_dict()
    <sotcore.training.Trainer.state_dict>` gives it, for ``load_state_dict``.
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
