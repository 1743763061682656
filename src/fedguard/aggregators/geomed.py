"""Geometric median: RFA (Pillutla et al. 2022), computed with the smoothed Weiszfeld algorithm."""

from __future__ import annotations

import torch

from fedguard.aggregators.base import Aggregator, weighted_average


def smoothed_weiszfeld(rows: torch.Tensor, weights: torch.Tensor, eps: float, max_iters: int,
                       tol: float) -> torch.Tensor:
    """argmin_z Σ α_i max(ν, ‖z − w_i‖) by z ← Σ β_i w_i / Σ β_i, β_i = α_i / max(ν, ‖z − w_i‖).

    Starts from the weighted mean; stops after ``max_iters`` or once an iteration moves z by at most
    ``tol`` times its norm. (RFA stops on the relative change of the objective instead, which far
    outliers dominate: it then stops while z is still far from the median.)
    """
    alpha = weights / weights.sum()
    z = weighted_average(rows, alpha)
    for _ in range(max_iters):
        beta = alpha / (rows - z).norm(dim=1).clamp_min(eps)
        z, previous = weighted_average(rows, beta), z
        if float((z - previous).norm()) <= tol * max(float(z.norm()), eps):
            break
    return z


class GeoMed(Aggregator):
    """RFA (Pillutla et al. 2022): the smoothed geometric median of the deltas.

    RFA weighs clients by their data size; here each client's weight is its defense weight alone,
    because an example count is the client's own claim and a robust rule should not trust it.
    """

    name = "geomed"

    def __init__(self, eps: float = 1e-6, max_iters: int = 1000, tol: float = 1e-8):
        if not (eps > 0 and max_iters >= 1 and tol >= 0):
            raise ValueError(f"geomed needs eps > 0, max_iters >= 1, tol >= 0, got {eps}, {max_iters}, {tol}")
        self.eps, self.max_iters, self.tol = float(eps), int(max_iters), float(tol)

    @classmethod
    def from_config(cls, server, seed):
        g = server.geomed
        return cls(g.eps, g.max_iters, g.tol)

    def combine(self, batch, state):
        return smoothed_weiszfeld(batch.deltas, batch.weights, self.eps, self.max_iters, self.tol)
