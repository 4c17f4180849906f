"""The on-disk pulse log (RecordingBackend(path=)) and the drift workflow's exact resume."""
import struct
import warnings

import numpy as np
import pytest

import sotcore
from sotcore import DeviceAging
from sotcore._pulselog import read_segment
from sotcore.backends import CompensatedBackend, EmulatedBackend, RecordingBackend, device_indices
from sotcore.characterize import recalibrate
from sotcore.training import TrainingInterrupted

from test_faults import KW, FlakyBackend, _data

POP = sotcore.DevicePopulation.from_width(20.0, 20, random_state=1)
AGING = DeviceAging(i50_drift=300.0, window_drift=100.0)   # strong: visible in 4 epochs


def _drift_stack(path, fail_on=()):
    """The README's drift workflow: aging devices, recorded pulses, compensation
    recalibrated from the epoch's records after every epoch."""
    emu = EmulatedBackend(POP, random_state=11, aging=AGING)
    rec = RecordingBackend(FlakyBackend(emu, fail_on=fail_on), path=path)
    comp = CompensatedBackend(rec, POP)

    def recal(epoch, info, net):
        recalibrate(comp, rec.records(), min_pulses=20)
        rec.log.clear()
        return False
    return comp, rec, recal


def _fit(backend, recal, **kw):
    return sotcore.SOTClassifier(devices=backend, callbacks=[recal], **{**KW, **kw})


@pytest.mark.parametrize("fail_call", [3, 6, 7, 12, 19])
def test_drift_workflow_resumes_bit_exactly_in_a_new_process(tmp_path, fail_call):
    X, y = _data()
    comp, rec, recal = _drift_stack(tmp_path / "clean-log")
    clean = _fit(comp, recal).fit(X, y)
    assert comp.recalibrations == KW["max_iter"]

    ck = tmp_path / "run.ckpt.npz"
    comp1, _, recal1 = _drift_stack(tmp_path / "log", fail_on={fail_call})
    with pytest.raises(TrainingInterrupted):
        _fit(comp1, recal1, checkpoint=ck).fit(X, y)
    # a new process: every object is new; only the files (checkpoint, log) remain
    comp2, rec2, recal2 = _drift_stack(tmp_path / "log")
    resumed = _fit(comp2, recal2, checkpoint=ck).fit(X, y, resume_from=ck)
    for a, b in zip(clean.coefs_ + clean.intercepts_, resumed.coefs_ + resumed.intercepts_):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(comp.i50_now, comp2.i50_now)
    np.testing.assert_array_equal(comp.scale_now, comp2.scale_now)
    assert resumed.loss_curve_ == clean.loss_curve_


class Killed(BaseException):
    """A process killed mid-step: nothing catches it, no checkpoint is written."""


class KillingBackend(FlakyBackend):
    def _pulse(self, currents, devices):
        if self.calls + 1 in self.fail_on:
            raise Killed
        return super()._pulse(currents, devices)


@pytest.mark.parametrize("kill_call", [8, 18, 20, 22])
def test_drift_workflow_resumes_after_a_kill_from_an_older_checkpoint(tmp_path, kill_call):
    """The log on disk runs ahead of the last checkpoint (written every 2 steps):
    the resume cuts it back to what the checkpoint refers to."""
    X, y = _data()
    comp, _, recal = _drift_stack(tmp_path / "clean-log")
    clean = _fit(comp, recal).fit(X, y)
    ck = tmp_path / "run.ckpt.npz"
    emu = EmulatedBackend(POP, random_state=11, aging=AGING)
    rec = RecordingBackend(KillingBackend(emu, fail_on={kill_call}), path=tmp_path / "log")
    comp1 = CompensatedBackend(rec, POP)

    def recal1(epoch, info, net):
        recalibrate(comp1, rec.records(), min_pulses=20)
        rec.log.clear()
    with pytest.raises(Killed):
        _fit(comp1, recal1, checkpoint=ck, checkpoint_every=2).fit(X, y)
    rec._disk.close()
    comp2, _, recal2 = _drift_stack(tmp_path / "log")
    resumed = _fit(comp2, recal2, checkpoint=ck, checkpoint_every=2).fit(X, y, resume_from=ck)
    for a, b in zip(clean.coefs_ + clean.intercepts_, resumed.coefs_ + resumed.intercepts_):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(comp.i50_now, comp2.i50_now)


def test_resume_without_a_log_on_disk_warns(tmp_path):
    X, y = _data()
    ck = tmp_path / "c.npz"
    emu = EmulatedBackend(POP, random_state=2)
    with pytest.raises(TrainingInterrupted):
        sotcore.SOTClassifier(devices=RecordingBackend(FlakyBackend(emu, fail_on={6})),
                              checkpoint=ck, **KW).fit(X, y)
    fresh = RecordingBackend(FlakyBackend(EmulatedBackend(POP, random_state=2)))
    with pytest.warns(RuntimeWarning, match="path=.*exact resume"):
        sotcore.SOTClassifier(devices=fresh, checkpoint=ck, **KW).fit(X, y, resume_from=ck)


def test_log_round_trip_and_clear_keeps_one_previous_segment(tmp_path):
    emu = EmulatedBackend(POP, random_state=0)
    rec = RecordingBackend(emu, path=tmp_path)
    rng = np.random.default_rng(0)
    reqs = []
    for i in range(3):
        cur = rng.normal(POP.i50[:5], POP.scale[:5], size=(4 + i, 5))
        rec.pulse(cur, np.array([0, 3, 5, 7, 19]))
        reqs.append(cur)
    rec.pulse(rng.normal(POP.i50[2:9], POP.scale[2:9], size=(3, 7)).astype(np.float32),
              slice(2, 9))
    again = RecordingBackend(EmulatedBackend(POP, random_state=0), path=tmp_path)
    assert len(again.log) == 4
    for (c1, d1, b1), (c2, d2, b2) in zip(rec.log, again.log):
        np.testing.assert_array_equal(c1, c2)
        assert c1.dtype == c2.dtype
        np.testing.assert_array_equal(b1, b2)
        np.testing.assert_array_equal(device_indices(d1), d2)
    for k in ("device", "current", "switched"):
        np.testing.assert_array_equal(rec.records()[k], again.records()[k])
    rec.log.clear()
    assert len(rec.log) == 0 and rec.records()["device"].size == 0
    rec.clear()
    rec.pulse(reqs[0], np.array([0, 3, 5, 7, 19]))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["seg-000001.plog", "seg-000002.plog"]
    assert len(RecordingBackend(emu, path=tmp_path).log) == 1


def test_torn_and_corrupt_tails_end_the_log_never_earlier_records(tmp_path):
    rec = RecordingBackend(EmulatedBackend(POP, random_state=0), path=tmp_path)
    for _ in range(3):
        rec.pulse(np.full((2, 4), POP.i50[0]), slice(0, 4))
    f = tmp_path / "seg-000000.plog"
    data = f.read_bytes()
    rec._disk.close()
    size_one = (len(data) - 16) // 3
    # torn last write
    f.write_bytes(data[:-5])
    assert len(read_segment(f, 20)[0]) == 2
    # a flipped bit in the second record's bits: checksum fails there
    b = bytearray(data)
    b[16 + size_one + size_one - 6] ^= 1
    f.write_bytes(bytes(b))
    assert len(read_segment(f, 20)[0]) == 1
    # a record declaring a huge size is not allocated
    b = bytearray(data)
    struct.pack_into("<Q", b, 16 + 4, 2**60)
    f.write_bytes(bytes(b))
    assert read_segment(f, 20)[0] == []
    # a fresh backend truncates the torn tail and continues after the intact records
    f.write_bytes(data[:-5])
    again = RecordingBackend(EmulatedBackend(POP, random_state=0), path=tmp_path)
    assert len(again.log) == 2 and f.stat().st_size == 16 + 2 * size_one
    again.pulse(np.full((2, 4), POP.i50[0]), slice(0, 4))
    assert len(read_segment(f, 20)[0]) == 3


def test_bad_log_files_are_refused_with_a_clear_error(tmp_path):
    (tmp_path / "seg-000000.plog").write_bytes(b"not a log at all")
    with pytest.raises(ValueError, match="not a sotcore pulse log"):
        RecordingBackend(EmulatedBackend(POP, random_state=0), path=tmp_path)
    d = tmp_path / "other"
    rec = RecordingBackend(EmulatedBackend(POP, random_state=0), path=d)
    rec.pulse(np.full((1, 2), POP.i50[0]), slice(0, 2))
    small = sotcore.DevicePopulation.from_width(20.0, 5, random_state=1)
    with pytest.raises(ValueError, match="for 20 devices, the backend has 5"):
        RecordingBackend(EmulatedBackend(small, random_state=0), path=d)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        RecordingBackend(EmulatedBackend(POP, random_state=0), path=tmp_path / "file")


def test_state_referring_to_more_records_than_the_log_holds_is_refused(tmp_path):
    rec = RecordingBackend(EmulatedBackend(POP, random_state=0), path=tmp_path / "a")
    for _ in range(3):
        rec.pulse(np.full((2, 4), POP.i50[0]), slice(0, 4))
    state = rec.get_state()
    fresh = RecordingBackend(EmulatedBackend(POP, random_state=0), path=tmp_path / "b")
    with pytest.raises(ValueError, match="refers to 3 logged request"):
        fresh.set_state(state)


@pytest.mark.parametrize("field, value, match", [
    ("pulse_counts", [1, 2], "for 2 devices"),
    ("pulse_counts", ["a"] * 20, "pulse_counts"),
    ("pulse_counts", [-1] + [0] * 19, "non-negative"),
    ("pulse_counts", [0.5] + [0] * 19, "non-negative integers"),
    ("calls", "3", "calls"),
    ("calls", -1, "calls"),
    ("aged_at", [0] * 3, "aged_at"),
    ("aged_at", [float("nan")] * 20, "non-finite"),
])
def test_emulator_state_is_validated(field, value, match):
    emu = EmulatedBackend(POP, random_state=0, aging=AGING)
    emu.pulse(np.full((2, 20), POP.i50[0]))
    state = emu.get_state()
    with pytest.raises(ValueError, match=match):
        emu.set_state({**state, field: value})
    emu.set_state(state)           # the valid state still loads


@pytest.mark.parametrize("field, value, match", [
    ("i50_now", [0.0] * 3, "i50_now"),
    ("scale_now", [0.0] * 20, "positive"),
    ("i50_now", [float("inf")] * 20, "non-finite"),
    ("recalibrations", 1.5, "recalibrations"),
])
def test_compensated_state_is_validated(field, value, match):
    comp = CompensatedBackend(EmulatedBackend(POP, random_state=0), POP)
    state = comp.get_state()
    with pytest.raises(ValueError, match=match):
        comp.set_state({**state, field: value})
    comp.set_state(state)
