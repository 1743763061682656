"""What an aggregation strategy is: how the server turns one round's accepted updates into the next global adapter.

The server (``federated.server``) decodes and validates every message, lets the defense weigh the accepted ones,
then hands the round to its strategy (``RoundInput``) and takes back the new global adapter and what to report
(``Aggregated``). A strategy may also shape what clients fetch (``downlink``, ``downlink_nbytes``) and which
shapes an update may have (``update_spec``). The strategies that wrap another one (central DP, secure summation)
are in ``private.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from fedguard.federated.transport import WireSpec
from fedguard.federated.transport import downlink_nbytes as wire_downlink_nbytes
from fedguard.federated.validation import UpdateSpec
from fedguard.messages import AdapterState, ClientUpdate, ServerState, UpdateSum

log = logging.getLogger("fedguard.federated.server")


@dataclass
class RoundInput:
    server_round: int
    global_adapter: AdapterState
    sent_global: AdapterState  # the tensors clients send (FFA-LoRA: B only)
    accepted: list[ClientUpdate]  # decoded and validated, in the round's order
    weights: list[float] | None  # the defense's per-client weights (None: no defense)
    skipped: bool  # the defense kept the global adapter unchanged
    state: ServerState
    meta: dict[str, Any]  # the next state's meta: a strategy keeps its own keys here
    wire: WireSpec
    sent_to: Sequence[str] | None = None  # the clients the round's downlink went to
    updates: Sequence[ClientUpdate] = ()  # every message that arrived, accepted or not
    summed: UpdateSum | None = None  # under secure aggregation: the protocol's sum (no single update)


@dataclass
class Aggregated:
    global_adapter: AdapterState
    report: dict[str, Any] | None = None  # the round's ``lora_aggregation`` record (product averaging, FLoRA)
    screening: dict[str, float] | None = None  # a rule's screening: client id -> share in which it counted
    privacy: dict[str, Any] | None = None  # DP or secure aggregation: what the round spent and who counted
    accepted_ids: list[str] | None = None  # who counted, where the sum decides it (secure aggregation, DP)
    skipped: bool | None = None  # overrides the defense's skip (DP noises every round)


class AggregationStrategy:
    """One way of combining LoRA adapters. ``name`` is what ``server.lora_aggregation`` says (FLoRA: ``lora.variant
    flora``); ``build`` makes one from the server's rule and settings; ``check`` refuses a wire it cannot read."""

    name: ClassVar[str]
    keeps_global_adapter: ClassVar[bool] = True  # False: the result lives elsewhere (FLoRA: in the base weights)

    @classmethod
    def build(cls, aggregator, lora_alpha: float, seed: int) -> AggregationStrategy:
        return cls()

    def check(self, wire: WireSpec) -> None:
        """ValueError when clients' messages on ``wire`` are not what this strategy combines."""

    def downlink(self, state: ServerState) -> dict | None:
        """Tensors every sampled client fetches beside the global adapter (None: none)."""
        return None

    def downlink_nbytes(self, global_adapter: AdapterState, state: ServerState, client_id: str, wire: WireSpec) -> int:
        """Bytes ``client_id`` fetches at the start of a round."""
        return wire_downlink_nbytes(global_adapter, wire)

    def update_spec(self, spec: UpdateSpec, update: ClientUpdate) -> UpdateSpec:
        """The shapes ``update`` is validated against (FLoRA: the client's own rank)."""
        return spec

    def aggregate(self, r: RoundInput) -> Aggregated:
        raise NotImplementedError


def unchanged(r: RoundInput) -> AdapterState:
    """The global adapter kept as it was (logged when no update was valid)."""
    if not r.accepted:
        log.warning("round %d: no valid update; the global adapter is unchanged", r.server_round)
    return {k: v.clone() for k, v in r.global_adapter.items()}
