"""Strategies that wrap another: client-level DP (``ClientLevelDPRelease``: the round's clipped updates summed,
then a noisy release with the accountant) and secure summation (``SecureSummation``: the server receives only the
sum SecAgg+ produced, and the wrapped rule takes the mean of the summed updates). Both need an inner strategy that
combines the tensors clients send one by one (``NaiveRule``): a sum of clipped updates is all they have."""

from __future__ import annotations

from typing import Any

from fedguard.federated.strategies.base import Aggregated, AggregationStrategy, RoundInput
from fedguard.federated.strategies.naive import NaiveRule
from fedguard.messages import AdapterState, ClientUpdate, UpdateSum

PRIVACY_META = "privacy"  # ServerState.meta: the DP accountant's history


class _Wrapper(AggregationStrategy):
    def __init__(self, inner: AggregationStrategy, what: str):
        if not isinstance(inner, NaiveRule):
            raise ValueError(f"{what} needs naive LoRA aggregation (the sum of the clients' tensors), not "
                             f"'{inner.name}'")
        self.inner = inner
        self.name = inner.name

    def _full(self, r: RoundInput, new_sent: AdapterState) -> AdapterState:
        return {k: t.clone() for k, t in r.wire.full_view(new_sent, r.global_adapter).items()}


class ClientLevelDPRelease(_Wrapper):
    """DP-FedAvg: noise every round, even one nobody answered, and never a skipped round (the accountant counts
    every release). The sum comes from secure aggregation when the engine ran it, else from clipping here."""

    def __init__(self, inner: AggregationStrategy, privacy):
        super().__init__(inner, "client-level DP")
        self.privacy = privacy  # fedguard.privacy.client_dp.ClientLevelDP

    def aggregate(self, r: RoundInput) -> Aggregated:
        summed = r.summed if r.summed is not None else self.privacy.clip_sum(r.sent_global, r.accepted, r.weights,
                                                                             r.state)
        new_sent, report, r.meta[PRIVACY_META] = self.privacy.release(r.server_round, r.sent_global, summed, r.state)
        return Aggregated(self._full(r, new_sent), privacy=report, accepted_ids=list(summed.clients), skipped=False)


class SecureSummation(_Wrapper):
    """Secure aggregation without DP: the wrapped rule (FedAvg, a server optimiser) on the uniform mean of the
    summed updates, each clipped by its client to ``clip``."""

    def __init__(self, inner: AggregationStrategy, clip: float):
        super().__init__(inner, "secure aggregation")
        self.clip = clip

    def aggregate(self, r: RoundInput) -> Aggregated:
        summed: UpdateSum = r.summed
        report: dict[str, Any] = {"mode": "secure_aggregation", "clients": summed.count, "clip": self.clip,
                                  **summed.report}
        if not summed.count:
            new_sent = {k: v.clone() for k, v in r.sent_global.items()}
        else:
            g = r.sent_global
            mean = ClientUpdate("secure-sum", {k: (g[k].double() + summed.total[k] / summed.count).to(g[k].dtype)
                                               for k in g}, 1)
            new_sent = self.inner.aggregator.aggregate(g, [mean], r.state)
        return Aggregated(self._full(r, new_sent), privacy=report, accepted_ids=list(summed.clients), skipped=False)
