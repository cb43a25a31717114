"""The built package must contain every subpackage and the bundled data and configs.

An editable install reads the source tree, so it cannot show a missing file: this builds a real
wheel (offline, ``pip wheel --no-deps --no-build-isolation --no-index`` on a copy of the sources,
so the checkout gets no build/ or egg-info) and checks its file list against the tree.
"""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")   # Python >= 3.11
pytest.importorskip("setuptools", minversion="70.1")   # builds wheels without the `wheel` package

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "hybrid_ray").rglob("__init__.py")}
    assert found <= listed, f"add to pyproject packages: {sorted(found - listed)}"
    assert "hybrid_ray.cluster_configs" in listed


def _source_files(folder: Path, pattern: str) -> set[Path]:
    return {p for p in folder.rglob(pattern)
            if p.is_file() and "__pycache__" not in p.parts and not any(x.startswith(".") for x in p.parts)}


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> set[str]:
    src = tmp_path_factory.mktemp("src") / "hybrid-ray"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")
    for name in ("hybrid_ray", "cluster_configs"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheels = list(out.glob("hybrid_ray-*.whl"))
    assert len(wheels) == 1, list(out.iterdir())
    with zipfile.ZipFile(wheels[0]) as z:
        return set(z.namelist())


def test_the_wheel_holds_every_module_and_subpackage(wheel_files):
    modules = {p.relative_to(ROOT).as_posix() for p in _source_files(ROOT / "hybrid_ray", "*.py")}
    missing = sorted(modules - wheel_files)
    assert not missing, f"not in the wheel (list the package in pyproject.toml): {missing[:10]}"
    assert "hybrid_ray/cluster_configs/__init__.py" in wheel_files


def test_the_wheel_holds_the_bundled_data_and_cluster_configs(wheel_files):
    data = {p.relative_to(ROOT).as_posix() for p in _source_files(ROOT / "hybrid_ray" / "data", "*")}
    # the topologies --config reads by name (cluster_configs/ray/ holds `ray up` files, not package data)
    configs = {f"hybrid_ray/cluster_configs/{p.name}" for p in (ROOT / "cluster_configs").glob("*.yaml")}
    assert data and configs
    for name in ("hybrid_ray/data/gsm8k/test_llama_token_counts.csv", "hybrid_ray/data/gsm8k/LICENSE",
                 "hybrid_ray/data/azure_llm_2023/AzureLLMInferenceTrace_conv.csv",
                 "hybrid_ray/cluster_configs/local.yaml", "hybrid_ray/cluster_configs/paper_llama65b.yaml"):
        assert name in data | configs, name
    missing = sorted((data | configs) - wheel_files)
    assert not missing, f"not in the wheel (pyproject package-data): {missing[:10]}"
    entry = [n for n in wheel_files if n.endswith(".dist-info/entry_points.txt")]
    assert entry, "no entry_points.txt: the hybrid-ray command would be missing"
