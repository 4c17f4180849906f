"""A durable, append-only log of pulse requests on disk (private; ``RecordingBackend(path=)``).

Why: the drift workflow recalibrates every epoch from the pulses recorded since
the last recalibration.  Held only in memory, those records die with the
process, and a run resumed from a checkpoint recalibrates from fewer pulses
than the uninterrupted run did.  On disk they survive, and a resume rebuilds
exactly the log the checkpoint refers to.

Layout: ``path`` is a directory of segments ``seg-<n>.plog``; segment ``n``
holds the requests logged after the ``n``-th :meth:`PulseLog.clear`.  A clear
starts a new segment and deletes all but the previous one (a checkpoint taken
just before the clear may still refer to it), so the disk holds at most two
recalibration periods.

Segment file (little-endian)::

    b"SOTPLOG1"  uint64 n_devices
    per request:  b"REQ" dtype(1 byte: 4 or 8)  uint64 n  uint64 k
                  k int64 devices  n*k currents  n*k uint8 bits  uint32 crc32(all before)

Every request is written and flushed before the pulse's bits are returned, so
the log survives the process dying (an exception, Ctrl-C, a kill);
``sync()`` (called at every state snapshot at most once a second, and at
clear) fsyncs it for power loss.  Files are untrusted on reading: every size
is checked against the bytes that remain, a torn or corrupt tail ends the
segment (and is cut off on resume, never anything before it).
"""
import os
import re
import struct
import time
import zlib
from pathlib import Path

import numpy as np

from . import _io
from .exceptions import InvalidInputError

MAGIC = b"SOTPLOG1"
_HEAD = struct.Struct("<3sBQQ")          # tag, itemsize, n, k
_SEG = re.compile(r"seg-(\d{6,})\.plog$")


def _seg_name(i):
    return f"seg-{int(i):06d}.plog"


def read_segment(file, n_devices, limit=None):
    """Requests of one segment: ``(records, ends)``, each record ``(currents, devices,
    bits)`` and ``ends[i]`` the byte offset just after record i.  Stops at a torn or
    corrupt tail, and after ``limit`` records."""
    file = Path(file)
    size = file.stat().st_size
    records, ends = [], []
    with open(file, "rb") as fh:
        head = fh.read(16)
        if len(head) < 16 or head[:8] != MAGIC:
            raise InvalidInputError(f"{file}: not a sotcore pulse log (bad header)")
        (m,) = struct.unpack("<Q", head[8:])
        if m != n_devices:
            raise InvalidInputError(f"{file}: pulse log is for {m} devices, the backend has "
                                    f"{n_devices}")
        pos = 16
        while limit is None or len(records) < limit:
            h = fh.read(_HEAD.size)
            if len(h) < _HEAD.size:
                break
            tag, isz, n, k = _HEAD.unpack(h)
            if tag != b"REQ" or isz not in (4, 8) or not 1 <= k <= n_devices:
                break
            body = k * 8 + n * k * (isz + 1)
            if n < 1 or body + 4 > size - pos - _HEAD.size:      # what the file can hold
                break
            raw = fh.read(body + 4)
            if len(raw) < body + 4 or zlib.crc32(h + raw[:body]) != \
                    struct.unpack("<I", raw[body:])[0]:
                break
            dev = np.frombuffer(raw, np.int64, k, 0).copy()
            if dev.min() < 0 or dev.max() >= n_devices:
                break
            cur = np.frombuffer(raw, np.float32 if isz == 4 else np.float64, n * k,
                                k * 8).reshape(n, k).copy()
            bits = np.frombuffer(raw, np.uint8, n * k, k * 8 + n * k * isz).reshape(n, k).copy()
            records.append((cur, dev, bits))
            pos += _HEAD.size + body + 4
            ends.append(pos)
    return records, ends


class PulseLog:
    """The on-disk side of a RecordingBackend's log (see the module docstring)."""

    def __init__(self, path, n_devices, sync_interval=1.0):
        self.dir = Path(path)
        self.n_devices = int(n_devices)
        self.sync_interval = float(sync_interval)
        if self.dir.exists() and not self.dir.is_dir():
            raise InvalidInputError(f"pulse log path {self.dir} exists and is not a directory")
        self.dir.mkdir(parents=True, exist_ok=True)
        segs = self.segments()
        self.segment = segs[-1] if segs else 0
        self.count = 0            # requests in the current segment
        self._fh = None
        self._last_sync = 0.0

    def segments(self):
        return sorted(int(m.group(1)) for p in self.dir.iterdir()
                      if (m := _SEG.match(p.name)))

    def _file(self, i):
        return self.dir / _seg_name(i)

    def _open(self):
        if self._fh is None:
            f = self._file(self.segment)
            new = not f.exists() or f.stat().st_size == 0
            self._fh = open(f, "ab")
            if new:
                self._fh.write(MAGIC + struct.pack("<Q", self.n_devices))
                self._fh.flush()
                _io.fsync_dir(self.dir)
        return self._fh

    def append(self, currents, devices, bits):
        cur = np.ascontiguousarray(currents)
        if cur.dtype not in (np.float32, np.float64):
            cur = cur.astype(np.float64)
        n, k = cur.shape
        dev = np.ascontiguousarray(np.broadcast_to(devices, (k,)), dtype=np.int64)
        h = _HEAD.pack(b"REQ", cur.dtype.itemsize, n, k)
        body = dev.tobytes() + cur.tobytes() + np.ascontiguousarray(bits, np.uint8).tobytes()
        crc = zlib.crc32(body, zlib.crc32(h))
        fh = self._open()
        fh.write(h + body + struct.pack("<I", crc))
        fh.flush()                # survives the process; sync() survives the machine
        self.count += 1

    def sync(self, force=False):
        if self._fh is not None and (force or
                                     time.monotonic() - self._last_sync >= self.sync_interval):
            os.fsync(self._fh.fileno())
            self._last_sync = time.monotonic()

    def close(self):
        if self._fh is not None:
            self.sync(force=True)
            self._fh.close()
            self._fh = None

    def clear(self):
        """Start a new segment; keep only the previous one besides it."""
        self.close()
        self.segment += 1
        self.count = 0
        for i in self.segments():
            if i < self.segment - 1:
                self._file(i).unlink(missing_ok=True)
        self._open()
        _io.fsync_dir(self.dir)

    def restore(self, segment, count):
        """Make the log what it was when the state ``(segment, count)`` was taken:
        returns that segment's first ``count`` requests; later data and segments go."""
        self.close()
        f = self._file(segment)
        if count and not f.exists():
            raise InvalidInputError(
                f"{self.dir}: the checkpoint refers to {count} logged request(s) in "
                f"{_seg_name(segment)}, which is missing")
        records, ends = read_segment(f, self.n_devices, limit=count) if f.exists() else ([], [])
        if len(records) < count:
            raise InvalidInputError(
                f"{self.dir}: the checkpoint refers to {count} logged request(s) in "
                f"{_seg_name(segment)}, the file holds {len(records)} intact ones (power loss "
                f"before the log was synced, or another run's log)")
        if f.exists():
            with open(f, "r+b") as fh:       # only what was logged after the state goes
                fh.truncate(ends[-1] if ends else 16)
                os.fsync(fh.fileno())
        for i in self.segments():
            if i > segment:
                self._file(i).unlink(missing_ok=True)
        self.segment, self.count = int(segment), int(count)
        _io.fsync_dir(self.dir)
        return records

    def load_current(self):
        """The current (latest) segment's intact requests (a fresh process)."""
        f = self._file(self.segment)
        if not f.exists():
            return []
        records, ends = read_segment(f, self.n_devices)
        if f.stat().st_size > (ends[-1] if ends else 16):
            with open(f, "r+b") as fh:       # a torn last write: never completed work
                fh.truncate(ends[-1] if ends else 16)
        self.count = len(records)
        return records
