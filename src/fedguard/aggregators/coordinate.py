"""Coordinate-wise rules: median and trimmed mean (Yin et al. 2018)."""

from __future__ import annotations

import logging
import math

import torch

from fedguard.aggregators.base import Aggregator, weighted_median

log = logging.getLogger(__name__)


class Median(Aggregator):
    """Yin et al. 2018: the coordinate-wise median, weighted by the defense weights.

    For even n with equal weights this is the mean of the two middle values; the Safe-FedLLM code
    (torch.median) takes the lower one.
    """

    name = "median"

    def combine(self, batch, state):
        return weighted_median(batch.deltas, batch.weights)


class TrimmedMean(Aggregator):
    """Yin et al. 2018: per coordinate, drop the k largest and k smallest values and average the rest
    (weighted by the defense weights of the clients whose values are kept).

    k = ⌊β·n⌋ for a trim ratio β, or a fixed ``count`` (1 reproduces the Safe-FedLLM baseline). If
    2k ≥ n the round uses the largest k that leaves one value, with a warning.
    """

    name = "trimmed_mean"

    def __init__(self, ratio: float = 0.1, count: int | None = None):
        if not 0 <= ratio < 0.5 or (count is not None and count < 0):
            raise ValueError(f"trimmed mean needs 0 <= ratio < 0.5 and count >= 0, got ratio={ratio}, count={count}")
        self.ratio, self.count = float(ratio), count

    @classmethod
    def from_config(cls, server, seed):
        return cls(server.trimmed_mean.ratio, server.trimmed_mean.count)

    def trimmed_per_end(self, n: int) -> int:
        k = self.count if self.count is not None else math.floor(self.ratio * n + 1e-9)
        if 2 * k >= n:
            log.warning("trimmed_mean: cannot trim %d of %d values at each end; trimming %d", k, n, (n - 1) // 2)
            k = (n - 1) // 2
        return k

    def combine(self, batch, state):
        n = batch.n
        k = self.trimmed_per_end(n)
        order = torch.argsort(batch.deltas, dim=0, stable=True)[k: n - k]
        values = batch.deltas.gather(0, order)
        weights = batch.weights[order]
        return (values * weights).sum(dim=0) / weights.sum(dim=0)
