"""Divide-and-Conquer (Shejwalkar & Houmansadr, NDSS 2021, Algorithm 3)."""

from __future__ import annotations

import logging
import math
from collections import Counter

import torch

from fedguard.aggregators.base import Aggregator, admissible_attackers, weighted_average
from fedguard.seeding import torch_generator

log = logging.getLogger(__name__)


def outlier_scores(rows: torch.Tensor) -> torch.Tensor:
    """((x_i − μ)·v)² with v the top right singular vector of the centred rows."""
    centred = rows - rows.mean(dim=0)
    top = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    return (centred @ top).square()


class DnC(Aggregator):
    """DnC: in each of ``iterations`` rounds of filtering, draw b coordinates (seeded by the run seed,
    the round and the iteration), score every client by its squared projection on the top singular
    vector of the centred sub-vectors, and keep all but the ⌈c·f⌉ highest scores; the clients kept in
    every iteration are averaged (weighted by the defense weights).

    The Safe-FedLLM code runs one unseeded iteration with c = 1 and the true attacker count; here f is
    ``server.expected_malicious`` and the iteration count a hyper-parameter (default 5). If the
    iterations agree on no client, those kept most often are averaged (with a warning).
    """

    name = "dnc"

    def __init__(self, expected_malicious: int = 0, subsample: int = 10_000, iterations: int = 5,
                 filter_frac: float = 1.0, seed: int = 0):
        if expected_malicious < 0 or subsample < 1 or iterations < 1 or not filter_frac > 0:
            raise ValueError(f"dnc needs expected_malicious >= 0, subsample >= 1, iterations >= 1, filter_frac > 0, "
                             f"got {expected_malicious}, {subsample}, {iterations}, {filter_frac}")
        self.f, self.subsample, self.iterations = int(expected_malicious), int(subsample), int(iterations)
        self.filter_frac, self.seed = float(filter_frac), int(seed)

    @classmethod
    def from_config(cls, server, seed):
        d = server.dnc
        return cls(server.expected_malicious, d.subsample, d.iterations, d.filter_frac, seed)

    def combine(self, batch, state):
        n, size = batch.deltas.shape
        largest_f = math.floor((n - 1) / self.filter_frac + 1e-9)  # c·f must leave one client
        f = admissible_attackers(self.name, self.f, n, largest_f, "DnC must keep at least one update")
        dropped = math.ceil(self.filter_frac * f - 1e-9)
        if dropped == 0:
            self.record_kept(batch, range(n))
            return weighted_average(batch.deltas, batch.weights)
        kept_count: Counter[int] = Counter()
        for iteration in range(self.iterations):
            columns = slice(None)
            if self.subsample < size:
                generator = torch_generator(self.seed, self.name, batch.server_round, iteration)
                columns = torch.randperm(size, generator=generator)[: self.subsample]
            scores = outlier_scores(batch.deltas[:, columns])
            kept_count.update(int(i) for i in torch.argsort(scores, stable=True)[: n - dropped])
        most = max(kept_count.values())
        if most < self.iterations:
            log.warning("dnc: no update survived all %d iterations; averaging those kept %d times",
                        self.iterations, most)
        kept = sorted(i for i, c in kept_count.items() if c == most)
        self.record_kept(batch, kept)
        return weighted_average(batch.deltas[kept], batch.weights[kept])
