"""Device neurons as a PyTorch layer: SOT neurons in any architecture.

:class:`DeviceNeurons` is an ``nn.Module`` over a custom
``torch.autograd.Function``.  Forward: each element of the input after the
batch dimension is one neuron; its pre-activation ``z`` becomes the current
``I = mapping.offset + mapping.unit * z``, is pulsed on the neuron's physical
device (the compiled emulator, or any sotcore backend such as an
:class:`~sotcore.InstrumentBackend`) and comes back as a 0/1 float tensor of
the input's shape.  Backward: the surrogate derivative ``dP/dz`` that
:class:`~sotcore.SOTClassifier` uses (:func:`sotcore.training.make_surrogate`).

The training modes are those of :mod:`sotcore.training`, per layer
(``mode=``, or :func:`set_mode` on a whole model):

=================  ==============================  =========================  ===============
mode               forward in ``model.train()``    backward surrogate         ``model.eval()``
=================  ==============================  =========================  ===============
software           ideal nominal neurons           nominal                    nominal neurons
ex-situ            ideal nominal neurons           nominal                    the devices
hardware-aware     the devices' known curves       each device's derivative   the devices
hil                the device backend              ``surrogate=``             the devices
=================  ==============================  =========================  ===============

Importing :mod:`sotcore` never imports this module (torch is the optional
extra ``torch``).

Size: the autograd Function, the layer, its device maps, state_dict and
modes belong together, and the module stays optional (imports torch).
"""
import json
import numbers
import time

import numpy as np
import torch
from torch import nn

from ._utils import seed_from_random_state
from .backends import EmulatedBackend, check_bits
from .devices import DevicePopulation
from .exceptions import BackendError, InvalidInputError
from .network import CurrentMapping, DeviceMap
from .training import MODES, SURROGATES, make_surrogate, nominal_curve

__all__ = ["DeviceNeurons", "set_mode", "predict_proba", "fit", "compare_modes",
           "DEVICE_MAPS"]

#: Named device maps (see :class:`DeviceNeurons`).
DEVICE_MAPS = ("round-robin", "channel", "position")

STATE_FORMAT = "sotcore.torch.DeviceNeurons"
STATE_VERSION = 1


def _is_backend(obj):
    return hasattr(obj, "pulse") and hasattr(obj, "n_devices")


def _map_index(spec, shape, n_devices):
    """Device index of each neuron (flattened C order over ``shape``) for a named map."""
    n = int(np.prod(shape, dtype=np.int64))
    if spec == "round-robin":
        return np.arange(n, dtype=np.int64) % n_devices
    if len(shape) < 2:
        raise InvalidInputError(f"device_map={spec!r} needs inputs with channels "
                                f"(N, C, ...); this layer's neurons have shape {tuple(shape)}")
    c, rest = shape[0], int(np.prod(shape[1:], dtype=np.int64))
    if spec == "channel":
        return np.repeat(np.arange(c, dtype=np.int64) % n_devices, rest)
    # "position": one device per spatial position, shared by the channels.
    return np.tile(np.arange(rest, dtype=np.int64) % n_devices, c)


class _DeviceFunction(torch.autograd.Function):
    """Bits forward, surrogate ``dP/dz`` backward (the layer does the checks)."""

    @staticmethod
    def forward(ctx, z, layer):
        bits, cur = layer._pulse(z)
        ctx.layer = layer
        ctx.cur = cur
        return bits

    @staticmethod
    def backward(ctx, grad):
        layer, cur = ctx.layer, ctx.cur
        d = layer._surrogate_fn(cur, slice(0, cur.shape[1]))
        g = grad.reshape(cur.shape).to(torch.float32) * torch.from_numpy(
            np.ascontiguousarray(d, dtype=np.float32))
        return g.reshape(grad.shape).to(grad.dtype), None


class DeviceNeurons(nn.Module):
    """Stochastic SOT-device neurons as a PyTorch layer (no parameters of its own).

    Parameters
    ----------
    devices : DevicePopulation, float, or device backend
        The physical devices: a population (emulated by the compiled
        sampler), a width in micrometres (a population of ``n_devices``
        devices is drawn from the default model with ``variability``), or any
        sotcore backend (``pulse`` and ``n_devices``; e.g. an
        :class:`~sotcore.InstrumentBackend`).
    mapping : CurrentMapping or None
        Network units to amperes.  Default: one unit = the nominal scale,
        offset = the nominal I50, so the nominal neuron is ``sigmoid(z)``
        (``z = 0`` switches with probability 1/2).
    surrogate : {"nominal", "calibrated", "straight-through"}
        The ``hil`` backward pass (as in SOTClassifier).  ``calibrated`` uses
        ``calibration``'s curve of each neuron's device.
    calibration : DevicePopulation or None
        Measured curves, one per physical device (e.g.
        :func:`sotcore.calibrate_backend`).
    device_map : {"round-robin", "channel", "position"}, int array, DeviceMap or None
        Which device each neuron is.  Neurons are the elements of one sample
        (shape ``(C, ...)``), numbered in C order.  ``"round-robin"``: neuron
        ``k`` -> device ``k mod n_devices`` (one device per element when there
        are enough).  ``"channel"``: every position of channel ``c`` ->
        device ``c mod n_devices`` (weight sharing's counterpart: a feature
        map is one device pulsed at each position).  ``"position"``: spatial
        position ``p`` -> device ``p mod n_devices``, shared by the channels.
        None (default): ``"channel"`` for inputs with spatial dimensions
        (``(N, C, L)`` or ``(N, C, H, W)``), ``"round-robin"`` for ``(N, H)``.
        The map is fixed at the first forward pass (or by ``shape``).
    n_samples : int, default 1
        Samples ``T`` that :func:`predict_proba` averages in eval mode when
        not told otherwise.  ``forward`` always returns one sample.
    mode : {"hil", "software", "ex-situ", "hardware-aware"}, default "hil"
        See the module docstring.
    nominal_device : (i50, scale) in amperes, or None
        The nominal device (software neurons, the default mapping, the
        nominal surrogate).  Default :func:`sotcore.training.nominal_curve`
        of the devices; required for a backend that does not describe them.
    shape : tuple of int or None
        The neurons' shape (one sample, without the batch dimension); None:
        taken from the first input.
    n_devices : int, default 64
        Devices drawn when ``devices`` is a width.
    variability : float, default 0.10
        Device-to-device spread when ``devices`` is a width.
    random_state : int, Generator or None
        Seeds the emulators' counter-based streams (stream = pulse-call
        number), so the same seed gives the same bits for any thread count.
    n_threads : int or None
        Threads of the compiled sampler (the bits do not depend on it).
    """

    def __init__(self, devices, *, mapping=None, surrogate="nominal", calibration=None,
                 device_map=None, n_samples=1, mode="hil", nominal_device=None, shape=None,
                 n_devices=64, variability=0.10, random_state=None, n_threads=None):
        super().__init__()
        if surrogate not in SURROGATES:
            raise InvalidInputError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
        if mode not in MODES:
            raise InvalidInputError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral) \
                or n_samples < 1:
            raise InvalidInputError(f"n_samples must be a positive integer, got {n_samples!r}")
        if calibration is not None and not isinstance(calibration, DevicePopulation):
            raise TypeError(f"calibration must be a DevicePopulation or None, got "
                            f"{type(calibration).__name__}")
        if mapping is not None and not isinstance(mapping, CurrentMapping):
            raise TypeError(f"mapping must be a CurrentMapping or None, got "
                            f"{type(mapping).__name__}")
        self._seed = seed_from_random_state(random_state)
        self.n_threads = n_threads
        self.backend, self.population = self._resolve_devices(devices, n_devices, variability)
        m = self.backend.n_devices if self.backend is not None else len(self.population)
        if calibration is not None and len(calibration) != m:
            raise InvalidInputError(f"calibration has {len(calibration)} devices, the layer's "
                                    f"devices are {m} (one curve per physical device)")
        if nominal_device is not None:
            nd = np.asarray(nominal_device, dtype=float)
            if nd.shape != (2,) or not np.all(np.isfinite(nd)) or not np.all(nd > 0):
                raise InvalidInputError("nominal_device must be (i50, scale) in amperes, both "
                                        f"> 0; got {nominal_device!r}")
            self.nominal = (float(nd[0]), float(nd[1]))
        elif self.population is not None:
            self.nominal = nominal_curve(self.population)
        else:
            raise InvalidInputError("this backend does not describe its devices: pass "
                                    "nominal_device=(i50, scale) in amperes")
        self.mapping = mapping if mapping is not None else CurrentMapping(
            unit=self.nominal[1], offset=self.nominal[0])
        self.n_devices = m
        self.surrogate = surrogate
        self.calibration = calibration
        self.n_samples = int(n_samples)
        self._map_spec = device_map
        self.device_map = None
        self.shape = None
        self._backends = {}
        self._surrogates = {}
        self.mode = mode
        self.set_mode(mode)
        if shape is not None:
            self._fix_shape(tuple(int(s) for s in shape))

    # -- set-up ---------------------------------------------------------------------------
    def _resolve_devices(self, d, n_devices, variability):
        if isinstance(d, DevicePopulation):
            return None, d
        if isinstance(d, numbers.Real) and not isinstance(d, bool):
            if not (np.isfinite(d) and d > 0):
                raise InvalidInputError(f"devices as a width must be > 0 micrometres, got {d}")
            return None, DevicePopulation.from_width(float(d), n_devices,
                                                     variability=variability,
                                                     random_state=self._seed % 2**32)
        if _is_backend(d):
            curves = d.device_curves() if hasattr(d, "device_curves") else None
            return d, curves
        raise TypeError("devices must be a DevicePopulation, a width in micrometres or a "
                        f"device backend; got {type(d).__name__}")

    def _fix_shape(self, shape):
        n = int(np.prod(shape, dtype=np.int64))
        if n < 1:
            raise InvalidInputError(f"DeviceNeurons needs at least one neuron per sample, got "
                                    f"shape {shape}")
        spec = self._map_spec
        if spec is None:
            spec = "channel" if len(shape) >= 2 else "round-robin"
        if isinstance(spec, str):
            if spec not in DEVICE_MAPS:
                raise InvalidInputError(f"device_map must be one of {DEVICE_MAPS}, an array "
                                        f"of device indices or a DeviceMap; got {spec!r}")
            dm = DeviceMap(_map_index(spec, shape, self.n_devices), self.n_devices)
        else:
            try:
                dm = DeviceMap.resolve(spec, n, self.n_devices)
            except ValueError as exc:
                raise InvalidInputError(f"device_map: {exc}") from None
        self.device_map = dm
        self.shape = shape
        self._surrogates.clear()

    def _emulator(self, which):
        """The emulator of the devices ("devices") or of the nominal neurons ("nominal")."""
        if which not in self._backends:
            if which == "devices":
                if self.population is None:
                    raise InvalidInputError(f"mode {self.mode!r} needs known device curves; "
                                            "this backend does not describe its devices")
                pop, salt = self.population, 0
            else:
                i50, s = self.nominal
                pop = DevicePopulation(np.full(self.n_devices, i50), np.full(self.n_devices, s),
                                       meta={"nominal": True})
                salt = 0x5EED
            self._backends[which] = EmulatedBackend(pop, random_state=self._seed ^ salt,
                                                    n_threads=self.n_threads)
        return self._backends[which]

    def set_mode(self, mode):
        """Switch the training mode (see the module docstring); returns self."""
        if mode not in MODES:
            raise InvalidInputError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "hil" and self.surrogate == "calibrated" and self.calibration is None:
            raise InvalidInputError("surrogate='calibrated' needs calibration= (a "
                                    "DevicePopulation measured from the devices, e.g. "
                                    "sotcore.calibrate_backend)")
        if mode == "hardware-aware" and self.population is None:
            raise InvalidInputError("mode 'hardware-aware' needs known device curves; this "
                                    "backend does not describe its devices")
        self.mode = mode
        self._surrogates.clear()
        return self

    def _device_backend(self):
        return self.backend if self.backend is not None else self._emulator("devices")

    def current_backend(self):
        """The backend the next forward pass pulses (depends on mode and train/eval)."""
        if self.mode == "software" or (self.mode == "ex-situ" and self.training):
            return self._emulator("nominal")
        if self.mode == "hardware-aware" and self.training:
            return self._emulator("devices")
        return self._device_backend()

    @property
    def _surrogate_fn(self):
        kind = {"software": "nominal", "ex-situ": "nominal",
                "hardware-aware": "calibrated"}.get(self.mode, self.surrogate)
        fn = self._surrogates.get(kind)
        if fn is None:
            curves = None
            if kind == "calibrated":
                base = self.population if self.mode == "hardware-aware" else self.calibration
                # Per network neuron: the curve of the neuron's physical device.
                curves = base[self.device_map.index]
            fn = make_surrogate(kind, self.mapping, *self.nominal, curves)
            self._surrogates[kind] = fn
        return fn

    # -- forward --------------------------------------------------------------------------
    def _check_input(self, z):
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"DeviceNeurons input must be a torch.Tensor, got "
                            f"{type(z).__name__}")
        if z.device.type != "cpu":
            raise TypeError(f"DeviceNeurons input must be a CPU tensor (the devices are "
                            f"driven from host memory), got device {z.device}")
        if z.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            raise TypeError(f"DeviceNeurons input must be a floating-point tensor, got "
                            f"{z.dtype}")
        if z.dim() < 2 or z.shape[0] < 1:
            raise InvalidInputError(f"DeviceNeurons input must have shape (N, ...) with "
                                    f"N >= 1 and one neuron per element after the batch "
                                    f"dimension, got {tuple(z.shape)}")
        shape = tuple(z.shape[1:])
        if self.shape is None:
            self._fix_shape(shape)
        elif shape != self.shape:
            raise InvalidInputError(
                f"DeviceNeurons input has neurons of shape {shape} "
                f"({int(np.prod(shape))} neurons) but the layer's device map is for "
                f"{self.shape} ({self.device_map.n_neurons} neurons)")

    def _pulse(self, z):
        """(bits tensor of z's shape and dtype, currents (N, n_neurons) float32)."""
        n = z.shape[0]
        zc = z.detach()
        if zc.dtype != torch.float32:
            zc = zc.to(torch.float32)
        zc = zc.contiguous()
        znp = zc.numpy().reshape(n, -1)         # shares memory with the tensor
        cur = np.multiply(znp, np.float32(self.mapping.unit))
        cur += np.float32(self.mapping.offset)
        # min/max propagate NaN and expose inf in two passes without a mask tensor.
        if not (np.isfinite(cur.min()) and np.isfinite(cur.max())):
            r, k = (int(v) for v in np.argwhere(~np.isfinite(cur))[0])
            raise InvalidInputError(f"DeviceNeurons input (pre-activations) must be finite "
                                    f"(as currents), found {float(znp[r, k])} at sample {r}, "
                                    f"neuron {k}")
        backend = self.current_backend()
        plan = self.device_map.plan(slice(0, self.device_map.n_neurons))
        try:
            bits = plan.pulse(backend, cur)
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"device backend {type(backend).__name__} failed in "
                               f"DeviceNeurons.forward: {type(exc).__name__}: {exc}") from exc
        bits = check_bits(bits, cur.shape, type(backend).__name__)
        # NumPy's uint8 -> float cast is several times faster than Tensor.to here.
        npdt = {torch.float32: np.float32, torch.float64: np.float64}.get(z.dtype)
        if npdt is not None:
            out = torch.from_numpy(bits.astype(npdt)).reshape(z.shape)
        else:
            out = torch.from_numpy(bits).reshape(z.shape).to(z.dtype)
        return out, cur

    def forward(self, z):
        """One stochastic sample of the neurons: 0/1 tensor of ``z``'s shape and dtype."""
        self._check_input(z)
        if torch.is_grad_enabled() and z.requires_grad:
            return _DeviceFunction.apply(z, self)
        return self._pulse(z)[0]

    def extra_repr(self):
        return (f"n_devices={self.n_devices}, mode={self.mode!r}, surrogate={self.surrogate!r}, "
                f"shape={self.shape}, n_samples={self.n_samples}")

    # -- state ----------------------------------------------------------------------------
    def get_extra_state(self):
        """A JSON string (no pickle): what rebuilds the layer, see :meth:`from_state_dict`."""
        emu = {k: {"calls": b.calls} for k, b in self._backends.items()}
        return json.dumps({
            "format": STATE_FORMAT, "version": STATE_VERSION, "mode": self.mode,
            "surrogate": self.surrogate, "n_samples": self.n_samples,
            "mapping": {"unit": self.mapping.unit, "offset": self.mapping.offset},
            "nominal": list(self.nominal), "n_devices": self.n_devices,
            "shape": None if self.shape is None else list(self.shape),
            "device_map": None if self.device_map is None else self.device_map.tolist(),
            "population": None if self.population is None else self.population.to_dict(),
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "seed": str(self._seed), "emulators": emu}, allow_nan=False)

    def set_extra_state(self, state):
        s = _parse_state(state)
        if self.backend is not None and self.backend.n_devices != s["n_devices"]:
            raise InvalidInputError(f"DeviceNeurons state is for {s['n_devices']} devices, this "
                                    f"layer's backend has {self.backend.n_devices}")
        if self.backend is None:
            self.population = s["population"]
        self.n_devices = s["n_devices"]
        self.calibration = s["calibration"]
        self.mapping = s["mapping"]
        self.nominal = s["nominal"]
        self.surrogate = s["surrogate"]
        self.n_samples = s["n_samples"]
        self._seed = s["seed"]
        self._backends = {}
        self.shape, self.device_map = None, None
        if s["shape"] is not None:
            self._map_spec = s["device_map"]
            self._fix_shape(s["shape"])
        self.set_mode(s["mode"])
        for k, v in s["emulators"].items():
            self._emulator(k).calls = v

    @classmethod
    def from_state_dict(cls, state_dict, prefix="", backend=None, n_threads=None):
        """Rebuild a layer from its ``state_dict()`` (the population travels by value;
        pass ``backend`` for a layer that pulsed an instrument)."""
        key = prefix + "_extra_state"
        if not isinstance(state_dict, dict) or key not in state_dict:
            raise InvalidInputError(f"state_dict has no {key!r} entry (not a DeviceNeurons "
                                    "state)")
        s = _parse_state(state_dict[key])
        devices = backend if backend is not None else s["population"]
        if devices is None:
            raise InvalidInputError("the layer pulsed a backend that does not describe its "
                                    "devices; pass backend= to rebuild it")
        layer = cls(devices, mapping=s["mapping"], nominal_device=s["nominal"],
                    n_threads=n_threads)
        layer.set_extra_state(state_dict[key])
        return layer


def _parse_state(state):
    """Validate a DeviceNeurons extra state (untrusted: every field is checked)."""
    src = "DeviceNeurons state"
    if not isinstance(state, str):
        raise InvalidInputError(f"{src}: expected a JSON string, got {type(state).__name__}")
    try:
        d = json.loads(state)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{src}: invalid JSON ({exc})") from None
    if not isinstance(d, dict) or d.get("format") != STATE_FORMAT:
        raise InvalidInputError(f"{src}: not a DeviceNeurons state (format field)")
    v = d.get("version")
    if not isinstance(v, int) or isinstance(v, bool) or v > STATE_VERSION:
        raise InvalidInputError(f"{src}: unsupported version {v!r} (this sotcore reads <= "
                                f"{STATE_VERSION})")

    def field(name, check, what):
        if name not in d or not check(d[name]):
            raise InvalidInputError(f"{src}: field {name!r} missing or not {what}")
        return d[name]

    def is_int(x, low=0):
        return isinstance(x, int) and not isinstance(x, bool) and x >= low
    out = {"mode": field("mode", lambda x: x in MODES, f"one of {MODES}"),
           "surrogate": field("surrogate", lambda x: x in SURROGATES, f"one of {SURROGATES}"),
           "n_samples": field("n_samples", lambda x: is_int(x, 1), "a positive integer"),
           "n_devices": field("n_devices", lambda x: is_int(x, 1), "a positive integer")}
    mp = field("mapping", lambda x: isinstance(x, dict) and set(x) == {"unit", "offset"},
               "{unit, offset}")
    try:
        out["mapping"] = CurrentMapping(float(mp["unit"]), float(mp["offset"]))
        nom = [float(x) for x in field("nominal", lambda x: isinstance(x, list) and len(x) == 2,
                                       "(i50, scale)")]
        seed = int(field("seed", lambda x: isinstance(x, str), "a string"))
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{src}: {exc}") from None
    if not (np.all(np.isfinite(nom)) and min(nom) > 0) or not 0 <= seed < 2**64:
        raise InvalidInputError(f"{src}: nominal must be two positive numbers and seed a "
                                "64-bit integer")
    out["nominal"], out["seed"] = tuple(nom), seed
    shape = d.get("shape")
    if shape is not None:
        if not (isinstance(shape, list) and shape and all(is_int(s, 1) for s in shape)):
            raise InvalidInputError(f"{src}: field 'shape' must be a list of positive integers")
        n = int(np.prod(shape, dtype=np.int64))
        dm = d.get("device_map")
        if not (isinstance(dm, list) and len(dm) == n):
            raise InvalidInputError(f"{src}: field 'device_map' must list one device per "
                                    f"neuron ({n})")
        if not all(is_int(i) and i < out["n_devices"] for i in dm):
            raise InvalidInputError(f"{src}: field 'device_map' entries must be devices in "
                                    f"[0, {out['n_devices']})")
        out["device_map"] = np.asarray(dm, dtype=np.int64)
        shape = tuple(shape)
    out["shape"] = shape
    for name in ("population", "calibration"):
        p = d.get(name)
        try:
            out[name] = None if p is None else DevicePopulation.from_dict(
                p, source=f"{src} {name}")
        except ValueError as exc:
            raise InvalidInputError(str(exc)) from None
        if out[name] is not None and len(out[name]) != out["n_devices"]:
            raise InvalidInputError(f"{src}: {name} has {len(out[name])} devices, n_devices is "
                                    f"{out['n_devices']}")
    emu = d.get("emulators", {})
    if not (isinstance(emu, dict) and set(emu) <= {"devices", "nominal"}
            and all(isinstance(e, dict) and is_int(e.get("calls")) for e in emu.values())):
        raise InvalidInputError(f"{src}: field 'emulators' is malformed")
    out["emulators"] = {k: e["calls"] for k, e in emu.items()}
    return out


# -- model-level helpers -----------------------------------------------------------------
def _layers(model):
    return [m for m in model.modules() if isinstance(m, DeviceNeurons)]


def set_mode(model, mode):
    """Set the training mode of every :class:`DeviceNeurons` in ``model``; returns model."""
    layers = _layers(model)
    if not layers:
        raise InvalidInputError("model has no DeviceNeurons layer")
    for layer in layers:
        layer.set_mode(mode)
    return model


def _as_tensor(X, name, dtype=torch.float32):
    if isinstance(X, torch.Tensor):
        t = X
    else:
        try:
            t = torch.from_numpy(np.ascontiguousarray(X))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be a tensor or a numeric array: {exc}") from None
    if t.device.type != "cpu":
        raise TypeError(f"{name} must be a CPU tensor, got device {t.device}")
    return t.to(dtype)


def predict_proba(model, X, n_samples=None, *, batch_size=1000, at=None):
    """The softmax of ``model(X)`` averaged over ``n_samples`` stochastic passes (eval mode).

    Parameters
    ----------
    model : nn.Module returning logits (N, C)
    X : tensor or array (N, ...)
    n_samples : int or None
        Passes ``T``; None: the model's DeviceNeurons' ``n_samples`` (which
        must agree).
    batch_size : int
        Inputs per pass.
    at : sequence of int or None
        If given, return ``{T: proba}`` for each ``T`` in ``at`` from the
        same passes (the mean of the first ``T``; ``n_samples`` defaults to
        ``max(at)``).

    Returns
    -------
    tensor (N, C) of float64, or a dict of them
    """
    if at is not None:
        at = sorted({int(t) for t in at})
        if not at or at[0] < 1:
            raise InvalidInputError(f"at must list positive sample counts, got {at}")
        n_samples = max(at) if n_samples is None else n_samples
    if n_samples is None:
        ts = {layer.n_samples for layer in _layers(model)} or {1}
        if len(ts) > 1:
            raise InvalidInputError(f"the model's DeviceNeurons disagree on n_samples {ts}; "
                                    "pass n_samples=")
        n_samples = ts.pop()
    if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral) \
            or n_samples < 1:
        raise InvalidInputError(f"n_samples must be a positive integer, got {n_samples!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) \
            or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    marks = set(at or [n_samples])
    X = _as_tensor(X, "X")
    was_training = model.training
    model.eval()
    total, out = None, {}
    try:
        with torch.no_grad():
            for t in range(1, n_samples + 1):
                p = torch.cat([torch.softmax(model(X[s:s + batch_size]).to(torch.float64), 1)
                               for s in range(0, X.shape[0], batch_size)])
                total = p if total is None else total + p
                if t in marks:
                    out[t] = total / t
    finally:
        model.train(was_training)
    return out if at is not None else out[n_samples]


def fit(model, X, y, *, epochs=10, batch_size=100, lr=3e-3, alpha=1e-4, random_state=None,
        callback=None):
    """Train ``model`` (logits out) with cross-entropy as SOTClassifier trains.

    Adam (``lr``), minibatches of ``batch_size`` in a fresh permutation per
    epoch, L2 ``alpha / batch`` on the weights (parameters with >= 2
    dimensions; not on biases), as :class:`sotcore.training.Trainer`.

    Returns
    -------
    dict with ``loss``, ``train_accuracy`` and ``seconds`` per epoch.
    """
    X = _as_tensor(X, "X")
    y = _as_tensor(y, "y", torch.int64)
    if y.dim() != 1 or y.shape[0] != X.shape[0]:
        raise InvalidInputError(f"y must have one label per row of X, got {tuple(y.shape)} "
                                f"for X {tuple(X.shape)}")
    rng = np.random.default_rng(random_state)
    n = X.shape[0]
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.Adam([{"params": decay, "weight_decay": alpha / batch_size},
                            {"params": rest, "weight_decay": 0.0}], lr=lr)
    hist = {"loss": [], "train_accuracy": [], "seconds": []}
    model.train()
    for _ in range(int(epochs)):
        t0 = time.perf_counter()
        order = torch.from_numpy(rng.permutation(n))
        tot, ok = 0.0, 0
        for s in range(0, n, batch_size):
            idx = order[s:s + batch_size]
            xb, yb = X[idx], y[idx]
            opt.zero_grad()
            logits = model(xb)
            loss = nn.functional.cross_entropy(logits, yb)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(idx)
            ok += int((logits.argmax(1) == yb).sum())
        hist["loss"].append(tot / n)
        hist["train_accuracy"].append(ok / n)
        hist["seconds"].append(time.perf_counter() - t0)
        if callback is not None:
            callback(len(hist["loss"]), hist, model)
    return hist


def compare_modes(build, X_train, y_train, X_test, y_test, *, devices,
                  modes=("software", "ex-situ", "hardware-aware", "hil"),
                  surrogates=("nominal",), n_samples=(1, 8, 32), seeds=(0,),
                  calibration=None, fit_params=None, n_threads=None, on_record=None):
    """The training modes side by side on one model definition and one dataset.

    Parameters
    ----------
    build : callable ``build(neurons) -> nn.Module``
        The model definition.  ``neurons(n_devices)`` returns the next
        :class:`DeviceNeurons` of the run (configured for the mode, surrogate
        and seed); call it once per device-neuron layer.
    devices : callable ``devices(k, n_devices, seed) -> DevicePopulation``
        The devices of the ``k``-th DeviceNeurons layer for ``seed`` (the same
        for every mode of a seed).
    surrogates : HIL surrogates, one run each.
    calibration : callable ``calibration(population, seed) -> DevicePopulation`` or None
        Measured curves for the ``calibrated`` surrogate.
    fit_params : dict
        Passed to :func:`fit` (epochs, batch_size, lr, alpha).

    Returns
    -------
    list of dict in :func:`sotcore.experiments.compare_modes`' format (``run``,
    ``mode``, ``surrogate``, ``seed``, ``T``, ``accuracy``,
    ``seconds_per_epoch``, ``loss_curve``, ...).
    """
    unknown = set(modes) - set(MODES)
    if unknown:
        raise InvalidInputError(f"unknown mode(s) {sorted(unknown)}")
    # One training run per row; software's run is also evaluated as ex-situ.
    runs = [(m, "nominal") for m, wanted in
            (("software", {"software", "ex-situ"}), ("hardware-aware", {"hardware-aware"}))
            if wanted & set(modes)]
    runs += [("hil", s) for s in surrogates] if "hil" in modes else []
    yte = np.asarray(y_test)
    records = []
    for seed in seeds:
        for mode, sur in runs:
            torch.manual_seed(seed)
            count = [0]

            def neurons(n_devices, mode=mode, sur=sur):
                k = count[0]
                count[0] += 1
                pop = devices(k, n_devices, seed)
                cal = calibration(pop, seed) if sur == "calibrated" else None
                return DeviceNeurons(pop, surrogate=sur, calibration=cal, mode=mode,
                                     random_state=seed * 1000 + k, n_threads=n_threads)
            model = build(neurons)
            hist = fit(model, X_train, y_train, random_state=seed, **(fit_params or {}))
            evals = [(mode, sur)]
            if mode == "software":
                evals = [(m, "nominal") for m in ("software", "ex-situ") if m in modes]
            for emode, esur in evals:
                set_mode(model, emode)
                probs = predict_proba(model, X_test, at=n_samples)
                for T, p in probs.items():
                    rec = {"run": f"hil ({esur})" if emode == "hil" else emode, "mode": emode,
                           "surrogate": esur if emode == "hil" else None, "seed": int(seed),
                           "T": int(T),
                           "accuracy": float((p.argmax(1).numpy() == yte).mean()),
                           "train_seconds": float(sum(hist["seconds"])),
                           "epochs": len(hist["loss"]),
                           "seconds_per_epoch": float(np.mean(hist["seconds"])),
                           "loss_curve": hist["loss"]}
                    records.append(rec)
                    if on_record is not None:
                        on_record(rec)
    return records
