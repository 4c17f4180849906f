"""Multilayer networks of stochastic binary neurons (one device per hidden neuron).

Layer ``l`` computes pre-activations ``z = h W + b`` in *network units*; a fixed
affine :class:`CurrentMapping` turns them into pulse currents
``I = offset + unit * z`` (amperes) for the layer's devices, and the devices'
switched bits are the layer's output.  The first layer's input is the data;
later layers receive bits, so their product is a sum of weight rows (at
inference the compiled first-layer kernel, which skips zeros, adds them in
order: the sums of ``binary_matvec``).  The output layer is a
softmax; inference averages the class probabilities over ``T`` samples.
"""
import numbers
from dataclasses import dataclass

import numpy as np
from scipy.special import expit
from tqdm.auto import tqdm

from . import _kernels
from ._fused import keyed_samples
from ._threads import blas_limit
from ._utils import effective_n_threads
from .exceptions import BackendError, SotcoreError

__all__ = ["CurrentMapping", "DeviceMap", "StochasticMLP", "layer_slices", "softmax"]


@dataclass(frozen=True)
class CurrentMapping:
    """Affine map from network units to device currents: ``I = offset + unit * z``.

    ``unit`` is in amperes per network unit (> 0), ``offset`` in amperes.
    The default used by the trainers (``CurrentMapping.for_nominal``) makes one
    network unit equal to the nominal device's sigmoid scale, so the nominal
    neuron is ``expit(z - z50)`` with ``z50 = I50_nominal / scale_nominal``.
    """

    unit: float
    offset: float = 0.0

    def __post_init__(self):
        if not (np.isfinite(self.unit) and self.unit > 0):
            raise ValueError(f"mapping unit must be a positive number of amperes, got {self.unit}")
        if not np.isfinite(self.offset):
            raise ValueError(f"mapping offset must be finite, got {self.offset}")

    @classmethod
    def for_nominal(cls, scale_nominal):
        return cls(unit=float(scale_nominal), offset=0.0)

    def to_current(self, z):
        return self.offset + self.unit * z

    def to_units(self, current):
        return (np.asarray(current) - self.offset) / self.unit


class DeviceMap:
    """Which physical device each hidden neuron is.

    Hidden neurons are numbered across the layers (layer 1's first, then
    layer 2's, ...); ``index[k]`` is neuron ``k``'s device.  A network may
    have more neurons than there are devices (a lab has 8 devices, not 500):
    neurons that share a device share its switching curve, and their bits
    are independent draws because the device is reset between pulses.

    Requests to a backend name each physical device at most once (unless the
    backend says ``accepts_repeated_devices``, as the emulator does): the
    neurons of a layer are grouped by their rank among the neurons sharing a
    device, and each group is one request, so the pulses of one device are
    sent one after the other, in neuron order, row by row.

    Parameters
    ----------
    index : array-like of int, shape (n_neurons,)
        Physical device of each neuron, in ``[0, n_devices)``.
    n_devices : int
        Devices of the backend.
    """

    def __init__(self, index, n_devices):
        if isinstance(n_devices, bool) or not isinstance(n_devices, numbers.Integral) \
                or n_devices < 1:
            raise ValueError(f"n_devices must be a positive integer, got {n_devices!r}")
        try:
            arr = np.asarray(index)
        except Exception as exc:
            raise ValueError(f"device_map could not be read as an array: {exc}") from None
        if arr.dtype == object or arr.dtype.kind not in "iuf" or arr.ndim != 1 or arr.size == 0:
            raise ValueError("device_map must be a non-empty 1-D array of device indices "
                             f"(integers), got {arr.dtype} with shape {arr.shape}")
        if arr.dtype.kind == "f":
            if not (np.isfinite(arr).all() and (arr == np.round(arr)).all()):
                raise ValueError("device_map entries must be whole numbers")
        if arr.min() < 0 or arr.max() >= n_devices:
            bad = int(np.flatnonzero((arr < 0) | (arr >= n_devices))[0])
            raise ValueError(f"device_map[{bad}] = {arr[bad]} is not a device of the backend "
                             f"(valid: 0..{n_devices - 1})")
        self.index = arr.astype(np.int64)
        self.index.setflags(write=False)
        self.n_devices = int(n_devices)
        self._plans = {}

    @classmethod
    def resolve(cls, spec, n_neurons, n_devices):
        """A map from ``spec``: ``None`` or ``"round-robin"`` (neuron ``k`` ->
        device ``k mod n_devices``; the identity when there are enough devices),
        a DeviceMap, or an integer array of length ``n_neurons``."""
        if spec is None or (isinstance(spec, str) and spec == "round-robin"):
            return cls(np.arange(n_neurons) % n_devices, n_devices)
        if isinstance(spec, str):
            raise ValueError(f"device_map must be 'round-robin', None or an array of device "
                             f"indices, got {spec!r}")
        dm = spec if isinstance(spec, DeviceMap) else cls(spec, n_devices)
        if dm.n_neurons != n_neurons:
            raise ValueError(f"device_map has {dm.n_neurons} entries but the hidden layers have "
                             f"{n_neurons} neurons (one entry per neuron)")
        if dm.n_devices != n_devices:
            dm = cls(dm.index, n_devices)
        return dm

    @property
    def n_neurons(self):
        return self.index.shape[0]

    @property
    def shared(self):
        """True if some device serves more than one neuron."""
        return np.unique(self.index).size < self.index.size

    def pulses_per_device(self, rows_per_neuron):
        """Pulses each device receives when every neuron is pulsed ``rows_per_neuron``
        times (int64, one per device)."""
        return np.bincount(self.index, minlength=self.n_devices).astype(np.int64) \
            * int(rows_per_neuron)

    def tolist(self):
        return self.index.tolist()

    def plan(self, sl):
        """The request plan of the neurons ``sl`` (a layer's slice)."""
        key = (sl.start, sl.stop)
        if key not in self._plans:
            self._plans[key] = _LayerPlan(self.index[sl])
        return self._plans[key]

    def __repr__(self):
        return f"DeviceMap(n_neurons={self.n_neurons}, n_devices={self.n_devices})"


class _LayerPlan:
    """How one layer's neurons become backend requests (see :class:`DeviceMap`)."""

    def __init__(self, idx):
        H = idx.shape[0]
        a = int(idx[0])
        if np.array_equal(idx, np.arange(a, a + H)):
            self.devices = slice(a, a + H)
        else:
            self.devices = idx
        self.distinct = np.unique(idx).size == H
        # Rank of each neuron among the earlier neurons on the same device.
        order = np.argsort(idx, kind="stable")
        srt = idx[order]
        first = np.r_[0, np.flatnonzero(np.diff(srt)) + 1]
        starts = np.repeat(first, np.diff(np.r_[first, H]))
        slot = np.empty(H, np.int64)
        slot[order] = np.arange(H) - starts
        groups = []
        for r in range(int(slot.max()) + 1):
            cols = np.flatnonzero(slot == r)
            if groups and np.array_equal(idx[groups[-1][-1]], idx[cols]):
                groups[-1].append(cols)
            else:
                groups.append([cols])
        # Each group: (q, m) neuron columns, all q ranks on the same m devices.
        self.groups = [(np.stack(g), idx[g[0]]) for g in groups]

    def pulse(self, backend, cur):
        """Bits (n, H) for currents (n, H) of this layer's neurons.

        A backend that raises anything but a sotcore error or a ValueError /
        TypeError (bad request) raises :class:`~sotcore.BackendError` here,
        with the original as its cause.
        """
        try:
            return self._pulse(backend, cur)
        except (SotcoreError, ValueError, TypeError):
            raise
        except Exception as exc:
            raise BackendError(f"{type(backend).__name__}.pulse failed: "
                               f"{type(exc).__name__}: {exc}") from exc

    def _pulse(self, backend, cur):
        if self.distinct or getattr(backend, "accepts_repeated_devices", False):
            return backend.pulse(cur, self.devices)
        n = cur.shape[0]
        out = np.empty(cur.shape, np.uint8)
        for cols, devs in self.groups:
            q, m = cols.shape
            # Row i * q + r: input i's neuron of rank r on each device.
            req = np.ascontiguousarray(cur[:, cols].reshape(n * q, m))
            bits = backend.pulse(req, devs)
            out[:, cols] = np.asarray(bits).reshape(n, q, m)
        return out


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def sparse_product(A, W, n_threads=None):
    """``A @ W``; for C-contiguous float32 operands by ``_kernels.sparse_matmul``
    (zeros of ``A`` skipped, a row's result independent of the batch and of the
    thread count), else by NumPy."""
    if (isinstance(A, np.ndarray) and isinstance(W, np.ndarray) and A.dtype == np.float32
            and W.dtype == np.float32 and A.ndim == 2 and W.ndim == 2
            and A.flags.c_contiguous and W.flags.c_contiguous and A.shape[1] == W.shape[0]):
        Z = np.empty((A.shape[0], W.shape[1]), np.float32)
        _kernels.sparse_matmul(A, W, Z, effective_n_threads(n_threads))
        return Z
    return A @ W


def sparse_product_tn(A, G, n_threads=None, out=None):
    """``A.T @ G`` (a weight gradient); for float32 operands by
    ``_kernels.sparse_matmul_tn`` (zeros of ``A`` skipped; the result does not
    depend on the thread count), else by NumPy.  ``out``: a float32 buffer."""
    if (isinstance(A, np.ndarray) and isinstance(G, np.ndarray) and A.dtype == np.float32
            and G.dtype == np.float32 and A.ndim == 2 and G.ndim == 2
            and A.flags.c_contiguous and A.shape[0] == G.shape[0]):
        if out is None or out.shape != (A.shape[1], G.shape[1]) or out.dtype != np.float32:
            out = np.empty((A.shape[1], G.shape[1]), np.float32)
        _kernels.sparse_matmul_tn(A, np.ascontiguousarray(G), out,
                                  effective_n_threads(n_threads))
        return out
    return A.T @ G


class StochasticMLP:
    """Weights and forward passes of a network of stochastic binary neurons.

    Parameters
    ----------
    layer_sizes : sequence of int
        ``(n_features, H1, ..., HL, n_classes)``.
    mapping : CurrentMapping
    device_map : DeviceMap or None
        The physical device of each hidden neuron; default one device per
        neuron, in order (layer ``l`` on devices ``offset_l .. offset_l + H_l``).
    """

    def __init__(self, layer_sizes, mapping, device_map=None):
        sizes = [int(s) for s in layer_sizes]
        if len(sizes) < 3 or min(sizes) < 1:
            raise ValueError(f"layer_sizes needs inputs, >= 1 hidden layer and outputs, "
                             f"all >= 1; got {layer_sizes}")
        self.layer_sizes = sizes
        self.mapping = mapping
        n = sum(sizes[1:-1])
        if device_map is not None and not isinstance(device_map, DeviceMap):
            raise TypeError(f"device_map must be a DeviceMap or None, got "
                            f"{type(device_map).__name__}")
        self.device_map = DeviceMap.resolve(device_map, n, n if device_map is None
                                            else device_map.n_devices)
        self.coefs = [np.zeros((a, b), np.float32) for a, b in zip(sizes[:-1], sizes[1:])]
        self.intercepts = [np.zeros(b, np.float32) for b in sizes[1:]]

    @property
    def hidden_sizes(self):
        return self.layer_sizes[1:-1]

    @property
    def n_devices(self):
        """Physical devices the network's map addresses."""
        return self.device_map.n_devices

    def device_slices(self):
        """The neurons of each hidden layer (slices of the neuron numbering)."""
        return layer_slices(self.hidden_sizes)

    def pulse_layer(self, backend, currents, k):
        """Pulse hidden layer ``k``'s neurons on their devices; bits (n, H_k)."""
        return self.device_map.plan(self.device_slices()[k]).pulse(backend, currents)

    def initialize(self, rng, hidden_bias):
        """Glorot-uniform weights; hidden biases at ``hidden_bias`` (units), output 0."""
        for k, (a, b) in enumerate(zip(self.layer_sizes[:-1], self.layer_sizes[1:])):
            bound = np.sqrt(6.0 / (a + b))
            self.coefs[k] = rng.uniform(-bound, bound, (a, b)).astype(np.float32)
            last = k == len(self.layer_sizes) - 2
            self.intercepts[k] = np.full(b, 0.0 if last else hidden_bias, dtype=np.float32)

    # -- forward ------------------------------------------------------------------------
    def forward(self, X, backend, n_samples, n_threads=None):
        """One stochastic forward pass with ``n_samples`` samples per input.

        Returns ``(probs, cache)`` where ``probs`` has shape (n, T, n_classes)
        and ``cache`` holds what the backward pass needs: per hidden layer the
        currents (first layer (n, H), later (n*T, H)), bits (n*T, H) and
        ``hidden``, the bits as float32.  float32 products go through
        :func:`sparse_product` on ``n_threads``.
        """
        T = n_samples
        n = X.shape[0]
        z = sparse_product(X, self.coefs[0], n_threads)
        z += self.intercepts[0]
        cur = self._to_current(z)
        currents, bits_list, hidden = [cur], [], []
        bits = self.pulse_layer(backend, np.repeat(cur, T, axis=0) if T > 1 else cur, 0)
        bits_list.append(bits)
        for k in range(1, len(self.coefs)):
            h = bits.astype(np.float32)
            hidden.append(h)
            z = sparse_product(h, self.coefs[k], n_threads)
            z += self.intercepts[k]
            if k == len(self.coefs) - 1:
                break
            cur = self._to_current(z)
            currents.append(cur)
            bits = self.pulse_layer(backend, cur, k)
            bits_list.append(bits)
        probs = softmax(z).reshape(n, T, -1)
        return probs, {"currents": currents, "bits": bits_list, "hidden": hidden}

    def _to_current(self, z):
        """``mapping.to_current(z)`` as float32, in place when ``z`` is float32."""
        if z.dtype != np.float32:
            return self.mapping.to_current(z).astype(np.float32)
        z *= self.mapping.unit
        z += self.mapping.offset
        return z

    def predict_proba(self, X, backend, n_samples=32, batch_size=None, n_threads=None,
                      row_keys=None, progress=False):
        """Class probabilities averaged over ``n_samples`` stochastic passes.

        Two paths, the same model:

        * **fused** -- one hidden layer on a backend that offers
          ``fused_forward`` and says it is available (the emulator without
          aging): the compiled first layer, then one compiled kernel per block of
          inputs draws all ``n_samples`` samples, output layer and softmax.
        * **general** -- deeper networks and other backends: the backend's
          pulses per layer (through the device map), the bits' sums by the
          same compiled kernel; ``progress`` shows a bar with an ETA.

        The first layer is computed by the compiled kernel
        ``_kernels.first_layer`` (one fused multiply-add per term, the
        input's zeros skipped), row by row in law, so a row's currents -- and
        with ``row_keys`` its predictions -- never depend on the batch, its
        order, the thread count or the CPU path.  With ``row_keys`` (one
        uint64 per row of X, or a callable on a block of rows) and an
        emulated backend, each input's noise depends only on its key.
        Memory is bounded by the blocks.
        """
        T = int(n_samples)
        if T < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        nt = effective_n_threads(n_threads)
        fused = len(self.coefs) == 2 and _fusable(backend)
        if row_keys is not None and not fused:
            row_keys = np.ascontiguousarray(row_keys(X) if callable(row_keys) else row_keys,
                                            dtype=np.uint64)
            if row_keys.shape != (X.shape[0],):
                raise ValueError("row_keys must have one entry per row of X")
        if fused:
            plan = self.device_map.plan(self.device_slices()[0])
            return backend.fused_forward(X, self.coefs, self.intercepts, self.mapping,
                                         plan.devices, T, row_keys=row_keys, n_threads=nt)
        return self._predict_general(X, backend, T, batch_size, nt, row_keys, progress)

    def _predict_general(self, X, backend, T, batch_size, nt, row_keys, progress=False):
        n = X.shape[0]
        if batch_size is None:
            batch_size = max(1, 2 ** 19 // (T * max(self.hidden_sizes)))
        out = np.empty((n, self.layer_sizes[-1]), dtype=np.float64)
        keyed = row_keys is not None and hasattr(backend, "pulse_keyed")
        plans = [self.device_map.plan(sl) for sl in self.device_slices()]
        panels = [_kernels.first_layer_panels(W) for W in self.coefs]
        bar = tqdm(total=n, desc="predict", unit="row", disable=not progress, leave=False)
        with blas_limit(1):
            for s in range(0, n, batch_size):
                e = min(s + batch_size, n)
                z = np.empty((e - s, self.layer_sizes[1]), np.float32)
                # Row by row in law (any block gives each row the same sums).
                _kernels.first_layer(np.ascontiguousarray(X[s:e], dtype=np.float32),
                                     panels[0], z, nt)
                z += self.intercepts[0]
                cur = np.repeat(self.mapping.to_current(z).astype(np.float32, copy=False), T,
                                axis=0)
                if keyed:
                    keys = keyed_samples(row_keys[s:e], T)

                def pulse(c, k):
                    if keyed:
                        return backend.pulse_keyed(c, plans[k].devices, keys, k)
                    return plans[k].pulse(backend, c)
                bits = pulse(cur, 0)
                for k in range(1, len(self.coefs)):
                    zk = np.empty((bits.shape[0], self.coefs[k].shape[1]), np.float32)
                    # The bits as 0/1 floats through the first-layer kernel: the same
                    # sums as binary_matvec (rows of set bits added in order), faster.
                    _kernels.first_layer(bits.astype(np.float32), panels[k], zk, nt)
                    zk += self.intercepts[k]
                    if k == len(self.coefs) - 1:
                        break
                    bits = pulse(self.mapping.to_current(zk).astype(np.float32, copy=False), k)
                out[s:e] = softmax(zk.astype(np.float64)).reshape(e - s, T, -1).mean(axis=1)
                bar.update(e - s)
        bar.close()
        return out


def layer_slices(hidden_sizes):
    """Slices of the neuron numbering (across layers) that each hidden layer occupies."""
    out, start = [], 0
    for h in hidden_sizes:
        out.append(slice(start, start + int(h)))
        start += int(h)
    return out


def _fusable(backend):
    """True for a backend whose own fused fast path applies (it says so itself)."""
    avail = getattr(backend, "fused_available", None)
    return callable(avail) and hasattr(backend, "fused_forward") and bool(avail())


def nominal_derivative(current, i50, scale, unit):
    """dP/dz (per network unit) of a sigmoid device (scalars or per-device arrays)."""
    s = expit((current - i50) / scale)
    return (unit / scale) * s * (1.0 - s)
