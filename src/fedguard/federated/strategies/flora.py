"""FLoRA stacking (``lora.variant: flora``). Clients of any rank r_k <= r send fresh adapters; the server stacks them
(``lora_exact.flora_stack``: exactly Σ p_k (alpha/r_k) B_k A_k), adds that to the merged update it keeps in
``ServerState.tensors`` (``flora/<module>``, float64) and sends every client the merged update so far, which it
merges into its base weights. The global adapter itself stays as it was (B = 0): every client re-initialises its
own each round."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any

import torch

from fedguard.aggregators.base import counted_updates
from fedguard.federated.compression import state_nbytes
from fedguard.federated.lora_exact import adapter_ranks, flora_stack, lora_scaling
from fedguard.federated.strategies.base import Aggregated, AggregationStrategy, RoundInput
from fedguard.federated.transport import WireSpec
from fedguard.federated.validation import UpdateRejected, UpdateSpec, check_keys_are_names
from fedguard.messages import AdapterState, ClientUpdate, ServerState
from fedguard.model.keys import is_lora_a

log = logging.getLogger("fedguard.federated.server")

FLORA_PREFIX = "flora/"  # ServerState.tensors keys of FLoRA's merged update, per module
# ServerState.meta under FLoRA: the bytes of each round's stacked adapter, and per client how many of those
# stacks it has fetched and merged (a client that sat out rounds fetches every stack it missed).
FLORA_STACKS = "flora_stack_bytes"
FLORA_SYNCED = "flora_synced"
FLORA_LEGACY_DOWNLINK = "flora_downlink_bytes"  # older checkpoints: the last stack, charged to every client


def flora_merged(state: ServerState) -> dict[str, torch.Tensor]:
    """FLoRA's merged update so far, ``{module: ΔW}`` (float64): what every client has added to its base."""
    return {k[len(FLORA_PREFIX):]: t for k, t in state.tensors.items() if k.startswith(FLORA_PREFIX)}


class FLoRAStacking(AggregationStrategy):
    name = "flora"
    keeps_global_adapter = False

    def __init__(self, lora_alpha: float):
        self.lora_alpha = float(lora_alpha)

    @classmethod
    def build(cls, aggregator, lora_alpha: float, seed: int) -> FLoRAStacking:
        return cls(lora_alpha)

    def check(self, wire: WireSpec) -> None:
        if wire.compressed or wire.lora_b_only:
            raise ValueError("FLoRA clients send their own rank's plain A and B tensors")

    def downlink(self, state: ServerState) -> dict:
        return flora_merged(state)  # every round so far, so a client that missed rounds catches up

    def downlink_nbytes(self, global_adapter: AdapterState, state: ServerState, client_id: str, wire: WireSpec) -> int:
        """The stacked adapters of the rounds ``client_id`` has not merged yet (nothing in round 1), or the dense
        merged update in fp32 where that is smaller."""
        if FLORA_STACKS not in state.meta and FLORA_LEGACY_DOWNLINK in state.meta:
            return int(state.meta[FLORA_LEGACY_DOWNLINK])  # a checkpoint from before per-client metering
        stacks = state.meta.get(FLORA_STACKS, [])
        missed = sum(stacks[int(state.meta.get(FLORA_SYNCED, {}).get(str(client_id), 0)):])
        dense = sum(4 * d.numel() for d in flora_merged(state).values())
        return int(min(missed, dense))

    def update_spec(self, spec: UpdateSpec, update: ClientUpdate) -> UpdateSpec:
        """The shapes of ``spec`` at the update's own rank (one rank for all modules, 1..r)."""
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

    def aggregate(self, r: RoundInput) -> Aggregated:
        merged = r.accepted if not r.skipped else []
        # Every client that took part fetched the stacks so far; this round's stack is fetched later.
        stacks = list(r.meta.get(FLORA_STACKS, []))
        fetched = r.sent_to if r.sent_to is not None else [getattr(u, "client_id", "?") for u in r.updates]
        r.meta[FLORA_SYNCED] = {**r.meta.get(FLORA_SYNCED, {}), **{str(c): len(stacks) for c in fetched}}
        report, stack_bytes = self._stack(merged, r.weights if merged else None, r.state)
        r.meta[FLORA_STACKS] = stacks + [stack_bytes]
        if not r.accepted:
            log.warning("round %d: no valid update; nothing merged", r.server_round)
        return Aggregated({k: v.clone() for k, v in r.global_adapter.items()}, report=report)

    def _stack(self, updates: list[ClientUpdate], client_weights: list[float] | None,
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
