"""sotcore: stochastic spin-orbit-torque neurons, from pulse data to trained networks."""
__version__ = "0.1.0"

try:
    from . import _kernels  # noqa: F401  (the compiled core)
except ImportError as _exc:     # e.g. `import sotcore` from an unbuilt source tree
    raise ImportError(
        "sotcore's compiled core (sotcore._kernels) could not be imported: "
        f"{_exc}. If you are in the source tree, either build it in place with "
        "`python setup.py build_ext --inplace`, or run from another directory so the "
        "installed package is imported (`pip install .` first).") from None

from .backends import (Backend, BackendError, CompensatedBackend, DeviceBackend,
                       EmulatedBackend, InstrumentBackend, RecordingBackend, ReplayBackend)
from .calibration import CalibrationResult, calibrate, simulate_measurements
from .characterize import calibrate_backend, estimate_calibration_pulses
from .devices import DeviceAging, DevicePopulation, switching_probability
from .estimator import SOTClassifier
from .exceptions import InvalidInputError, SotcoreError, TrainingInterrupted
from .network import CurrentMapping, DeviceMap
from .training import suggest_mapping

__all__ = ["DevicePopulation", "switching_probability", "SOTClassifier", "CurrentMapping",
           "DeviceMap", "Backend", "DeviceBackend", "EmulatedBackend", "InstrumentBackend",
           "RecordingBackend", "ReplayBackend", "BackendError", "calibrate_backend",
           "estimate_calibration_pulses", "calibrate", "CalibrationResult",
           "simulate_measurements", "suggest_mapping", "SotcoreError", "InvalidInputError",
           "TrainingInterrupted", "DeviceAging", "CompensatedBackend", "__version__"]
