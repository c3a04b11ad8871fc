"""Lean loading: the lens stages read only the frozen tensors they need from safetensors, never build the model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loralens.lens.runtime.adapters import folded_unembedding, out_proj_weight
from loralens.lens.runtime.lean import LeanLoadError, load_lean, read_frozen_parts, safetensors_index
from loralens.lens.runtime.models import load_model
from tests.conftest import FAMILIES, save_tiny_model


@pytest.fixture(scope="module")
def sharded_models(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """Each family's tiny model saved as a sharded safetensors checkpoint (many files + index)."""
    root = tmp_path_factory.mktemp("sharded")
    out = {}
    for family in FAMILIES:
        folder = save_tiny_model(family, root / family, tiny_tokenizer, seed=3)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder)
        model.save_pretrained(root / f"{family}-sharded", max_shard_size="40KB")
        tiny_tokenizer.save_pretrained(root / f"{family}-sharded")
        out[family] = root / f"{family}-sharded"
    return out


class ModelConstructions:
    """Counts PreTrainedModel constructions (a counter around the real __init__)."""

    def __init__(self, monkeypatch) -> None:
        from transformers import PreTrainedModel

        self.count = 0
        real = PreTrainedModel.__init__

        def counting(model, *args, **kwargs):
            self.count += 1
            real(model, *args, **kwargs)

        monkeypatch.setattr(PreTrainedModel, "__init__", counting)


@pytest.mark.parametrize("family", FAMILIES)
def test_lean_parts_equal_the_full_models_tensors_without_building_it(sharded_models, family, tmp_path,
                                                                      monkeypatch):
    folder = sharded_models[family]
    assert (folder / "model.safetensors.index.json").exists()
    assert len(set(safetensors_index(folder).values())) > 1  # really sharded
    built = ModelConstructions(monkeypatch)
    lean = load_lean(str(folder), tmp_path, [0, 2])
    assert built.count == 0
    monkeypatch.undo()

    full = load_model(str(folder), tmp_path)
    w, b = folded_unembedding(full.adapter, full.model)
    lw, lb = lean.parts.folded()
    assert torch.equal(lw, w) and torch.equal(lb, b)
    for layer in (0, 2):
        assert torch.equal(lean.parts.w_o(layer), out_proj_weight(full.adapter, full.model, layer, full.dims).float())
    assert torch.equal(lean.parts.lm_head()[0], full.model.get_output_embeddings().weight)
    assert lean.dims == full.dims and lean.fingerprint == full.fingerprint
    assert len(lean.tokenizer) == len(full.tokenizer)
    with pytest.raises(LeanLoadError, match="layer 1 was not loaded"):
        lean.parts.w_o(1)


def test_lean_loading_reads_bf16_and_folds_in_fp32(tiny_models, tmp_path, tiny_tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    parts = read_frozen_parts(tmp_path / "bf16", AutoConfig.from_pretrained(tmp_path / "bf16"), [1])
    assert parts.unembed_w.dtype == torch.bfloat16  # read as stored: half the bytes of fp32
    w, _ = parts.folded()
    assert w.dtype == torch.float32
    expected = model.lm_head.weight.float() * model.model.norm.weight.float()[None, :]
    assert torch.equal(w, expected)


def test_a_checkpoint_missing_a_needed_tensor_is_one_line(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    src = tiny_models["llama"]
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.self_attn.o_proj.weight"]
    (tmp_path / "m").mkdir()
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    with pytest.raises(LeanLoadError, match=r"has no tensor 'model\.layers\.1\.self_attn\.o_proj\.weight'"):
        read_frozen_parts(tmp_path / "m", AutoConfig.from_pretrained(src), [0, 1])


def test_training_worker_never_builds_the_model(tiny_models, tmp_path):
    """Run the real train worker process on a real cache, counting model constructions inside it."""
    from loralens.config import parse_config
    from loralens.tasks.stages.cache import cache_version, run_cache_stage
    from loralens.tasks.stages.train import run_train_stage, train_version
    from loralens.warehouse.constants import TRAIN_RESULT, TRAIN_SPEC

    raw = {"home": str(tmp_path / "home"), "model": {"name": str(tiny_models["llama"])},
           "corpus": {"max_prompts_per_file": 12}, "cache": {"prompts_per_shard": 8, "max_length": 16},
           "train": {"micro_batch_tokens": 32, "epochs": 1, "zero_stage": 0}}
    cfg = parse_config(raw)
    cache_ver = cache_version(cfg)
    run_cache_stage(cfg, cache_ver)
    ver = train_version(cfg, cache_ver)
    run_train_stage(cfg, ver, cache_ver)
    spec = json.loads((ver.artifact.path / TRAIN_SPEC).read_text())
    spec["out_dir"] = str(tmp_path / "again")
    (tmp_path / "again").mkdir()
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    probe = (
        "import sys, transformers\n"
        "n = [0]\n"
        "real = transformers.PreTrainedModel.__init__\n"
        "def counting(self, *a, **k):\n"
        "    n[0] += 1; real(self, *a, **k)\n"
        "transformers.PreTrainedModel.__init__ = counting\n"
        "from loralens.tasks.workers.train_worker import main\n"
        "rc = main([sys.argv[1]])\n"
        "print('MODELS_BUILT', n[0])\n"
        "sys.exit(rc)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "spec.json")], capture_output=True, text=True,
                         timeout=600, env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "MODELS_BUILT 0" in out.stdout
    assert (tmp_path / "again" / TRAIN_RESULT).exists()
