"""Norm clipping (Sun et al. 2019, "Can you really backdoor federated learning?")."""

from __future__ import annotations

import torch

from fedguard.aggregators.base import Aggregator, median_norm, weighted_average


def clip_rows(rows: torch.Tensor, bound: float) -> torch.Tensor:
    """Each row scaled down to L2 norm ``bound`` if it is longer."""
    norms = rows.norm(dim=1, keepdim=True)
    return rows * torch.where(norms > bound, bound / norms.clamp_min(torch.finfo(rows.dtype).tiny), 1.0)


class NormClip(Aggregator):
    """Sun et al. 2019: clip every delta to L2 norm M, then average (weighted by the defense weights).

    Without a fixed ``bound`` M is the median delta norm of the round (the adaptive bound FLAME and
    LASA use), so the rule needs no knowledge of the model's update scale.
    """

    name = "norm_clip"

    def __init__(self, bound: float | None = None):
        if bound is not None and not bound > 0:
            raise ValueError(f"the clipping bound must be positive, got {bound}")
        self.bound = bound

    @classmethod
    def from_config(cls, server, seed):
        return cls(server.norm_clip.bound)

    def combine(self, batch, state):
        bound = self.bound if self.bound is not None else median_norm(batch.deltas)
        return weighted_average(clip_rows(batch.deltas, bound), batch.weights)
