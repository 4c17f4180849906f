import numpy as np
import pytest
from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import sotcore
from sotcore.backends import InstrumentBackend
from sotcore.datasets import load_digits
from sotcore.estimator import SOTClassifier

# Checks a stochastic classifier cannot pass by nature; filled in below.
EXPECTED_FAILED = {}
# Few epochs on small data need larger steps than the MNIST defaults.
FAST = dict(batch_size=32, learning_rate_init=1e-2)


@parametrize_with_checks(
    [SOTClassifier(hidden_layer_sizes=(16,), max_iter=30, batch_size=16, learning_rate_init=1e-2,
                   n_samples=8, random_state=0)],
    expected_failed_checks=lambda est: EXPECTED_FAILED)
def test_sklearn_compatible(estimator, check):
    check(estimator)


def test_param_validation_check():
    # scikit-learn's own check that every constraint in _parameter_constraints is enforced
    from sklearn.utils.estimator_checks import check_param_validation
    check_param_validation("SOTClassifier", SOTClassifier(hidden_layer_sizes=(8,), max_iter=1))


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits()
    return train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)


def test_public_import_and_defaults():
    clf = sotcore.SOTClassifier()
    assert clf.hidden_layer_sizes == (500,) and clf.training == "hil" and clf.n_samples == 32
    assert clf.max_iter == 30 and clf.devices is None


@pytest.mark.parametrize("devices", [None, 20.0, "population", "backend"])
def test_devices_argument_forms(digits, devices):
    Xtr, Xte, ytr, yte = digits
    pop = sotcore.DevicePopulation.from_width(20.0, 40, random_state=0)
    if devices == "population":
        devices = pop
    elif devices == "backend":
        rng = np.random.default_rng(0)
        devices = InstrumentBackend(
            lambda c, d: rng.random(c.shape) < pop[d].probability(c), 32, curves=pop[:32])
    clf = SOTClassifier(hidden_layer_sizes=(32,), devices=devices, max_iter=3, n_samples=4,
                        random_state=0, **FAST).fit(Xtr, ytr)
    assert clf.score(Xte, yte) > 0.5
    assert clf.devices_ is not None and len(clf.devices_) == 32


def test_devices_argument_errors(digits):
    Xtr, _, ytr, _ = digits
    small = sotcore.DevicePopulation.from_width(20.0, 8, random_state=0)
    with pytest.raises(ValueError, match=r"device_map\[3\] = 8"):
        SOTClassifier(hidden_layer_sizes=(4,), devices=small,
                      device_map=[0, 1, 2, 8]).fit(Xtr, ytr)
    with pytest.raises(ValueError, match="16 neurons"):
        SOTClassifier(hidden_layer_sizes=(16,), devices=small, device_map=[0, 1]).fit(Xtr, ytr)
    with pytest.raises(TypeError, match="devices must be"):
        SOTClassifier(devices="20um").fit(Xtr, ytr)
    calls = []
    bare = InstrumentBackend(lambda c, d: calls.append(1) or np.zeros(c.shape), 16)
    for mode in ("hil", "ex-situ", "software"):
        with pytest.raises(ValueError, match="nominal_device"):
            SOTClassifier(hidden_layer_sizes=(16,), devices=bare, training=mode).fit(Xtr, ytr)
    with pytest.raises(ValueError, match="needs device curves"):
        SOTClassifier(hidden_layer_sizes=(16,), devices=bare, training="hardware-aware",
                      nominal_device=(2e-3, 7e-5)).fit(Xtr, ytr)
    with pytest.raises(ValueError, match="nominal_device"):
        SOTClassifier(hidden_layer_sizes=(16,), devices=bare,
                      nominal_device=(2e-3, -1.0)).fit(Xtr, ytr)
    assert not calls                      # nothing was pulsed before validation passed
    with pytest.raises(ValueError, match="calibration"):
        SOTClassifier(hidden_layer_sizes=(16,), devices=20.0, surrogate="calibrated",
                      max_iter=1).fit(Xtr, ytr)
    with pytest.raises(ValueError, match="training"):
        SOTClassifier(training="insitu").fit(Xtr, ytr)
    with pytest.raises(ValueError, match="n_samples"):
        SOTClassifier(n_samples=0).fit(Xtr, ytr)


def test_instrument_without_curves_with_nominal_device(digits):
    Xtr, Xte, ytr, yte = digits
    pop = sotcore.DevicePopulation.from_width(20.0, 32, random_state=0)
    rng = np.random.default_rng(0)
    be = InstrumentBackend(lambda c, d: rng.random(c.shape) < pop[d].probability(c), 32)
    clf = SOTClassifier(hidden_layer_sizes=(32,), devices=be, max_iter=3, n_samples=4, **FAST,
                        nominal_device=(2e-3, 0.3e-3 / 4.394), random_state=0).fit(Xtr, ytr)
    assert clf.score(Xte, yte) > 0.5
    assert be.pulse_counts.sum() > 0 and be.hardware_time > 0


def test_partial_fit(digits):
    Xtr, Xte, ytr, yte = digits
    clf = SOTClassifier(hidden_layer_sizes=(32,), devices=20.0, n_samples=4, random_state=0,
                        **FAST)
    with pytest.raises(ValueError, match="classes"):
        clf.partial_fit(Xtr, ytr)
    for _ in range(3):
        clf.partial_fit(Xtr, ytr, classes=np.arange(10))
    assert clf.n_iter_ == 3 and len(clf.loss_curve_) == 3
    assert clf.loss_curve_[-1] < clf.loss_curve_[0]
    assert clf.score(Xte, yte) > 0.8


def test_pipeline_gridsearch_and_parallel_cv(digits):
    Xtr, _, ytr, _ = digits
    pipe = make_pipeline(MinMaxScaler(), SOTClassifier(hidden_layer_sizes=(16,), max_iter=10,
                                                       n_samples=4, random_state=0, **FAST))
    gs = GridSearchCV(pipe, {"sotclassifier__learning_rate_init": [3e-3, 1e-2]}, cv=2)
    gs.fit(Xtr[:400], ytr[:400])
    assert gs.best_score_ > 0.3
    scores = cross_val_score(SOTClassifier(hidden_layer_sizes=(16,), max_iter=10, n_samples=4,
                                           random_state=0, **FAST), Xtr[:400], ytr[:400], cv=3, n_jobs=2)
    assert scores.shape == (3,) and scores.min() > 0.3


def test_predict_proba_is_a_distribution(digits):
    Xtr, Xte, ytr, _ = digits
    clf = SOTClassifier(hidden_layer_sizes=(16,), max_iter=2, n_samples=4,
                        random_state=0).fit(Xtr, ytr)
    P = clf.predict_proba(Xte)
    assert P.shape == (len(Xte), 10)
    np.testing.assert_allclose(P.sum(axis=1), 1)
    assert np.all(clf.predict(Xte) == clf.classes_[P.argmax(axis=1)])


def test_save_load_roundtrip(tmp_path, digits):
    Xtr, Xte, ytr, yte = digits
    labels = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                       "nine"])
    clf = SOTClassifier(hidden_layer_sizes=(16,), devices=20.0, max_iter=2, n_samples=4,
                        random_state=0, **FAST).fit(Xtr, labels[ytr])
    path = clf.save(tmp_path / "model.json")
    back = SOTClassifier.load(path)
    np.testing.assert_array_equal(back.predict_proba(Xte), clf.predict_proba(Xte))
    assert back.predict(Xte[:3]).dtype == clf.predict(Xte[:3]).dtype
    for a, b in zip(back.coefs_, clf.coefs_):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(back.devices_.i50, clf.devices_.i50)
    assert back.get_params()["n_samples"] == 4


def test_load_rejects_bad_model_files(tmp_path, digits):
    import json
    Xtr, _, ytr, _ = digits
    clf = SOTClassifier(hidden_layer_sizes=(8,), max_iter=1, random_state=0).fit(Xtr, ytr)
    path = clf.save(tmp_path / "m.json")
    meta = json.loads(path.read_text())
    meta["version"] = 7
    (tmp_path / "new.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="newer"):
        SOTClassifier.load(tmp_path / "new.json")
    (tmp_path / "trunc.json").write_text(path.read_text()[:100])
    with pytest.raises(ValueError, match="truncated"):
        SOTClassifier.load(tmp_path / "trunc.json")
    npz = tmp_path / "m.npz"
    data = bytearray(npz.read_bytes())
    data[-10] ^= 0xFF
    npz.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        SOTClassifier.load(path)
    npz.unlink()
    with pytest.raises(FileNotFoundError, match="weights file"):
        SOTClassifier.load(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        SOTClassifier.load(tmp_path / "absent.json")


def test_predictions_do_not_depend_on_the_batch(digits):
    Xtr, Xte, ytr, _ = digits
    clf = SOTClassifier(hidden_layer_sizes=(16, 8), max_iter=2, n_samples=4, random_state=0,
                        **FAST).fit(Xtr, ytr)
    P = clf.predict_proba(Xte)
    np.testing.assert_array_equal(clf.predict_proba(Xte[5:9]), P[5:9])
    perm = np.random.default_rng(0).permutation(len(Xte))
    np.testing.assert_array_equal(clf.predict_proba(Xte[perm]), P[perm])
    np.testing.assert_array_equal(clf.predict_proba(Xte), P)      # repeatable


def test_mlpclassifier_optimiser_names(digits):
    Xtr, _, ytr, _ = digits
    with pytest.raises(TypeError):
        SOTClassifier((8,), 20.0)                        # keyword-only after the sizes
    kw = dict(hidden_layer_sizes=(8,), devices=20.0, max_iter=1, random_state=0)
    clf = SOTClassifier(beta_1=0.5, beta_2=0.9, epsilon=1e-3, **kw).fit(Xtr, ytr)
    opt = clf._train_state["optimizer"]
    assert (opt.beta1, opt.beta2, opt.eps) == (0.5, 0.9, 1e-3)
    base = SOTClassifier(**kw).fit(Xtr, ytr)
    assert not np.array_equal(clf.coefs_[0], base.coefs_[0])
    sgd = SOTClassifier(solver="sgd", nesterovs_momentum=False, **kw).fit(Xtr, ytr)
    assert sgd._train_state["optimizer"].nesterov is False
    # shuffle=False trains on the data's order: the same as feeding it pre-ordered
    a = SOTClassifier(shuffle=False, **kw).fit(Xtr, ytr)
    b = SOTClassifier(shuffle=False, **kw).fit(Xtr[::-1], ytr[::-1])
    assert not np.array_equal(a.coefs_[0], b.coefs_[0])
    c = SOTClassifier(shuffle=True, **kw).fit(Xtr, ytr)
    assert not np.array_equal(a.coefs_[0], c.coefs_[0])
    auto = SOTClassifier(batch_size="auto", **kw)
    assert auto._batch(1000) == 200 and auto._batch(50) == 50
    auto.fit(Xtr, ytr)
    with pytest.raises(ValueError, match="batch_size"):
        SOTClassifier(batch_size="big", **kw).fit(Xtr, ytr)
