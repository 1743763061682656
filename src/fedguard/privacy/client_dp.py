"""Client-level differential privacy by DP-FedAvg with central noise (McMahan et al., ICLR 2018).

Each round the server takes every accepted client's update Δ_k = local − global over the tensors clients send
(under FFA-LoRA: B only), clips it to L2 norm C, multiplies it by the client's defense weight w_k ∈ [0, 1]
(1 without a defense), sums, and adds Gaussian noise N(0, (σ·C)²) to every coordinate of the sum. The global
adapter moves by the noisy sum divided by the *expected* number of clients q·N, a constant: adding or removing
one client changes the sum by at most C, whatever the others sent, so (q, σ) per round is all the accountant
needs. Clients are sampled by Poisson sampling at rate q = clients_per_round / num_clients (``RoundPlan``).

What the guarantee covers: the sequence of global adapters the server releases, for any one client's whole
data (client-level, neighbouring federations differ in one client). The server itself sees each update before
noise (central DP trusts the server; secure aggregation or noise at the clients would not).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from fedguard.messages import AdapterState, ClientUpdate, ServerState
from fedguard.privacy.accountant import epsilon
from fedguard.seeding import derive_seed

META_KEY = "privacy"  # ServerState.meta: {"history": [[q, sigma], ...]}


@dataclass
class CentralClientDP:
    clip: float  # C: L2 bound on one client's update
    noise_multiplier: float  # sigma: the noise on the sum has standard deviation sigma * C
    sample_rate: float  # q
    num_clients: int  # N
    delta: float
    accountant: str = "rdp"
    target_epsilon: float | None = None
    seed: int = 0
    secure_noise: bool = False  # True: noise from the OS's entropy (not reproducible); False: from the run seed

    @property
    def expected_clients(self) -> float:
        return self.sample_rate * self.num_clients

    # -- the mechanism ---------------------------------------------------------------------------------
    def aggregate(self, server_round: int, sent_global: AdapterState, updates: list[ClientUpdate],
                  weights: list[float] | None) -> tuple[AdapterState, dict[str, Any]]:
        """The new sent tensors and the round's report (norms before clipping, how many were clipped)."""
        keys = sorted(sent_global)
        total = {k: torch.zeros_like(sent_global[k], dtype=torch.float64) for k in keys}
        norms, clipped = [], 0
        for i, u in enumerate(updates):
            delta = {k: u.tensors[k].double() - sent_global[k].double() for k in keys}
            norm = math.sqrt(sum(float(d.pow(2).sum()) for d in delta.values()))
            norms.append(norm)
            scale = min(1.0, self.clip / norm) if norm > 0 else 1.0
            clipped += scale < 1.0
            w = 1.0 if weights is None else min(max(float(weights[i]), 0.0), 1.0)
            for k in keys:
                total[k] += delta[k] * (scale * w)
        gen = torch.Generator()
        gen.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1 if self.secure_noise
                        else derive_seed(self.seed, "dp-noise", server_round))
        std = self.noise_multiplier * self.clip
        out = {}
        for k in keys:
            noise = torch.randn(total[k].shape, generator=gen, dtype=torch.float64) * std
            out[k] = (sent_global[k].double() + (total[k] + noise) / self.expected_clients).to(sent_global[k].dtype)
        report = {"clip": self.clip, "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                  "clients": len(updates), "clipped": int(clipped),
                  "median_norm": sorted(norms)[len(norms) // 2] if norms else None,
                  "noise_std_on_mean": std / self.expected_clients}
        return out, report

    # -- accounting ------------------------------------------------------------------------------------
    @staticmethod
    def history(state: ServerState) -> list[list[float]]:
        return [list(h) for h in state.meta.get(META_KEY, {}).get("history", [])]

    def spent(self, state: ServerState) -> float:
        return epsilon(self.history(state), self.delta, self.accountant)

    def with_round(self, state: ServerState) -> dict[str, Any]:
        """``ServerState.meta[META_KEY]`` after one more round of this mechanism."""
        return {"history": self.history(state) + [[self.sample_rate, self.noise_multiplier]]}

    def would_exceed(self, state: ServerState) -> bool:
        """Whether one more round would spend more than ``target_epsilon``."""
        if self.target_epsilon is None:
            return False
        nxt = epsilon(self.with_round(state)["history"], self.delta, self.accountant)
        return nxt > self.target_epsilon
