"""Exact product averaging: the FedAvg-weighted mean of the clients' products s·B_k A_k (examples x defense weight),
re-factorised to rank r by truncated SVD (``lora_exact.product_average``), with the error of naive averaging and
of the refactorisation reported per round."""

from __future__ import annotations

import math
from typing import Any

from fedguard.aggregators.base import counted_updates
from fedguard.federated.lora_exact import adapter_ranks, lora_scaling, product_average
from fedguard.federated.strategies.base import Aggregated, AggregationStrategy, RoundInput, unchanged
from fedguard.seeding import derive_seed


class ProductAveraging(AggregationStrategy):
    name = "product"

    def __init__(self, lora_alpha: float, seed: int):
        self.lora_alpha, self.seed = float(lora_alpha), int(seed)

    @classmethod
    def build(cls, aggregator, lora_alpha: float, seed: int) -> ProductAveraging:
        return cls(lora_alpha, seed)

    def aggregate(self, r: RoundInput) -> Aggregated:
        if not r.accepted or r.skipped:
            return Aggregated(unchanged(r))
        counted = counted_updates(r.accepted, r.weights)
        if not counted:  # every client weighted to zero: keep the global adapter, as every rule does
            return Aggregated({k: v.clone() for k, v in r.global_adapter.items()})
        ranks = set(adapter_ranks(r.global_adapter).values())
        if len(ranks) != 1:
            raise ValueError(f"product averaging needs one LoRA rank, the global adapter has {sorted(ranks)}")
        rank = ranks.pop()
        s = lora_scaling(self.lora_alpha, rank)
        # Unused directions get fresh A rows (B stays 0 there), seeded by round so a resumed run agrees.
        agg = product_average([c.update.tensors for c in counted], [c.example_weight for c in counted],
                              scalings=s, out_scaling=s, rank=rank,
                              fill_seed=derive_seed(self.seed, "product-fill", r.server_round))
        rep = agg.report
        report: dict[str, Any] = {"method": "product", "naive_rel": _finite(rep.naive_rel),
                                  "refactor_rel": _finite(rep.refactor_rel), "exact_norm": rep.exact_norm}
        return Aggregated(agg.adapter, report=report)


def _finite(x: float | None) -> float | None:
    """JSON has no inf: a non-finite error is reported as missing."""
    return x if x is not None and math.isfinite(x) else None
