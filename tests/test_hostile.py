"""Hostile input at every public entry point: clear errors, never a crash or a hang."""
import gzip
import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import sotcore
from sotcore.datasets import load_mnist, read_idx
from sotcore.estimator import SOTClassifier

FAST = dict(hidden_layer_sizes=(8,), max_iter=1, n_samples=2, random_state=0)


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    X = rng.random((40, 5)).astype(np.float32)
    y = np.arange(40) % 3
    return SOTClassifier(**FAST).fit(X, y), X, y


BAD_X = [
    (np.full((4, 5), np.nan), ValueError, "NaN"),
    (np.full((4, 5), np.inf), ValueError, "infinity"),
    (np.zeros((0, 5)), ValueError, "0 sample"),
    (np.zeros((4, 7)), ValueError, "features"),
    (np.zeros((4, 5, 2)), ValueError, "dim"),
    (np.array([["a"] * 5] * 4), ValueError, "string"),
    (np.zeros((4, 5), dtype=complex), ValueError, "omplex"),
    (np.full((4, 5), 1e39), ValueError, "infinity"),     # overflows float32
]


@pytest.mark.parametrize("X, exc, match", BAD_X)
def test_predict_rejects_bad_X(fitted, X, exc, match):
    clf = fitted[0]
    with pytest.raises(exc, match=match):
        clf.predict_proba(X)


@pytest.mark.parametrize("X, exc, match", BAD_X[:3] + BAD_X[4:])
def test_fit_rejects_bad_X(X, exc, match):
    y = np.arange(len(X)) % 2
    with pytest.raises(exc, match=match):
        SOTClassifier(**FAST).fit(X, y)


@pytest.mark.parametrize("y, match", [
    (np.linspace(0, 1, 6), "continuous"),
    (np.array([0, 1, 0, 1, np.nan, 1]), "NaN"),
    (np.arange(5), "inconsistent"),
])
def test_fit_rejects_bad_y(y, match):
    X = np.random.default_rng(0).random((6, 3))
    with pytest.raises(ValueError, match=match):
        SOTClassifier(**FAST).fit(X, y)


def test_readonly_noncontiguous_and_huge_inputs_work(fitted):
    clf, X, _ = fitted
    P = clf.predict_proba(X)
    ro = X.copy()
    ro.setflags(write=False)
    np.testing.assert_array_equal(clf.predict_proba(ro), P)
    strided = np.repeat(X, 2, axis=1)[:, ::2]
    np.testing.assert_array_equal(clf.predict_proba(strided), P)
    fortran = np.asfortranarray(X)
    np.testing.assert_array_equal(clf.predict_proba(fortran), P)
    huge = clf.predict_proba(np.full((3, 5), 1e30))      # finite: currents clamp to the grid
    assert np.isfinite(huge).all()
    np.testing.assert_allclose(huge.sum(axis=1), 1)


@pytest.mark.parametrize("param, value", [
    ("hidden_layer_sizes", (0,)), ("hidden_layer_sizes", (-3,)), ("hidden_layer_sizes", ("a",)),
    ("batch_size", 0), ("learning_rate_init", -1.0), ("alpha", -1.0), ("momentum", 2.0),
    ("variability", -0.1), ("train_samples", 0), ("solver", "lbfgs"), ("surrogate", "x"),
    ("mapping_unit", 0.0), ("nominal_device", (1e-3, -1.0)), ("nominal_device", (1.0,)),
    ("devices", -5.0), ("devices", "20um"), ("devices", [1, 2]), ("n_threads", 0),
])
def test_bad_estimator_parameters(param, value):
    X = np.random.default_rng(0).random((10, 3))
    y = np.arange(10) % 2
    with pytest.raises((ValueError, TypeError), match=param if param not in (
            "devices", "nominal_device", "hidden_layer_sizes") else
            {"devices": "devices|width", "nominal_device": "nominal_device",
             "hidden_layer_sizes": "hidden_layer_sizes"}[param]):
        SOTClassifier(**{**FAST, param: value}).fit(X, y)


# -- files ---------------------------------------------------------------------------------
def _idx(path, arr, magic_type=0x08, gz=True):
    head = bytes([0, 0, magic_type, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    data = head + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)
    return path


def test_idx_loader_roundtrip_and_corruption(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (7, 28, 28))
    labs = np.arange(7) % 10
    _idx(tmp_path / "train-images-idx3-ubyte.gz", imgs)
    _idx(tmp_path / "train-labels-idx1-ubyte", labs, gz=False)
    X, y = load_mnist(tmp_path, "train")
    assert X.shape == (7, 784) and X.max() <= 1 and y.tolist() == labs.tolist()
    raw = gzip.open(tmp_path / "train-images-idx3-ubyte.gz").read()
    gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb").write(raw[:-10])
    with pytest.raises(ValueError, match="truncated"):
        load_mnist(tmp_path, "train")
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(ValueError, match="cannot read|truncated"):
        load_mnist(tmp_path, "train")
    (tmp_path / "train-images-idx3-ubyte.gz").unlink()
    _idx(tmp_path / "train-images-idx3-ubyte.gz", imgs[:5])
    with pytest.raises(ValueError, match="labels"):
        load_mnist(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="test images"):
        load_mnist(tmp_path, "test")
    with pytest.raises(ValueError, match="split"):
        load_mnist(tmp_path, "validation")


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=200))
def test_read_idx_never_crashes_on_random_bytes(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("idx") / "f.idx"
    p.write_bytes(data)
    try:
        arr = read_idx(p)
    except ValueError:
        return
    assert isinstance(arr, np.ndarray)


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(0, 2000), flip=st.integers(0, 2000))
def test_population_loader_on_edited_files(tmp_path_factory, cut, flip):
    pop = sotcore.DevicePopulation.from_width(20.0, 4, random_state=0)
    d = tmp_path_factory.mktemp("pop")
    text = json.dumps(pop.to_dict())
    b = bytearray(text[:cut] if cut < len(text) else text, "utf-8")
    if b and flip < len(b):
        b[flip] = (b[flip] + 7) % 128
    (d / "p.json").write_bytes(bytes(b))
    try:
        back = sotcore.DevicePopulation.load(d / "p.json")
    except sotcore.InvalidInputError as exc:      # one error type, naming the file
        assert str(d / "p.json") in str(exc)
        return
    assert len(back) >= 1 and np.isfinite(back.i50).all() and (back.scale > 0).all()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 6), m=st.integers(1, 5), fill=st.sampled_from(
    [0.0, 1e-3, -1e300, 1e300, np.nan, np.inf, 5e-324]))
def test_backend_pulse_properties(n, m, fill):
    pop = sotcore.DevicePopulation.from_width(20.0, m, random_state=0)
    be = sotcore.EmulatedBackend(pop, 0)
    cur = np.full((n, m), fill)
    try:
        bits = be.pulse(cur)
    except ValueError as exc:
        assert "finite" in str(exc) and not np.isfinite(fill)
        return
    assert bits.shape == (n, m) and bits.dtype == np.uint8 and bits.max(initial=0) <= 1


def _traced_peak(fn):
    import tracemalloc
    tracemalloc.start()
    try:
        try:
            fn()
        except ValueError as exc:
            out = exc
        else:
            out = None
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_idx_gzip_bomb_is_refused_before_allocating(tmp_path):
    """A header declaring 2 GiB (over the limit) or 512 MiB (more than a few
    KiB of gzip can hold) is refused after reading only the header."""
    p = tmp_path / "bomb-idx3-ubyte.gz"
    for shape in ((1 << 16, 1 << 15), (1 << 14, 1 << 15)):
        head = bytes([0, 0, 0x08, 2]) + struct.pack(">II", *shape)
        with gzip.open(p, "wb") as fh:
            fh.write(head + b"\0" * 4096)
        exc, peak = _traced_peak(lambda: read_idx(p))
        assert isinstance(exc, sotcore.InvalidInputError) and str(p) in str(exc)
        assert peak < 4 << 20


def test_idx_real_bomb_obeys_max_bytes(tmp_path):
    p = tmp_path / "zeros-idx1-ubyte.gz"
    n = 16 << 20
    with gzip.open(p, "wb") as fh:
        fh.write(bytes([0, 0, 0x08, 1]) + struct.pack(">I", n))
        fh.write(b"\0" * n)
    assert p.stat().st_size < 64 << 10
    exc, peak = _traced_peak(lambda: read_idx(p, max_bytes=1 << 20))
    assert isinstance(exc, sotcore.InvalidInputError) and "limit" in str(exc)
    assert peak < 2 << 20
    assert read_idx(p).shape == (n,)                       # within the default limit


def test_idx_raw_header_larger_than_file_and_trailing_bytes(tmp_path):
    p = tmp_path / "x-idx1-ubyte"
    p.write_bytes(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 2**29) + b"\0" * 10)
    exc, peak = _traced_peak(lambda: read_idx(p))
    assert isinstance(exc, ValueError) and "hold at most" in str(exc) and peak < 1 << 20
    p.write_bytes(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 3) + b"\0" * 4)
    with pytest.raises(ValueError, match="3\\+ bytes"):
        read_idx(p)


def test_mnist_images_must_be_uint8(tmp_path):
    head = bytes([0, 0, 0x0D, 3]) + struct.pack(">III", 2, 2, 2)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(head + b"\0" * 32)
    _idx(tmp_path / "train-labels-idx1-ubyte", np.arange(2), gz=False)
    with pytest.raises(ValueError, match="uint8"):
        load_mnist(tmp_path, "train")
