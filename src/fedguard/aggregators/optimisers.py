"""Federated optimisation: FedAvg, FedProx, server momentum and adaptive server optimisers.

All of them start from the pseudo-gradient Δ = the example-weighted mean client delta (times the
defense weights). Reddi et al. write the plain mean; with equal client data sizes the two agree, and
the example weighting keeps every rule of this family comparable with FedAvg.
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from fedguard.aggregators.base import Aggregator, ClientDeltas, read_state, weighted_average, write_state


def example_weighted_mean(batch: ClientDeltas) -> torch.Tensor:
    return weighted_average(batch.deltas, batch.num_examples * batch.weights)


class FedAvg(Aggregator):
    """McMahan et al. 2017: the mean of client adapters weighted by their number of examples.

    Every client starts the round from the same global adapter, so averaging full LoRA tensors equals
    adding the example-weighted mean delta to the global adapter (what OpenFedLLM / Safe-FedLLM do);
    Safe-FedLLM's security weights multiply the example counts, exactly as in its code.
    """

    name = "fedavg"

    def combine(self, batch, state):
        return example_weighted_mean(batch)


class FedProx(FedAvg):
    """Li et al. 2020: FedAvg aggregation; each client minimises F(w) + μ/2 ‖w − w_global‖².

    The proximal term lives in the client's loss (``LocalTrainer``); this rule only sends μ along.
    """

    name = "fedprox"

    def __init__(self, mu: float = 0.01):
        if not mu >= 0:
            raise ValueError(f"the FedProx coefficient mu must be non-negative, got {mu}")
        self.mu = float(mu)

    @classmethod
    def from_config(cls, server, seed):
        return cls(server.fedprox.mu)

    def client_config(self):
        return {"proximal_mu": self.mu}


class FedAvgM(Aggregator):
    """Hsu et al. 2019: server momentum v ← βv + Δ, then θ ← θ + ηv (β = 0, η = 1 is FedAvg)."""

    name = "fedavgm"

    def __init__(self, lr: float = 1.0, momentum: float = 0.9):
        if not (lr > 0 and 0 <= momentum < 1):
            raise ValueError(f"FedAvgM needs lr > 0 and 0 <= momentum < 1, got lr={lr}, momentum={momentum}")
        self.lr, self.momentum = float(lr), float(momentum)

    @classmethod
    def from_config(cls, server, seed):
        return cls(server.fedavgm.lr, server.fedavgm.momentum)

    def combine(self, batch, state):
        key = f"{self.name}/momentum"
        previous = read_state(state, key, batch.layout.size)
        velocity = example_weighted_mean(batch) if previous is None \
            else self.momentum * previous + example_weighted_mean(batch)
        write_state(state, key, velocity)
        return self.lr * velocity


class _AdaptiveServerOptimiser(Aggregator):
    """Reddi et al. 2021, Algorithm 2: m ← β1 m + (1−β1)Δ; v ← (rule); θ ← θ + η m / (√v + τ).

    m starts at 0 and v at τ² (the paper asks for v₋₁ ≥ τ²); as in the paper, no bias correction.
    """

    def __init__(self, lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        if not (lr > 0 and 0 <= beta1 < 1 and 0 <= beta2 < 1 and tau > 0):
            raise ValueError(f"{self.name} needs lr > 0, 0 <= beta1, beta2 < 1 and tau > 0, "
                             f"got lr={lr}, beta1={beta1}, beta2={beta2}, tau={tau}")
        self.lr, self.beta1, self.beta2, self.tau = float(lr), float(beta1), float(beta2), float(tau)

    @classmethod
    def from_config(cls, server, seed):
        opt = server.fedopt
        return cls(opt.lr, opt.beta1, opt.beta2, opt.tau)

    def combine(self, batch, state):
        size = batch.layout.size
        pseudo_gradient = example_weighted_mean(batch)
        m = read_state(state, f"{self.name}/m", size)
        v = read_state(state, f"{self.name}/v", size)
        m = torch.zeros(size, dtype=torch.float64) if m is None else m
        v = torch.full((size,), self.tau ** 2, dtype=torch.float64) if v is None else v
        m = self.beta1 * m + (1 - self.beta1) * pseudo_gradient
        v = self.second_moment(v, pseudo_gradient.square())
        write_state(state, f"{self.name}/m", m)
        write_state(state, f"{self.name}/v", v)
        return self.lr * m / (v.sqrt() + self.tau)

    @abstractmethod
    def second_moment(self, v: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        """v_t from v_{t-1} and Δ², the one line where the three optimisers differ."""


class FedAdagrad(_AdaptiveServerOptimiser):
    name = "fedadagrad"

    def second_moment(self, v, squared):
        return v + squared


class FedAdam(_AdaptiveServerOptimiser):
    name = "fedadam"

    def second_moment(self, v, squared):
        return self.beta2 * v + (1 - self.beta2) * squared


class FedYogi(_AdaptiveServerOptimiser):
    name = "fedyogi"

    def second_moment(self, v, squared):
        return v - (1 - self.beta2) * squared * torch.sign(v - squared)
