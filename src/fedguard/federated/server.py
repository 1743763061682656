"""Server role: tell the round's clients what to do, then decode and validate every update, aggregate the
accepted ones and advance the server state.

``configure(round, global_adapter, state) -> {client id: Instructions}`` and
``aggregate_round(round, global_adapter, updates, state) -> RoundOutcome`` are the whole role; an engine
(the embedded simulation, a Flower strategy) moves the messages between them and the clients.

The server sees ``ClientUpdate``s and nothing else; ground truth about clients (which are malicious,
in later issues) lives only in the simulation's metadata.

How LoRA adapters are combined:

* ``lora_aggregation = "naive"``: the configured aggregator on the tensors clients send (A and B
  averaged separately by FedAvg; under FFA-LoRA, B only, with A frozen, which is exact);
* ``lora_aggregation = "product"``: the exact FedAvg-weighted mean of the clients' products
  s·B_k A_k, re-factorised to rank r by truncated SVD (``lora_exact.product_average``), with the
  error of naive averaging and of the refactorisation reported per round;
* ``lora_aggregation = "flora"``: FLoRA. Clients of any rank r_k ≤ r send fresh adapters; the
  server stacks them (``lora_exact.flora_stack``: exactly Σ p_k (alpha/r_k) B_k A_k), adds that to
  the merged update it keeps in ``ServerState.tensors`` (``flora/<module>``, float64) and sends the
  stacked adapter to every client, which merges it into its base weights. The global adapter
  itself stays as it was (B = 0): every client re-initialises its own each round.
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

from fedguard.aggregators.base import counted_updates
from fedguard.federated.aggregation import Aggregator
from fedguard.federated.compression import state_nbytes
from fedguard.federated.sampling import RoundPlan
from fedguard.federated.lora_exact import (
    adapter_ranks,
    flora_stack,
    lora_scaling,
    product_average,
)
from fedguard.federated.transport import downlink_nbytes as wire_downlink_nbytes
from fedguard.federated.transport import WireSpec, decode_update
from fedguard.model.keys import is_lora_a
from fedguard.messages import AdapterState, ClientUpdate, Instructions, RoundConfig, ServerState, UpdateSum
from fedguard.federated.validation import UpdateRejected, UpdateSpec, check_keys_are_names, validate_update
from fedguard.seeding import derive_seed

LORA_AGGREGATIONS = ("naive", "product", "flora")
PRIVACY_META = "privacy"  # ServerState.meta: the DP accountant's history
FLORA_PREFIX = "flora/"  # ServerState.tensors keys of FLoRA's merged update, per module
# ServerState.meta under FLoRA: the bytes of each round's stacked adapter, and per client how many of those
# stacks it has fetched and merged (a client that sat out rounds fetches every stack it missed).
FLORA_STACKS = "flora_stack_bytes"
FLORA_SYNCED = "flora_synced"
FLORA_LEGACY_DOWNLINK = "flora_downlink_bytes"  # older checkpoints: the last stack, charged to every client


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


def flora_merged(state: ServerState) -> dict[str, torch.Tensor]:
    """FLoRA's merged update so far, ``{module: ΔW}`` (float64): what every client has added to its base."""
    return {k[len(FLORA_PREFIX):]: t for k, t in state.tensors.items() if k.startswith(FLORA_PREFIX)}

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
                 lora_aggregation: str = "naive", lora_alpha: float = 1.0, seed: int = 0,
                 plan: RoundPlan | None = None, max_abs_value: float = math.inf, privacy=None,
                 secure_clip: float | None = None, realign=None):
        """``wire``: what clients send (default: every tensor, uncompressed); ``lora_alpha``: LoRA's
        alpha, a rank-r adapter runs with s = alpha / r (product averaging, FLoRA); ``seed``: the run
        seed (product averaging draws fresh A rows for directions the mean does not use); ``plan``: who
        trains when (needed by ``configure``); ``privacy``: client-level DP (``ClientLevelDP``);
        ``secure_clip``: the round's updates reach the server only as a secure sum, each clipped by its client
        to this norm (the engine runs secure aggregation and passes ``summed`` to ``aggregate_round``)."""
        if lora_aggregation not in LORA_AGGREGATIONS:
            raise ValueError(f"unknown lora_aggregation '{lora_aggregation}' (known: {', '.join(LORA_AGGREGATIONS)})")
        if lora_aggregation == "flora" and (wire is not None and (wire.compressed or wire.lora_b_only)):
            raise ValueError("FLoRA clients send their own rank's plain A and B tensors")
        self.aggregator = aggregator
        self.max_update_bytes = int(max_update_bytes)
        self.defense = defense  # optional: per-client weights from a probe (fedguard.defenses)
        self.wire = wire if wire is not None else WireSpec()
        self.lora_aggregation = lora_aggregation
        self.lora_alpha = float(lora_alpha)
        self.seed = int(seed)
        self.plan = plan
        self.max_abs_value = float(max_abs_value)
        self.privacy = privacy  # optional: client-level DP (fedguard.privacy.client_dp.ClientLevelDP)
        self.secure_clip = secure_clip
        self.realign = realign  # optional: server-side steps on its own safety data after aggregation
        if realign is not None and lora_aggregation == "flora":
            raise ValueError("server-side realignment needs a global adapter; FLoRA has none")
        if (privacy is not None or secure_clip is not None) and lora_aggregation != "naive":
            raise ValueError("client-level DP and secure aggregation need naive LoRA aggregation")
        if secure_clip is not None and defense is not None:
            raise ValueError("secure aggregation hides single updates: no per-client defense can run with it")

    def configure(self, server_round: int, global_adapter: AdapterState, state: ServerState) -> dict[str, Instructions]:
        """The round's sampled clients and what each receives: its round config and the downlink (under
        FLoRA the merged update of every round so far, so a client that missed rounds catches up)."""
        if self.plan is None:
            raise ValueError("configure needs the server's RoundPlan")
        base = self.plan.round_config(server_round)
        delta = flora_merged(state) if self.lora_aggregation == "flora" else None
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
        """Bytes ``client_id`` fetches at the start of a round: the global tensors it needs, or under FLoRA
        the stacked adapters of the rounds it has not merged yet (nothing in round 1), or the dense merged
        update in fp32 where that is smaller."""
        if self.lora_aggregation != "flora":
            return wire_downlink_nbytes(global_adapter, self.wire)
        if FLORA_STACKS not in state.meta and FLORA_LEGACY_DOWNLINK in state.meta:
            return int(state.meta[FLORA_LEGACY_DOWNLINK])  # a checkpoint from before per-client metering
        stacks = state.meta.get(FLORA_STACKS, [])
        missed = sum(stacks[int(state.meta.get(FLORA_SYNCED, {}).get(str(client_id), 0)):])
        dense = sum(4 * d.numel() for d in flora_merged(state).values())
        return int(min(missed, dense))

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
        if (summed is not None) != (self.secure_clip is not None):
            raise ValueError("a server with secure aggregation takes the round's sum and nothing else"
                             if self.secure_clip is not None else "this server aggregates single updates, not sums")
        if summed is not None and updates:
            raise ValueError("under secure aggregation the server receives no single update")
        if summed is not None:
            self._check_sum(summed, sent_global)
        spec = UpdateSpec.from_adapter(sent_global, self.max_update_bytes, self.max_abs_value, whole=global_adapter)
        accepted, rejected = self._admit(server_round, global_adapter, updates, spec, sent_to)
        verdicts, weights, skipped, report, meta, screening = [], None, False, None, dict(state.meta), None
        privacy, accepted_ids = None, None
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
        if accepted and not skipped and self.lora_aggregation == "product":
            new_global, report = self._product_average(server_round, global_adapter, accepted, weights)
        elif self.lora_aggregation == "flora":
            merged = accepted if not skipped else []
            # Every client that took part fetched the stacks so far; this round's stack is fetched later.
            stacks = list(meta.get(FLORA_STACKS, []))
            fetched = sent_to if sent_to is not None else [getattr(u, "client_id", "?") for u in updates]
            meta[FLORA_SYNCED] = {**meta.get(FLORA_SYNCED, {}), **{str(c): len(stacks) for c in fetched}}
            report, stack_bytes = self._flora(merged, weights if merged else None, state)
            meta[FLORA_STACKS] = stacks + [stack_bytes]
            new_global = {k: v.clone() for k, v in global_adapter.items()}
            if not accepted:
                log.warning("round %d: no valid update; nothing merged", server_round)
        elif self.privacy is not None or summed is not None:
            # DP: noise every round, even one nobody answered; no skipping under DP
            if summed is None:
                summed = self.privacy.clip_sum(sent_global, accepted, weights, state)
            new_sent, privacy = self._release(server_round, sent_global, summed, state, meta)
            new_global = {k: t.clone() for k, t in self.wire.full_view(new_sent, global_adapter).items()}
            accepted_ids = list(summed.clients)
            skipped = False
        elif accepted and not skipped:
            new_sent = self.aggregator.aggregate(sent_global, accepted, state, client_weights=weights)
            screening = self.aggregator.screening
            new_global = {k: t.clone() for k, t in self.wire.full_view(new_sent, global_adapter).items()}
        else:
            if not accepted:
                log.warning("round %d: no valid update; the global adapter is unchanged", server_round)
            new_global = {k: v.clone() for k, v in global_adapter.items()}
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

    def _release(self, server_round: int, sent_global: AdapterState, summed: UpdateSum, state: ServerState,
                 meta: dict[str, Any]) -> tuple[AdapterState, dict[str, Any] | None]:
        """The new sent tensors from the round's sum: DP's noisy release, or (secure aggregation alone) the
        configured rule (FedAvg, a server optimiser) on the uniform mean of the summed updates."""
        if self.privacy is not None:
            new_sent, report, meta[PRIVACY_META] = self.privacy.release(server_round, sent_global, summed, state)
            return new_sent, report
        report = {"mode": "secure_aggregation", "clients": summed.count, "clip": self.secure_clip, **summed.report}
        if not summed.count:
            return {k: v.clone() for k, v in sent_global.items()}, report
        mean = ClientUpdate("secure-sum", {k: (sent_global[k].double() + summed.total[k] / summed.count).to(
            sent_global[k].dtype) for k in sent_global}, 1)
        return self.aggregator.aggregate(sent_global, [mean], state), report

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
                validate_update(u, self._rank_spec(spec, u) if self.lora_aggregation == "flora" else spec)
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

    @staticmethod
    def _rank_spec(spec: UpdateSpec, update: ClientUpdate) -> UpdateSpec:
        """FLoRA: the shapes of ``spec`` at the update's own rank (one rank for all modules, 1..r)."""
        tensors = update.tensors if isinstance(update.tensors, dict) else {}
        check_keys_are_names(tensors)
        ranks = {int(t.shape[0]) for k, t in tensors.items()
                 if is_lora_a(k) and isinstance(t, torch.Tensor) and t.dim() == 2}
        r = max((s[0] for k, s in spec.shapes.items() if is_lora_a(k)), default=0)
        if len(ranks) != 1 or not 1 <= min(ranks) <= r:
            raise UpdateRejected("wrong_rank", f"lora_A ranks {sorted(ranks)}; FLoRA needs one rank between 1 and {r}")
        rank = ranks.pop()
        shapes = {k: (rank, s[1]) if is_lora_a(k) else (s[0], rank) for k, s in spec.shapes.items()}
        return replace(spec, shapes=shapes)

    def _flora(self, updates: Sequence[ClientUpdate], client_weights: Sequence[float] | None,
               state: ServerState) -> tuple[dict[str, Any] | None, int]:
        """Stack the accepted adapters (examples × defense weight), add Σ p_k s_k B_k A_k to the merged update;
        returns the round's report and the bytes of the stacked adapter clients fetch."""
        counted = counted_updates(updates, client_weights)
        if not counted:
            return None, 0
        ranks = [set(adapter_ranks(c.update.tensors).values()).pop() for c in counted]
        agg = flora_stack([c.update.tensors for c in counted], [c.example_weight for c in counted],
                          scalings=[lora_scaling(self.lora_alpha, r) for r in ranks])
        for module, delta in agg.delta.items():
            key = FLORA_PREFIX + module
            previous = state.tensors.get(key)
            state.tensors[key] = delta.double() if previous is None else previous + delta.double()
        norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in agg.delta.values()))
        report = {"method": "flora", "ranks": {c.update.client_id: r for c, r in zip(counted, ranks)},
                  "stacked_rank": sum(ranks), "delta_norm": norm}
        return report, state_nbytes(agg.adapter)

    def _product_average(self, server_round: int, global_adapter: AdapterState, updates: Sequence[ClientUpdate],
                         client_weights: Sequence[float] | None) -> tuple[AdapterState, dict[str, Any] | None]:
        """FedAvg's weights (examples × defense weight) on the products B_k A_k instead of on A and B."""
        counted = counted_updates(updates, client_weights)
        if not counted:  # every client weighted to zero: keep the global adapter, as every rule does
            return {k: v.clone() for k, v in global_adapter.items()}, None
        ranks = set(adapter_ranks(global_adapter).values())
        if len(ranks) != 1:
            raise ValueError(f"product averaging needs one LoRA rank, the global adapter has {sorted(ranks)}")
        rank = ranks.pop()
        s = lora_scaling(self.lora_alpha, rank)
        # Unused directions get fresh A rows (B stays 0 there), seeded by round so a resumed run agrees.
        agg = product_average([c.update.tensors for c in counted], [c.example_weight for c in counted],
                              scalings=s, out_scaling=s, rank=rank,
                              fill_seed=derive_seed(self.seed, "product-fill", server_round))
        rep = agg.report
        finite = lambda x: x if x is not None and math.isfinite(x) else None  # noqa: E731 (JSON has no inf)
        return agg.adapter, {"method": "product", "naive_rel": finite(rep.naive_rel),
                             "refactor_rel": finite(rep.refactor_rel), "exact_norm": rep.exact_norm}
