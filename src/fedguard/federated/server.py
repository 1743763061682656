"""Server role: validate every update, aggregate the accepted ones, advance the server state.

The server sees ``ClientUpdate``s and nothing else; ground truth about clients (which are malicious,
in later issues) lives only in the simulation's metadata.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from fedguard.federated.aggregation import Aggregator
from fedguard.federated.types import AdapterState, ClientUpdate, ServerState
from fedguard.federated.validation import UpdateRejected, UpdateSpec, validate_update

log = logging.getLogger(__name__)


@dataclass
class RoundOutcome:
    global_adapter: AdapterState
    state: ServerState
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # client id -> reason


class FederatedServer:
    def __init__(self, aggregator: Aggregator, max_update_bytes: int):
        self.aggregator = aggregator
        self.max_update_bytes = int(max_update_bytes)

    def aggregate_round(self, server_round: int, global_adapter: AdapterState, updates: Sequence[ClientUpdate],
                        state: ServerState) -> RoundOutcome:
        spec = UpdateSpec.from_adapter(global_adapter, self.max_update_bytes)
        accepted: list[ClientUpdate] = []
        rejected: dict[str, str] = {}
        seen: set[str] = set()
        for u in updates:
            cid = str(getattr(u, "client_id", "?"))
            try:
                if cid in seen:
                    raise UpdateRejected("duplicate", "a second update from the same client in one round")
                validate_update(u, spec)
            except UpdateRejected as exc:
                rejected[cid] = str(exc)
                log.warning("round %d: rejected update from client %s (%s)", server_round, cid, exc)
                continue
            seen.add(cid)
            accepted.append(u)
        if accepted:
            new_global = self.aggregator.aggregate(global_adapter, accepted, state)
        else:
            log.warning("round %d: no valid update; the global adapter is unchanged", server_round)
            new_global = {k: v.clone() for k, v in global_adapter.items()}
        new_state = ServerState(round=server_round, tensors=state.tensors, meta=state.meta)
        return RoundOutcome(new_global, new_state, [u.client_id for u in accepted], rejected)
