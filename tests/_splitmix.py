"""NumPy reference of the compiled core's counter-based generator (shared by the tests)."""
import numpy as np

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15


def mix64(z):
    """SplitMix64's output function on a uint64 array (wrapping arithmetic)."""
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def stream_key(seed, stream):
    """The key of stream ``stream`` under ``seed`` (``sot_stream_key``)."""
    inner = int(mix64(np.uint64(seed ^ 0x5851F42D4C957F2D)))
    return int(mix64(np.uint64((inner + stream * GAMMA) & MASK64)))
