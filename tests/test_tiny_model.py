"""The offline tiny model directory: loads like any Hugging Face checkpoint, idempotent, CLI."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from hybrid_ray.cli import main                                         # noqa: E402
from hybrid_ray.engines.tiny_model import FILES, TinyModelError, build_tiny_model   # noqa: E402
from hybrid_ray.workload import load_gsm8k_questions                    # noqa: E402

# the vLLM venv's python (.ci/run and docs/engines.md make it in the repository root)
VVENV = Path(os.environ.get("HYBRID_RAY_VLLM_PYTHON", Path(__file__).resolve().parents[1] / ".venv-vllm/bin/python"))


def test_gsm8k_questions_are_bundled():
    qs = load_gsm8k_questions()
    assert len(qs) == 1319 and qs[0].startswith("Janet")
    assert load_gsm8k_questions(3) == qs[:3]


def test_directory_loads_with_transformers(tiny_model_dir):
    d = tiny_model_dir
    assert all((d / f).is_file() for f in FILES)
    tok = transformers.AutoTokenizer.from_pretrained(d, local_files_only=True)
    cfg = transformers.AutoConfig.from_pretrained(d, local_files_only=True)
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2) and cfg.architectures == ["LlamaForCausalLM"]
    assert cfg.hidden_size // cfg.num_attention_heads == 64 and not cfg.tie_word_embeddings
    assert cfg.max_position_embeddings == tok.model_max_length == 1024 and len(tok) == cfg.vocab_size == 512
    ids = tok("Janet's ducks lay 16 eggs per day.").input_ids
    assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=True) == "Janet's ducks lay 16 eggs per day."
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<s><|user|>\nHi</s>\n<|assistant|>\n"
    model = transformers.AutoModelForCausalLM.from_pretrained(d, local_files_only=True)
    w = model.lm_head.weight
    others = torch.cat([w[:2], w[3:]]).norm(dim=1).mean()
    assert w[2].norm() > 2 * others                                     # the EOS row, scaled by 3


def test_build_is_idempotent_and_safe(tmp_path, tiny_model_dir):
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    stamp = (d / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(d) == d and (d / "model.safetensors").stat().st_mtime_ns == stamp   # kept
    other = tmp_path / "not-a-model"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(TinyModelError, match="not a tiny model directory"):
        build_tiny_model(other)
    with pytest.raises(TinyModelError, match="must be 64"):
        build_tiny_model(tmp_path / "x", hidden=64, heads=4)


def test_make_model_command(tmp_path, tiny_model_dir, capsys):
    d = tmp_path / "cli"
    shutil.copytree(tiny_model_dir, d)                 # same arguments: the command keeps it (fast)
    assert main(["make-model", str(d)]) == 0
    assert f"wrote {d}" in capsys.readouterr().out
    assert json.loads((d / "hybrid_ray_tiny_model.json").read_text())["seed"] == 0


@pytest.mark.vllm                      # CI's vLLM step runs it (in .venv-vllm, VVENV is that venv's python)
@pytest.mark.skipif(not VVENV.exists(), reason="no vLLM venv (.venv-vllm or $HYBRID_RAY_VLLM_PYTHON)")
def test_directory_loads_with_older_transformers(tiny_model_dir):
    """The vLLM venv's transformers (< 5.20) reads the tokenizer, chat template and config too."""
    code = ("import sys; from transformers import AutoTokenizer, AutoConfig; d = sys.argv[1]; "
            "t = AutoTokenizer.from_pretrained(d, local_files_only=True); "
            "c = AutoConfig.from_pretrained(d, local_files_only=True); "
            "print(t('Hello world').input_ids[0], t.eos_token_id, c.head_dim, "
            "repr(t.apply_chat_template([{'role': 'user', 'content': 'Hi'}], tokenize=False, "
            "add_generation_prompt=True)))")
    out = subprocess.run([str(VVENV), "-c", code, str(tiny_model_dir)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRANSFORMERS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[:3] == ["1", "2", "64"]
    assert "<|assistant|>" in out.stdout
