"""The plugin as users install it: manifest valid, discovered from the editable install and
from a built wheel installed into a fresh venv."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_manifest_valid_and_importable():
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    mf = pm.get_manifest("napari-bci")
    assert mf.package_metadata is not None and mf.package_metadata.version
    mf.validate_imports()  # every python_name in napari.yaml resolves
    widgets = {w.display_name for w in mf.contributions.widgets}
    assert {"Slides", "Virtual IHC", "Compare", "Register", "HER2"} <= widgets
    keys = {s.key for s in mf.contributions.sample_data}
    assert {"bci-0", "bci-1+", "bci-2+", "bci-3+", "wsi-pair", "cmu-small"} <= keys


def test_npe2_validate_cli():
    exe = Path(sys.executable).with_name("npe2")
    res = subprocess.run([str(exe), "validate", "napari-bci"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "valid" in res.stdout


@pytest.mark.slow
def test_wheel_in_fresh_venv(tmp_path):
    """Build the wheel, install it (no deps) into a new venv that sees the test venv's other
    packages through a path file, and check napari discovers it from site-packages."""
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(ROOT)],
        check=True,
    )
    (wheel,) = dist.glob("napari_bci-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "napari_bci/napari.yaml" in names
    assert any(n.endswith("entry_points.txt") for n in names)

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    )
    # the test venv's packages, minus napari-bci itself (its editable install)
    deps = tmp_path / "deps"
    deps.mkdir()
    ours = Path(sysconfig.get_paths()["purelib"])
    for entry in ours.iterdir():
        n = entry.name.lower()
        if n.startswith(("napari_bci", "__editable__", "napari-bci")) or n.endswith(".pth"):
            continue
        (deps / entry.name).symlink_to(entry)
    (site / "_deps.pth").write_text(str(deps) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
    )
    code = (
        "import napari_bci, pathlib; from npe2 import PluginManager;"
        "pm = PluginManager.instance(); pm.discover();"
        "mf = pm.get_manifest('napari-bci'); mf.validate_imports();"
        "print(pathlib.Path(napari_bci.__file__).parent)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([str(py), "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()).is_relative_to(site)
    res = subprocess.run(
        [str(env_dir / "bin" / "napari-bci"), "--version"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert res.returncode == 0 and "napari-bci" in res.stdout
