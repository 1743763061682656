"""Base-model loading (embedded, tiny, or any HF causal LM) and LoRA adapter handling."""

from fedguard.model.loading import LoadedModel, load_base_model
from fedguard.model.lora import AdapterSlot, AdapterState, attach_lora, export_peft_adapter

__all__ = ["AdapterSlot", "AdapterState", "LoadedModel", "attach_lora", "export_peft_adapter", "load_base_model"]
