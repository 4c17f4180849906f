"""Device backends: where a network's hidden neurons get their bits.

A backend owns ``n_devices`` devices.  The network asks it to apply one pulse
per (row, device) and return the switched bits::

    bits = backend.pulse(currents, devices=slice(0, 500))   # uint8 0/1

``currents`` has shape (n, k) in amperes and ``devices`` names the k devices
(a slice or an integer array).  Each row is one pulse on each named device,
after which the device is reset.  Anything that implements ``n_devices`` and
``pulse`` is a backend; subclass :class:`DeviceBackend` to get validation.

Size: one module for the protocol and every backend (emulator, instrument,
recording/replay, compensated), as shared/DESIGN.md lays out; they share the
validation base class and the state helpers, and a user reads them side by side.
"""
import collections
from collections import deque
import threading
import time
import typing

import numpy as np

from . import _fused, _io, _pulselog
from ._utils import as_float_array, effective_n_threads, seed_from_random_state
from .devices import DevicePopulation
from .exceptions import BackendError, InvalidInputError, SotcoreError

__all__ = ["Backend", "DeviceBackend", "EmulatedBackend", "InstrumentBackend", "RecordingBackend",
           "ReplayBackend", "CompensatedBackend", "BackendError", "device_indices"]


@typing.runtime_checkable
class Backend(typing.Protocol):
    """What every device backend offers (``isinstance(obj, Backend)`` checks it).

    Optional: ``device_curves() -> DevicePopulation | None``, ``get_state()`` /
    ``set_state(state)`` (exact resume), ``pulse_counts``,
    ``accepts_repeated_devices`` and the emulator's own fast path
    (``fused_available()`` / ``fused_forward(...)``).
    """

    n_devices: int

    def pulse(self, currents, devices=None):
        """uint8 0/1 bits of one pulse per (row, named device); shape of ``currents``."""


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


def device_indices(devices):
    """The int64 device indices of a normalised selection (slice or int array)."""
    if isinstance(devices, slice):
        return np.arange(devices.start, devices.stop, dtype=np.int64)
    return np.asarray(devices, dtype=np.int64)


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


def _add_counts(counts, devices, rows):
    """``counts[d] += rows`` for every named device, repeated names counted each time."""
    if isinstance(devices, slice):
        counts[devices] += rows
    else:
        np.add.at(counts, devices, rows)


class DeviceBackend:
    """Base class: validates requests and counts pulses; subclasses implement ``_pulse``.

    The protocol every backend follows (``typing``-style, duck-typed):
    ``n_devices``; ``pulse(currents, devices)``; optionally ``device_curves()``,
    ``get_state()``/``set_state()``.  ``accepts_repeated_devices`` says whether
    one request may name a device twice (the emulator samples each column
    independently; an instrument gets each device at most once per request,
    see :class:`~sotcore.network.DeviceMap`).
    """

    n_devices = 0
    accepts_repeated_devices = False
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
        try:
            res = self._pulse(arr, devices)
        except (SotcoreError, ValueError, TypeError):
            raise
        except Exception as exc:
            raise BackendError(f"{type(self).__name__} failed on a request of {arr.shape[0]} "
                               f"row(s) x {k} device(s): {type(exc).__name__}: {exc}") from exc
        bits = check_bits(res, arr.shape, type(self).__name__)
        _add_counts(self.pulse_counts, devices, arr.shape[0])
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
        if not isinstance(state, dict) or not isinstance(state.get("pulse_counts"),
                                                         (list, np.ndarray)):
            raise InvalidInputError("backend state has no list field 'pulse_counts'")
        if len(state["pulse_counts"]) != self.n_devices:
            raise InvalidInputError(f"backend state is for {len(state['pulse_counts'])} "
                                    f"devices, this backend has {self.n_devices}")
        counts = _state_array(state, "pulse_counts", (self.n_devices,), np.float64)
        if (counts < 0).any() or (counts != np.round(counts)).any() or counts.max(
                initial=0) >= 2.0 ** 53:
            raise InvalidInputError("backend state field 'pulse_counts' must hold "
                                    "non-negative integers")
        self.pulse_counts = counts.astype(np.int64)


class EmulatedBackend(DeviceBackend):
    """Emulated devices: the compiled table sampler on a :class:`DevicePopulation`.

    Each call draws from a fresh counter-based stream (seed, call number), so a
    run is reproducible from ``random_state`` alone and independent of threads.

    ``aging`` (a :class:`~sotcore.devices.DeviceAging`) makes the devices drift,
    stick and misread as they receive pulses; the emulated population is
    refreshed whenever some device has had ``update_pulses`` more pulses.
    ``population`` then always describes the devices *now*.

    The emulator offers its own fast path, :meth:`fused_forward` (a whole
    one-hidden-layer inference pass in one compiled kernel), where it
    reproduces :meth:`pulse` in law (:meth:`fused_available`).
    """

    _check_finite = False
    accepts_repeated_devices = True
    #: Sub-populations kept for repeated device selections (least recently used evicted).
    SUBPOP_CACHE = 16

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
        self._subpops = collections.OrderedDict()
        self.aging = aging
        self.update_pulses = int(update_pulses)
        super().__init__()
        if aging is not None:
            self.initial_population = population
            self._aging_draws = aging.draw(self.n_devices, np.random.default_rng(
                [self.seed & 0xFFFFFFFF, self.seed >> 32, _fused.AGING_SALT]))
            self._aged_at = None
            self._refresh()

    def _refresh(self):
        counts = self.pulse_counts
        if self._aged_at is not None and (counts - self._aged_at).max() < self.update_pulses:
            return
        self.population = self.aging.population_at(self.initial_population, counts,
                                                    self._aging_draws)
        self._aged_at = counts.copy()
        self._subpops.clear()

    def _subpop(self, devices):
        if isinstance(devices, slice) and devices == slice(0, self.n_devices):
            return self.population
        key = (devices.start, devices.stop) if isinstance(devices, slice) else devices.tobytes()
        sub = self._subpops.get(key)
        if sub is None:
            sub = self.population[devices]
            self._subpops[key] = sub
            while len(self._subpops) > self.SUBPOP_CACHE:
                self._subpops.popitem(last=False)
        else:
            self._subpops.move_to_end(key)
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
            arr, self.seed, self.n_threads, stream=_fused.KEYED_BASE + int(stream),
            row_keys=keys, name="currents")
        _add_counts(self.pulse_counts, devices, arr.shape[0])
        return bits

    def fused_available(self):
        """True where :meth:`fused_forward` reproduces this backend's pulses in law:
        no aging, and a subclass has not changed how the devices are pulsed."""
        cls = type(self)
        return (self.aging is None and cls._pulse is EmulatedBackend._pulse
                and cls.pulse is EmulatedBackend.pulse
                and cls.pulse_keyed is EmulatedBackend.pulse_keyed)

    def fused_forward(self, X, coefs, intercepts, mapping, devices, n_samples, row_keys=None,
                      n_threads=None):
        """Class probabilities of a one-hidden-layer network on these devices.

        ``devices``: the physical device of each hidden neuron (slice or int
        array, repeats allowed).  ``row_keys`` (uint64 per row, or a callable
        on a block of rows) keys each input's noise; without keys the call
        draws from a fresh stream, as :meth:`pulse` does.  Counts ``n *
        n_samples`` pulses on each neuron's device.
        """
        if not self.fused_available():
            raise BackendError("fused_forward is not available on this backend "
                               "(aging, or a subclass that changes how devices are pulsed)")
        devices = _device_index(devices, self.n_devices)
        W1, W2 = coefs
        if _count(devices) != W2.shape[0]:
            raise ValueError(f"{_count(devices)} devices named for {W2.shape[0]} hidden neurons")
        n = X.shape[0]
        if row_keys is not None:
            keys, stream = row_keys, _fused.FUSED_STREAM
        else:
            keys, stream = np.arange(n, dtype=np.uint64), self.calls
            self.calls += 1
        out, bad = _fused.fused_predict(
            X, W1, intercepts[0], W2, intercepts[1], mapping.unit, mapping.offset,
            self._subpop(devices).table(), self.seed, stream, keys, int(n_samples),
            effective_n_threads(n_threads if n_threads is not None else self.n_threads))
        if bad:
            raise ValueError("currents must be finite; the first layer produced NaN or "
                             "infinity (check the inputs and the weights)")
        _add_counts(self.pulse_counts, devices, n * int(n_samples))
        return out

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
        self.calls = _state_int(state, "calls", 0)
        if self.aging is not None:
            # Rebuild the population exactly as it was at the last refresh.
            aged_at = _state_array(state, "aged_at", (self.n_devices,), np.float64)
            if (aged_at < 0).any() or (aged_at != np.round(aged_at)).any():
                raise InvalidInputError("backend state field 'aged_at' must hold "
                                        "non-negative integers")
            aged_at = aged_at.astype(np.int64)
            self.population = self.aging.population_at(self.initial_population, aged_at,
                                                        self._aging_draws)
            self._aged_at = aged_at
            self._subpops.clear()


class _CallRunner:
    """Runs the instrument function with a time limit on a daemon worker thread.

    A call that overruns raises :class:`BackendError`; its thread is abandoned
    (Python cannot stop it) and the next call gets a fresh worker, so a hung
    instrument never blocks training or interpreter exit.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._worker = None

    def _start(self):
        jobs = collections.deque()
        ready = threading.Condition()
        state = {"jobs": jobs, "ready": ready}

        def loop():
            while True:
                with ready:
                    while not jobs:
                        ready.wait()
                    fn, args, box, done = jobs.popleft()
                try:
                    box["result"] = fn(*args)
                except BaseException as exc:   # handed to the caller
                    box["error"] = exc
                done.set()

        t = threading.Thread(target=loop, name="sotcore-instrument", daemon=True)
        t.start()
        state["thread"] = t
        return state

    def run(self, fn, args, timeout):
        with self._lock:
            if self._worker is None:
                self._worker = self._start()
            w = self._worker
            box, done = {}, threading.Event()
            with w["ready"]:
                w["jobs"].append((fn, args, box, done))
                w["ready"].notify()
            if not done.wait(timeout):
                self._worker = None     # abandon the hung thread
                raise TimeoutError(f"no answer within {timeout} s")
        if "error" in box:
            raise box["error"]
        return box["result"]


class InstrumentBackend(DeviceBackend):
    """Wrap a user's instrument code as a backend.

    Parameters
    ----------
    fn : callable
        ``fn(currents, device_indices) -> bits``: ``currents`` float64 (n, k)
        amperes, ``device_indices`` int64 (k,), distinct; must return n x k
        values in {0, 1} (bool or integer dtype, or floats equal to 0/1).  Row
        ``i`` is one pulse on each named device (then read and reset); rows
        are applied in order.
    n_devices : int
        Number of devices the instrument drives.
    pulse_duration : float, default 10e-9
        Seconds per pulse (ASSUMPTION: 10 ns pulses as in SOT switching
        experiments; set it to your instrument's figure).
    read_time, reset_time : float, default 0
        Seconds to read a device's state and to reset it after each pulse.
    call_latency : float, default 0
        Fixed seconds per call of ``fn`` (communication, arming the generator).
    parallel : bool, default True
        Whether one row's pulses hit all its devices at once (crossbar-style).
    max_batch : int, default 4096
        Largest number of rows sent to ``fn`` in one call.
    timeout : float or None, default None
        Seconds one call of ``fn`` may take; a call that overruns raises
        :class:`BackendError` (training then checkpoints, as for any fault).
        The overrunning call's thread cannot be stopped and is abandoned.
    curves : DevicePopulation, optional
        A calibration of the devices (used by the ``calibrated`` surrogate).

    Notes
    -----
    The hardware-time model: each call costs ``call_latency``, and each row
    (``parallel=True``) or each pulse (``parallel=False``) costs
    ``pulse_duration + read_time + reset_time``.  ``hardware_time`` applies
    it to the pulses sent so far, :meth:`request_time` to a planned request;
    ``throughput`` is the measured pulses per second of wall time in ``fn``.
    """

    def __init__(self, fn, n_devices, *, pulse_duration=10e-9, read_time=0.0, reset_time=0.0,
                 call_latency=0.0, parallel=True, max_batch=4096, timeout=None, curves=None):
        if not callable(fn):
            raise TypeError("fn must be callable: fn(currents, device_indices) -> bits")
        if isinstance(n_devices, bool) or not isinstance(n_devices, (int, np.integer)) \
                or n_devices < 1:
            raise ValueError(f"n_devices must be a positive integer, got {n_devices!r}")
        if isinstance(max_batch, bool) or not (isinstance(max_batch, (int, np.integer))
                                               and max_batch >= 1):
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        for name, v, pos in (("pulse_duration", pulse_duration, True),
                             ("read_time", read_time, False), ("reset_time", reset_time, False),
                             ("call_latency", call_latency, False)):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) \
                    or not np.isfinite(v) or v < 0 or (pos and v == 0):
                raise ValueError(f"{name} must be a finite number of seconds "
                                 f"{'> 0' if pos else '>= 0'}, got {v!r}")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(
                timeout, (int, float, np.floating, np.integer)) or not timeout > 0
                or not np.isfinite(timeout)):
            raise ValueError(f"timeout must be a positive number of seconds or None, "
                             f"got {timeout!r}")
        if curves is not None and (not isinstance(curves, DevicePopulation)
                                   or len(curves) != n_devices):
            raise ValueError("curves must be a DevicePopulation with one entry per device")
        self.fn = fn
        self.n_devices = int(n_devices)
        self.pulse_duration = float(pulse_duration)
        self.read_time = float(read_time)
        self.reset_time = float(reset_time)
        self.call_latency = float(call_latency)
        self.parallel = bool(parallel)
        self.max_batch = int(max_batch)
        self.timeout = None if timeout is None else float(timeout)
        self.curves = curves
        self.rows = 0
        self.calls = 0
        self.wall_time = 0.0
        self._runner = _CallRunner() if timeout is not None else None
        super().__init__()

    def _call(self, chunk, idx):
        if self._runner is None:
            return self.fn(chunk, idx)
        return self._runner.run(self.fn, (chunk, idx), self.timeout)

    def _pulse(self, currents, devices):
        idx = device_indices(devices)
        n, k = currents.shape
        out = np.empty((n, k), dtype=np.uint8)
        cur64 = np.asarray(currents, dtype=np.float64)
        for s in range(0, n, self.max_batch):
            chunk = cur64[s:s + self.max_batch]
            t0 = time.perf_counter()
            try:
                res = self._call(chunk.copy(), idx.copy())
            except Exception as exc:
                raise BackendError(f"instrument call failed on rows {s}..{s + len(chunk) - 1} "
                                   f"of a request for {k} device(s): {type(exc).__name__}: "
                                   f"{exc}") from exc
            finally:
                self.wall_time += time.perf_counter() - t0
            self.calls += 1
            out[s:s + len(chunk)] = check_bits(res, chunk.shape, "instrument")
        self.rows += n
        return out

    def get_state(self):
        return {**super().get_state(), "rows": self.rows, "calls": self.calls,
                "wall_time": self.wall_time}

    def set_state(self, state):
        super().set_state(state)
        self.rows = _state_int(state, "rows", 0)
        self.wall_time = _io.check_float(state.get("wall_time"), "backend state", "wall_time",
                                         low=0.0)
        self.calls = _state_int(state, "calls", 0, default=0)

    def _time(self, calls, rows, pulses):
        per = self.pulse_duration + self.read_time + self.reset_time
        return calls * self.call_latency + (rows if self.parallel else pulses) * per

    @property
    def hardware_time(self):
        """Seconds of instrument time implied by the requests so far (see Notes)."""
        return self._time(self.calls, self.rows, int(self.pulse_counts.sum()))

    def request_time(self, n_rows, n_devices):
        """Seconds of instrument time one request of ``n_rows`` x ``n_devices`` takes."""
        calls = -(-int(n_rows) // self.max_batch)
        return self._time(calls, int(n_rows), int(n_rows) * int(n_devices))

    @property
    def throughput(self):
        """Measured pulses per second of wall time spent in ``fn`` (NaN before any call)."""
        total = int(self.pulse_counts.sum())
        return total / self.wall_time if self.wall_time > 0 else float("nan")

    def device_curves(self):
        return self.curves


def _state_int(state, key, low=None, default=...):
    """Integer field ``key`` of a backend state (from a checkpoint file: untrusted)."""
    if not isinstance(state, dict):
        raise InvalidInputError(f"backend state must be a dict, got {type(state).__name__}")
    if key not in state:
        if default is ...:
            raise InvalidInputError(f"backend state has no field {key!r}")
        return default
    return _io.check_int(state[key], "backend state", key, low=low)


def _state_array(state, key, shape, dtype=np.float64):
    """Array field ``key`` of a backend state, of exactly ``shape``, finite."""
    if not isinstance(state, dict) or key not in state:
        raise InvalidInputError(f"backend state has no field {key!r}")
    try:
        a = np.asarray(state[key], dtype=dtype)
    except (TypeError, ValueError, OverflowError):
        raise InvalidInputError(f"backend state field {key!r} is not a numeric array") from None
    if a.shape != shape:
        raise InvalidInputError(f"backend state field {key!r} has shape {a.shape}, this "
                                f"backend needs {shape}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise InvalidInputError(f"backend state field {key!r} holds non-finite values")
    return a


class _Log(deque):
    """A RecordingBackend's in-memory log; ``clear()`` clears the backend's log (and
    starts a new segment on disk), so ``rec.log.clear()`` keeps working."""

    def __init__(self, owner):
        super().__init__()
        self._owner = owner

    def clear(self):
        self._owner.clear()


class RecordingBackend(DeviceBackend):
    """Log every request (currents, devices) and answer (bits) of another backend.

    ``replay()`` gives a backend that answers the same requests with the same
    bits, bit-exactly; ``records()`` flattens the log into per-pulse records
    ``(device, current, switched)`` for re-calibration.  ``max_records``
    bounds the log in memory (in pulses; the oldest requests are dropped first).

    ``path`` (a directory) also keeps the log on disk, append-only and
    checksummed (``sotcore/_pulselog.py``): every request is written before
    its bits are returned, so the log survives the process, and resuming
    from a checkpoint (``set_state``) rebuilds exactly the log the checkpoint
    refers to -- the drift workflow that recalibrates from ``records()``
    every epoch then resumes bit-exactly.  ``clear()`` (or ``log.clear()``)
    starts a new segment; the disk keeps the current and the previous one.
    An existing log at ``path`` is continued: give a new run a new path.
    Without ``path``, a resume in a new process warns that the records taken
    before the checkpoint are gone.
    """

    def __init__(self, inner, max_records=None, path=None):
        self.inner = inner
        self.n_devices = inner.n_devices
        self.accepts_repeated_devices = getattr(inner, "accepts_repeated_devices", False)
        if max_records is not None:
            max_records = _io.check_int(max_records, "RecordingBackend", "max_records", low=1)
        self.max_records = max_records
        self.log = _Log(self)
        self._logged = 0          # pulses in the log
        self._appended = 0        # requests ever logged (log holds the last len(log))
        self._since_clear = 0     # requests logged since the last clear()
        self._disk = None if path is None else _pulselog.PulseLog(path, self.n_devices)
        if self._disk is not None:
            for rec in self._disk.load_current():   # an existing log is continued
                self._remember(rec)
        super().__init__()

    def _remember(self, rec):
        deque.append(self.log, rec)
        self._appended += 1
        self._since_clear += 1
        self._logged += rec[0].size
        if self.max_records is not None:
            while self._logged > self.max_records and len(self.log) > 1:
                self._logged -= self.log.popleft()[0].size

    def _pulse(self, currents, devices):
        bits = self.inner.pulse(currents, devices)
        rec = (np.array(currents, copy=True), devices, bits.copy())
        if self._disk is not None:
            self._disk.append(rec[0], device_indices(devices), rec[2])
        self._remember(rec)
        return bits

    def clear(self):
        """Forget the logged requests (``log.clear()`` does the same); with a ``path``,
        a new segment starts on disk and the previous one is kept until the next clear."""
        deque.clear(self.log)
        self._logged = 0
        self._since_clear = 0
        if self._disk is not None:
            self._disk.clear()

    def device_curves(self):
        return self.inner.device_curves()

    def get_state(self):
        inner = self.inner.get_state() if hasattr(self.inner, "get_state") else None
        state = {**super().get_state(), "appended": self._appended,
                 "since_clear": self._since_clear, "inner": inner}
        if self._disk is not None:
            self._disk.sync()
            state["log_segment"] = self._disk.segment
        return state

    def set_state(self, state):
        super().set_state(state)
        appended = _state_int(state, "appended", 0, default=state.get("log_length", 0))
        since = _state_int(state, "since_clear", 0, default=None)
        if self._disk is not None and since is not None and "log_segment" in state:
            # Rebuild exactly the log the state refers to, from disk.
            seg = _state_int(state, "log_segment", 0)
            deque.clear(self.log)
            self._logged = self._since_clear = 0
            for rec in self._disk.restore(seg, since):
                self._remember(rec)
            self._appended = appended
        else:
            # Drop the requests logged after the state was taken (repeated on resume).
            extra = self._appended - appended
            for _ in range(max(0, min(extra, len(self.log)))):
                self._logged -= self.log.pop()[0].size
            self._since_clear = max(0, self._since_clear - max(0, extra))
            missing = (since or 0) - self._since_clear
            if missing > 0:
                import warnings
                warnings.warn(f"RecordingBackend: the state refers to {since} request(s) "
                              f"logged since the last clear, this log holds {self._since_clear}"
                              f": records() will miss {missing} (a recalibration from them "
                              f"differs from the uninterrupted run). RecordingBackend(inner, "
                              f"path=...) keeps the log on disk for an exact resume.",
                              RuntimeWarning, stacklevel=2)
            self._appended = appended
        if state.get("inner") is not None and hasattr(self.inner, "set_state"):
            self.inner.set_state(state["inner"])

    def records(self, last=None):
        """Per-pulse records of the last ``last`` requests (all by default).

        Returns a dict of 1-D arrays ``device``, ``current``, ``switched``.
        """
        log = list(self.log) if last is None else list(self.log)[-last:]
        dev, cur, sw = [], [], []
        for c, d, b in log:
            dev.append(np.broadcast_to(device_indices(d), c.shape).ravel())
            cur.append(np.asarray(c, dtype=np.float64).ravel())
            sw.append(b.ravel())
        if not dev:
            return {"device": np.zeros(0, np.int64), "current": np.zeros(0),
                    "switched": np.zeros(0, np.uint8)}
        return {"device": np.concatenate(dev).astype(np.int64), "current": np.concatenate(cur),
                "switched": np.concatenate(sw)}

    def replay(self):
        """A backend answering the recorded requests with the recorded bits."""
        return ReplayBackend(list(self.log), self.n_devices, curves=self.inner.device_curves())

    def save(self, path):
        """Save the log to a ``.npz`` file (no pickle)."""
        arrays = {}
        for i, (c, d, b) in enumerate(self.log):
            arrays[f"c{i}"], arrays[f"d{i}"], arrays[f"b{i}"] = c, device_indices(d), b
        arrays["n_devices"] = np.asarray(self.n_devices, np.int64)
        arrays["n_calls"] = np.asarray(len(self.log), np.int64)
        _io.atomic_write(path, _io.npz_bytes(arrays))     # the previous log survives a failure


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
        """Read a log written by :meth:`RecordingBackend.save` (untrusted: bounded
        reads, every request checked; one InvalidInputError naming file and field)."""
        def bad(msg):
            return InvalidInputError(f"{path}: {msg}")

        def expect(name, shape, dtype):
            if name in ("n_calls", "n_devices"):
                if shape != () or dtype.kind not in "iu":
                    raise bad(f"field {name!r} must be an integer scalar")
            elif name[:1] in "cdb" and name[1:].isdigit():
                if len(shape) != (1 if name[0] == "d" else 2):
                    raise bad(f"array {name!r} has shape {shape}")
            else:
                raise bad(f"unexpected array {name!r}")
        z = _io.read_npz(path, expected=expect, required=("n_calls", "n_devices"),
                         what="replay file")
        n, m = int(z["n_calls"]), int(z["n_devices"])
        if not 0 <= n <= 10**7 or not 1 <= m <= 10**7:
            raise bad(f"n_calls={n} / n_devices={m} out of range")
        log = []
        for i in range(n):
            try:
                c, d, b = z[f"c{i}"], z[f"d{i}"], z[f"b{i}"]
            except KeyError as exc:
                raise bad(f"request {i} is missing array {exc}") from None
            if d.dtype.kind not in "iu" or d.size == 0 or d.min() < 0 or d.max() >= m:
                raise bad(f"request {i}: device indices must lie in [0, {m})")
            if c.dtype.kind != "f" or c.shape != (c.shape[0], d.size) or b.shape != c.shape \
                    or b.dtype != np.uint8 or (b.size and b.max() > 1):
                raise bad(f"request {i}: currents {c.shape} / bits {b.shape} {b.dtype} do not "
                          f"match {d.size} devices")
            log.append((c, d.astype(np.int64), b))
        return cls(log, m)

    def _pulse(self, currents, devices):
        if self._pos >= len(self._log):
            raise BackendError(f"replay exhausted after {len(self._log)} recorded requests")
        c, d, b = self._log[self._pos]
        idx = device_indices(devices)
        didx = device_indices(d)
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
        self.accepts_repeated_devices = getattr(inner, "accepts_repeated_devices", False)
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
        idx = device_indices(devices)
        ref = self.reference
        gain = (self.scale_now[idx] / ref.scale[idx]).astype(currents.dtype)
        applied = (self.i50_now[idx].astype(currents.dtype)
                   + (currents - ref.i50[idx].astype(currents.dtype)) * gain)
        return self.inner.pulse(applied, devices)

    def recalibrate(self, records, **kwargs):
        """Deprecated: use :func:`sotcore.characterize.recalibrate` (measuring devices
        lives in ``characterize``, which builds on the backends)."""
        import warnings
        warnings.warn("CompensatedBackend.recalibrate is deprecated; use "
                      "sotcore.characterize.recalibrate(backend, records)", DeprecationWarning,
                      stacklevel=2)
        from .characterize import recalibrate   # the deprecation shim only
        return recalibrate(self, records, **kwargs)

    def get_state(self):
        inner = self.inner.get_state() if hasattr(self.inner, "get_state") else None
        return {**super().get_state(), "inner": inner, "i50_now": self.i50_now.tolist(),
                "scale_now": self.scale_now.tolist(), "recalibrations": self.recalibrations}

    def set_state(self, state):
        super().set_state(state)
        i50 = _state_array(state, "i50_now", (self.n_devices,))
        scale = _state_array(state, "scale_now", (self.n_devices,))
        if (scale <= 0).any():
            raise InvalidInputError("backend state field 'scale_now' must be positive")
        self.i50_now, self.scale_now = i50, scale
        self.recalibrations = _state_int(state, "recalibrations", 0,
                                         default=self.recalibrations)
        if state.get("inner") is not None and hasattr(self.inner, "set_state"):
            self.inner.set_state(state["inner"])
