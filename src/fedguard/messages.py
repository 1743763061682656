"""Messages between the roles. Plain data: tensors, numbers and strings only.

The bottom of the import graph (it imports torch and ``fedguard.model.keys``, nothing else of fedguard), so
the server, the client, the aggregation rules, the defenses and both engines (embedded, Flower) share one
definition of what crosses the wire:

* ``Instructions``: server -> one client, at the start of a round (``FederatedServer.configure``);
* ``ClientUpdate``: client -> server, at the end of it (``Client.run``);
* ``ServerState``: what the server carries from round to round (checkpointed whole).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from fedguard.model.keys import AdapterState

__all__ = ["AdapterState", "ClientUpdate", "Instructions", "RoundConfig", "ServerState", "UpdateSum"]


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
    proximal_mu: float = 0.0  # FedProx: mu/2 ||w - w_global||^2 joins the local loss (0: off)
    train_lora_a: bool = True  # False: FFA-LoRA, lora_A stays frozen and only lora_B trains
    # What a defense asks clients to attach (empty: nothing). Keys are adapter tensor names.
    snapshot_keys: tuple[str, ...] = ()
    snapshot_steps: bool = False  # ΔLoRA vs the round-start global after every step: "step/<t>/<key>"
    shadow_steps: int = 0  # a shadow branch from θ₀ on the same data: "shadow/<t>/<key>"
    shadow_lr: float = 0.0
    # Client-level DP done by the client (distributed noise, or norm bounding before secure aggregation):
    # clip the update to this L2 norm (None: the client does not clip) and add noise of this std per coordinate
    update_clip: float | None = None
    update_noise_std: float = 0.0
    update_bit_noise_std: float = 0.0  # adaptive clipping: noise on the client's [norm <= clip] bit
    update_noise_seeded: bool = True  # False: noise from the OS's entropy
    # Sample-level DP: DP-SGD in local training (None: off), per-example gradient bound and noise multiplier
    dpsgd_clip: float | None = None
    dpsgd_noise_multiplier: float = 0.0
    dpsgd_delta: float = 1e-5  # the delta of the epsilon each client reports

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["snapshot_keys"] = list(self.snapshot_keys)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoundConfig:
        return cls(**{**d, "snapshot_keys": tuple(d.get("snapshot_keys", ()))})


@dataclass
class Instructions:
    """What one sampled client receives at the start of a round: how to train (``config``) and the
    downlink, the tensors it starts from.

    ``global_adapter``: the round-start global adapter (under FFA-LoRA the client still needs the frozen A).
    FLoRA: the global adapter is not trained from; the client re-initialises an adapter of its own rank
    (seeded by ``config.seed``, the round and its id) and first brings its base weights to
    ``W0 + flora_delta``, the merged update of every round so far (``flora_round``: the last round in it, so
    a process that already merged it skips the work).
    """

    client_id: str
    config: RoundConfig
    global_adapter: AdapterState
    flora_delta: dict[str, torch.Tensor] | None = None
    flora_round: int = 0


@dataclass
class ClientUpdate:
    """What a client sends back: its locally trained adapter and how much data produced it.

    The adapter travels either as ``tensors`` or, compressed, as ``payload``: one safetensors blob
    of the encoded delta against the round-start global adapter (``fedguard.federated.transport``
    writes and reads it); never both.
    """

    client_id: str
    tensors: AdapterState
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    # Extra tensors a defense asked for (see RoundConfig); checked by the defense, not aggregated.
    attachments: dict[str, torch.Tensor] = field(default_factory=dict)
    payload: bytes | None = None  # bytes on the wire: fedguard.federated.transport.uplink_nbytes


@dataclass
class UpdateSum:
    """The sum of a round's updates (local - global over the tensors clients send, float64), as secure
    aggregation hands it to the server instead of the updates themselves (or as client-level DP sums them).

    ``clients``: whose updates are in the sum; ``unclipped``: the sum of the clients' [norm <= clip] bits
    (adaptive clipping); ``report``: how the sum was made (protocol, dropouts, bytes)."""

    total: dict[str, torch.Tensor]
    clients: list[str]
    unclipped: float = 0.0
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.clients)


@dataclass
class ServerState:
    """Everything the server carries across rounds; checkpointed whole.

    ``tensors`` holds aggregator state (momentum, optimiser moments, defense statistics of later
    issues); ``meta`` holds JSON-serialisable values.
    """

    round: int = 0  # last completed round
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
