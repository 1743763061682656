"""Server role: tell the round's clients what to do, then decode and validate every update, aggregate the
accepted ones and advance the server state.

``configure(round, global_adapter, state) -> {client id: Instructions}`` and
``aggregate_round(round, global_adapter, updates, state) -> RoundOutcome`` are the whole role; an engine
(the embedded simulation, a Flower strategy) moves the messages between them and the clients.

The server sees ``ClientUpdate``s and nothing else; ground truth about clients (which are malicious,
in later issues) lives only in the simulation's metadata.

How LoRA adapters are combined is the server's aggregation strategy (``fedguard.federated.strategies``):
``naive`` (the configured rule on A and B separately; under FFA-LoRA on B only, which is exact), ``product``
(exact product averaging, re-factorised by SVD) or ``flora`` (FLoRA stacking into the clients' base weights);
client-level DP and secure summation wrap it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from fedguard.federated.aggregation import Aggregator
from fedguard.federated.sampling import RoundPlan
from fedguard.federated.strategies import (AggregationStrategy, ClientLevelDPRelease, RoundInput, SecureSummation,
                                           build_strategy)
from fedguard.federated.transport import WireSpec, decode_update
from fedguard.federated.validation import UpdateRejected, UpdateSpec, validate_update
from fedguard.messages import AdapterState, ClientUpdate, Instructions, RoundConfig, ServerState, UpdateSum


REASON_CHARS = 300  # a rejection reason is cut to this: it never echoes a payload into the run's logs
_PLAIN_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def display_id(client_id) -> str:
    """How the run's logs name a client: its id when it is a short plain string, else a digest of what it
    sent (``../../etc/passwd\n{...}`` never reaches a file name, a log line or a JSON key)."""
    if isinstance(client_id, str) and _PLAIN_ID.fullmatch(client_id):
        return client_id
    try:
        text = repr(client_id)
    except Exception:  # noqa: BLE001 - an object whose repr fails is still named
        text = type(client_id).__name__
    return "invalid-id-" + hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:12]


def cap_reason(text: str) -> str:
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 3] + "..."


log = logging.getLogger(__name__)


@dataclass
class RoundOutcome:
    global_adapter: AdapterState
    state: ServerState
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # client id -> reason
    verdicts: list = field(default_factory=list)  # defense verdicts of the accepted updates
    skipped: bool = False  # the defense kept the global adapter unchanged
    # product averaging: relative errors against the exact mean; FLoRA: ranks and merged norm (None otherwise)
    lora_aggregation: dict[str, Any] | None = None
    # naive aggregation by a rule that screens clients: client id -> share in which it counted (1 kept,
    # 0 screened out), see ``Aggregator.screening``; None otherwise
    screening: dict[str, float] | None = None
    defended: bool = False  # a defense weighed the round's updates (verdicts, skipped)
    privacy: dict[str, Any] | None = None  # client-level DP: clipping, noise, epsilon spent so far
    realign: dict[str, Any] | None = None  # server-side realignment's steps and losses, where it ran


class FederatedServer:
    def __init__(self, aggregator: Aggregator, max_update_bytes: int, defense=None, *, wire: WireSpec | None = None,
                 lora_aggregation: str | AggregationStrategy = "naive", lora_alpha: float = 1.0, seed: int = 0,
                 plan: RoundPlan | None = None, max_abs_value: float = math.inf, privacy=None,
                 secure_clip: float | None = None, realign=None):
        """``wire``: what clients send (default: every tensor, uncompressed); ``lora_aggregation``: how adapters
        are combined, a strategy's name (``fedguard.federated.strategies``) or a strategy; ``lora_alpha``: LoRA's
        alpha, a rank-r adapter runs with s = alpha / r (product averaging, FLoRA); ``seed``: the run seed
        (product averaging draws fresh A rows for directions the mean does not use); ``plan``: who trains when
        (needed by ``configure``); ``privacy``: client-level DP (``ClientLevelDP``); ``secure_clip``: the round's
        updates reach the server only as a secure sum, each clipped by its client to this norm (the engine runs
        secure aggregation and passes ``summed`` to ``aggregate_round``). DP and secure summation wrap the
        strategy."""
        strategy = lora_aggregation if isinstance(lora_aggregation, AggregationStrategy) else \
            build_strategy(lora_aggregation, aggregator, lora_alpha, seed)
        self.aggregator = aggregator
        self.max_update_bytes = int(max_update_bytes)
        self.defense = defense  # optional: per-client weights from a probe (fedguard.defenses)
        self.wire = wire if wire is not None else WireSpec()
        strategy.check(self.wire)
        self.lora_aggregation = strategy.name
        self.plan = plan
        self.max_abs_value = float(max_abs_value)
        self.privacy = privacy  # optional: client-level DP (fedguard.privacy.client_dp.ClientLevelDP)
        self.secure_clip = secure_clip
        self.realign = realign  # optional: server-side steps on its own safety data after aggregation
        if realign is not None and not strategy.keeps_global_adapter:
            raise ValueError(f"server-side realignment needs a global adapter; {strategy.name} has none")
        if privacy is not None:
            strategy = ClientLevelDPRelease(strategy, privacy)
        elif secure_clip is not None:
            strategy = SecureSummation(strategy, secure_clip)
        if secure_clip is not None and defense is not None:
            raise ValueError("secure aggregation hides single updates: no per-client defense can run with it")
        self.strategy = strategy

    def configure(self, server_round: int, global_adapter: AdapterState, state: ServerState) -> dict[str, Instructions]:
        """The round's sampled clients and what each receives: its round config and the downlink (under
        FLoRA the merged update of every round so far, so a client that missed rounds catches up)."""
        if self.plan is None:
            raise ValueError("configure needs the server's RoundPlan")
        base = self.plan.round_config(server_round)
        delta = self.strategy.downlink(state)
        return {str(c): Instructions(str(c), self.client_config(base, str(c), state), global_adapter, delta,
                                     state.round)
                for c in self.plan.sampled(server_round)}

    def client_config(self, base: RoundConfig, client_id: str, state: ServerState | None = None) -> RoundConfig:
        """The round config one client receives: the base, the aggregator's settings (FedProx's mu), what
        to train (FFA-LoRA: B only), the clipping and noise it applies itself (distributed DP, norm bounding
        before secure aggregation) and what the defense asks it to attach."""
        base = replace(base, **self.aggregator.client_config(), train_lora_a=not self.wire.lora_b_only,
                       **self.client_privacy(state or ServerState()))
        if self.defense is None:
            return base
        return replace(base, **self.defense.client_requests(base.server_round, client_id))

    def client_privacy(self, state: ServerState) -> dict[str, Any]:
        """The ``RoundConfig`` fields of what clients do for privacy before they send."""
        if self.privacy is not None:
            return self.privacy.client_requests(state)
        if self.secure_clip is not None:  # no DP: clipping only bounds what one client adds to the secure sum
            return {"update_clip": self.secure_clip}
        return {}

    def downlink_nbytes(self, global_adapter: AdapterState, state: ServerState, client_id: str) -> int:
        """Bytes ``client_id`` fetches at the start of a round (the strategy's: FLoRA fetches stacks)."""
        return self.strategy.downlink_nbytes(global_adapter, state, client_id, self.wire)

    def restore(self, state: ServerState) -> None:
        """Bring stateful server components back to a checkpointed state."""
        if self.defense is not None and "defense" in state.meta:
            self.defense.load_state_dict(state.meta["defense"])

    def aggregate_round(self, server_round: int, global_adapter: AdapterState, updates: Sequence[ClientUpdate],
                        state: ServerState, sent_to: Sequence[str] | None = None,
                        summed: UpdateSum | None = None) -> RoundOutcome:
        """Decode, validate, weigh and aggregate one round's updates. ``sent_to``: the clients the round's
        downlink went to (default: those whose messages arrived), which FLoRA counts as synced. ``summed``:
        under secure aggregation, the sum the engine's protocol produced (``updates`` is then empty: the
        server never holds a single update)."""
        sent_global = self.wire.sent_view(global_adapter)
        if summed is None and self.secure_clip is not None and not updates:
            # nobody took part (DP's Poisson sampling drew no client, or none could send): the sum of nothing
            summed = UpdateSum({k: torch.zeros_like(t, dtype=torch.float64) for k, t in sent_global.items()}, [],
                               report={"secure_aggregation": "secagg+", "skipped": "no client took part"})
        if (summed is not None) != (self.secure_clip is not None):
            raise ValueError("a server with secure aggregation takes the round's sum and nothing else"
                             if self.secure_clip is not None else "this server aggregates single updates, not sums")
        if summed is not None and updates:
            raise ValueError("under secure aggregation the server receives no single update")
        if summed is not None:
            self._check_sum(summed, sent_global)
        spec = UpdateSpec.from_adapter(sent_global, self.max_update_bytes, self.max_abs_value, whole=global_adapter)
        accepted, rejected = self._admit(server_round, global_adapter, updates, spec, sent_to)
        verdicts, weights, skipped, meta = [], None, False, dict(state.meta)
        if accepted and self.defense is not None:
            # The defense judges whole adapters: under FFA-LoRA the frozen A is filled in (its delta is 0).
            whole = [replace(u, tensors=self.wire.full_view(u.tensors, global_adapter)) for u in accepted]
            judged, judged_ids = self._weigh(server_round, global_adapter, whole, rejected)
            accepted = [u for u in accepted if u.client_id in judged_ids]
            if judged is not None:
                verdicts, weights, skipped = judged.verdicts, judged.weights, judged.skip
                if skipped:
                    log.warning("round %d: mean defense weight %.3f is below the skip threshold; global adapter "
                                "kept", server_round, judged.mean_weight)
        out = self.strategy.aggregate(RoundInput(server_round, global_adapter, sent_global, accepted, weights, skipped,
                                                 state, meta, self.wire, sent_to, updates, summed))
        new_global, report, screening, privacy = out.global_adapter, out.report, out.screening, out.privacy
        accepted_ids = out.accepted_ids
        if out.skipped is not None:
            skipped = out.skipped
        realigned = None
        if self.realign is not None and (accepted or accepted_ids) and not skipped:
            # after the aggregate (and after DP's noise: post-processing on the server's own data costs no privacy)
            new_global, realigned = self.realign(server_round, new_global)
        if self.defense is not None:
            meta["defense"] = self.defense.state_dict()
        new_state = ServerState(round=server_round, tensors=state.tensors, meta=meta)
        ids = accepted_ids if accepted_ids is not None else [u.client_id for u in accepted]
        return RoundOutcome(new_global, new_state, ids, rejected, verdicts, skipped,
                            report, screening, defended=self.defense is not None, privacy=privacy,
                            realign=realigned)

    @staticmethod
    def _check_sum(summed: UpdateSum, sent_global: AdapterState) -> None:
        if set(summed.total) != set(sent_global) or any(
                tuple(summed.total[k].shape) != tuple(sent_global[k].shape) for k in sent_global):
            raise ValueError("the secure sum's tensors do not match the global adapter's")
        if not all(bool(torch.isfinite(t).all()) for t in summed.total.values()):
            raise ValueError("the secure sum is not finite")

    def _admit(self, server_round: int, global_adapter: AdapterState, updates: Sequence[ClientUpdate],
               spec: UpdateSpec, sent_to: Sequence[str] | None) -> tuple[list[ClientUpdate], dict[str, str]]:
        """Decode and validate each message. With ``sent_to`` (the round's roster) a message from any other
        client is refused; a client that sends two messages in a round has neither counted (the server cannot
        tell which one is its own), so no client is ever both accepted and rejected."""
        roster = {str(c) for c in sent_to} if sent_to is not None else None
        accepted: list[ClientUpdate] = []
        rejected: dict[str, str] = {}
        seen: set[str] = set()
        duplicate = "duplicate: more than one message from this client in one round; none counts"
        for u in updates:
            raw = getattr(u, "client_id", None)
            cid = display_id(raw)
            try:
                if roster is not None and (not isinstance(raw, str) or raw not in roster):
                    raise UpdateRejected("unknown_client", "not a client this round's instructions went to")
                if cid in seen:
                    accepted = [a for a in accepted if a.client_id != cid]
                    rejected[cid] = duplicate
                    log.warning("round %d: client %s sent more than one message; none counts", server_round, cid)
                    continue
                seen.add(cid)
                u = decode_update(u, global_adapter, self.wire, self.max_update_bytes)
                validate_update(u, self.strategy.update_spec(spec, u))
            except UpdateRejected as exc:
                rejected.setdefault(cid, cap_reason(str(exc)))
                log.warning("round %d: rejected update from client %s (%s)", server_round, cid, rejected[cid])
                continue
            except Exception as exc:  # noqa: BLE001 - whatever a client sends, the round goes on
                rejected.setdefault(cid, cap_reason(f"malformed: {type(exc).__name__}: {exc}"))
                log.warning("round %d: rejected malformed update from client %s (%s)", server_round, cid,
                            rejected[cid])
                continue
            accepted.append(u)
        return accepted, rejected

    def _weigh(self, server_round: int, global_adapter: AdapterState, whole: list[ClientUpdate],
               rejected: dict[str, str]):
        """The defense's judgement of the round, and the clients it judged. Validation should leave the
        defense nothing it cannot read; should it still fail, each update is tried alone (from the same
        defense state) and those it cannot judge are rejected, so no message ends a round."""
        saved = json.loads(json.dumps(self.defense.state_dict()))
        try:
            return self.defense.weigh(server_round, global_adapter, whole), {u.client_id for u in whole}
        except Exception as exc:  # noqa: BLE001
            log.error("round %d: the defense failed on this round's updates (%s); trying each alone", server_round,
                      cap_reason(repr(exc)))
        keep = []
        for u in whole:
            self.defense.load_state_dict(json.loads(json.dumps(saved)))
            try:
                self.defense.weigh(server_round, global_adapter, [u])
                keep.append(u)
            except Exception as exc:  # noqa: BLE001
                rejected[u.client_id] = cap_reason(f"defense_error: {type(exc).__name__}: {exc}")
        self.defense.load_state_dict(saved)
        try:
            return (self.defense.weigh(server_round, global_adapter, keep) if keep else None), \
                {u.client_id for u in keep}
        except Exception as exc:  # noqa: BLE001 - together they still fail: nothing of this round counts
            self.defense.load_state_dict(saved)
            for u in keep:
                rejected[u.client_id] = cap_reason(f"defense_error: {type(exc).__name__}: {exc}")
            return None, set()
