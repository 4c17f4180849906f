"""Data loaders: MNIST-format IDX files and scikit-learn's embedded digits."""
import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .exceptions import InvalidInputError

__all__ = ["read_idx", "load_mnist", "load_digits", "find_mnist_dir"]

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

# File names tried for each split, in order (gzip or raw).
_MNIST_NAMES = {
    "train": ["train-images-idx3-ubyte", "train-images.idx3-ubyte", "train5k-images-idx3-ubyte"],
    "test": ["t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"],
}


#: Largest IDX payload read (bytes).  ASSUMPTION: 1 GiB, 20x the full MNIST
#: training images (47 MB); larger headers are refused before reading.
MAX_IDX_BYTES = 1 << 30
#: Deflate cannot expand more than ~1032:1, so a gzip file of n bytes holds
#: at most this many times n.
_MAX_GZIP_RATIO = 1100


def read_idx(path, *, max_bytes=MAX_IDX_BYTES):
    """Read one IDX file (gzip-compressed or raw) into a NumPy array.

    The header's declared size is checked against ``max_bytes`` and against
    what the file (or its compressed bytes) can hold before anything is
    allocated, so a gzip bomb costs no memory.  Raises ``InvalidInputError``
    (a ValueError) naming the file if the header is not IDX or the data are
    truncated or too long.
    """
    path = Path(path)

    def bad(msg):
        return InvalidInputError(f"{path}: {msg}")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            gz = fh.read(2) == b"\x1f\x8b"
        with (gzip.open if gz else open)(path, "rb") as fh:
            head = fh.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
                raise bad("not an IDX file (bad magic number)")
            ndim = head[3]
            dims = fh.read(4 * ndim)
            if ndim == 0 or len(dims) < 4 * ndim:
                raise bad("IDX header truncated")
            shape = struct.unpack(">" + "I" * ndim, dims)
            dtype = np.dtype(_IDX_DTYPES[head[2]])
            expected = math.prod(shape) * dtype.itemsize       # Python ints: exact
            room = size * _MAX_GZIP_RATIO if gz else size - 4 - 4 * ndim
            if expected > max_bytes:
                raise bad(f"IDX header {tuple(shape)} declares {expected} bytes (limit "
                          f"{max_bytes})")
            if expected > room:
                raise bad(f"IDX header {tuple(shape)} needs {expected} bytes but the file can "
                          f"hold at most {room}; the file is truncated or corrupt")
            body = fh.read(expected)
            extra = fh.read(1)
    except FileNotFoundError:
        raise FileNotFoundError(f"IDX file not found: {path}") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise bad(f"cannot read ({exc}); the file may be truncated") from None
    if len(body) != expected or extra:
        raise bad(f"IDX data hold {len(body)}{'+' if extra else ''} bytes but the header "
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
    if images.dtype != np.uint8 or labels.dtype.kind not in "iu":
        raise InvalidInputError(f"{img}: expected uint8 images and integer labels, got "
                                f"{images.dtype} and {labels.dtype}")
    if images.ndim != 3 or labels.ndim != 1:
        raise InvalidInputError(f"{img}: expected images (n, rows, cols) and labels (n,), got "
                         f"{images.shape} and {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise InvalidInputError(f"{img} holds {images.shape[0]} images but {lab} "
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
