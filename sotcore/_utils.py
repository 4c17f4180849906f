"""Validation and randomness helpers shared by the package (private)."""
import math
import numbers

import numpy as np
from sklearn.utils import check_random_state, check_scalar

from . import _kernels
from ._threads import cpu_count
from .exceptions import InvalidInputError, InvalidTypeError


#: Largest |n_threads| accepted (the kernels take a C int; more threads than
#: this is a mistake, not a machine).
MAX_THREADS = 4096


def check_counter(value, name):
    """A stream/row counter: an integer in [0, 2**64) (ValueError otherwise, no truncation)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise InvalidInputError(f"{name} must be a non-negative integer, got {value!r}")
    value = int(value)
    if not 0 <= value < 2**64:
        raise InvalidInputError(f"{name} must be in [0, 2**64), got {value}")
    return value


def effective_n_threads(n_threads=None):
    """Number of threads a kernel should use.

    ``None`` means OpenMP's default, which honours ``OMP_NUM_THREADS``;
    a negative value ``-k`` means all CPUs but ``k - 1``.  Results never
    depend on this number, only speed does.
    """
    if n_threads is None:
        n = _kernels.omp_max_threads()
    else:
        if isinstance(n_threads, (bool, np.bool_)) or not isinstance(n_threads, numbers.Integral):
            raise TypeError(f"n_threads must be an int or None, got {type(n_threads).__name__}")
        n_threads = int(n_threads)
        if n_threads == 0:
            raise ValueError("n_threads must not be 0 (use None for the default)")
        if abs(n_threads) > MAX_THREADS:
            raise ValueError(f"n_threads must be in [-{MAX_THREADS}, {MAX_THREADS}], "
                             f"got {n_threads}")
        if n_threads < 0:
            n = max(cpu_count() + 1 + n_threads, 1)
        else:
            n = n_threads
    if not _kernels.openmp_enabled():
        return 1
    return max(1, int(n))


def seed_from_random_state(random_state):
    """Turn ``random_state`` into one 64-bit seed (drawn once per call)."""
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(0, 2**64, dtype=np.uint64))
    if isinstance(random_state, numbers.Integral) and not isinstance(random_state, (bool, np.bool_)):
        if random_state < 0:
            raise ValueError(f"random_state must be a non-negative integer, got {random_state}")
        # Any size of integer seed; SeedSequence hashes it into independent bits.
        hi, lo = np.random.SeedSequence(int(random_state)).generate_state(2, dtype=np.uint32)
        return int((int(hi) << 32) | int(lo))
    rs = check_random_state(random_state)
    hi, lo = rs.randint(0, 2**32, size=2, dtype=np.uint64)
    return int((int(hi) << 32) | int(lo))


def as_float_array(x, name, *, ndim=None, dtype=np.float64, allow_float32=False,
                   finite=True):
    """Check that ``x`` is a real numeric array; return it C-contiguous.

    Raises ``TypeError`` for non-numeric input (strings, objects, complex,
    booleans) and ``ValueError`` for NaN/inf or a wrong number of dimensions.
    Read-only and non-contiguous arrays are accepted (copied if needed).
    """
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{name} must be numeric, got a string")
    try:
        arr = np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise ValueError(f"{name} could not be converted to an array: {exc}") from None
    if arr.dtype == object:
        try:
            arr = arr.astype(np.float64)
        except OverflowError:       # Python ints beyond float64 (e.g. 10**400)
            raise ValueError(f"{name} has a value too large for float64") from None
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be numeric, got objects that are not numbers") from None
    kind = arr.dtype.kind
    if kind == "b":
        raise TypeError(f"{name} must be numeric, got booleans")
    if kind not in "fiu":
        raise TypeError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if allow_float32 and arr.dtype == np.float32:
        out_dtype = np.float32
    else:
        out_dtype = dtype
    if ndim is not None and arr.ndim not in np.atleast_1d(ndim):
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {arr.shape}")
    arr = np.asarray(arr, dtype=out_dtype, order="C")
    # min/max propagate NaN and expose inf without a temporary as large as arr.
    if finite and arr.size and not (np.isfinite(arr.min()) and np.isfinite(arr.max())):
        bad = np.argwhere(~np.isfinite(arr))[0]
        where = tuple(int(i) for i in bad)
        raise ValueError(f"{name} must be finite, found {arr[tuple(bad)]} at index {where}")
    return arr


def as_per_device(x, name, n, *, positive=False, low=None, high=None):
    """Broadcast a scalar or length-``n`` array to a float64 array of length n."""
    arr = as_float_array(x, name, ndim=(0, 1))
    if arr.ndim == 0:
        arr = np.full(n, float(arr))
    elif arr.shape[0] != n:
        raise ValueError(f"{name} must be a scalar or have {n} entries (one per device), "
                         f"got {arr.shape[0]}")
    if positive and arr.size and not (arr > 0).all():
        i = int(np.argmin(arr > 0))
        raise ValueError(f"{name} must be > 0, got {arr[i]} for device {i}")
    if low is not None and arr.size and not (arr >= low).all():
        i = int(np.argmin(arr >= low))
        raise ValueError(f"{name} must be >= {low}, got {arr[i]} for device {i}")
    if high is not None and arr.size and not (arr <= high).all():
        i = int(np.argmin(arr <= high))
        raise ValueError(f"{name} must be <= {high}, got {arr[i]} for device {i}")
    return arr.copy()


def check_scalar_arg(x, name, *, low=None, high=None, low_open=False, integer=False):
    """``sklearn.utils.check_scalar`` (type and bounds, its messages) plus what it does
    not check (no bool, finite); errors are :class:`InvalidInputError` (a ValueError)
    or, for a wrong type, :class:`InvalidTypeError` (also a TypeError).  Returns a
    plain int or float."""
    if isinstance(x, (bool, np.bool_)):
        raise InvalidTypeError(f"{name} must be a real number, got {type(x).__name__}")
    try:
        check_scalar(x, name, numbers.Integral if integer else numbers.Real, min_val=low,
                     max_val=high, include_boundaries=("both" if not low_open else
                                                       "neither" if high is None else "right"))
    except TypeError as exc:
        raise InvalidTypeError(str(exc)) from None
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None
    if not math.isfinite(x):
        raise InvalidInputError(f"{name} must be finite, got {x}")
    return int(x) if integer else float(x)
