"""Load the base model once per process, in the precision the run asks for."""

from __future__ import annotations

import ctypes
import sys
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedguard.config import ModelConfig
from fedguard.model.fingerprint import model_fingerprint
from fedguard.model.registry import cache_root, resolve_model_path
from fedguard.model.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel (a causal LM)
    tokenizer: Any
    path: str  # resolved folder or hub id
    device: torch.device
    compute_dtype: torch.dtype  # what matmuls run in (bf16 under autocast, or fp32)
    _fingerprint: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def autocast_enabled(self) -> bool:
        return self.compute_dtype != torch.float32

    def autocast(self):
        if not self.autocast_enabled:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def fingerprint(self) -> dict[str, Any]:
        """Identifies the base model by content (architecture, tokenizer, weights; ``name`` is for people):
        computed once per process, the weight hash cached on disk."""
        if self._fingerprint is None:
            self._fingerprint = {"name": self.model.config.name_or_path or self.path,
                                 **model_fingerprint(self.model.config, self.tokenizer, self.path,
                                                     cache_root() / "fingerprints")}
        return self._fingerprint


def cpu_supports_bf16() -> bool:
    try:
        if torch._C._cpu._is_avx512_bf16_supported() or torch._C._cpu._is_amx_tile_supported():
            return True
    except AttributeError:
        pass
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def tune_cpu_allocator() -> None:
    """Keep freed activation memory in the process heap (glibc) instead of returning it to the OS.

    A training step allocates and frees tens of megabytes of activations per layer; with glibc's
    defaults each such block is a fresh mmap whose pages fault in again on every step, which costs
    more than the arithmetic on two cores. Raising the mmap and trim thresholds makes those blocks
    reusable. No effect (and no error) where glibc's mallopt is not available.
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD: 32 MiB (glibc's maximum)
        libc.mallopt(-1, 1024 * 1024 * 1024)  # M_TRIM_THRESHOLD: 1 GiB
    except (OSError, AttributeError):
        pass


def resolve_device(cfg: ModelConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is 'cuda' but no CUDA device is available")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def resolve_precision(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.precision == "fp32":
        return torch.float32
    if cfg.precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def load_base_model(cfg: ModelConfig, path: str | None = None) -> LoadedModel:
    """The model at ``path`` (default: ``cfg.name_or_path``, resolved), loaded with ``cfg``'s device, precision and
    attention settings. Which model a run starts from (``model.aligned``) is decided by whoever assembles the run
    (``fedguard.alignment.load_start_model``), never here."""
    if cfg.aligned and path is None:
        raise ValueError("model.aligned is set: load the run's starting model with "
                         "fedguard.alignment.load_start_model, or pass the path to load")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg)
    if device.type == "cpu":
        tune_cpu_allocator()
    compute_dtype = resolve_precision(cfg, device)
    path = str(path) if path is not None else resolve_model_path(cfg.name_or_path)
    tokenizer = load_tokenizer(path, cfg.trust_remote_code)
    # The frozen base is stored in the compute dtype, so no per-step weight casts happen; the LoRA
    # parameters stay fp32 (master weights) and matmuls run under autocast.
    attn = cfg.attn_implementation
    if attn == "auto":
        attn = "sdpa" if device.type == "cuda" else "eager"
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=compute_dtype,
        attn_implementation=attn,
        trust_remote_code=cfg.trust_remote_code,
    )
    model.to(device)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    log.info("loaded %s on %s (%s)", path, device, str(compute_dtype).removeprefix("torch."))
    return LoadedModel(model=model, tokenizer=tokenizer, path=path, device=device, compute_dtype=compute_dtype)
