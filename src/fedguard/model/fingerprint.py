"""Identify a base model by content: architecture config, tokenizer and a hash of the weights.

Two copies of the same model in different folders (another cache, a user's download) get the same
fingerprint; the same folder with other weights (an aligned model, a fine-tune) gets another. The
weight hash reads every tensor once (names, dtypes, shapes and bytes, in name order, so the file's
own layout does not matter) and is cached by the files' path, size and modification time.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from fedguard.io import atomic_write_json
from fedguard.model.tokenizer import load_tokenizer

_CONFIG_NOISE = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache")


def config_digest(model_config) -> str:
    cfg = model_config.to_dict()
    for k in _CONFIG_NOISE:
        cfg.pop(k, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tokenizer_digest(tokenizer) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    h.update(str(tokenizer.chat_template or "").encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    return files or sorted(p for p in folder.glob("*.bin") if p.is_file())


def weights_digest(folder: str | Path, cache_dir: Path | None = None) -> str | None:
    """sha256 (16 hex) of the tensors stored in ``folder``; None for a hub id or a folder without weights."""
    folder = Path(folder)
    files = _weight_files(folder) if folder.is_dir() else []
    if not files:
        return None
    stats = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    key = hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:24]
    cached = cache_dir / f"{key}.json" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        try:
            return json.loads(cached.read_text(encoding="utf-8"))["weights_sha256_16"]
        except (ValueError, KeyError):
            pass
    h = hashlib.sha256()
    if files[0].suffix == ".safetensors":
        from safetensors import safe_open

        # one digest over the tensors in name order, whatever the file layout (safe_open maps the file, so
        # opening it per tensor reads only that tensor)
        entries = []
        for p in files:
            with safe_open(p, framework="pt") as f:
                entries += [(name, p) for name in f.keys()]
        for name, p in sorted(entries):
            with safe_open(p, framework="pt") as f:
                t = f.get_tensor(name).contiguous()
            h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:  # pickled checkpoints are never loaded here: hash their bytes
        for p in files:
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    digest = h.hexdigest()[:16]
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cached, {"files": stats, "weights_sha256_16": digest})
    return digest


def folder_fingerprint(path: str | Path, cache_dir: Path | None = None, trust_remote_code: bool = False
                       ) -> dict[str, Any]:
    """``LoadedModel.fingerprint`` of a model folder without loading its weights into a model (config and
    tokenizer only; the weight hash is read from the files, or from the cache)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return {"name": config.name_or_path or str(path),
            **model_fingerprint(config, load_tokenizer(str(path), trust_remote_code), str(path), cache_dir)}


def model_fingerprint(model_config, tokenizer, path: str, cache_dir: Path | None = None) -> dict[str, Any]:
    """The base model's identity by content (the name is kept for people, and is not compared)."""
    return {"architecture_sha256_16": config_digest(model_config),
            "tokenizer_sha256_16": tokenizer_digest(tokenizer),
            "weights_sha256_16": weights_digest(path, cache_dir) or f"hub:{path}"}
