"""The package is release-ready: one version everywhere, a wheel and an sdist that twine accepts."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RELEASE_FILES = ("setup.cfg", "pyproject.toml", "README.md", "CHANGELOG.md", "MANIFEST.in")


def setup_cfg_version() -> str:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return config["metadata"]["version"]


def test_version_is_the_same_everywhere():
    import monai_patchplug

    version = setup_cfg_version()
    assert monai_patchplug.__version__ == version
    assert f"version = {{{version}}}" in (ROOT / "README.md").read_text(encoding="utf-8"), "README's citation"
    assert f"\n## {version}\n" in (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")


def test_py_typed_marker_is_shipped():
    assert (ROOT / "monai_patchplug" / "py.typed").is_file()
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert "py.typed" in config["options.package_data"]["monai_patchplug"]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the sdist and the wheel from a copy of the release inputs (the work tree is left untouched)."""
    pytest.importorskip("build", reason="build is not installed: pip install -e '.[test]'")
    src = tmp_path_factory.mktemp("release")
    for name in RELEASE_FILES:
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "monai_patchplug", src / "monai_patchplug",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    # no isolation: use the installed setuptools instead of downloading one (-x: wheel is not needed for it)
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "-x", "-o", str(src / "dist"), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return src / "dist"


def test_twine_accepts_the_distributions(dist: Path):
    pytest.importorskip("twine", reason="twine is not installed: pip install -e '.[test]'")
    files = sorted(str(p) for p in dist.iterdir())
    assert len(files) == 2, files
    done = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *files],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_wheel_holds_the_package_only(dist: Path):
    version = setup_cfg_version()
    (wheel,) = dist.glob(f"monai_patchplug-{version}-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(f"monai_patchplug-{version}.dist-info/METADATA").decode()
    assert "monai_patchplug/py.typed" in names
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "monai_patchplug").rglob("*.py")}
    assert sources <= names, f"missing from the wheel: {sorted(sources - names)}"
    top = {name.split("/", 1)[0] for name in names}
    assert top == {"monai_patchplug", f"monai_patchplug-{version}.dist-info"}, top  # no tests, benchmarks, ...
    assert f"\nVersion: {version}\n" in metadata
    assert "Requires-Dist: monai>=1.6" in metadata


def test_sdist_holds_what_a_rebuild_needs(dist: Path):
    version = setup_cfg_version()
    (sdist,) = dist.glob(f"monai_patchplug-{version}.tar.gz")
    with tarfile.open(sdist) as tf:
        names = {name.split("/", 1)[1] for name in tf.getnames() if "/" in name}
    for name in ("setup.cfg", "pyproject.toml", "README.md", "CHANGELOG.md", "monai_patchplug/__init__.py",
                 "monai_patchplug/py.typed"):
        assert name in names, f"{name} missing from the sdist"
