"""Faults in the loop: failing instruments, checkpoints and exact resume."""
import numpy as np
import pytest

import sotcore
from sotcore.backends import BackendError, DeviceBackend, EmulatedBackend, RecordingBackend
from sotcore.training import TrainingInterrupted, load_checkpoint, save_checkpoint


class FlakyBackend(DeviceBackend):
    """Wraps a backend and fails on chosen calls, the way instruments do."""

    def __init__(self, inner, fail_on=(), how="raise"):
        self.inner, self.n_devices = inner, inner.n_devices
        self.fail_on, self.how, self.calls = set(fail_on), how, 0
        super().__init__()

    def device_curves(self):
        return self.inner.device_curves()

    def get_state(self):
        return {**super().get_state(), "inner": self.inner.get_state()}

    def set_state(self, state):
        super().set_state(state)
        self.inner.set_state(state["inner"])

    def _pulse(self, currents, devices):
        self.calls += 1
        if self.calls in self.fail_on:
            if self.how == "raise":
                raise TimeoutError("pulse generator did not answer")
            if self.how == "shape":
                return np.zeros((1, 1), np.uint8)
            return np.full(currents.shape, 3, np.uint8)
        bits = self.inner.pulse(currents, devices)
        if self.how == "shape" and self.calls in self.fail_on:
            return bits[:, :-1]
        return bits


def _data():
    rng = np.random.default_rng(0)
    X = rng.random((120, 6)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 1).astype(int) + (X[:, 2] > 0.5)
    return X, y


KW = dict(hidden_layer_sizes=(12, 8), max_iter=4, batch_size=20, train_samples=2,
          learning_rate_init=1e-2, random_state=5)


@pytest.mark.parametrize("fail_call", [1, 7, 13, 24])
@pytest.mark.parametrize("how", ["raise", "garbage"])
def test_resume_after_failure_is_bit_exact(tmp_path, fail_call, how):
    X, y = _data()
    pop = sotcore.DevicePopulation.from_width(20.0, 20, random_state=1)
    clean = sotcore.SOTClassifier(devices=EmulatedBackend(pop, 9), **KW).fit(X, y)
    ck = tmp_path / "run.ckpt.npz"
    flaky = FlakyBackend(EmulatedBackend(pop, 9), fail_on={fail_call}, how=how)
    clf = sotcore.SOTClassifier(devices=flaky, checkpoint=ck, **KW)
    with pytest.raises(TrainingInterrupted, match="checkpoint written") as info:
        clf.fit(X, y)
    assert info.value.checkpoint == ck and ck.exists()
    assert isinstance(info.value.__cause__, (TimeoutError, BackendError))
    # a fresh process: new estimator, new backend object, same devices and seed
    fresh = FlakyBackend(EmulatedBackend(pop, 9))
    resumed = sotcore.SOTClassifier(devices=fresh, checkpoint=ck, **KW).fit(
        X, y, resume_from=ck)
    for a, b in zip(clean.coefs_ + clean.intercepts_, resumed.coefs_ + resumed.intercepts_):
        np.testing.assert_array_equal(a, b)
    assert resumed.loss_curve_ == clean.loss_curve_


def test_resume_with_pulse_log(tmp_path):
    X, y = _data()
    pop = sotcore.DevicePopulation.from_width(20.0, 20, random_state=1)
    clean_rec = RecordingBackend(EmulatedBackend(pop, 4))
    clean = sotcore.SOTClassifier(devices=clean_rec, **KW).fit(X, y)
    ck = tmp_path / "c.npz"
    rec = RecordingBackend(FlakyBackend(EmulatedBackend(pop, 4), fail_on={10}))
    with pytest.raises(TrainingInterrupted):
        sotcore.SOTClassifier(devices=rec, checkpoint=ck, **KW).fit(X, y)
    rec.inner.fail_on = set()        # the instrument is fixed; same process continues
    resumed = sotcore.SOTClassifier(devices=rec, checkpoint=ck, **KW).fit(X, y, resume_from=ck)
    np.testing.assert_array_equal(clean.coefs_[0], resumed.coefs_[0])
    # the pulse log holds exactly the pulses of an uninterrupted run
    assert len(rec.log) == len(clean_rec.log)
    for (c1, _, b1), (c2, _, b2) in zip(rec.log, clean_rec.log):
        np.testing.assert_array_equal(b1, b2)
        np.testing.assert_array_equal(c1, c2)


@pytest.mark.parametrize("fail_call", [3, 17, 24])
@pytest.mark.parametrize("hil_epochs", [2, None])
def test_resume_in_the_hil_stage_after_pretraining(tmp_path, fail_call, hil_epochs):
    """A failure while fine-tuning after pretraining resumes in that stage, bit-exactly
    (it used to be refused: the end epoch is beyond max_iter)."""
    X, y = _data()
    pop = sotcore.DevicePopulation.from_width(20.0, 20, random_state=1)
    kw = dict(KW, max_iter=2, pretrain="hardware-aware", hil_epochs=hil_epochs,
              calibration=pop)
    clean = sotcore.SOTClassifier(devices=FlakyBackend(EmulatedBackend(pop, 9)), **kw).fit(X, y)
    ck = tmp_path / "run.ckpt.npz"
    flaky = FlakyBackend(EmulatedBackend(pop, 9), fail_on={fail_call})
    with pytest.raises(TrainingInterrupted):
        sotcore.SOTClassifier(devices=flaky, checkpoint=ck, **kw).fit(X, y)
    assert load_checkpoint(ck)["meta"]["extra"]["stage"] == 1     # pretraining was done
    fresh = FlakyBackend(EmulatedBackend(pop, 9))
    resumed = sotcore.SOTClassifier(devices=fresh, checkpoint=ck, **kw).fit(
        X, y, resume_from=ck)
    for a, b in zip(clean.coefs_ + clean.intercepts_, resumed.coefs_ + resumed.intercepts_):
        np.testing.assert_array_equal(a, b)
    assert resumed.loss_curve_ == clean.loss_curve_ and resumed.n_iter_ == clean.n_iter_ == 4
    np.testing.assert_array_equal(resumed.pulses_, clean.pulses_)


def test_resume_requires_same_parameters(tmp_path):
    X, y = _data()
    ck = tmp_path / "c.npz"
    sotcore.SOTClassifier(devices=20.0, checkpoint=ck, **KW).fit(X, y)
    with pytest.raises(ValueError, match="other estimator parameters"):
        sotcore.SOTClassifier(devices=20.0, **{**KW, "max_iter": 9}).fit(X, y, resume_from=ck)


def test_epoch_checkpoint_resume_equals_uninterrupted(tmp_path):
    """Kill after epoch 2 (simulated by a callback), resume from the epoch checkpoint."""
    X, y = _data()
    clean = sotcore.SOTClassifier(devices=20.0, **KW).fit(X, y)
    ck = tmp_path / "c.npz"

    class Kill(Exception):
        pass
    from sotcore import training

    orig = training.save_checkpoint

    def killing_save(path, state):
        out = orig(path, state)
        if state["meta"]["batch_start"] == 0 and state["meta"]["epoch"] == 2:
            raise Kill()
        return out
    training.save_checkpoint = killing_save
    try:
        with pytest.raises(Kill):
            sotcore.SOTClassifier(devices=20.0, checkpoint=ck, **KW).fit(X, y)
    finally:
        training.save_checkpoint = orig
    resumed = sotcore.SOTClassifier(devices=20.0, **KW).fit(X, y, resume_from=ck)
    np.testing.assert_array_equal(clean.coefs_[1], resumed.coefs_[1])


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A crash while writing leaves the previous checkpoint intact and loadable."""
    X, y = _data()
    ck = tmp_path / "c.npz"
    sotcore.SOTClassifier(devices=20.0, checkpoint=ck, **KW).fit(X, y)
    before = ck.read_bytes()
    state = load_checkpoint(ck)
    import numpy
    real = numpy.savez

    def dying_savez(fh, **arrays):
        fh.write(b"PK\x03\x04partial")
        raise KeyboardInterrupt("killed mid-write")
    monkeypatch.setattr(numpy, "savez", dying_savez)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(ck, {"network": state["network"], "optimizer": state["optimizer"],
                             "order": state["order"], "best": None, "meta": state["meta"]})
    monkeypatch.setattr(numpy, "savez", real)
    assert ck.read_bytes() == before
    load_checkpoint(ck)


def test_bad_checkpoint_files(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="unreadable checkpoint"):
        load_checkpoint(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.npz")
