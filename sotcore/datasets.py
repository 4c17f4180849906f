"""Data loaders: MNIST-format IDX files and scikit-learn's embedded digits."""
import gzip
import os
import struct
from pathlib import Path

import numpy as np

__all__ = ["read_idx", "load_mnist", "load_digits", "find_mnist_dir"]

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

# File names tried for each split, in order (gzip or raw).
_MNIST_NAMES = {
    "train": ["train-images-idx3-ubyte", "train-images.idx3-ubyte", "train5k-images-idx3-ubyte"],
    "test": ["t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"],
}


def read_idx(path):
    """Read one IDX file (gzip-compressed or raw) into a NumPy array.

    Raises ``ValueError`` naming the file if the header is not IDX or the
    data are truncated or too long.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"IDX file not found: {path}") from None
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read ({exc}); the file may be truncated") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    ndim = data[3]
    if ndim == 0 or len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: IDX header truncated")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    body = data[4 + 4 * ndim:]
    if len(body) != expected:
        raise ValueError(f"{path}: IDX data hold {len(body)} bytes but the header "
                         f"{tuple(shape)} needs {expected}; the file is truncated or corrupt")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _find(directory, stem):
    for suffix in (".gz", ""):
        p = directory / (stem + suffix)
        if p.is_file():
            return p
    return None


def find_mnist_dir():
    """The first existing MNIST directory among ``$SOTCORE_MNIST_DIR``,
    ``../shared/data/mnist`` and ``shared/data/mnist`` (relative to the
    working directory), or None."""
    candidates = [os.environ.get("SOTCORE_MNIST_DIR"), "../shared/data/mnist", "shared/data/mnist",
                  Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    return None


def load_mnist(directory=None, split="train", *, max_samples=None):
    """Load an MNIST-format split from a directory of IDX files.

    Parameters
    ----------
    directory : path or None
        Directory holding ``train-images-idx3-ubyte[.gz]`` (the full training
        set) or ``train5k-images-idx3-ubyte[.gz]`` (the 5,000-image subset),
        ``t10k-images-idx3-ubyte[.gz]`` and the matching label files.
        None: ``find_mnist_dir()``.
    split : {"train", "test"}
    max_samples : int, optional
        Keep only the first ``max_samples`` images.

    Returns
    -------
    X : ndarray of float32, shape (n, 784), pixel values scaled to [0, 1]
    y : ndarray of int64, shape (n,)
    """
    if split not in _MNIST_NAMES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if directory is None:
        directory = find_mnist_dir()
        if directory is None:
            raise FileNotFoundError("no MNIST directory found; pass one (e.g. ../shared/data/mnist)")
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"MNIST directory not found: {directory}")
    for stem in _MNIST_NAMES[split]:
        img = _find(directory, stem)
        if img is not None:
            lab = _find(directory, stem.replace("images", "labels").replace("idx3", "idx1"))
            if lab is None:
                raise FileNotFoundError(f"{img} has no matching labels file in {directory}")
            break
    else:
        raise FileNotFoundError(f"no {split} images in {directory} (looked for "
                                f"{', '.join(n + '[.gz]' for n in _MNIST_NAMES[split])})")
    images = read_idx(img)
    labels = read_idx(lab)
    if images.ndim != 3 or labels.ndim != 1:
        raise ValueError(f"{img}: expected images (n, rows, cols) and labels (n,), got "
                         f"{images.shape} and {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{img} holds {images.shape[0]} images but {lab} "
                         f"{labels.shape[0]} labels")
    if max_samples is not None:
        images, labels = images[:max_samples], labels[:max_samples]
    X = images.reshape(images.shape[0], -1).astype(np.float32) / np.float32(255.0)
    return X, labels.astype(np.int64)


def load_digits():
    """scikit-learn's bundled 8x8 digits (1,797 images), scaled to [0, 1] as float32."""
    from sklearn.datasets import load_digits as _ld
    d = _ld()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)
