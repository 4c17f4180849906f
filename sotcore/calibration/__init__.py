"""Device calibration: switching curves fitted to measured pulse data.

A researcher pulses each device ``pulses`` times at each of a sweep of
currents and counts how often it switched.  :func:`calibrate` turns such a
table into per-device switching curves of a chosen family (logistic, probit,
thermal Neel-Brown, asymmetric generalised logistic, isotonic, binned table,
or ``"auto"``: per device the best by AIC/BIC), flags, fit-quality measures,
robust population statistics per device width and the width scaling of I50
and of the programming window, and returns them with a ready-to-use
:class:`~sotcore.DevicePopulation`.  :func:`simulate_measurements` is the
virtual lab: it produces the same kind of table from any population, and
:func:`family_population` makes populations of any family.

Modules: ``_measurements`` (reading and validating tables and CSV files),
``_families`` (parametric families and their fit), ``_logistic`` (the
analytic logistic fit), ``_nonparametric`` (isotonic and table curves),
``_population`` (statistics, width scaling, unit checks), ``result``
(:class:`CalibrationResult`, the report), ``lab`` (virtual lab, planning).
"""
from ._calibrate import (
                         DEFAULT_TABLE_BINS,
                         DEFAULT_TABLE_SMOOTHING,
                         MAX_ERROR_TOLERANCE,
                         NONMONOTONE_PVALUE,
                         POOR_FIT_PVALUE,
                         calibrate,
)
from ._families import DEFAULT_PULSE_WIDTH, DEFAULT_TAU0, FAMILIES, MODELS, PARAMETRIC
from ._measurements import COLUMN_ALIASES
from ._population import CURRENT_RATIO, OUTLIER_Z, PLAUSIBLE_CURRENT
from .lab import (
                         DEFAULT_SPAN,
                         expected_standard_errors,
                         family_population,
                         pulses_for_precision,
                         simulate_measurements,
)
from .result import CalibrationResult

__all__ = ["calibrate", "CalibrationResult", "simulate_measurements", "family_population",
           "expected_standard_errors", "pulses_for_precision", "COLUMN_ALIASES", "MODELS",
           "FAMILIES", "PARAMETRIC", "POOR_FIT_PVALUE", "NONMONOTONE_PVALUE",
           "MAX_ERROR_TOLERANCE", "DEFAULT_TABLE_BINS", "DEFAULT_TABLE_SMOOTHING",
           "DEFAULT_TAU0", "DEFAULT_PULSE_WIDTH", "DEFAULT_SPAN", "OUTLIER_Z",
           "PLAUSIBLE_CURRENT", "CURRENT_RATIO"]
