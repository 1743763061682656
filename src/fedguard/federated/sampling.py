"""Which clients take part in a round, and at what learning rate."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedguard.config import ExperimentConfig, TrainConfig
from fedguard.messages import RoundConfig
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


@dataclass(frozen=True)
class RoundPlan:
    """Who trains in which round and with what settings (the config's federation and train sections)."""

    num_clients: int
    clients_per_round: int
    rounds: int
    seed: int
    train: TrainConfig
    # Poisson sampling (each client joins with probability clients_per_round / num_clients, independently):
    # what differential privacy's amplification by sampling assumes
    poisson: bool = False
    # sample-level DP-SGD in every client's training: (per-example clip, noise multiplier, delta); None: off
    dpsgd: tuple[float, float, float] | None = None

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> RoundPlan:
        f = cfg.federation
        p = cfg.privacy
        return cls(f.num_clients, f.clients_per_round, f.rounds, cfg.seed, cfg.train, poisson=p.client_dp != "none",
                   dpsgd=(p.sample_clip, p.sample_noise_multiplier, p.delta) if p.sample_dp == "dpsgd" else None)

    @property
    def sample_rate(self) -> float:
        return self.clients_per_round / self.num_clients

    def sampled(self, server_round: int) -> list[int]:
        if self.poisson:
            draws = numpy_rng(self.seed, "client-sampling-poisson", server_round).random(self.num_clients)
            return [c for c in range(self.num_clients) if draws[c] < self.sample_rate]
        return sample_clients(self.num_clients, self.clients_per_round, self.seed, server_round)

    def round_config(self, server_round: int) -> RoundConfig:
        """What every client of ``server_round`` is told before the aggregator and the defense add theirs."""
        t = self.train
        return RoundConfig(server_round=server_round, lr=round_lr(t, server_round, self.rounds),
                           local_steps=t.local_steps, batch_size=t.batch_size, grad_accum=t.grad_accum,
                           seed=self.seed, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
                           **({} if self.dpsgd is None else dict(zip(
                               ("dpsgd_clip", "dpsgd_noise_multiplier", "dpsgd_delta"), self.dpsgd))))
