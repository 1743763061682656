"""FLAME (Nguyen et al., USENIX Security 2022): clustering, adaptive clipping, Gaussian noise."""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import torch

from fedguard.aggregators.base import Aggregator, cosine_similarities, median_norm, weighted_average
from fedguard.aggregators.clipping import clip_rows
from fedguard.seeding import torch_generator

log = logging.getLogger(__name__)

ClusterInput = Literal["cosine_distance", "distance_rows"]


def majority_cluster(rows: torch.Tensor, cluster_input: ClusterInput = "cosine_distance") -> torch.Tensor:
    """Indices of the rows in HDBSCAN's majority cluster (min_cluster_size = n//2 + 1, min_samples = 1,
    a single cluster allowed) on pairwise cosine distances; every row if HDBSCAN finds only noise.

    ``distance_rows`` feeds the rows of the distance matrix to HDBSCAN as Euclidean features, as the
    Safe-FedLLM code does, instead of the distances themselves.
    """
    n = rows.shape[0]
    everyone = torch.arange(n)
    if n < 3:  # a majority of one or two updates is all of them
        return everyone
    distances = (1.0 - cosine_similarities(rows)).clamp_min(0.0)
    distances = ((distances + distances.T) / 2).fill_diagonal_(0.0).numpy()
    from sklearn.cluster import HDBSCAN  # here, not at the top: scikit-learn costs every process ~1 s to import

    metric = "precomputed" if cluster_input == "cosine_distance" else "euclidean"
    labels = HDBSCAN(min_cluster_size=n // 2 + 1, min_samples=1, metric=metric, allow_single_cluster=True,
                     copy=True).fit_predict(distances)
    clustered = labels[labels >= 0]
    if clustered.size == 0:
        log.warning("flame: HDBSCAN labelled every update as noise; keeping all %d", n)
        return everyone
    largest = np.bincount(clustered).argmax()  # at most one cluster can hold a majority
    return torch.from_numpy(np.flatnonzero(labels == largest))


class Flame(Aggregator):
    """FLAME: keep HDBSCAN's majority cluster of deltas by cosine distance; clip each kept delta to
    S = the median delta norm of all clients; average (weighted by the defense weights); add Gaussian
    noise N(0, (λS)²) to every parameter, from a stream seeded by the run seed and the round.

    FLAME clusters the local models; here the deltas, because a LoRA's shared random A initialisation
    dominates the full vectors and makes every pair look alike.
    """

    name = "flame"

    def __init__(self, noise: float = 0.001, cluster_input: ClusterInput = "cosine_distance", seed: int = 0):
        if not noise >= 0 or cluster_input not in ("cosine_distance", "distance_rows"):
            raise ValueError(f"flame needs noise >= 0 and a known cluster_input, got {noise}, {cluster_input!r}")
        self.noise, self.cluster_input, self.seed = float(noise), cluster_input, int(seed)

    @classmethod
    def from_config(cls, server, seed):
        return cls(server.flame.noise, server.flame.cluster_input, seed)

    def combine(self, batch, state):
        bound = median_norm(batch.deltas)
        kept = majority_cluster(batch.deltas, self.cluster_input)
        self.record_kept(batch, kept)
        delta = weighted_average(clip_rows(batch.deltas[kept], bound), batch.weights[kept])
        sigma = self.noise * bound
        if sigma > 0:
            generator = torch_generator(self.seed, self.name, "noise", batch.server_round)
            delta = delta + sigma * torch.randn(delta.shape, generator=generator, dtype=torch.float64)
        return delta
