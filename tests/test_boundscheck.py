"""The kernel tests against a build with Cython bounds checking switched on."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="needs the source tree")
def test_kernel_tests_pass_with_boundscheck(tmp_path):
    pytest.importorskip("Cython")
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "sotcore", src / "sotcore",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__", "*.pyd"))
    shutil.copytree(ROOT / "tests", src / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "SOTCORE_BOUNDSCHECK": "1"}
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=src,
                           env=env, capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    env["PYTHONPATH"] = str(src)
    # The build really checks bounds: an out-of-range index raises instead of reading.
    probe = subprocess.run([sys.executable, "-c", (
        "import numpy as np\nfrom sotcore import _kernels\n"
        "assert _kernels._index_probe(np.arange(3.0), 2) == 2.0\n"
        "try:\n    _kernels._index_probe(np.arange(3.0), 3)\n"
        "except IndexError:\n    print('checked')\n")], cwd=src, env=env,
        capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "checked", probe.stdout + probe.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_kernels.py", "tests/test_devices.py"], cwd=src, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:]
    assert " passed" in run.stdout
