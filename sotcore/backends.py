"""Device backends: where a network's hidden neurons get their bits.

A backend owns ``n_devices`` devices.  The network asks it to apply one pulse
per (row, device) and return the switched bits::

    bits = backend.pulse(currents, devices=slice(0, 500))   # uint8 0/1

``currents`` has shape (n, k) in amperes and ``devices`` names the k devices
(a slice or an integer array).  Each row is one pulse on each named device,
after which the device is reset.  Anything that implements ``n_devices`` and
``pulse`` is a backend; subclass :class:`DeviceBackend` to get validation.
"""
import time

import numpy as np

from ._utils import as_float_array, seed_from_random_state
from .devices import DevicePopulation
from .exceptions import BackendError

__all__ = ["DeviceBackend", "EmulatedBackend", "InstrumentBackend", "RecordingBackend",
           "ReplayBackend", "CompensatedBackend", "BackendError"]


def _device_index(devices, n_devices):
    """Normalise ``devices`` to a slice or an int array inside [0, n_devices)."""
    if devices is None:
        return slice(0, n_devices)
    if isinstance(devices, slice):
        start, stop, step = devices.indices(n_devices)
        if step != 1:
            return np.arange(start, stop, step)
        if stop <= start:
            raise ValueError(f"devices {devices} selects no device of {n_devices}")
        return slice(start, stop)
    idx = np.asarray(devices)
    if idx.dtype.kind not in "iu" or idx.ndim != 1 or idx.size == 0:
        raise TypeError("devices must be a slice or a non-empty 1-D integer array")
    if idx.min() < 0 or idx.max() >= n_devices:
        raise ValueError(f"devices must lie in [0, {n_devices}), got {idx.min()}..{idx.max()}")
    return idx


def check_bits(res, shape, who="backend"):
    """Return ``res`` as a uint8 0/1 array of ``shape`` or raise BackendError."""
    if isinstance(res, np.ndarray) and res.dtype == np.uint8 and res.shape == shape:
        if res.size == 0 or res.max() <= 1:
            return res
    try:
        arr = np.asarray(res)
    except Exception:
        raise BackendError(f"{who} returned something that is not an array") from None
    if arr.shape != shape:
        raise BackendError(f"{who} returned shape {arr.shape}, expected {shape}")
    if arr.dtype.kind not in "biuf":
        raise BackendError(f"{who} returned dtype {arr.dtype}, expected 0/1 values")
    ok = (arr == 0) | (arr == 1)
    if arr.size and not ok.all():
        raise BackendError(f"{who} returned non-binary value {arr[~ok].flat[0]!r}")
    return arr.astype(np.uint8)


def _count(devices):
    if isinstance(devices, slice):
        return devices.stop - devices.start
    return devices.shape[0]


class DeviceBackend:
    """Base class: validates requests and counts pulses; subclasses implement ``_pulse``."""

    n_devices = 0
    _check_finite = True     # the emulator's kernel checks finiteness itself

    def __init__(self):
        self.pulse_counts = np.zeros(self.n_devices, dtype=np.int64)

    def pulse(self, currents, devices=None):
        """Apply one pulse per (row, device); return uint8 bits of the same shape."""
        devices = _device_index(devices, self.n_devices)
        k = _count(devices)
        arr = as_float_array(currents, "currents", ndim=2, allow_float32=True,
                             finite=self._check_finite)
        if arr.shape[1] != k:
            raise ValueError(f"currents must have {k} columns (one per requested device), "
                             f"got shape {arr.shape}")
        bits = check_bits(self._pulse(arr, devices), arr.shape, type(self).__name__)
        self.pulse_counts[devices] += arr.shape[0]
        return bits

    def _pulse(self, currents, devices):  # pragma: no cover - abstract
        raise NotImplementedError

    def device_curves(self):
        """A DevicePopulation describing the devices if this backend knows one, else None."""
        return None

    def get_state(self):
        """JSON-serialisable state needed to continue exactly (checkpoints)."""
        return {"pulse_counts": self.pulse_counts.tolist()}

    def set_state(self, state):
        counts = np.asarray(state["pulse_counts"], dtype=np.int64)
        if counts.shape != (self.n_devices,):
            raise ValueError(f"backend state is for {counts.shape[0]} devices, this backend "
                             f"has {self.n_devices}")
        self.pulse_counts = counts


class EmulatedBackend(DeviceBackend):
    """Emulated devices: the compiled table sampler on a :class:`DevicePopulation`.

    Each call draws from a fresh counter-based stream (seed, call number), so a
    run is reproducible from ``random_state`` alone and independent of threads.

    ``aging`` (a :class:`~sotcore.devices.DeviceAging`) makes the devices drift,
    stick and misread as they receive pulses; the emulated population is
    refreshed whenever some device has had ``update_pulses`` more pulses.
    ``population`` then always describes the devices *now*.
    """

    _check_finite = False

    def __init__(self, population, random_state=None, n_threads=None, aging=None,
                 update_pulses=1000):
        if not isinstance(population, DevicePopulation):
            raise TypeError(f"population must be a DevicePopulation, got "
                            f"{type(population).__name__}")
        self.population = population
        self.n_devices = len(population)
        self.n_threads = n_threads
        self.seed = seed_from_random_state(random_state)
        self.calls = 0
        self._subpops = {}
        self.aging = aging
        self.update_pulses = int(update_pulses)
        super().__init__()
        if aging is not None:
            self.initial_population = population
            self._aging_draws = aging.draw(self.n_devices, np.random.default_rng(
                [self.seed & 0xFFFFFFFF, self.seed >> 32, 0xA9E]))
            self._aged_at = None
            self._refresh()

    def _refresh(self):
        counts = self.pulse_counts
        if self._aged_at is not None and (counts - self._aged_at).max() < self.update_pulses:
            return
        self.population = self.aging.population_at(self.initial_population, counts,
                                                    self._aging_draws)
        self._aged_at = counts.copy()
        self._subpops = {}

    def _subpop(self, devices):
        if isinstance(devices, slice) and devices == slice(0, self.n_devices):
            return self.population
        key = (devices.start, devices.stop) if isinstance(devices, slice) else devices.tobytes()
        sub = self._subpops.get(key)
        if sub is None:
            sub = self.population[devices]
            self._subpops[key] = sub
        return sub

    def _pulse(self, currents, devices):
        if self.aging is not None:
            self._refresh()
        bits = self._subpop(devices)._sample_seeded(currents, self.seed, self.n_threads,
                                                    stream=self.calls, name="currents")
        self.calls += 1
        return bits

    def age(self, pulses):
        """Advance every device's pulse count by ``pulses`` without sampling
        (time in service, for aging studies); returns the new population."""
        if isinstance(pulses, bool) or not isinstance(pulses, (int, np.integer)) or pulses < 0:
            raise ValueError(f"pulses must be a non-negative integer, got {pulses!r}")
        self.pulse_counts += int(pulses)
        if self.aging is not None:
            self._refresh()
        return self.population

    def pulse_keyed(self, currents, devices, row_keys, stream):
        """Like ``pulse``, but row ``i`` draws from its own key ``row_keys[i]`` in
        ``stream`` (not from the call count): the same input row always gives
        the same bits, whatever else is in the batch.  Used for inference."""
        devices = _device_index(devices, self.n_devices)
        arr = as_float_array(currents, "currents", ndim=2, allow_float32=True, finite=False)
        if arr.shape[1] != _count(devices):
            raise ValueError(f"currents must have {_count(devices)} columns, got {arr.shape}")
        keys = np.ascontiguousarray(row_keys, dtype=np.uint64)
        if keys.shape != (arr.shape[0],):
            raise ValueError("row_keys must have one entry per row of currents")
        if self.aging is not None:
            self._refresh()
        bits = self._subpop(devices)._sample_seeded(
            arr, self.seed, self.n_threads, stream=(1 << 62) + int(stream), row_keys=keys,
            name="currents")
        self.pulse_counts[devices] += arr.shape[0]
        return bits

    def device_curves(self):
        return self.population

    def get_state(self):
        state = {**super().get_state(), "calls": self.calls, "seed": str(self.seed)}
        if self.aging is not None:
            state["aged_at"] = self._aged_at.tolist()
        return state

    def set_state(self, state):
        if str(state.get("seed")) != str(self.seed):
            raise ValueError("backend state comes from an emulator with another seed")
        super().set_state(state)
        self.calls = int(state["calls"])
        if self.aging is not None:
            # Rebuild the population exactly as it was at the last refresh.
            aged_at = np.asarray(state["aged_at"], dtype=np.int64)
            self.population = self.aging.population_at(self.initial_population, aged_at,
                                                        self._aging_draws)
            self._aged_at = aged_at
            self._subpops = {}


class InstrumentBackend(DeviceBackend):
    """Wrap a user's instrument code as a backend.

    Parameters
    ----------
    fn : callable
        ``fn(currents, device_indices) -> bits``: ``currents`` float64 (n, k)
        amperes, ``device_indices`` int64 (k,); must return n x k values in
        {0, 1} (bool or integer dtype, or floats equal to 0/1).
    n_devices : int
        Number of devices the instrument drives.
    pulse_duration : float, default 10e-9
        Seconds per pulse, including reset and read (ASSUMPTION: 10 ns pulses
        as in SOT switching experiments; set it to your instrument's figure).
    parallel : bool, default True
        Whether one row's pulses hit all its devices at once (crossbar-style).
        The implied hardware time is ``rows * pulse_duration`` if True, else
        ``pulses * pulse_duration``.
    max_batch : int, default 4096
        Largest number of rows sent to ``fn`` in one call.
    curves : DevicePopulation, optional
        A calibration of the devices (used by the ``calibrated`` surrogate).
    """

    def __init__(self, fn, n_devices, *, pulse_duration=10e-9, parallel=True, max_batch=4096,
                 curves=None):
        if not callable(fn):
            raise TypeError("fn must be callable: fn(currents, device_indices) -> bits")
        if isinstance(n_devices, bool) or not isinstance(n_devices, (int, np.integer)) \
                or n_devices < 1:
            raise ValueError(f"n_devices must be a positive integer, got {n_devices!r}")
        if not (isinstance(max_batch, (int, np.integer)) and max_batch >= 1):
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        if not (np.isfinite(pulse_duration) and pulse_duration > 0):
            raise ValueError(f"pulse_duration must be > 0 seconds, got {pulse_duration!r}")
        if curves is not None and (not isinstance(curves, DevicePopulation)
                                   or len(curves) != n_devices):
            raise ValueError("curves must be a DevicePopulation with one entry per device")
        self.fn = fn
        self.n_devices = int(n_devices)
        self.pulse_duration = float(pulse_duration)
        self.parallel = bool(parallel)
        self.max_batch = int(max_batch)
        self.curves = curves
        self.rows = 0
        self.wall_time = 0.0
        super().__init__()

    def _pulse(self, currents, devices):
        idx = (np.arange(devices.start, devices.stop) if isinstance(devices, slice)
               else devices).astype(np.int64)
        n, k = currents.shape
        out = np.empty((n, k), dtype=np.uint8)
        cur64 = np.asarray(currents, dtype=np.float64)
        for s in range(0, n, self.max_batch):
            chunk = cur64[s:s + self.max_batch]
            t0 = time.perf_counter()
            try:
                res = self.fn(chunk.copy(), idx.copy())
            except Exception as exc:
                raise BackendError(f"instrument call failed on rows {s}..{s + len(chunk) - 1}: "
                                   f"{type(exc).__name__}: {exc}") from exc
            self.wall_time += time.perf_counter() - t0
            out[s:s + len(chunk)] = check_bits(res, chunk.shape, "instrument")
        self.rows += n
        return out

    def get_state(self):
        return {**super().get_state(), "rows": self.rows, "wall_time": self.wall_time}

    def set_state(self, state):
        super().set_state(state)
        self.rows, self.wall_time = int(state["rows"]), float(state["wall_time"])

    @property
    def hardware_time(self):
        """Seconds of pulsing implied by the pulses so far (see ``parallel``)."""
        n = self.rows if self.parallel else int(self.pulse_counts.sum())
        return n * self.pulse_duration

    def device_curves(self):
        return self.curves


class RecordingBackend(DeviceBackend):
    """Log every request (currents, devices) and answer (bits) of another backend.

    ``replay()`` gives a backend that answers the same requests with the same
    bits, bit-exactly; ``records()`` flattens the log into per-pulse records
    ``(device, current, switched)`` for re-calibration.
    """

    def __init__(self, inner, max_records=None):
        self.inner = inner
        self.n_devices = inner.n_devices
        self.max_records = max_records
        self.log = []
        super().__init__()

    def _pulse(self, currents, devices):
        bits = self.inner.pulse(currents, devices)
        self.log.append((np.array(currents, copy=True), devices, bits.copy()))
        if self.max_records is not None:
            while sum(c.size for c, _, _ in self.log) > self.max_records and len(self.log) > 1:
                self.log.pop(0)
        return bits

    def device_curves(self):
        return self.inner.device_curves()

    def get_state(self):
        inner = self.inner.get_state() if hasattr(self.inner, "get_state") else None
        return {**super().get_state(), "log_length": len(self.log), "inner": inner}

    def set_state(self, state):
        super().set_state(state)
        del self.log[int(state["log_length"]):]
        if state.get("inner") is not None and hasattr(self.inner, "set_state"):
            self.inner.set_state(state["inner"])

    def records(self, last=None):
        """Per-pulse records of the last ``last`` requests (all by default).

        Returns a dict of 1-D arrays ``device``, ``current``, ``switched``.
        """
        log = self.log if last is None else self.log[-last:]
        dev, cur, sw = [], [], []
        for c, d, b in log:
            idx = np.arange(d.start, d.stop) if isinstance(d, slice) else d
            dev.append(np.broadcast_to(idx, c.shape).ravel())
            cur.append(np.asarray(c, dtype=np.float64).ravel())
            sw.append(b.ravel())
        if not dev:
            return {"device": np.zeros(0, np.int64), "current": np.zeros(0),
                    "switched": np.zeros(0, np.uint8)}
        return {"device": np.concatenate(dev).astype(np.int64), "current": np.concatenate(cur),
                "switched": np.concatenate(sw)}

    def replay(self):
        """A backend answering the recorded requests with the recorded bits."""
        return ReplayBackend(self.log, self.n_devices, curves=self.inner.device_curves())

    def save(self, path):
        """Save the log to a ``.npz`` file (no pickle)."""
        arrays = {}
        for i, (c, d, b) in enumerate(self.log):
            idx = np.arange(d.start, d.stop) if isinstance(d, slice) else d
            arrays[f"c{i}"], arrays[f"d{i}"], arrays[f"b{i}"] = c, idx, b
        np.savez_compressed(path, n_devices=self.n_devices, n_calls=len(self.log), **arrays)


class ReplayBackend(DeviceBackend):
    """Answer a recorded sequence of requests with the recorded bits.

    Raises :class:`BackendError` if a request differs from the recording
    (different currents or devices) or the recording runs out.
    """

    def __init__(self, log, n_devices, curves=None):
        self.n_devices = int(n_devices)
        self._log = list(log)
        self._pos = 0
        self.curves = curves
        super().__init__()

    def device_curves(self):
        return self.curves

    @classmethod
    def load(cls, path):
        with np.load(path, allow_pickle=False) as z:
            n = int(z["n_calls"])
            log = [(z[f"c{i}"], z[f"d{i}"], z[f"b{i}"]) for i in range(n)]
            return cls(log, int(z["n_devices"]))

    def _pulse(self, currents, devices):
        if self._pos >= len(self._log):
            raise BackendError(f"replay exhausted after {len(self._log)} recorded requests")
        c, d, b = self._log[self._pos]
        idx = np.arange(devices.start, devices.stop) if isinstance(devices, slice) else devices
        didx = np.arange(d.start, d.stop) if isinstance(d, slice) else d
        if not np.array_equal(idx, didx) or c.shape != currents.shape or \
                not np.array_equal(np.asarray(c), np.asarray(currents, dtype=c.dtype)):
            raise BackendError(f"replay diverged at request {self._pos}: the currents or "
                               f"devices differ from the recording")
        self._pos += 1
        return b.copy()


class CompensatedBackend(DeviceBackend):
    """Make drifting devices look like their reference curves to the network.

    Each request for current ``I`` on device ``j`` is applied as
    ``I' = i50_now[j] + (I - i50_ref[j]) * scale_now[j] / scale_ref[j]``, so a
    device whose curve moved from ``reference`` to ``now`` switches with the
    reference probability.  ``now`` starts equal to ``reference`` and is updated
    by :meth:`recalibrate` (from recorded pulses) or :meth:`set_curves`.
    Put a :class:`RecordingBackend` *inside* (between this and the devices) so
    the log holds the currents actually applied.

    Parameters
    ----------
    inner : device backend
    reference : DevicePopulation
        The curves the network was (or is being) trained against.
    """

    def __init__(self, inner, reference):
        if not isinstance(reference, DevicePopulation) or len(reference) != inner.n_devices:
            raise ValueError("reference must be a DevicePopulation with one entry per device")
        self.inner = inner
        self.n_devices = inner.n_devices
        self.reference = reference
        self.i50_now = reference.i50.copy()
        self.scale_now = reference.scale.copy()
        self.recalibrations = 0
        super().__init__()

    def device_curves(self):
        return self.reference

    def set_curves(self, i50, scale, mask=None):
        """Set the devices' present curves (``mask``: only these devices)."""
        i50 = np.asarray(i50, dtype=np.float64)
        scale = np.asarray(scale, dtype=np.float64)
        mask = np.ones(self.n_devices, bool) if mask is None else np.asarray(mask, bool)
        if i50.shape != (self.n_devices,) or scale.shape != (self.n_devices,):
            raise ValueError(f"i50 and scale need {self.n_devices} entries")
        ok = mask & np.isfinite(i50) & np.isfinite(scale) & (scale > 0)
        self.i50_now[ok] = i50[ok]
        self.scale_now[ok] = scale[ok]
        return ok

    def _pulse(self, currents, devices):
        idx = np.arange(devices.start, devices.stop) if isinstance(devices, slice) else devices
        ref = self.reference
        gain = (self.scale_now[idx] / ref.scale[idx]).astype(currents.dtype)
        applied = (self.i50_now[idx].astype(currents.dtype)
                   + (currents - ref.i50[idx].astype(currents.dtype)) * gain)
        return self.inner.pulse(applied, devices)

    def recalibrate(self, records, *, bin_width=None, min_pulses=200, max_rel_se=0.25):
        """Refit the devices' present curves from per-pulse records.

        ``records``: dict of ``device``, ``current`` (applied amperes) and
        ``switched`` arrays, e.g. ``RecordingBackend.records(last=k)``.
        Currents are binned (``bin_width`` amperes, default a quarter of the
        median reference scale) before the binomial fit.  Devices with fewer
        than ``min_pulses`` pulses or fewer than 3 bins with both outcomes,
        flagged fits (stuck, poor fit, non-monotone, at a bound) or an I50
        standard error above ``max_rel_se`` of the scale keep their previous
        curve.  Returns the boolean mask of devices updated.
        """
        from .calibration import calibrate
        dev = np.asarray(records["device"], dtype=np.int64)
        cur = np.asarray(records["current"], dtype=np.float64)
        sw = np.asarray(records["switched"], dtype=np.int64)
        if bin_width is None:
            bin_width = 0.25 * float(np.median(self.reference.scale))
        b = np.rint(cur / bin_width).astype(np.int64)
        key = dev * (1 << 40) + (b - b.min(initial=0))
        uniq, inv, counts = np.unique(key, return_inverse=True, return_counts=True)
        sw_sum = np.bincount(inv, weights=sw, minlength=uniq.size)
        cur_mean = np.bincount(inv, weights=cur, minlength=uniq.size) / counts
        d = uniq >> 40
        per_dev = np.bincount(d, weights=counts, minlength=self.n_devices)
        # Only devices whose pulses straddle their switching region carry
        # information: >= 3 current bins with both outcomes.  Near-separable
        # devices (scale -> 0) would also stall the joint fit.
        mixed = (sw_sum > 0) & (sw_sum < counts)
        n_mixed = np.bincount(d, weights=mixed, minlength=self.n_devices)
        use = (per_dev[d] >= min_pulses) & (n_mixed[d] >= 3)
        updated = np.zeros(self.n_devices, bool)
        if not use.any():
            return updated
        table = {"device": d[use], "current": cur_mean[use], "pulses": counts[use],
                 "switched": sw_sum[use].astype(np.int64)}
        res = calibrate(table, progress=False)
        f = res.per_device
        labels = np.asarray(f["device"], dtype=np.int64)
        good = ~(f["stuck"] | f["poor_fit"] | f["nonmonotone"] | f["at_bound"]) \
            & np.isfinite(f["i50"]) & (f["i50_se"] < max_rel_se * f["scale"])
        i50 = self.i50_now.copy()
        scale = self.scale_now.copy()
        i50[labels[good]] = f["i50"][good]
        scale[labels[good]] = f["scale"][good]
        mask = np.zeros(self.n_devices, bool)
        mask[labels[good]] = True
        updated = self.set_curves(i50, scale, mask)
        self.recalibrations += 1
        return updated

    def get_state(self):
        inner = self.inner.get_state() if hasattr(self.inner, "get_state") else None
        return {**super().get_state(), "inner": inner, "i50_now": self.i50_now.tolist(),
                "scale_now": self.scale_now.tolist()}

    def set_state(self, state):
        super().set_state(state)
        self.i50_now = np.asarray(state["i50_now"], dtype=np.float64)
        self.scale_now = np.asarray(state["scale_now"], dtype=np.float64)
        if state.get("inner") is not None and hasattr(self.inner, "set_state"):
            self.inner.set_state(state["inner"])
