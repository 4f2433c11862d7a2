"""`pip install -e .` / a wheel: the package, its data and the dependencies of requirements.txt."""

import glob
import os
import shutil
import subprocess
import sys
import zipfile

from conftest import REPO


def requirement_lines(name):
    with open(os.path.join(REPO, name)) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def test_wheel_holds_the_package_and_declares_requirements_txt(tmp_path):
    source = tmp_path / "source"  # built from a copy: a build leaves build/ and egg-info behind
    source.mkdir()
    for name in ("pyproject.toml", "requirements.txt", "requirements-test.txt", "README.md"):
        shutil.copy(os.path.join(REPO, name), source)
    shutil.copytree(os.path.join(REPO, "pixelflow_jax"), source / "pixelflow_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (wheel,) = glob.glob(str(tmp_path / "dist" / "*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    modules = {os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "pixelflow_jax", "**", "*.py"),
                                                               recursive=True)}
    assert "pixelflow_jax/sampling/cascade.py" in modules  # the subpackages are in the wheel too
    assert modules | {"pixelflow_jax/imagenet_class_names.json"} <= names
    declared = [line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist: ")]
    assert [d for d in declared if "extra ==" not in d] == requirement_lines("requirements.txt")
    assert [d.split(";")[0] for d in declared if 'extra == "test"' in d] == requirement_lines("requirements-test.txt")
