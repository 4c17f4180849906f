"""Multilayer networks of stochastic binary neurons (one device per hidden neuron).

Layer ``l`` computes pre-activations ``z = h W + b`` in *network units*; a fixed
affine :class:`CurrentMapping` turns them into pulse currents
``I = offset + unit * z`` (amperes) for the layer's devices, and the devices'
switched bits are the layer's output.  The first layer's input is the data;
later layers receive bits, so their product is a sum of weight rows
(the compiled ``binary_matvec`` kernel at inference).  The output layer is a
softmax; inference averages the class probabilities over ``T`` samples.
"""
from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from . import _kernels
from ._utils import effective_n_threads

__all__ = ["CurrentMapping", "StochasticMLP", "softmax"]


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


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


class StochasticMLP:
    """Weights and forward passes of a network of stochastic binary neurons.

    Parameters
    ----------
    layer_sizes : sequence of int
        ``(n_features, H1, ..., HL, n_classes)``; hidden layer ``l`` uses the
        backend's devices ``offset_l .. offset_l + H_l`` in order.
    mapping : CurrentMapping
    """

    def __init__(self, layer_sizes, mapping):
        sizes = [int(s) for s in layer_sizes]
        if len(sizes) < 3 or min(sizes) < 1:
            raise ValueError(f"layer_sizes needs inputs, >= 1 hidden layer and outputs, "
                             f"all >= 1; got {layer_sizes}")
        self.layer_sizes = sizes
        self.mapping = mapping
        self.coefs = [np.zeros((a, b), np.float32) for a, b in zip(sizes[:-1], sizes[1:])]
        self.intercepts = [np.zeros(b, np.float32) for b in sizes[1:]]

    @property
    def hidden_sizes(self):
        return self.layer_sizes[1:-1]

    @property
    def n_devices(self):
        return sum(self.hidden_sizes)

    def device_slices(self):
        out, start = [], 0
        for h in self.hidden_sizes:
            out.append(slice(start, start + h))
            start += h
        return out

    def initialize(self, rng, hidden_bias):
        """Glorot-uniform weights; hidden biases at ``hidden_bias`` (units), output 0."""
        for k, (a, b) in enumerate(zip(self.layer_sizes[:-1], self.layer_sizes[1:])):
            bound = np.sqrt(6.0 / (a + b))
            self.coefs[k] = rng.uniform(-bound, bound, (a, b)).astype(np.float32)
            last = k == len(self.layer_sizes) - 2
            self.intercepts[k] = np.full(b, 0.0 if last else hidden_bias, dtype=np.float32)

    # -- forward ------------------------------------------------------------------------
    def forward(self, X, backend, n_samples):
        """One stochastic forward pass with ``n_samples`` samples per input.

        Returns ``(probs, cache)`` where ``probs`` has shape (n, T, n_classes)
        and ``cache`` holds what the backward pass needs: per hidden layer the
        currents (first layer (n, H), later (n*T, H)) and bits (n*T, H).
        """
        T = n_samples
        n = X.shape[0]
        slices = self.device_slices()
        z = X @ self.coefs[0] + self.intercepts[0]
        cur = self.mapping.to_current(z).astype(np.float32, copy=False)
        currents, bits_list = [cur], []
        bits = backend.pulse(np.repeat(cur, T, axis=0), slices[0])
        bits_list.append(bits)
        for k in range(1, len(self.coefs)):
            h = bits.astype(np.float32)
            z = h @ self.coefs[k] + self.intercepts[k]
            if k == len(self.coefs) - 1:
                break
            cur = self.mapping.to_current(z).astype(np.float32, copy=False)
            currents.append(cur)
            bits = backend.pulse(cur, slices[k])
            bits_list.append(bits)
        probs = softmax(z).reshape(n, T, -1)
        return probs, {"currents": currents, "bits": bits_list}

    def predict_proba(self, X, backend, n_samples=32, batch_size=None, n_threads=None,
                      row_keys=None):
        """Class probabilities averaged over ``n_samples`` stochastic passes.

        Hidden layers after the first and the output use the compiled binary
        mat-vec kernel on the bits.  Rows are processed in batches so memory
        stays bounded whatever ``len(X)``.  With ``row_keys`` (one uint64 per
        row of X) and a backend that has ``pulse_keyed`` (the emulator), the
        noise of each input depends only on its key: predictions do not depend
        on the batch, the row order or earlier calls.
        """
        T = int(n_samples)
        n = X.shape[0]
        if batch_size is None:
            batch_size = max(1, 2 ** 19 // (T * max(self.hidden_sizes)))
        nt = effective_n_threads(n_threads)
        slices = self.device_slices()
        out = np.empty((n, self.layer_sizes[-1]), dtype=np.float64)
        keyed = row_keys is not None and hasattr(backend, "pulse_keyed")
        for s in range(0, n, batch_size):
            Xb = X[s:s + batch_size]
            z = Xb @ self.coefs[0] + self.intercepts[0]
            cur = np.repeat(self.mapping.to_current(z).astype(np.float32, copy=False), T, axis=0)
            if keyed:
                # Sample t of input i draws from key_i + t * golden (distinct per sample).
                with np.errstate(over="ignore"):
                    keys = (np.repeat(np.asarray(row_keys[s:s + batch_size], np.uint64), T)
                            + np.tile(np.arange(T, dtype=np.uint64), len(Xb))
                            * np.uint64(0x9E3779B97F4A7C15))

            def pulse(c, k):
                return backend.pulse_keyed(c, slices[k], keys, k) if keyed \
                    else backend.pulse(c, slices[k])
            bits = pulse(cur, 0)
            for k in range(1, len(self.coefs)):
                zk = np.empty((bits.shape[0], self.coefs[k].shape[1]), np.float32)
                _kernels.binary_matvec(bits, self.coefs[k], zk, nt)
                zk += self.intercepts[k]
                if k == len(self.coefs) - 1:
                    break
                bits = pulse(self.mapping.to_current(zk).astype(np.float32, copy=False), k)
            out[s:s + batch_size] = softmax(zk.astype(np.float64)).reshape(
                Xb.shape[0], T, -1).mean(axis=1)
        return out


def nominal_derivative(current, i50, scale, unit):
    """dP/dz (per network unit) of a sigmoid device (scalars or per-device arrays)."""
    s = expit((current - i50) / scale)
    return (unit / scale) * s * (1.0 - s)
