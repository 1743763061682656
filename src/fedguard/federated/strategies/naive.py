"""Per-matrix aggregation: the configured rule (``server.aggregator``: FedAvg, a server optimiser or a robust rule)
on the tensors clients send, A and B each on its own (under FFA-LoRA B only, with A frozen: exact)."""

from __future__ import annotations

from fedguard.federated.strategies.base import Aggregated, AggregationStrategy, RoundInput, unchanged


class NaiveRule(AggregationStrategy):
    name = "naive"

    def __init__(self, aggregator):
        self.aggregator = aggregator

    @classmethod
    def build(cls, aggregator, lora_alpha: float, seed: int) -> NaiveRule:
        return cls(aggregator)

    def aggregate(self, r: RoundInput) -> Aggregated:
        if not r.accepted or r.skipped:
            return Aggregated(unchanged(r))
        new_sent = self.aggregator.aggregate(r.sent_global, r.accepted, r.state, client_weights=r.weights)
        return Aggregated({k: t.clone() for k, t in r.wire.full_view(new_sent, r.global_adapter).items()},
                          screening=self.aggregator.screening)
