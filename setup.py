"""Build the compiled core ``sotcore._kernels``.

Environment variables (all optional):

SOTCORE_BOUNDSCHECK=1   compile the kernels with Cython bounds and wraparound
                        checks on (debug build; slower).
SOTCORE_NATIVE=1        add ``-march=native`` (not portable; off by default).
SOTCORE_NO_OPENMP=1     build without OpenMP even if the compiler supports it.
SOTCORE_SANITIZE=1      AddressSanitizer + UndefinedBehaviorSanitizer build (see
                        tools/sanitize.sh; load libasan with LD_PRELOAD to run it).
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _openmp_flags():
    """Return (compile, link) flags if a test program builds with OpenMP."""
    if _truthy("SOTCORE_NO_OPENMP") or sys.platform == "win32":
        return [], []
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    cc = cc.split()
    src = "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n"
    tmp = tempfile.mkdtemp()
    try:
        c = os.path.join(tmp, "t.c")
        with open(c, "w") as fh:
            fh.write(src)
        res = subprocess.run(cc + ["-fopenmp", c, "-o", os.path.join(tmp, "t")],
                             capture_output=True)
        ok = res.returncode == 0
    except OSError:
        ok = False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not ok:
        print("sotcore: OpenMP not available, building the serial kernels", file=sys.stderr)
        return [], []
    return ["-fopenmp"], ["-fopenmp"]


boundscheck = _truthy("SOTCORE_BOUNDSCHECK")
omp_c, omp_l = _openmp_flags()
extra_compile = ["-O3", "-fno-math-errno", "-fno-trapping-math"] + omp_c
if _truthy("SOTCORE_NATIVE"):
    extra_compile.append("-march=native")
extra_link = list(omp_l)
if _truthy("SOTCORE_SANITIZE"):
    # AddressSanitizer + UndefinedBehaviorSanitizer build (tools/sanitize.sh runs it)
    san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
           "-fno-sanitize-recover=undefined"]
    extra_compile = [f for f in extra_compile if f != "-O3"] + ["-O1", "-g"] + san
    extra_link += san

ext = Extension(
    "sotcore._kernels",
    sources=["sotcore/_kernels.pyx"],
    depends=["sotcore/_sotrng.h", "sotcore/_sot_math.h", "sotcore/_sot_infer.h",
             "sotcore/_sot_optim.h", "sotcore/_sot_train.h", "sotcore/_sot_first.h", "sotcore/_sot_fp.h"],
    include_dirs=[np.get_include(), "sotcore"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    extra_compile_args=extra_compile,
    extra_link_args=extra_link,
)

setup(
    ext_modules=cythonize(
        [ext],
        language_level=3,
        compiler_directives={
            "boundscheck": boundscheck,
            "wraparound": boundscheck,
            "initializedcheck": boundscheck,
            "cdivision": True,
        },
    ),
)
