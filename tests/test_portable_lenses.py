"""Portable lenses and typed heads, on the home of the session's planted-head pipeline run (tests/conftest.py).

A home's lenses saved with `save_pretrained` load with `Lenses.from_pretrained` onto the same model (by name, as a
`loralens.load_model` result, or as a HF model) and decode exactly as before; a model with another folded
unembedding is refused in one line; `loralens export-lenses` writes the same folder; heads are accepted in every
form a person types them, and a wrong form or an out-of-range head is a one-line ApiError naming `heads`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_attribution import PLANTED, TOXIC_WORD

import loralens
from loralens.flows.cli import main
from loralens.lens.lenses.lens_set import fingerprint_tensor
from loralens.lens.lenses.pretrained import CONFIG_FILE, layer_file

HEAD = f"L{PLANTED[0]}H{PLANTED[1]}"
OTHER = (0, 3)  # another lensed head of the 3-layer, 4-head tiny llama


@pytest.fixture(scope="module")
def planted(planted_run):
    """(config, results, home path) of the planted-head run."""
    config, results, _db = planted_run
    return config, results, Path(config["home"])


@pytest.fixture(scope="module")
def lenses(planted):
    return loralens.open(planted[2]).lenses()


@pytest.fixture(scope="module")
def saved(lenses, tmp_path_factory) -> Path:
    return lenses.save_pretrained(tmp_path_factory.mktemp("portable") / "lenses")


@pytest.fixture(scope="module")
def prompt(planted) -> str:
    home = loralens.open(planted[2])
    return home.sql("SELECT text FROM prompts WHERE toxicity > 0.5 ORDER BY prompt_idx LIMIT 1")["text"][0].as_py()


def test_saved_folder_is_flat_and_describes_the_lenses(saved, lenses, planted):
    config, results, _path = planted
    files = sorted(p.name for p in saved.iterdir())
    assert files == [CONFIG_FILE, *(layer_file(layer) for layer in (0, 1, 2)), "token_toxicity.safetensors"]
    assert all((saved / f).is_file() for f in files)  # flat: a hub repository can hold it as is
    cfg = json.loads((saved / CONFIG_FILE).read_text())
    assert cfg["loralens_version"] == loralens.__version__ and cfg["format"] == "loralens-lenses"
    assert cfg["base_model"] == {"name": config["model"]["name"], "dtype": "float32", "revision": None,
                                 "trust_remote_code": False}
    assert (cfg["layers"], cfg["n_heads"], cfg["d_model"], cfg["d_head"], cfg["n_layers"]) == ([0, 1, 2], 4, 64, 16, 3)
    assert cfg["train_version"] == results["train"]["version"] and cfg["store_dtype"] == "float16"
    bank = lenses.reader.banks[0]
    assert cfg["lens"] == bank.config.to_dict() and cfg["vocab"] == bank.vocab
    # The fingerprint is a content hash of the model's own W_U with the final norm folded in.
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(config["model"]["name"])
    folded = hf.lm_head.weight.detach() * hf.model.norm.weight.detach()[None, :]
    assert cfg["unembedding_fingerprint"] == fingerprint_tensor(folded) == lenses.reader.unembed.fingerprint()
    for layer, bank in lenses.reader.banks.items():
        stored = load_file(saved / layer_file(layer))
        assert stored.keys() == bank.state_dict().keys()
        assert all(torch.equal(stored[k], v) for k, v in bank.state_dict().items())
    assert torch.equal(load_file(saved / "token_toxicity.safetensors")["score"], lenses.vocab_tox)


def test_from_pretrained_on_the_same_model_decodes_identically(saved, lenses, planted, prompt):
    """By the base model's name (the default), as a load_model result, and as a HF model with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, _results, path = planted
    name = config["model"]["name"]
    want = lenses.decode(prompt, k=5).table
    assert want.num_rows == len(lenses.decode(prompt, heads=HEAD, k=1).tokens) * 12 * 2 * 5
    models = [None, name, loralens.load_model(name, home=path),
              AutoModelForCausalLM.from_pretrained(name)]
    for model in models:
        tokenizer = AutoTokenizer.from_pretrained(name) if isinstance(model, torch.nn.Module) else None
        loaded = loralens.Lenses.from_pretrained(saved, model, tokenizer=tokenizer, home=path)
        assert loaded.home is None and loaded.version == lenses.version and loaded.layers == [0, 1, 2]
        got = loaded.decode(prompt, k=5)
        assert got.table.equals(want), type(model).__name__
        assert got.top(HEAD)[0][0] == TOXIC_WORD
    assert not any(v != v for v in want.column("expected_toxicity").to_pylist())  # the token toxicity travelled


def test_another_model_is_refused_in_one_line(saved, lenses, planted, tmp_path):
    """A model of the same shape with other weights, and the same model with another final norm: both refused."""
    from conftest import save_tiny_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, _results, path = planted
    name = config["model"]["name"]
    tokenizer = AutoTokenizer.from_pretrained(name)
    other = save_tiny_model("llama", tmp_path / "other", tokenizer, seed=1)
    renormed = AutoModelForCausalLM.from_pretrained(name)
    with torch.no_grad():
        renormed.model.norm.weight.mul_(1.01)  # the same W_U: only the folded final norm differs
    renormed.save_pretrained(tmp_path / "renormed")
    tokenizer.save_pretrained(tmp_path / "renormed")
    want = json.loads((saved / CONFIG_FILE).read_text())["unembedding_fingerprint"]
    for model in (str(other), str(tmp_path / "renormed")):
        with pytest.raises(loralens.ApiError) as err:
            loralens.Lenses.from_pretrained(saved, model, home=path)
        message = str(err.value)
        assert "\n" not in message
        assert message.startswith(f"these lenses were trained on '{name}' (unembedding fingerprint {want}), but "
                                  f"model '{model}' has unembedding fingerprint ")
    with pytest.raises(loralens.ApiError, match=r"^source: no lens folder at /nonexistent/lenses \(and it is not"):
        loralens.Lenses.from_pretrained("/nonexistent/lenses")
    with pytest.raises(loralens.ApiError) as err:
        loralens.Lenses.from_pretrained(other, name, home=path)  # a model folder: its config.json is not ours
    assert str(err.value) == (f"{other / 'config.json'} is not a loralens lens config (its format is not "
                              "'loralens-lenses')")
    with pytest.raises(loralens.ApiError) as err:
        lenses.save_pretrained(other)  # never over a model's config.json
    assert str(err.value) == (f"out_dir: {other / 'config.json'} exists and is not a saved lens config; refusing to "
                              "overwrite it (choose another folder)")
    with pytest.raises(loralens.ApiError, match=r"^model: expected a model name, folder, hub id, .* got int$"):
        loralens.Lenses.from_pretrained(saved, 42)
    with pytest.raises(loralens.ApiError, match=r"^tokenizer: a HF model needs its tokenizer"):
        loralens.Lenses.from_pretrained(saved, renormed)
    (tmp_path / "empty").mkdir()
    with pytest.raises(loralens.ApiError) as err:
        loralens.Lenses.from_pretrained(tmp_path / "empty", name, home=path)
    assert str(err.value) == f"{tmp_path / 'empty'} is not a saved lens folder: it has no config.json"


def test_export_lenses_command_writes_the_same_folder(saved, planted, tmp_path, capsys):
    _config, results, path = planted
    out = tmp_path / "exported"
    assert main(["export-lenses", "--home", str(path), "--version", results["train"]["version"], str(out)]) == 0
    assert f"wrote 5 files to {out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in saved.iterdir())
    assert (out / CONFIG_FILE).read_text() == (saved / CONFIG_FILE).read_text()
    for f in saved.glob("*.safetensors"):  # the same tensors and metadata (whose order in the header may differ)
        with safe_open(str(f), "pt") as want, safe_open(str(out / f.name), "pt") as got:
            assert got.metadata() == want.metadata() and sorted(got.keys()) == sorted(want.keys())
            assert all(torch.equal(got.get_tensor(k), want.get_tensor(k)) for k in want.keys())  # noqa: SIM118
    assert main(["export-lenses", "--home", str(path), "--version", "nope", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == f"loralens: error: train version nope is not complete in {path}\n"


@pytest.mark.parametrize(("heads", "want"), [
    (HEAD, [PLANTED]), (f"{HEAD},L0H3", [PLANTED, OTHER]), ("1.2 0.3", [PLANTED, OTHER]),
    ([HEAD, "L0H3"], [PLANTED, OTHER]), ([PLANTED], [PLANTED]), (PLANTED, [PLANTED]), ([1, 2], [PLANTED]),
    ([HEAD, OTHER], [PLANTED, OTHER]), ([[0, 3], "L1H2"], [OTHER, PLANTED]),
])
def test_every_head_form_is_accepted(lenses, prompt, heads, want):
    assert loralens.parse_heads(heads) == want
    d = lenses.decode(prompt, heads=heads, k=2, position="last")
    assert sorted({(r["layer"], r["head"]) for r in d.table.to_pylist()}) == sorted(want)
    assert d.top(want[0]) == d.top(f"L{want[0][0]}H{want[0][1]}") == d.top([want[0]])


BAD_FORM = "heads: expected 'L<layer>H<head>' (e.g. 'L21H3'), 'LAYER.HEAD' (e.g. '21.3') or (layer, head) pairs, got"


@pytest.mark.parametrize(("heads", "message"), [
    ("X", "heads: bad head 'X'; expected LAYER.HEAD (e.g. 3.1) or LxHy (e.g. L3H1)"),
    ([HEAD, "L1"], "heads: bad head 'L1'; expected LAYER.HEAD (e.g. 3.1) or LxHy (e.g. L3H1)"),
    ([HEAD, 7], f"{BAD_FORM} 7"), ([(1, 2, 3)], f"{BAD_FORM} (1, 2, 3)"), ([(1.0, 2)], f"{BAD_FORM} (1.0, 2)"),
    ([(True, 2)], f"{BAD_FORM} (True, 2)"), (7, f"{BAD_FORM} 7"),
    ("L1H4", "heads: L1H4: head 4 is out of range: layers have 4 heads (0-3)"),
    ([(0, 0), (5, 1)], "heads: L5H1: layer 5 has no trained lens (layers: 0-2)"),
    ("L-1H0", "heads: bad head 'L-1H0'; expected LAYER.HEAD (e.g. 3.1) or LxHy (e.g. L3H1)"),
    ([(-1, 0)], "heads: L-1H0: layer -1 has no trained lens (layers: 0-2)"),
])
def test_a_wrong_head_is_a_one_line_error_naming_heads(lenses, heads, message):
    with pytest.raises(loralens.ApiError) as err:
        lenses.decode("the cat", heads=heads)
    assert str(err.value) == message


def test_decoding_top_names_its_parameter(lenses, prompt):
    d = lenses.decode(prompt, heads=HEAD, k=2, position="last")
    with pytest.raises(loralens.ApiError, match=r"^head: expected one head, got 2 \(L1H2,L0H3\)$"):
        d.top(f"{HEAD},L0H3")
    with pytest.raises(loralens.ApiError, match=r"^head: bad head 'H1'"):
        d.top("H1")


def test_lens_folder_is_rewritten_in_place_and_bad_configs_are_one_line(tmp_path):
    """write_lenses on small real banks: a rewrite with fewer layers drops the stale file; a config of another
    format version, without a required key, or banks of mixed configs are one-line LensFolderErrors."""
    from loralens.lens.lenses.lens_set import FoldedUnembed, LensBank, LensConfig
    from loralens.lens.lenses.pretrained import LensFolderError, read_lens_config, write_lenses

    unembed = FoldedUnembed(torch.randn(50, 16, generator=torch.Generator().manual_seed(0)))
    banks = {layer: LensBank(unembed, 3, LensConfig(rank=2), layer=layer) for layer in (0, 2)}
    info = {"base_model": {"name": "m"}, "store_dtype": "float16"}
    out = write_lenses(tmp_path / "lenses", banks, info)
    assert read_lens_config(out)["layers"] == [0, 2] and read_lens_config(out)["token_toxicity"] is None
    write_lenses(out, {0: banks[0]}, info)
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, layer_file(0)]
    cfg = json.loads((out / CONFIG_FILE).read_text())
    (out / CONFIG_FILE).write_text(json.dumps(cfg | {"format_version": 2}))
    with pytest.raises(LensFolderError, match=r"config.json has format_version 2; this loralens reads 1 \(a newer"):
        read_lens_config(out)
    (out / CONFIG_FILE).write_text(json.dumps({k: v for k, v in cfg.items() if k != "layers"}))
    with pytest.raises(LensFolderError, match=r"config.json lacks layers$"):
        read_lens_config(out)
    mixed = {0: banks[0], 1: LensBank(unembed, 3, LensConfig(rank=4), layer=1)}
    with pytest.raises(LensFolderError, match=r"^layer 1's bank has another config or unembedding than layer 0's$"):
        write_lenses(tmp_path / "mixed", mixed, info)
