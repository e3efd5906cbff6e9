"""Guard rails that keep the code base in shape: the layer contract, ruff (with a complexity limit), file sizes."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 450


def run(*command):
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_layers_import_only_downwards():
    # next to this interpreter first: a virtual environment run without activating it
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if command is None:
        pytest.skip("import-linter is not installed (pip install import-linter)")
    result = run(command, "--no-cache")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_ruff_finds_nothing():
    command = ("check", "--output-format=concise", "lxt_explicit", "tests", "benchmarks")
    result = run(sys.executable, "-m", "ruff", *command)
    if result.returncode != 0 and "No module named ruff" in result.stderr:
        pytest.skip("ruff is not installed (pip install ruff)")
    assert result.returncode == 0, result.stdout[-4000:]


def test_no_library_file_is_longer_than_the_limit():
    long = {
        str(path.relative_to(ROOT)): n
        for path in (ROOT / "lxt_explicit").rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these modules (over {MAX_LINES} lines): {long}"
