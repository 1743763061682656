"""Which clients take part in a round, and at what learning rate."""

from __future__ import annotations

import math

from fedguard.config import TrainConfig
from fedguard.seeding import numpy_rng


def sample_clients(num_clients: int, per_round: int, seed: int, server_round: int) -> list[int]:
    """A sorted, seeded sample without replacement; its own stream per round (resume-safe)."""
    if per_round >= num_clients:
        return list(range(num_clients))
    rng = numpy_rng(seed, "client-sampling", server_round)
    return sorted(rng.choice(num_clients, size=per_round, replace=False).tolist())


def round_lr(train: TrainConfig, server_round: int, total_rounds: int) -> float:
    """Learning rate for a round (1-based); constant within the round.

    cosine (Safe-FedLLM): min_lr + (lr - min_lr) * (1 + cos(pi * (round - 1) / rounds)) / 2.
    """
    if train.lr_schedule == "constant":
        return train.lr
    progress = (server_round - 1) / total_rounds
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1.0 + math.cos(math.pi * progress))
