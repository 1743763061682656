"""Server-side aggregation: one interface, implementations chosen by name in the config.

``aggregate`` receives the validated updates and optional per-client weights (Safe-FedLLM defense
weights in a later issue multiply into them) and returns the new global adapter. Aggregators that
keep state across rounds (server momentum, adaptive optimisers) keep it in ``ServerState.tensors``
so that it is checkpointed with everything else.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch

from fedguard.federated.types import AdapterState, ClientUpdate, ServerState


class Aggregator(ABC):
    name: ClassVar[str]

    @abstractmethod
    def aggregate(self, global_adapter: AdapterState, updates: Sequence[ClientUpdate], state: ServerState,
                  client_weights: Sequence[float] | None = None) -> AdapterState:
        """New global adapter from at least one validated update."""


def weighted_mean(tensors: Sequence[AdapterState], weights: Sequence[float]) -> AdapterState:
    w = torch.tensor(list(weights), dtype=torch.float64)
    if (w < 0).any() or not torch.isfinite(w).all() or float(w.sum()) <= 0:
        raise ValueError(f"aggregation weights must be finite, non-negative and not all zero: {w.tolist()}")
    w = w / w.sum()
    out: AdapterState = {}
    for key in tensors[0]:
        stacked = torch.stack([t[key].to(torch.float64) for t in tensors])
        out[key] = torch.tensordot(w, stacked, dims=1).to(tensors[0][key].dtype)
    return out


class FedAvg(Aggregator):
    """McMahan et al. 2017: the mean of client adapters weighted by their number of examples.

    Every client starts the round from the same global adapter, so averaging full LoRA tensors equals
    adding the example-weighted mean delta to the global adapter (what OpenFedLLM / Safe-FedLLM do).
    """

    name = "fedavg"

    def aggregate(self, global_adapter, updates, state, client_weights=None):
        base = [float(u.num_examples) for u in updates]
        if client_weights is not None:
            if len(client_weights) != len(updates):
                raise ValueError("one client weight per update is required")
            base = [b * float(c) for b, c in zip(base, client_weights)]
        if sum(base) <= 0:  # every client weighted to zero: keep the global adapter
            return {k: v.clone() for k, v in global_adapter.items()}
        return weighted_mean([u.tensors for u in updates], base)


AGGREGATORS: dict[str, type[Aggregator]] = {cls.name: cls for cls in (FedAvg,)}


def build_aggregator(name: str) -> Aggregator:
    try:
        return AGGREGATORS[name]()
    except KeyError:
        raise ValueError(f"unknown aggregator '{name}' (known: {', '.join(sorted(AGGREGATORS))})") from None
