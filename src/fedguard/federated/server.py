"""Server role: validate every update, aggregate the accepted ones, advance the server state.

The server sees ``ClientUpdate``s and nothing else; ground truth about clients (which are malicious,
in later issues) lives only in the simulation's metadata.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from fedguard.federated.aggregation import Aggregator
from fedguard.federated.types import AdapterState, ClientUpdate, RoundConfig, ServerState
from fedguard.federated.validation import UpdateRejected, UpdateSpec, validate_update

log = logging.getLogger(__name__)


@dataclass
class RoundOutcome:
    global_adapter: AdapterState
    state: ServerState
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # client id -> reason
    verdicts: list = field(default_factory=list)  # defense verdicts of the accepted updates
    skipped: bool = False  # the defense kept the global adapter unchanged


class FederatedServer:
    def __init__(self, aggregator: Aggregator, max_update_bytes: int, defense=None):
        self.aggregator = aggregator
        self.max_update_bytes = int(max_update_bytes)
        self.defense = defense  # optional: per-client weights from a probe (fedguard.defenses)

    def client_config(self, base: RoundConfig, client_id: str) -> RoundConfig:
        """The round config one client receives: the base, the aggregator's settings (FedProx's mu) and
        what the defense asks it to attach."""
        base = replace(base, **self.aggregator.client_config())
        if self.defense is None:
            return base
        return replace(base, **self.defense.client_requests(base.server_round, client_id))

    def restore(self, state: ServerState) -> None:
        """Bring stateful server components back to a checkpointed state."""
        if self.defense is not None and "defense" in state.meta:
            self.defense.load_state_dict(state.meta["defense"])

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
        verdicts, weights, skipped = [], None, False
        if accepted and self.defense is not None:
            judged = self.defense.weigh(server_round, global_adapter, accepted)
            verdicts, weights, skipped = judged.verdicts, judged.weights, judged.skip
            if skipped:
                log.warning("round %d: mean defense weight %.3f is below the skip threshold; global adapter kept",
                            server_round, judged.mean_weight)
        if accepted and not skipped:
            new_global = self.aggregator.aggregate(global_adapter, accepted, state, client_weights=weights)
        else:
            if not accepted:
                log.warning("round %d: no valid update; the global adapter is unchanged", server_round)
            new_global = {k: v.clone() for k, v in global_adapter.items()}
        meta = dict(state.meta)
        if self.defense is not None:
            meta["defense"] = self.defense.state_dict()
        new_state = ServerState(round=server_round, tensors=state.tensors, meta=meta)
        return RoundOutcome(new_global, new_state, [u.client_id for u in accepted], rejected, verdicts, skipped)
