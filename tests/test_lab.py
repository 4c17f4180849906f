"""A lab's instrument in every mode: few devices, slow pulses, faults (issue #10 and #12)."""
import json
import os
import signal
import time
import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split

import sotcore
from sotcore import BackendError, InstrumentBackend, SOTClassifier, TrainingInterrupted
from sotcore.backends import DeviceBackend, EmulatedBackend, RecordingBackend
from sotcore.datasets import load_digits
from sotcore.training import nominal_curve, suggest_mapping


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits()
    return train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)


class Lab:
    """A stand-in for lab code: hidden devices, a seeded RNG, a request log."""

    def __init__(self, pop, seed=0, delay=0.0):
        self.pop, self.rng, self.delay = pop, np.random.default_rng(seed), delay
        self.requests = []

    def __call__(self, currents, devices):
        assert currents.dtype == np.float64 and devices.dtype == np.int64
        assert np.unique(devices).size == devices.size      # each device once per request
        self.requests.append((currents.shape, devices.copy()))
        if self.delay:
            time.sleep(self.delay)
        p = self.pop[devices].probability(currents)
        return (self.rng.random(currents.shape) < p).astype(np.uint8)


def _instrument(n=8, seed=0, **kw):
    pop = sotcore.DevicePopulation.from_width(20.0, n, variability=0.10, random_state=seed)
    lab = Lab(pop, seed)
    return InstrumentBackend(lab, n_devices=n, **kw), lab, pop


FAST = dict(hidden_layer_sizes=(16,), max_iter=3, batch_size=64, n_samples=4, random_state=0)


def test_exsitu_on_an_instrument_predicts_through_it(digits):
    Xtr, Xte, ytr, yte = digits
    backend, lab, pop = _instrument()
    calib = pop          # a perfect calibration; only the nominal device comes from it
    soft = SOTClassifier(devices=backend, calibration=calib, training="software", **FAST)
    ex = SOTClassifier(devices=backend, calibration=calib, training="ex-situ", **FAST)
    soft.fit(Xtr, ytr)
    ex.fit(Xtr, ytr)
    assert backend.pulse_counts.sum() == 0            # neither training pulses the devices
    for a, b in zip(soft.coefs_ + soft.intercepts_, ex.coefs_ + ex.intercepts_):
        np.testing.assert_array_equal(a, b)           # ex-situ IS the software run
    soft.predict(Xte)
    assert backend.pulse_counts.sum() == 0            # software predicts on ideal neurons
    ex.predict(Xte)
    assert backend.pulse_counts.sum() == len(Xte) * 4 * 16     # ... ex-situ on the devices


def test_exsitu_early_stopping_selects_on_nominal_neurons(digits):
    Xtr, _, ytr, _ = digits
    pop = sotcore.DevicePopulation.from_width(20.0, 16, variability=0.3, random_state=0)
    kw = dict(FAST, max_iter=6, early_stopping=True, n_iter_no_change=1, tol=0.0)
    soft = SOTClassifier(devices=pop, training="software", **kw).fit(Xtr, ytr)
    ex = SOTClassifier(devices=pop, training="ex-situ", **kw).fit(Xtr, ytr)
    assert soft.validation_scores_ == ex.validation_scores_
    for a, b in zip(soft.coefs_, ex.coefs_):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", ["hil", "hardware-aware"])
def test_modes_on_a_bare_instrument_with_a_calibration(digits, mode):
    Xtr, Xte, ytr, yte = digits
    backend, lab, pop = _instrument(16)
    calib = sotcore.DevicePopulation(pop.i50 * 1.01, pop.scale)   # measured, slightly off
    clf = SOTClassifier(devices=backend, calibration=calib, training=mode, surrogate="calibrated",
                        **dict(FAST, max_iter=15, batch_size=32, n_samples=8)).fit(Xtr, ytr)
    assert clf.nominal_device_ == nominal_curve(calib)
    assert (backend.pulse_counts > 0).all() == (mode == "hil")
    assert clf.score(Xte, yte) > 0.8


def test_many_neurons_on_few_devices_train_like_one_device_each(digits):
    Xtr, Xte, ytr, yte = digits
    acc = {8: [], 64: []}
    for seed in range(3):
        for n in acc:
            pop = sotcore.DevicePopulation.from_width(20.0, n, variability=0.10,
                                                      random_state=seed)
            clf = SOTClassifier(hidden_layer_sizes=(64,), devices=pop, max_iter=30,
                                batch_size=32, random_state=seed).fit(Xtr, ytr)
            acc[n].append(clf.score(Xte, yte))
            if n == 8:
                assert clf.device_map_.tolist() == [k % 8 for k in range(64)]
                assert (clf.pulses_ == 8 * 30 * len(Xtr)).all()
    assert np.mean(acc[8]) >= np.mean(acc[64]) - 0.01, acc


def test_multiplexed_instrument_run_carries_the_map(digits, tmp_path):
    Xtr, Xte, ytr, _ = digits
    backend, lab, pop = _instrument(4)
    dm = np.array([3, 2, 1, 0] * 3)
    clf = SOTClassifier(devices=backend, calibration=pop, device_map=dm,
                        **dict(FAST, hidden_layer_sizes=(12,))).fit(Xtr, ytr)
    assert clf.device_map_.tolist() == dm.tolist()
    assert (backend.pulse_counts == 3 * 3 * len(Xtr)).all()
    clf.save(tmp_path / "m.json")
    back = SOTClassifier.load(tmp_path / "m.json", backend=backend)
    assert back.device_map_.tolist() == dm.tolist()
    n0 = backend.pulse_counts.copy()
    back.predict(Xte[:10])
    assert (backend.pulse_counts - n0 == 3 * 4 * 10).all()


def test_cost_estimate_matches_the_pulses_counted(digits):
    Xtr, Xte, ytr, yte = digits
    backend, lab, pop = _instrument(8, pulse_duration=1e-6, read_time=2e-6, call_latency=1e-3,
                                    max_batch=50)
    clf = SOTClassifier(devices=backend, calibration=pop,
                        **dict(FAST, hidden_layer_sizes=(20,), early_stopping=True,
                               n_iter_no_change=50))
    cost = clf.estimate_cost(Xtr, n_score=len(Xte))
    assert backend.pulse_counts.sum() == 0 and not lab.requests     # nothing pulsed
    t0, c0 = backend.hardware_time, backend.calls
    clf.fit(Xtr, ytr)
    np.testing.assert_array_equal(cost["fit_pulses"], backend.pulse_counts)
    np.testing.assert_array_equal(cost["fit_pulses"], clf.pulses_)
    assert cost["fit_requests"] == len(lab.requests)
    assert cost["fit_hardware_time"] == pytest.approx(backend.hardware_time - t0)
    n0, h0, r0 = backend.pulse_counts.copy(), backend.hardware_time, len(lab.requests)
    clf.score(Xte, yte)
    np.testing.assert_array_equal(cost["score_pulses"], backend.pulse_counts - n0)
    assert cost["score_requests"] == len(lab.requests) - r0
    assert cost["score_hardware_time"] == pytest.approx(backend.hardware_time - h0)
    assert backend.calls > c0 and np.isfinite(backend.throughput)
    assert "pulses on 8 devices" in str(cost)
    soft = SOTClassifier(devices=backend, calibration=pop, training="software", **FAST)
    assert soft.estimate_cost(Xtr)["fit_pulses"].sum() == 0


def test_hardware_time_model():
    b = InstrumentBackend(lambda c, d: np.zeros(c.shape), 4, pulse_duration=1e-8,
                          read_time=1e-7, reset_time=2e-8, call_latency=1e-3, max_batch=10,
                          parallel=False)
    b.pulse(np.zeros((25, 3)), np.array([0, 1, 2]))
    # 3 calls (10 + 10 + 5 rows), 75 pulses of 130 ns each
    assert b.hardware_time == pytest.approx(3e-3 + 75 * 1.3e-7)
    assert b.request_time(25, 3) == pytest.approx(b.hardware_time)
    par = InstrumentBackend(lambda c, d: np.zeros(c.shape), 4, pulse_duration=1e-8)
    par.pulse(np.zeros((25, 3)), np.array([0, 1, 2]))
    assert par.hardware_time == pytest.approx(25 * 1e-8)


@pytest.mark.parametrize("kw, match", [
    (dict(read_time=-1), "read_time"), (dict(reset_time=np.inf), "reset_time"),
    (dict(call_latency="1"), "call_latency"), (dict(timeout=0), "timeout"),
    (dict(timeout=True), "timeout"), (dict(pulse_duration=0), "pulse_duration"),
])
def test_instrument_arguments_are_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        InstrumentBackend(lambda c, d: np.zeros(c.shape), 4, **kw)


def test_hung_instrument_times_out_and_checkpoints(digits, tmp_path):
    Xtr, Xte, ytr, _ = digits
    backend, lab, pop = _instrument(16, timeout=0.5)
    calls = {"n": 0}
    inner = backend.fn

    def sometimes_hangs(c, d):
        calls["n"] += 1
        if calls["n"] == 5:
            time.sleep(30)
        return inner(c, d)
    backend.fn = sometimes_hangs
    ck = tmp_path / "ck.npz"
    t0 = time.perf_counter()
    with pytest.raises(TrainingInterrupted, match="no answer within 0.5 s") as info:
        SOTClassifier(devices=backend, calibration=pop, checkpoint=ck, **FAST).fit(Xtr, ytr)
    assert time.perf_counter() - t0 < 10 and info.value.checkpoint == ck and ck.exists()
    # prediction through a hung instrument: BackendError, not a hang
    backend.fn = lambda c, d: time.sleep(30)
    clf = SOTClassifier(devices=backend, calibration=pop, training="ex-situ", **FAST)
    clf.fit(Xtr, ytr)
    with pytest.raises(BackendError, match="no answer"):
        clf.predict(Xte[:5])


class _Raises(DeviceBackend):
    """A user backend whose own code raises (not an InstrumentBackend)."""

    def __init__(self, n):
        self.n_devices = n
        super().__init__()

    def _pulse(self, currents, devices):
        raise ConnectionError("VISA session lost")


def test_user_backend_errors_arrive_as_backend_errors(digits):
    Xtr, Xte, ytr, _ = digits
    pop = sotcore.DevicePopulation.from_width(20.0, 16, random_state=0)
    clf = SOTClassifier(devices=_Raises(16), calibration=pop, training="ex-situ", **FAST)
    clf.fit(Xtr, ytr)
    with pytest.raises(BackendError, match="VISA session lost") as info:
        clf.predict(Xte[:3])
    assert isinstance(info.value.__cause__, ConnectionError)
    with pytest.raises(TrainingInterrupted, match="VISA"):
        SOTClassifier(devices=_Raises(16), calibration=pop, **FAST).fit(Xtr, ytr)


def test_pbit_devices_with_signed_currents(digits):
    Xtr, Xte, ytr, yte = digits
    rng = np.random.default_rng(0)
    i50 = rng.normal(0.0, 2e-6, 16)         # 50 % points around zero current, both signs
    pop = sotcore.DevicePopulation(i50, np.full(16, 1e-6))
    backend = InstrumentBackend(Lab(pop), 16)
    clf = SOTClassifier(devices=backend, calibration=pop, mapping_offset=-3e-6,
                        **dict(FAST, max_iter=15, batch_size=32, n_samples=8)).fit(Xtr, ytr)
    assert clf.mapping_.offset == -3e-6 and clf.nominal_device_[0] == pytest.approx(
        np.median(i50))
    assert clf.score(Xte, yte) > 0.75
    assert SOTClassifier(devices=backend, nominal_device=(-1e-6, 1e-6),
                         **FAST).fit(Xtr, ytr).nominal_device_ == (-1e-6, 1e-6)


def test_suggest_mapping_and_auto_unit(digits):
    Xtr, _, ytr, _ = digits
    wide = sotcore.DevicePopulation.from_width(20.0, 200, variability=0.3, random_state=0)
    i50n, sn = nominal_curve(wide)
    m = suggest_mapping(wide)
    mad = 1.4826 * np.median(np.abs(wide.i50 - np.median(wide.i50)))
    assert m.unit == pytest.approx(max(sn, mad)) and m.unit > 2 * sn
    # one absurd device does not move it
    odd = sotcore.DevicePopulation(np.r_[wide.i50, 1.0], np.r_[wide.scale, sn])
    assert suggest_mapping(odd).unit == pytest.approx(m.unit, rel=0.02)
    tight = sotcore.DevicePopulation.from_width(20.0, 50, variability=0.0, random_state=0)
    assert suggest_mapping(tight).unit == pytest.approx(nominal_curve(tight)[1])
    clf = SOTClassifier(devices=wide, mapping_unit="auto", **FAST).fit(Xtr, ytr)
    assert clf.mapping_.unit == pytest.approx(suggest_mapping(wide[:16]).unit)


def test_far_devices_warn_by_name(digits):
    Xtr, _, ytr, _ = digits
    pop = sotcore.DevicePopulation.from_width(20.0, 16, variability=0.0, random_state=0)
    i50 = pop.i50.copy()
    i50[5] += 15 * pop.scale[5]
    far = sotcore.DevicePopulation(i50, pop.scale)
    with pytest.warns(UserWarning, match=r"devices 5;"):
        SOTClassifier(devices=far, **FAST).fit(Xtr, ytr)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SOTClassifier(devices=pop, **FAST).fit(Xtr, ytr)
        SOTClassifier(devices=far, training="software", **FAST).fit(Xtr, ytr)


def test_pretrain_then_short_hil(digits):
    Xtr, Xte, ytr, yte = digits
    backend, lab, pop = _instrument(32, seed=1)
    clf = SOTClassifier(hidden_layer_sizes=(32,), devices=backend, calibration=pop,
                        pretrain="hardware-aware", hil_epochs=2, max_iter=20, batch_size=32,
                        random_state=0).fit(Xtr, ytr)
    assert (backend.pulse_counts == 2 * len(Xtr)).all() and clf.n_iter_ == 22
    assert clf.score(Xte, yte) > 0.9
    with pytest.raises(ValueError, match="pretrain"):
        SOTClassifier(devices=backend, pretrain="hardware-aware", training="ex-situ",
                      calibration=pop, **FAST).fit(Xtr, ytr)


def test_transfer_to_another_population(digits, tmp_path):
    Xtr, Xte, ytr, yte = digits
    a = sotcore.DevicePopulation.from_width(20.0, 32, variability=0.2, random_state=1)
    b_pop = sotcore.DevicePopulation.from_width(20.0, 32, variability=0.2, random_state=2)
    clf = SOTClassifier(hidden_layer_sizes=(32,), devices=a, max_iter=15, batch_size=32,
                        random_state=0).fit(Xtr, ytr)
    clf.save(tmp_path / "a.json")
    B = InstrumentBackend(Lab(b_pop, 3), 32)
    moved = SOTClassifier.load(tmp_path / "a.json", backend=B)
    before = moved.score(Xte, yte)
    for _ in range(2):
        moved.partial_fit(Xtr, ytr)
    assert moved.n_iter_ == clf.n_iter_ + 2
    assert moved.score(Xte, yte) >= before - 0.02
    assert not np.array_equal(moved.coefs_[0], clf.coefs_[0])


def test_progress_bars_for_slow_backends_only(digits, capsys):
    Xtr, Xte, ytr, _ = digits
    backend, lab, pop = _instrument(16)
    clf = SOTClassifier(devices=backend, calibration=pop, **FAST).fit(Xtr, ytr)
    clf.predict(Xte)
    err = capsys.readouterr().err
    assert "training" in err and "predict" in err
    SOTClassifier(devices=pop, **FAST).fit(Xtr, ytr).predict(Xte)
    assert capsys.readouterr().err == ""
    SOTClassifier(devices=backend, calibration=pop, progress=False, **FAST).fit(Xtr, ytr)
    assert capsys.readouterr().err == ""


# -- scikit-learn semantics (issue #12) ------------------------------------------------
def test_clone_keeps_the_backend(digits):
    Xtr, _, ytr, _ = digits
    backend, lab, pop = _instrument(16)
    clf = SOTClassifier(devices=backend, calibration=pop, **FAST)
    assert clone(clf).devices is backend
    assert clone(clf).calibration is not pop          # other parameters are copied
    cross_val_score(clf, Xtr[:300], ytr[:300], cv=2)
    assert backend.pulse_counts.sum() > 0             # the user's instrument was pulsed


def test_numpy_typed_parameters(digits, tmp_path):
    Xtr, Xte, ytr, yte = digits
    clf = SOTClassifier(hidden_layer_sizes=(np.int64(8),), max_iter=np.int64(2),
                        alpha=np.float32(1e-4), batch_size=np.int32(64), devices=20.0,
                        nominal_device=np.array([2e-3, 6.8e-5]), random_state=0,
                        checkpoint=tmp_path / "c.npz")
    clf.fit(Xtr, ytr).score(Xte, yte)
    clf.save(tmp_path / "m.json")
    gs = GridSearchCV(SOTClassifier(hidden_layer_sizes=(8,), max_iter=1, devices=20.0),
                      {"batch_size": np.array([32, 64])}, cv=2).fit(Xtr[:200], ytr[:200])
    assert gs.best_params_["batch_size"] in (32, 64)


def test_partial_fit_after_load_continues(digits, tmp_path):
    Xtr, Xte, ytr, yte = digits
    clf = SOTClassifier(devices=20.0, **dict(FAST, max_iter=10, batch_size=32)).fit(Xtr, ytr)
    acc = clf.score(Xte, yte)
    clf.save(tmp_path / "m.json")
    back = SOTClassifier.load(tmp_path / "m.json")
    back.partial_fit(Xtr, ytr)
    fresh = SOTClassifier(devices=20.0, **dict(FAST, max_iter=10, batch_size=32))
    fresh.partial_fit(Xtr, ytr, classes=np.unique(ytr))
    assert back.n_iter_ == 11
    assert not np.array_equal(back.coefs_[0], fresh.coefs_[0])
    assert back.score(Xte, yte) > acc - 0.05 > fresh.score(Xte, yte)
    back.set_params(hidden_layer_sizes=(32,))
    with pytest.raises(ValueError, match="fitted with"):
        back.partial_fit(Xtr, ytr)
    back.set_params(hidden_layer_sizes=(16,), n_samples=0)
    with pytest.raises(ValueError, match="n_samples"):
        back.partial_fit(Xtr, ytr)                 # parameters validated on every call


def test_tol_stops_on_the_training_loss(digits):
    Xtr, _, ytr, _ = digits
    clf = SOTClassifier(devices=20.0, tol=10.0, n_iter_no_change=2,
                        **dict(FAST, max_iter=50)).fit(Xtr, ytr)
    assert clf.n_iter_ == 4                           # as MLPClassifier: > 2 epochs w/o gain
    assert clf.best_loss_ == min(clf.loss_curve_)
    clf = SOTClassifier(devices=20.0, tol=0.0, **dict(FAST, max_iter=5)).fit(Xtr, ytr)
    assert clf.n_iter_ == 5


def test_resume_of_a_finished_or_stopped_run(digits, tmp_path):
    Xtr, _, ytr, _ = digits
    ck = tmp_path / "c.npz"
    kw = dict(FAST, max_iter=3)
    clf = SOTClassifier(devices=20.0, checkpoint=ck, **kw).fit(Xtr, ytr)
    again = SOTClassifier(devices=20.0, checkpoint=ck, **kw).fit(Xtr, ytr, resume_from=ck)
    assert again.n_iter_ == clf.n_iter_ == 3
    np.testing.assert_array_equal(again.coefs_[0], clf.coefs_[0])
    stop = [lambda e, info, net: e >= 2]
    clf = SOTClassifier(devices=20.0, checkpoint=ck, callbacks=stop, **kw).fit(Xtr, ytr)
    again = SOTClassifier(devices=20.0, checkpoint=ck, callbacks=stop, **kw).fit(
        Xtr, ytr, resume_from=ck)
    assert clf.n_iter_ == again.n_iter_ == 2
    np.testing.assert_array_equal(again.coefs_[0], clf.coefs_[0])


def test_missing_checkpoint_directory_fails_before_training(digits, tmp_path):
    Xtr, _, ytr, _ = digits
    backend, lab, pop = _instrument(16)
    with pytest.raises(ValueError, match="does not exist"):
        SOTClassifier(devices=backend, calibration=pop, checkpoint=tmp_path / "no" / "c.npz",
                      **FAST).fit(Xtr, ytr)
    assert not lab.requests


class _FailAt(DeviceBackend):
    """Emulated devices that fail on one chosen call."""

    def __init__(self, pop, seed, fail_call=None, action=None):
        self.inner = EmulatedBackend(pop, seed)
        self.n_devices = len(pop)
        self.fail_call, self.action, self.n = fail_call, action, 0
        super().__init__()

    def get_state(self):
        return {**super().get_state(), "inner": self.inner.get_state(), "n": self.n}

    def set_state(self, state):
        super().set_state(state)
        self.inner.set_state(state["inner"])
        self.n = state["n"]

    def _pulse(self, currents, devices):
        self.n += 1
        if self.n == self.fail_call:
            self.fail_call = None
            self.action()
        return self.inner.pulse(currents, devices)


def _resume_matches_clean(digits, tmp_path, action, fail_call, expect, **extra):
    Xtr, _, ytr, _ = digits
    pop = sotcore.DevicePopulation.from_width(20.0, 16, random_state=0)
    kw = dict(FAST, max_iter=3, **extra)
    clean = SOTClassifier(devices=_FailAt(pop, 1), calibration=pop, **kw).fit(Xtr, ytr)
    ck = tmp_path / "c.npz"
    with pytest.raises(expect):
        SOTClassifier(devices=_FailAt(pop, 1, fail_call, action), calibration=pop,
                      checkpoint=ck, **kw).fit(Xtr, ytr)
    assert ck.exists()
    res = SOTClassifier(devices=_FailAt(pop, 1), calibration=pop, checkpoint=ck, **kw).fit(
        Xtr, ytr, resume_from=ck)
    for a, b in zip(clean.coefs_ + clean.intercepts_, res.coefs_ + res.intercepts_):
        np.testing.assert_array_equal(a, b)
    assert res.loss_curve_ == clean.loss_curve_
    return clean, res


def _timeout():
    raise TimeoutError("no answer")


def test_ctrl_c_checkpoints_the_interrupted_step(digits, tmp_path):
    def ctrl_c():
        os.kill(os.getpid(), signal.SIGINT)
    _resume_matches_clean(digits, tmp_path, ctrl_c, 7, KeyboardInterrupt)


def test_fault_during_validation_checkpoints_the_epoch(digits, tmp_path):
    # 1 training epoch = 14 requests (batch 64 on 883 rows) + validation through the devices
    clean, res = _resume_matches_clean(digits, tmp_path, _timeout, 15, TrainingInterrupted,
                                       early_stopping=True, n_iter_no_change=50)
    assert res.validation_scores_ == clean.validation_scores_


def test_failing_callback_checkpoints_and_reraises(digits, tmp_path):
    Xtr, _, ytr, _ = digits
    ck = tmp_path / "c.npz"
    state = {"fail": True}

    def cb(epoch, info, net):
        if epoch == 2 and state["fail"]:
            state["fail"] = False
            raise RuntimeError("my logging code broke")
        return False
    kw = dict(FAST, max_iter=3, callbacks=[cb])
    with pytest.raises(RuntimeError, match="logging code") as info:
        SOTClassifier(devices=20.0, checkpoint=ck, **kw).fit(Xtr, ytr)
    assert any("checkpoint written" in n for n in info.value.__notes__)
    res = SOTClassifier(devices=20.0, checkpoint=ck, **kw).fit(Xtr, ytr, resume_from=ck)
    clean = SOTClassifier(devices=20.0, **dict(FAST, max_iter=3)).fit(Xtr, ytr)
    np.testing.assert_array_equal(res.coefs_[0], clean.coefs_[0])
    assert res.loss_curve_ == clean.loss_curve_


def test_recording_eviction_and_state(pop20):
    rec = RecordingBackend(EmulatedBackend(pop20, 0), max_records=3 * 64)
    cur = np.tile(pop20.i50, (1, 1))
    for _ in range(5):
        rec.pulse(cur)
    assert len(rec.log) == 3
    state = rec.get_state()
    kept = [b.copy() for _, _, b in rec.log]
    rec.pulse(cur)
    rec.pulse(cur)
    rec.set_state(state)
    assert len(rec.log) == 1                           # the later requests are dropped ...
    np.testing.assert_array_equal(rec.log[-1][2], kept[-1])   # ... back to the saved point
    assert rec.records()["device"].size == 64


def test_recording_costs_do_not_grow_with_the_log(pop20):
    rec = RecordingBackend(EmulatedBackend(pop20, 0), max_records=10_000)
    cur = np.tile(pop20.i50, (2, 1))
    t = []
    for k in range(3):
        t0 = time.perf_counter()
        for _ in range(1500):
            rec.pulse(cur)
        t.append(time.perf_counter() - t0)
    assert t[2] < 3 * t[0] + 0.05


# -- the CLI on an instrument ----------------------------------------------------------
def make_backend():
    """Factory for ``--instrument tests.test_lab:make_backend`` style use."""
    pop = sotcore.DevicePopulation.from_width(20.0, 8, variability=0.10, random_state=0)
    return InstrumentBackend(Lab(pop), 8)


def test_cli_runs_every_mode_on_an_instrument(tmp_path, capsys, monkeypatch):
    from sotcore.cli import main
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    args = ["--instrument", "test_lab:make_backend", "--nominal", "2e-3,7e-5", "--hidden",
            "16", "--epochs", "2", "--seeds", "1", "--samples", "2", "--quiet",
            "--max-train", "300"]
    assert main(args + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "hil (nominal), per seed" in out and "pulses on 8 devices" in out
    assert main(args + ["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for run in ("software", "ex-situ", "hardware-aware", "hil (calibrated)"):
        assert run in out
    data = json.loads((tmp_path / "results.json").read_text())
    assert {r["mode"] for r in data["records"]} == {"software", "ex-situ", "hardware-aware",
                                                    "hil"}
    assert main(["--instrument", "test_lab:nothing_here"]) == 2
    assert "cannot import" in capsys.readouterr().err
    assert main(["--instrument", "test_lab:make_backend", "--hidden", "8"]) == 2
    assert "--nominal" in capsys.readouterr().err


def test_cli_width_study_holds_the_mapping(capsys):
    from sotcore.cli import main
    assert main(["--width", "10", "40", "--hidden", "16", "--epochs", "2", "--seeds", "1",
                 "--samples", "4", "--quiet", "--surrogates", "nominal"]) == 0
    out = capsys.readouterr().out
    assert "mapping held at" in out
    tables = out.split("width 10.0 um")[1].split("width 40.0 um")
    assert tables[0].strip().splitlines()[2:] != tables[1].strip().splitlines()[2:]


def test_cli_sweep_on_an_instrument(tmp_path, capsys, monkeypatch):
    from sotcore.cli import main
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    out = tmp_path / "results.jsonl"
    assert main(["sweep", "--out", str(tmp_path), "--instrument", "test_lab:make_backend",
                 "--nominal", "2e-3,7e-5", "--runs", "software", "hil:calibrated",
                 "--seeds", "1", "--hidden", "16", "--epochs", "2", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "instrument test_lab:make_backend" in text and "hil (calibrated)" in text
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["mode"] for r in recs} == {"software", "ex-situ", "hil"}
    assert main(["sweep", "--out", str(tmp_path), "--instrument", "test_lab:make_backend",
                 "--n-jobs", "2"]) == 2


def test_cli_refuses_main_job_options_before_a_subcommand(tmp_path, capsys):
    from sotcore.cli import main
    assert main(["--seeds", "2", "train", "-o", str(tmp_path / "m.json")]) == 2
    assert "belong(s) to the main job" in capsys.readouterr().err


def test_two_fits_on_one_checkpoint_are_refused(digits, tmp_path):
    import threading
    Xtr, _, ytr, _ = digits
    ck = tmp_path / "shared.npz"
    gate, errors = threading.Event(), []

    def slow_cb(epoch, info, net):
        gate.wait(5)
        return False
    first = SOTClassifier(devices=20.0, checkpoint=ck, callbacks=[slow_cb], **FAST)
    t = threading.Thread(target=lambda: first.fit(Xtr, ytr))
    t.start()
    time.sleep(0.3)
    try:
        SOTClassifier(devices=20.0, checkpoint=ck, **FAST).fit(Xtr, ytr)
    except ValueError as exc:
        errors.append(str(exc))
    gate.set()
    t.join()
    assert errors and "another fit" in errors[0]
    SOTClassifier(devices=20.0, checkpoint=ck, **FAST).fit(Xtr, ytr)   # free again


def test_replay_files_are_checked(tmp_path, pop20):
    rec = RecordingBackend(EmulatedBackend(pop20, 0))
    rec.pulse(np.tile(pop20.i50, (3, 1)))
    rec.save(tmp_path / "log.npz")
    back = sotcore.ReplayBackend.load(tmp_path / "log.npz")
    np.testing.assert_array_equal(back.pulse(np.tile(pop20.i50, (3, 1))), rec.log[0][2])
    z = dict(np.load(tmp_path / "log.npz"))
    for change in ({"d0": np.array([0, 99])}, {"n_calls": np.asarray(5)},
                   {"b0": np.full((3, 64), 7, np.uint8)}, {"x": np.zeros(2)}):
        np.savez(tmp_path / "bad.npz", **{**z, **change})
        with pytest.raises(ValueError, match="bad.npz"):
            sotcore.ReplayBackend.load(tmp_path / "bad.npz")
    (tmp_path / "torn.npz").write_bytes((tmp_path / "log.npz").read_bytes()[:200])
    with pytest.raises(ValueError, match="torn.npz"):
        sotcore.ReplayBackend.load(tmp_path / "torn.npz")


def test_fine_tuning_after_pretraining_uses_its_own_rate(digits):
    Xtr, _, ytr, _ = digits
    pop = sotcore.DevicePopulation.from_width(20.0, 16, random_state=0)
    kw = dict(FAST, pretrain="hardware-aware", hil_epochs=1, calibration=pop, devices=pop)
    clf = SOTClassifier(**kw).fit(Xtr, ytr)
    assert clf._train_state["optimizer"].lr == pytest.approx(FAST.get("learning_rate_init",
                                                                       3e-3) / 10)
    assert clf._train_state["optimizer"].t == -(-len(Xtr) // 64)    # fresh: one epoch
    clf = SOTClassifier(hil_learning_rate=5e-4, **kw).fit(Xtr, ytr)
    assert clf._train_state["optimizer"].lr == 5e-4
