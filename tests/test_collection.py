"""The GPU machine has neither FFCV nor DALI: the suite must still collect there, and the tests of those
two loaders skip. Checked here by hiding both packages from a fresh interpreter (a `None` in sys.modules
is what an uninstalled package looks like to `import`: ModuleNotFoundError)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import HANG_GUARD_S, ROOT

HIDDEN = ("ffcv", "nvidia.dali")
HIDE_AND_RUN_PYTEST = (
    "import sys\n"
    "for name in sys.argv[1].split(','):\n"
    "    sys.modules[name] = None\n"
    "import pytest\n"
    "raise SystemExit(pytest.main(sys.argv[2:]))\n"
)


def pytest_without(packages: tuple[str, ...], *args: str) -> subprocess.CompletedProcess:
    # `-o addopts=` as on the GPU machine: no xdist workers, whose fresh processes would see the packages.
    command = [
        sys.executable,
        "-c",
        HIDE_AND_RUN_PYTEST,
        ",".join(packages),
        "-o",
        "addopts=",
        "-p",
        "no:cacheprovider",
    ]
    return subprocess.run([*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S)


@pytest.mark.parametrize("selection", [["-m", "gpu or timm"], []], ids=["gpu-or-timm", "everything"])
def test_the_suite_collects_without_ffcv_and_dali(selection: list[str]) -> None:
    result = pytest_without(HIDDEN, "--collect-only", "-q", *selection, "tests/")
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "error" not in summary and " collected" in summary, summary


def test_the_loader_tests_skip_without_their_packages() -> None:
    """The parametrized loader tests and the marked ones skip, with the package named; the torch ones stay."""
    result = pytest_without(HIDDEN, "-q", "-rs", "tests/test_loaders.py", "-k", "resume_reads or dali_reads_cifar")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "1 passed, 3 skipped" in result.stdout, result.stdout[-2000:]
    assert (
        "needs ffcv, not installed here" in result.stdout and "needs nvidia.dali, not installed here" in result.stdout
    )


def test_converting_without_ffcv_is_one_clear_line(tmp_path) -> None:
    code = (
        "import sys; sys.modules['ffcv'] = None\n"
        "from pipeline.convert import main\n"
        f"raise SystemExit(main(['--src', {str(tmp_path)!r}, '--dst', {str(tmp_path / 'x.beton')!r}]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: converting to .beton needs FFCV, which is not installed here (pip install ffcv)"
    ]
    assert list(tmp_path.iterdir()) == []
