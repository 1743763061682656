"""The LoRA weights of some seam parts, one set per owner, on one resident model.

The server and every simulated client run on the same resident PEFT model (loaded once per process): each
owns the LoRA of its own parts only (a client: front and back; the server: middle; in hierarchical mode one
copy of the middle's LoRA per client). ``PartLora.use(owner)`` makes an owner's tensors the live ones by
*reference*: every LoRA ``Linear`` of the parts gets the owner's ``Parameter`` as its ``weight``. An autograd
graph keeps the tensors it was built with, so a client's forward graph stays valid (and its gradients land in
its own parameters) while other owners run forwards of their own in between: what batch-parallel split
training needs, where every client's front graph is alive while the server waits for the whole group.
Values are never copied in place while a graph may be alive (``load`` is for between steps).

Keys are PEFT's state-dict keys (``<module>.lora_A.weight``), as in ``fedguard.model.lora.AdapterSlot``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from fedguard.model.keys import AdapterState, module_of
from fedguard.model.lora import ADAPTER_NAME

__all__ = ["PartLora"]


class PartLora:
    def __init__(self, model, parts: Iterable):
        names = {id(m): n for n, m in model.named_modules()}
        self.linears: dict[str, torch.nn.Linear] = {}  # key -> the Linear whose weight is swapped
        self.layers: dict[str, torch.nn.Module] = {}  # module name -> the PEFT LoraLayer
        for part in parts:
            for top in part.modules():
                for sub in top.modules():
                    emb = getattr(sub, "lora_embedding_A", None)
                    if emb is not None and ADAPTER_NAME in emb:
                        raise TypeError(f"{names[id(sub)]}: LoRA on an embedding is not supported in split learning "
                                        "(the head shares the tied embedding weight)")
                    if not isinstance(getattr(sub, "lora_A", None), torch.nn.ModuleDict) \
                            or ADAPTER_NAME not in sub.lora_A:
                        continue
                    name = names[id(sub)]
                    self.layers[name] = sub
                    self.linears[f"{name}.lora_A.weight"] = sub.lora_A[ADAPTER_NAME]
                    self.linears[f"{name}.lora_B.weight"] = sub.lora_B[ADAPTER_NAME]
        if not self.linears:
            raise RuntimeError("these parts hold no LoRA layers (check lora.target_modules)")
        self.original = {k: lin.weight for k, lin in self.linears.items()}
        self.initial: AdapterState = {k: p.detach().float().cpu().clone() for k, p in self.original.items()}
        self.sets: dict[str, dict[str, torch.nn.Parameter]] = {}
        self.active: str | None = None

    def keys(self) -> list[str]:
        return list(self.linears)

    def add(self, owner: str, state: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.nn.Parameter]:
        """A new set of trainable fp32 parameters for ``owner`` (``state``, else the values at construction)."""
        state = self.initial if state is None else state
        self._check_keys(state)
        device = next(iter(self.original.values())).device
        self.sets[owner] = {k: torch.nn.Parameter(state[k].detach().to(device, torch.float32).clone())
                            for k in self.linears}
        return self.sets[owner]

    def use(self, owner: str) -> None:
        """Make ``owner``'s parameters the live LoRA weights of the parts."""
        if owner not in self.sets:
            raise KeyError(f"no LoRA parameters for {owner!r}")
        if self.active == owner:
            return
        for k, lin in self.linears.items():
            lin.weight = self.sets[owner][k]
        self.active = owner

    def restore(self) -> None:
        """Put the model's own LoRA parameters back (the ones it had before this object)."""
        for k, lin in self.linears.items():
            lin.weight = self.original[k]
        self.active = None

    def params(self, owner: str) -> dict[str, torch.nn.Parameter]:
        return self.sets[owner]

    @torch.no_grad()
    def state(self, owner: str) -> AdapterState:
        return {k: p.detach().to("cpu", torch.float32, copy=True) for k, p in self.sets[owner].items()}

    @torch.no_grad()
    def load(self, owner: str, state: Mapping[str, torch.Tensor]) -> None:
        """Copy ``state`` into ``owner``'s parameters in place (between steps: no graph may hold them)."""
        self._check_keys(state)
        for k, p in self.sets[owner].items():
            p.copy_(state[k])

    def scaling(self, module: str) -> float:
        return float(self.layers[module].scaling[ADAPTER_NAME])

    def base_weight(self, module: str) -> torch.Tensor:
        return self.layers[module].base_layer.weight

    @torch.no_grad()
    def merge_into_base(self, delta: Mapping[str, torch.Tensor]) -> None:
        """``W <- W + ΔW`` for every module of ``delta`` (summed in float64, stored in W's dtype)."""
        for m, d in delta.items():
            w = self.base_weight(m)
            if tuple(w.shape) != tuple(d.shape):
                raise ValueError(f"{m}: base weight {tuple(w.shape)} vs delta {tuple(d.shape)}")
            w.copy_((w.double() + d.to(w.device, torch.float64)).to(w.dtype))

    def modules(self) -> list[str]:
        return sorted({module_of(k) for k in self.linears})

    def _check_keys(self, state: Mapping[str, torch.Tensor]) -> None:
        missing, extra = set(self.linears) - set(state), set(state) - set(self.linears)
        if missing or extra:
            raise KeyError(f"LoRA keys differ: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
