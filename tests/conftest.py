"""Shared fixtures. Area-specific fixtures live in the area's own test modules."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"

# Keep torch and BLAS from oversubscribing the two CI cores when tests run Qt threads too: two
# threads in a single process, one in each pytest-xdist worker. Workers inherit the controller's
# environment, so a default the controller set is replaced there; a value the user set is kept.
if os.environ.get("PYTEST_XDIST_WORKER"):
    if os.environ.get("NAPARI_BCI_TEST_THREADS_DEFAULTED"):
        os.environ["OMP_NUM_THREADS"] = "1"
elif "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "2"
    os.environ["NAPARI_BCI_TEST_THREADS_DEFAULTED"] = "1"
# Settings the widgets remember (QSettings) go to a private folder, never the user's.
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="napari-bci-test-config-")


@pytest.fixture(autouse=True)
def _fresh_widget_settings():
    """Each test starts from the widgets' defaults, not from what an earlier test chose."""
    yield
    if "qtpy" in __import__("sys").modules:
        from qtpy.QtCore import QSettings

        QSettings("napari-bci", "napari-bci").clear()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``tests/data``: real, freely licensed samples (see ATTRIBUTION.md there)."""
    return DATA


@pytest.fixture
def run_cli(capsys):
    """Run ``napari-bci ARGS`` in-process; returns ``(exit_code, stdout, stderr)``."""
    from napari_bci.cli import main

    def run(*args: str):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run
