"""sotcore: stochastic spin-orbit-torque neurons, from pulse data to trained networks."""
__version__ = "0.1.0"

from .devices import DevicePopulation, switching_probability

__all__ = ["DevicePopulation", "switching_probability", "__version__"]
