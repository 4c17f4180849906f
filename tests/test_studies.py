"""The study scripts in python/ import and parse their options (they drift otherwise)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "python").glob("*.py") if not p.name.startswith("_")) \
    if (ROOT / "python").is_dir() else []


@pytest.mark.skipif(not SCRIPTS, reason="needs the source tree")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_study_script_starts(script, tmp_path):
    if "torch" in script.read_text() and importlib.util.find_spec("torch") is None:
        pytest.skip("needs torch")
    run = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "usage" in run.stdout
