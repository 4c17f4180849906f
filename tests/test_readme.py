"""The README's code blocks run as written.

Python blocks run in order in one namespace, in a scratch directory, with the
MNIST directory found as ``load_mnist()`` finds it; a block right after a line
``<!-- readme-test: long -->`` is skipped (minutes of training), and so is the
PyTorch block when torch is not installed.  Every
``sotcore-eval`` command in a bash block must parse with the real parser.
"""
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
pytestmark = pytest.mark.skipif(not README.exists(), reason="needs the source tree")


def _blocks(lang):
    text = README.read_text(encoding="utf-8")
    out = []
    for m in re.finditer(r"(?:(<!-- readme-test: long -->)\s*\n)?```" + lang + r"\n(.*?)```",
                         text, re.S):
        line = text[:m.start()].count("\n") + 1
        out.append((line, bool(m.group(1)), m.group(2)))
    return out


def test_python_blocks_run(tmp_path, monkeypatch):
    from sotcore.datasets import find_mnist_dir
    monkeypatch.chdir(ROOT)
    mnist = find_mnist_dir()
    if mnist is not None:
        monkeypatch.setenv("SOTCORE_MNIST_DIR", str(Path(mnist).resolve()))
    monkeypatch.chdir(tmp_path)
    blocks = _blocks("python")
    assert len(blocks) >= 4
    ns = {"__name__": "__readme__"}
    ran = 0
    try:
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
    for line, long, code in blocks:
        if long or ("sotcore.torch" in code and not have_torch):   # optional extra absent
            continue
        try:
            exec(compile(code, f"README.md:{line}", "exec"), ns)
        except Exception as exc:
            raise AssertionError(f"README block at line {line} failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
        ran += 1
    assert ran >= 3


def test_cli_commands_parse():
    from sotcore.cli import build_parser
    n = 0
    for line, _, code in _blocks("bash"):
        for cmd in code.splitlines():
            cmd = cmd.split("#")[0].strip()
            if "sotcore-eval" not in cmd:
                continue
            argv = shlex.split(cmd[cmd.index("sotcore-eval"):])[1:]
            if "--help" in argv or "--version" in argv:
                continue
            build_parser().parse_args(argv)       # raises on an unknown option
            n += 1
    assert n >= 5
