"""Base-model loading (embedded, tiny, or any HF causal LM) and LoRA adapter handling.

Names are imported on first use, so ``fedguard.model.keys`` (the bottom of the import graph) does not
pull in transformers.
"""

from importlib import import_module

_EXPORTS = {"LoadedModel": "loading", "load_base_model": "loading", "AdapterSlot": "lora",
            "attach_lora": "lora", "export_peft_adapter": "lora", "AdapterState": "keys"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedguard.model' has no attribute {name!r}")
    return getattr(import_module(f"fedguard.model.{_EXPORTS[name]}"), name)
