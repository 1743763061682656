"""Messages between the roles. Plain data: tensors, numbers and strings only."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

AdapterState = dict[str, torch.Tensor]


@dataclass(frozen=True)
class RoundConfig:
    """What the server tells every sampled client for one round."""

    server_round: int
    lr: float
    local_steps: int
    batch_size: int
    grad_accum: int
    seed: int
    weight_decay: float = 0.0
    max_grad_norm: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoundConfig:
        return cls(**d)


@dataclass
class ClientUpdate:
    """What a client sends back: its locally trained adapter and how much data produced it."""

    client_id: str
    tensors: AdapterState
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values() if isinstance(t, torch.Tensor))


@dataclass
class ServerState:
    """Everything the server carries across rounds; checkpointed whole.

    ``tensors`` holds aggregator state (momentum, optimiser moments, defense statistics of later
    issues); ``meta`` holds JSON-serialisable values.
    """

    round: int = 0  # last completed round
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
