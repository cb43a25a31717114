"""The installed package must contain every subpackage and the bundled data and configs."""
import pytest

tomllib = pytest.importorskip("tomllib")   # Python >= 3.11
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "hybrid_ray").rglob("__init__.py")}
    assert found <= listed, f"add to pyproject packages: {sorted(found - listed)}"
    assert "hybrid_ray.cluster_configs" in listed


def test_bundled_files_are_package_data():
    import importlib.resources as res
    cfg = res.files("hybrid_ray.cluster_configs")
    assert (cfg / "local.yaml").is_file() and (cfg / "paper_llama65b.yaml").is_file()
    data = res.files("hybrid_ray") / "data"
    for name in ("gsm8k/test_llama_token_counts.csv", "gsm8k/LICENSE", "azure_llm_2023/LICENSE",
                 "azure_llm_2023/AzureLLMInferenceTrace_conv.csv"):
        assert (data / name).is_file(), name
