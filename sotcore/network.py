"""Multilayer networks of stochastic binary neurons (one device per hidden neuron).

Layer ``l`` computes pre-activations ``z = h W + b`` in *network units*; a fixed
affine :class:`CurrentMapping` turns them into pulse currents
``I = offset + unit * z`` (amperes) for the layer's devices, and the devices'
switched bits are the layer's output.  The first layer's input is the data;
later layers receive bits, so their product is a sum of weight rows
(the compiled ``binary_matvec`` kernel at inference).  The output layer is a
softmax; inference averages the class probabilities over ``T`` samples.
"""
import contextlib
from concurrent.futures import ThreadPoolExecutor
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
        currents (first layer (n, H), later (n*T, H)), bits (n*T, H) and
        ``hidden``, the bits as float32.
        """
        T = n_samples
        n = X.shape[0]
        slices = self.device_slices()
        z = X @ self.coefs[0]
        z += self.intercepts[0]
        cur = self._to_current(z)
        currents, bits_list, hidden = [cur], [], []
        bits = backend.pulse(np.repeat(cur, T, axis=0) if T > 1 else cur, slices[0])
        bits_list.append(bits)
        for k in range(1, len(self.coefs)):
            h = bits.astype(np.float32)
            hidden.append(h)
            z = h @ self.coefs[k]
            z += self.intercepts[k]
            if k == len(self.coefs) - 1:
                break
            cur = self._to_current(z)
            currents.append(cur)
            bits = backend.pulse(cur, slices[k])
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
                      row_keys=None):
        """Class probabilities averaged over ``n_samples`` stochastic passes.

        Two paths, the same model:

        * **fused** -- one hidden layer on an :class:`~sotcore.EmulatedBackend`
          (without aging): the first layer by BLAS (float32 sgemm), then one
          compiled kernel per block of inputs looks each device's threshold
          up once per input and draws all ``n_samples`` samples, output layer
          and softmax (``_kernels.fused_predict``, see ``_sotfused.h``).
        * **general** -- deeper networks and other backends: the backend's
          pulses per layer and the compiled binary mat-vec on the bits.

        The first layer is always computed in BLAS calls of exactly
        ``FIRST_LAYER_ROWS`` rows (zero-padded) with BLAS limited to one
        thread, so a row's currents -- and with ``row_keys`` its
        predictions -- never depend on the batch, its order or the thread
        counts.  With ``row_keys`` (one uint64 per row of X) and an emulated
        backend, each input's noise depends only on its key.  Memory is
        bounded by the blocks (``batch_size`` rows at a time on the general
        path), whatever ``len(X)``.
        """
        T = int(n_samples)
        if T < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        nt = effective_n_threads(n_threads)
        fused = len(self.coefs) == 2 and _fusable(backend)
        if row_keys is not None:
            key_fn = row_keys if callable(row_keys) else None
            if key_fn is None or not fused:
                row_keys = np.ascontiguousarray(row_keys(X) if key_fn else row_keys,
                                                dtype=np.uint64)
                if row_keys.shape != (X.shape[0],):
                    raise ValueError("row_keys must have one entry per row of X")
        if fused:
            return self._predict_fused(X, backend, T, nt, row_keys)
        return self._predict_general(X, backend, T, batch_size, nt, row_keys)

    def _first_layer(self, X, s, e, W1, xbuf, zbuf):
        """``X[s:e] @ W1`` (no bias) into ``zbuf[:e - s]`` by one BLAS call of
        ``FIRST_LAYER_ROWS`` rows; ``xbuf`` pads a partial or non-C-ordered block."""
        k = e - s
        if k == FIRST_LAYER_ROWS and X.dtype == np.float32 and X.flags.c_contiguous:
            xb = X[s:e]
        else:
            xbuf[:k] = X[s:e]
            xbuf[k:] = 0.0
            xb = xbuf
        with np.errstate(invalid="ignore", over="ignore"):   # non-finite results are reported
            np.matmul(xb, W1, out=zbuf)
        return zbuf[:k]

    def _predict_fused(self, X, backend, T, nt, row_keys):
        n, d = X.shape
        W1, W2, b2 = self.coefs[0], self.coefs[1], self.intercepts[1]
        H, C = W2.shape
        sl = self.device_slices()[0]
        pop = backend._subpop(sl)
        thr = pop.table()[2]
        a, b = pop._table_cache[np.float64]
        unit, offset = self.mapping.unit, self.mapping.offset
        # 4096 x grid coordinate of the device's table at current offset + unit (z + b1).
        A = (4096.0 * a * unit).astype(np.float32)
        B = (4096.0 * (a * (offset + unit * self.intercepts[0].astype(np.float64)) + b)
             ).astype(np.float32)
        Hp, Cp = _kernels.fused_padded_sizes(H, C)
        R = _aligned_empty(((Hp // 8) * 256, Cp), np.float32)
        _kernels.subset_sum_table(np.ascontiguousarray(W2, dtype=np.float32), R)
        bias = np.zeros(Cp, np.float32)
        bias[:C] = b2
        if row_keys is not None:
            keys, stream = row_keys, FUSED_STREAM
        else:
            # Unkeyed: a fresh stream per call, as for pulse().
            keys, stream = np.arange(n, dtype=np.uint64), backend.calls
            backend.calls += 1
        out = np.empty((n, C), dtype=np.float64)
        CH = FIRST_LAYER_ROWS
        nch = -(-n // CH)
        nw = max(1, min(nt, nch))
        seed = np.uint64(backend.seed)
        W1 = np.ascontiguousarray(W1, dtype=np.float32)

        def worker(w):
            # Worker w takes a contiguous range of blocks and owns its buffers; it
            # runs BLAS and the kernel on one thread, so no two thread pools ever
            # spin against each other.
            c0, c1 = nch * w // nw, nch * (w + 1) // nw
            r0, r1 = c0 * CH, min(c1 * CH, n)
            if callable(keys):
                kw = np.ascontiguousarray(keys(X[r0:r1]), dtype=np.uint64)
                if kw.shape != (r1 - r0,):
                    raise ValueError("row_keys must give one key per row")
            else:
                kw = keys[r0:r1]
            xbuf = np.empty((CH, d), np.float32)
            zbuf = np.empty((CH, H), np.float32)
            bad = False
            for c in range(c0, c1):
                s, e = c * CH, min((c + 1) * CH, n)
                Z = self._first_layer(X, s, e, W1, xbuf, zbuf)
                bad |= _kernels.fused_predict(Z, A, B, thr, R, bias, seed, stream,
                                              kw[s - r0:e - r0], T, out[s:e], 1)
            return bad

        with _blas_threads(1):
            if nw == 1:
                bad = worker(0)
            else:
                # Worker 0 is this thread; the others are helpers (no pool to keep).
                with ThreadPoolExecutor(nw - 1) as ex:
                    futures = [ex.submit(worker, w) for w in range(1, nw)]
                    bad = worker(0)
                    bad = any([f.result() for f in futures]) or bad
        if bad:
            raise ValueError("currents must be finite; the first layer produced NaN or "
                             "infinity (check the inputs and the weights)")
        backend.pulse_counts[sl] += n * T
        return out

    def _predict_general(self, X, backend, T, batch_size, nt, row_keys):
        n, d = X.shape
        if batch_size is None:
            batch_size = max(1, 2 ** 19 // (T * max(self.hidden_sizes)))
        slices = self.device_slices()
        out = np.empty((n, self.layer_sizes[-1]), dtype=np.float64)
        keyed = row_keys is not None and hasattr(backend, "pulse_keyed")
        CH = FIRST_LAYER_ROWS
        xbuf = np.empty((CH, d), np.float32)
        zbuf = np.empty((CH, self.layer_sizes[1]), np.float32)
        W1 = np.ascontiguousarray(self.coefs[0], dtype=np.float32)
        with _blas_threads(1):
            for s in range(0, n, batch_size):
                e = min(s + batch_size, n)
                z = np.empty((e - s, self.layer_sizes[1]), np.float32)
                for c in range(s, e, CH):
                    z[c - s:min(c + CH, e) - s] = self._first_layer(X, c, min(c + CH, e), W1,
                                                                     xbuf, zbuf)
                z += self.intercepts[0]
                cur = np.repeat(self.mapping.to_current(z).astype(np.float32, copy=False), T,
                                axis=0)
                if keyed:
                    # Sample t of input i draws from key_i + t * golden (distinct per sample).
                    with np.errstate(over="ignore"):
                        keys = (np.repeat(row_keys[s:e], T)
                                + np.tile(np.arange(T, dtype=np.uint64), e - s)
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
                out[s:e] = softmax(zk.astype(np.float64)).reshape(e - s, T, -1).mean(axis=1)
        return out


#: Rows of every first-layer BLAS call at inference (the last block zero-padded):
#: a fixed call shape gives each row the same arithmetic in any batch.
FIRST_LAYER_ROWS = 256

#: Stream of the fused path's keyed draws (the unfused keyed path uses 2**62 + layer).
FUSED_STREAM = (1 << 62) + (1 << 61)


def _fusable(backend):
    """True for an emulator whose pulses the fused kernel reproduces in law: an
    ``EmulatedBackend`` (not a subclass changing how it pulses) without aging."""
    from .backends import EmulatedBackend
    return (isinstance(backend, EmulatedBackend)
            and type(backend)._pulse is EmulatedBackend._pulse
            and type(backend).pulse_keyed is EmulatedBackend.pulse_keyed
            and getattr(backend, "aging", None) is None)


def _aligned_empty(shape, dtype, align=64):
    """An uninitialised array whose data start on an ``align``-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + nbytes].view(dtype).reshape(shape)


_BLAS_CONTROLLER = None


def _blas_threads(n):
    """Context manager limiting the BLAS libraries to ``n`` threads (threadpoolctl)."""
    global _BLAS_CONTROLLER
    if _BLAS_CONTROLLER is None:
        try:
            from threadpoolctl import ThreadpoolController
            _BLAS_CONTROLLER = ThreadpoolController()
        except Exception:  # pragma: no cover - threadpoolctl comes with scikit-learn
            _BLAS_CONTROLLER = False
    if not _BLAS_CONTROLLER:
        return contextlib.nullcontext()
    return _BLAS_CONTROLLER.limit(limits=n, user_api="blas")


def nominal_derivative(current, i50, scale, unit):
    """dP/dz (per network unit) of a sigmoid device (scalars or per-device arrays)."""
    s = expit((current - i50) / scale)
    return (unit / scale) * s * (1.0 - s)
