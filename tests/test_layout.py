"""Repository invariants: the stdlib `platform` module is never shadowed, CI runs `make test`."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO_ROOT


def test_stdlib_platform_still_imports_from_the_repo_root():
    out = subprocess.run(
        [sys.executable, "-c", "import platform; print(platform.system(), platform.__file__)"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    system, path = out.stdout.split()
    assert system == "Linux"
    assert str(REPO_ROOT) not in path


def test_platform_dir_is_never_a_python_package():
    assert not (REPO_ROOT / "platform.py").exists()
    assert not (REPO_ROOT / "platform" / "__init__.py").exists()


def test_ci_runs_the_readme_test_command():
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    assert "make test" in (REPO_ROOT / "README.md").read_text()
