"""Distance-based selection: Krum, Multi-Krum (Blanchard et al. 2017) and Bulyan (El Mhamdi et al. 2018).

Krum scores each delta by the summed squared distances to its n − f − 2 nearest neighbours and
needs n > 2f + 2; Bulyan needs n ≥ 4f + 3. With fewer updates in a round, f is lowered to the
largest admissible value (with a warning) rather than failing the round.
"""

from __future__ import annotations

import logging

import torch

from fedguard.aggregators.base import (
    Aggregator, ClientDeltas, admissible_attackers, pairwise_distances, weighted_average, weighted_median,
)

log = logging.getLogger(__name__)


def krum_ranking(squared_distances: torch.Tensor, f: int) -> torch.Tensor:
    """Indices from the lowest Krum score up: Σ of the n − f − 2 smallest squared distances from an
    update to the others (at least one neighbour, so a small pool still prefers clustered updates).

    Equal scores (a mutually nearest pair always ties at one neighbour) are ordered by the summed
    squared distance to the whole pool, so the choice never depends on the order clients arrive in.
    """
    n = squared_distances.shape[0]
    squared = (squared_distances + squared_distances.T) / 2  # exactly symmetric: pairs tie exactly
    neighbours = min(max(n - f - 2, 1), n - 1)
    others = squared + torch.diag(torch.full((n,), float("inf"), dtype=squared.dtype))
    scores = others.sort(dim=1).values[:, :neighbours].sum(dim=1)
    by_spread = torch.argsort(squared.sum(dim=1), stable=True)
    return by_spread[torch.argsort(scores[by_spread], stable=True)]


def krum_attackers(f: int, n: int) -> int:
    return admissible_attackers("krum", f, n, (n - 3) // 2, "Krum needs n > 2f + 2")


class Krum(Aggregator):
    """Blanchard et al. 2017: the single delta with the lowest Krum score.

    ``neighbourhood_mean=True`` is the Safe-FedLLM / FedLLM-Attack baseline instead: score by
    *unsquared* distances to the n − f − 1 nearest neighbours (self included) and return the mean of
    the best delta and those neighbours (weighted by the defense weights).
    With fewer than 3 updates nothing can be ranked and the rule returns their weighted mean.
    """

    name = "krum"

    def __init__(self, expected_malicious: int = 0, neighbourhood_mean: bool = False):
        if expected_malicious < 0:
            raise ValueError(f"expected_malicious must be non-negative, got {expected_malicious}")
        self.f = int(expected_malicious)
        self.neighbourhood_mean = bool(neighbourhood_mean)

    @classmethod
    def from_config(cls, server, seed):
        return cls(server.expected_malicious, server.krum.neighbourhood_mean)

    def combine(self, batch, state):
        if batch.n < 3:
            log.warning("krum: %d update(s) cannot be ranked; using their weighted mean", batch.n)
            self.record_kept(batch, range(batch.n))
            return weighted_average(batch.deltas, batch.weights)
        f = krum_attackers(self.f, batch.n)
        distances = pairwise_distances(batch.deltas)
        if not self.neighbourhood_mean:
            best = int(krum_ranking(distances.square(), f)[0])
            self.record_kept(batch, [best])
            return batch.deltas[best].clone()
        nearest = distances.sort(dim=1)  # column 0 is the update itself
        k = batch.n - f - 1
        best = int(torch.argmin(nearest.values[:, : k + 1].sum(dim=1)))
        group = nearest.indices[best, : k + 1]
        self.record_kept(batch, group)
        return weighted_average(batch.deltas[group], batch.weights[group])


class MultiKrum(Aggregator):
    """Blanchard et al. 2017: the mean of the m deltas with the lowest Krum scores (m = n − f by default),
    weighted by the defense weights."""

    name = "multikrum"

    def __init__(self, expected_malicious: int = 0, selected: int | None = None):
        if expected_malicious < 0 or (selected is not None and selected < 1):
            raise ValueError(f"multikrum needs expected_malicious >= 0 and selected >= 1, "
                             f"got {expected_malicious}, {selected}")
        self.f = int(expected_malicious)
        self.selected = selected

    @classmethod
    def from_config(cls, server, seed):
        return cls(server.expected_malicious, server.krum.selected)

    def combine(self, batch, state):
        if batch.n < 3:
            log.warning("multikrum: %d update(s) cannot be ranked; using their weighted mean", batch.n)
            self.record_kept(batch, range(batch.n))
            return weighted_average(batch.deltas, batch.weights)
        f = krum_attackers(self.f, batch.n)
        m = min(self.selected or batch.n - f, batch.n)
        chosen = krum_ranking(pairwise_distances(batch.deltas).square(), f)[:m]
        self.record_kept(batch, chosen)
        return weighted_average(batch.deltas[chosen], batch.weights[chosen])


class Bulyan(Aggregator):
    """El Mhamdi et al. 2018: Krum picks θ = n − 2f deltas one by one (each pick removed from the pool);
    then, per coordinate, the β = θ − 2f picked values closest to their median are averaged
    (weighted by the defense weights)."""

    name = "bulyan"

    def __init__(self, expected_malicious: int = 0):
        if expected_malicious < 0:
            raise ValueError(f"expected_malicious must be non-negative, got {expected_malicious}")
        self.f = int(expected_malicious)

    @classmethod
    def from_config(cls, server, seed):
        return cls(server.expected_malicious)

    def combine(self, batch, state):
        n = batch.n
        f = admissible_attackers("bulyan", self.f, n, (n - 3) // 4, "Bulyan needs n >= 4f + 3")
        squared = pairwise_distances(batch.deltas).square()
        pool, picked = list(range(n)), []
        while len(picked) < n - 2 * f:
            picked.append(pool.pop(int(krum_ranking(squared[pool][:, pool], f)[0])))
        self.record_kept(batch, picked)  # the coordinate-wise trimming after it screens values, not clients
        chosen: ClientDeltas = batch.subset(picked)
        beta = chosen.n - 2 * f
        median = weighted_median(chosen.deltas, torch.ones(chosen.n, dtype=torch.float64))
        closest = torch.topk((chosen.deltas - median).abs(), beta, dim=0, largest=False).indices
        values = chosen.deltas.gather(0, closest)
        weights = chosen.weights[closest]
        return (values * weights).sum(dim=0) / weights.sum(dim=0)
