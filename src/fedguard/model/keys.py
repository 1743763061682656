"""An adapter as plain tensors, and the names PEFT gives its LoRA weights.

``AdapterState`` is a ``dict[str, Tensor]`` keyed by PEFT's own state-dict keys (adapter name
removed), fp32 on the CPU. Every role, message and aggregation rule speaks it; this module depends on
nothing but torch so it can sit at the bottom of the import graph.
"""

from __future__ import annotations

import torch

AdapterState = dict[str, torch.Tensor]

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"


def is_lora_a(key: str) -> bool:
    return key.endswith(A_SUFFIX)


def is_lora_b(key: str) -> bool:
    return key.endswith(B_SUFFIX)


def module_of(key: str) -> str:
    """``...q_proj.lora_A.weight`` -> ``...q_proj``; ValueError for a key that is not a LoRA A/B weight."""
    for suffix in (A_SUFFIX, B_SUFFIX):
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)]
    raise ValueError(f"{key!r} is not a PEFT LoRA weight key (expected '<module>{A_SUFFIX}' or '<module>{B_SUFFIX}')")


def a_key(module: str) -> str:
    return module + A_SUFFIX


def b_key(module: str) -> str:
    return module + B_SUFFIX


def base_layer_key(module: str) -> str:
    """Name of the frozen base weight of ``module`` among a PEFT model's ``named_parameters``."""
    return module + ".base_layer.weight"
