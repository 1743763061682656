"""Client-level differential privacy: DP-FedAvg (McMahan et al., ICLR 2018), with the noise added by the server
(central) or in shares by the clients (distributed), and fixed or adaptive clipping (Andrew et al., NeurIPS 2021).

Each round every counted client's update Δ_k = local − global over the tensors clients send (under FFA-LoRA: B
only) is clipped to L2 norm C and multiplied by its defense weight w_k ∈ [0, 1] (1 without a defense); the
clipped updates are summed and Gaussian noise N(0, (σ·C)²) lands on every coordinate of the sum. The global
adapter moves by the noisy sum divided by the *expected* number of clients M = q·N, a constant: adding or
removing one client changes the sum by at most C whatever the others sent, so (q, σ) per round is all the
accountant needs. Clients are sampled by Poisson sampling at rate q = clients_per_round / num_clients.

* ``central``: the server clips and adds the noise. It sees every update before noise (it is trusted); with
  secure aggregation it sees only the clipped sum, still before noise.
* ``distributed``: every client clips its own update and adds N(0, (σ·C)²/M); the sum of n clients' noise
  has std σ·C·sqrt(n/M), so a round is charged with σ·sqrt(n/M) (fewer clients than expected, less noise,
  more epsilon). With secure aggregation the server sees only that noisy sum; without it, it sees each update
  with its own share of the noise only (``epsilon_server_view``). A client that skips its noise lowers the
  total: the guarantee assumes the counted clients are honest about their noise.
* adaptive clipping: C follows the ``target_quantile`` of the update norms. Each client's bit
  b_k = [‖Δ_k‖ ≤ C] is summed with noise N(0, σ_b²); C ← C·exp(−η(b̄ − γ)), b̄ the noisy fraction over M. The
  update noise is raised to σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2) so the pair costs exactly what σ alone would
  (Andrew et al., Thm 1): the accountant is charged with σ.

What the guarantee covers: the sequence of global adapters the server releases, for any one client's whole
data (client-level: neighbouring federations differ in one client).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from fedguard.messages import AdapterState, ClientUpdate, RoundConfig, ServerState, UpdateSum
from fedguard.privacy.accountant import epsilon
from fedguard.seeding import derive_seed

META_KEY = "privacy"  # ServerState.meta: {"history": [[q, sigma], ...], "clip": C, "server_view": [...]}
MODES = ("central", "distributed")


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no infinity: an unbounded epsilon is null


def _generator(secure: bool, seed: int, *keys) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1 if secure else derive_seed(seed, *keys))
    return gen


@dataclass(frozen=True)
class AdaptiveClip:
    target_quantile: float  # γ: the fraction of updates that should end up unclipped
    learning_rate: float  # η
    count_stddev: float  # σ_b: noise on the count of unclipped clients

    def update_multiplier(self, sigma: float) -> float:
        """σ_Δ, the update's noise multiplier that leaves the pair (update, count) at the cost of σ."""
        if sigma == 0:
            return 0.0
        rest = sigma ** -2 - (2 * self.count_stddev) ** -2
        if rest <= 0:
            raise ValueError(f"adaptive clipping: noise multiplier {sigma:.4g} needs a count noise std above "
                             f"{sigma / 2:.4g} (privacy.clipped_count_stddev is {self.count_stddev:.4g}); raise it "
                             "or lower the noise multiplier")
        return rest ** -0.5


def clip_update(delta: dict[str, torch.Tensor], clip: float) -> tuple[dict[str, torch.Tensor], float, float]:
    """``delta`` scaled to L2 norm at most ``clip``: (clipped, norm before, scale applied)."""
    norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in delta.values()))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: d.double() * scale for k, d in delta.items()}, norm, scale


def privatize_update(tensors: AdapterState, start: AdapterState, keys, rc: RoundConfig,
                     client_id: str) -> tuple[AdapterState, dict[str, float]]:
    """The client's half: clip its update to ``rc.update_clip`` (norm bounding before secure aggregation, or
    distributed DP) and add its share of the noise, ``rc.update_noise_std`` per coordinate. Returns the tensors
    it sends and the metrics it reports: the bit [norm ≤ C] (with its noise share under distributed adaptive
    clipping) for adaptive clipping; never the norm itself."""
    delta = {k: tensors[k].double() - start[k].double() for k in keys}
    clipped, norm, _ = clip_update(delta, float(rc.update_clip))
    gen = _generator(not rc.update_noise_seeded, rc.seed, "client-dp-noise", rc.server_round, client_id)
    out = dict(tensors)
    for k in sorted(keys):
        noise = torch.randn(clipped[k].shape, generator=gen, dtype=torch.float64) * rc.update_noise_std \
            if rc.update_noise_std else 0.0
        out[k] = (start[k].double() + clipped[k] + noise).to(tensors[k].dtype)
    bit = float(norm <= rc.update_clip)
    if rc.update_bit_noise_std:
        bit += float(torch.randn((), generator=gen, dtype=torch.float64)) * rc.update_bit_noise_std
    return out, {"dp_unclipped": bit}


@dataclass
class ClientLevelDP:
    clip: float  # C at the start (fixed clipping: always)
    noise_multiplier: float  # σ: the accountant's multiplier; noise std on the sum is σ_Δ * C
    sample_rate: float  # q
    num_clients: int  # N
    delta: float
    accountant: str = "rdp"
    target_epsilon: float | None = None
    seed: int = 0
    secure_noise: bool = False  # True: noise from the OS's entropy (not reproducible); False: from the run seed
    mode: str = "central"
    adaptive: AdaptiveClip | None = None
    secure_aggregation: bool = False  # the server sees only the sum (it cannot clip: clients do)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown client-level DP mode '{self.mode}' (known: {', '.join(MODES)})")
        self.update_multiplier = self.adaptive.update_multiplier(self.noise_multiplier) if self.adaptive \
            else self.noise_multiplier

    @property
    def expected_clients(self) -> float:
        return self.sample_rate * self.num_clients

    @property
    def clients_clip(self) -> bool:
        """Whether clients clip their own update (distributed noise, or a server that only sees the sum)."""
        return self.mode == "distributed" or self.secure_aggregation

    # -- per round ---------------------------------------------------------------------------------------
    def current_clip(self, state: ServerState) -> float:
        return float(state.meta.get(META_KEY, {}).get("clip", self.clip))

    def client_requests(self, state: ServerState) -> dict[str, Any]:
        """What every client of the round is told (``RoundConfig`` fields)."""
        if not self.clients_clip:
            return {}
        clip = self.current_clip(state)
        share = 1 / math.sqrt(self.expected_clients) if self.mode == "distributed" else 0.0
        return {"update_clip": clip, "update_noise_std": self.update_multiplier * clip * share,
                "update_bit_noise_std": (self.adaptive.count_stddev * share) if self.adaptive else 0.0,
                "update_noise_seeded": not self.secure_noise}

    def clip_sum(self, sent_global: AdapterState, updates: list[ClientUpdate], weights: list[float] | None,
                 state: ServerState) -> UpdateSum:
        """The server's sum of the round's updates: clipped here (central) or as the clients sent them."""
        clip = self.current_clip(state)
        keys = sorted(sent_global)
        total = {k: torch.zeros_like(sent_global[k], dtype=torch.float64) for k in keys}
        norms, clipped, unclipped = [], 0, 0.0
        for i, u in enumerate(updates):
            delta = {k: u.tensors[k].double() - sent_global[k].double() for k in keys}
            if self.clients_clip:  # already clipped (and noised) by the client
                unclipped += float(u.metrics.get("dp_unclipped", 0.0))
            else:
                delta, norm, scale = clip_update(delta, clip)
                norms.append(norm)
                clipped += scale < 1.0
                unclipped += float(norm <= clip)
            w = 1.0 if weights is None else min(max(float(weights[i]), 0.0), 1.0)
            for k in keys:
                total[k] += delta[k] * w
        report = {"clipped": int(clipped), "median_norm": sorted(norms)[len(norms) // 2]} if norms else {}
        return UpdateSum(total, [u.client_id for u in updates], unclipped, report)

    def release(self, server_round: int, sent_global: AdapterState, summed: UpdateSum,
                state: ServerState) -> tuple[AdapterState, dict[str, Any], dict[str, Any]]:
        """The new sent tensors, the round's report and ``ServerState.meta[META_KEY]`` after the round."""
        clip = self.current_clip(state)
        gen = _generator(self.secure_noise, self.seed, "dp-noise", server_round)
        central_std = self.update_multiplier * clip if self.mode == "central" else 0.0
        out = {}
        for k in sorted(sent_global):
            noise = torch.randn(summed.total[k].shape, generator=gen, dtype=torch.float64) * central_std \
                if central_std else 0.0
            out[k] = (sent_global[k].double() + (summed.total[k] + noise) / self.expected_clients).to(
                sent_global[k].dtype)
        # what one round costs: σ; distributed noise comes from the n clients in the sum
        charged = self.noise_multiplier if self.mode == "central" else \
            self.noise_multiplier * math.sqrt(summed.count / self.expected_clients)
        previous = state.meta.get(META_KEY, {})
        meta = {"history": self.history(state) + [[self.sample_rate, charged]], "clip": clip}
        # The server's own view of one client: each update alone (distributed, no secure aggregation: that
        # client's noise share only; every round counted, the server knows who took part); nothing bounds it
        # when the server sees updates or their sum before the noise.
        if self.mode == "distributed" and not self.secure_aggregation:
            meta["server_view"] = list(previous.get("server_view", [])) + \
                [[1.0, self.noise_multiplier / math.sqrt(self.expected_clients)]]
        report = {"mode": self.mode, "clip": clip, "noise_multiplier": self.noise_multiplier,
                  "noise_multiplier_charged": charged, "sample_rate": self.sample_rate, "clients": summed.count,
                  "noise_std_on_mean": self.update_multiplier * clip * (
                      1.0 if self.mode == "central" else math.sqrt(summed.count / self.expected_clients))
                  / self.expected_clients, **summed.report}
        if self.adaptive is not None:
            count_noise = 0.0
            if self.mode == "central":
                count_noise = float(torch.randn((), generator=gen, dtype=torch.float64)) * self.adaptive.count_stddev
            fraction = (summed.unclipped + count_noise) / self.expected_clients
            meta["clip"] = clip * math.exp(-self.adaptive.learning_rate * (fraction - self.adaptive.target_quantile))
            report.update(unclipped_fraction=fraction, next_clip=meta["clip"],
                          update_noise_multiplier=self.update_multiplier)
        spent = epsilon(meta["history"], self.delta, self.accountant)
        report.update(epsilon=_finite(spent), delta=self.delta)
        report["epsilon_server_view"] = _finite(self._server_view(meta))
        return out, report, meta

    def aggregate(self, server_round: int, sent_global: AdapterState, updates: list[ClientUpdate],
                  weights: list[float] | None, state: ServerState | None = None
                  ) -> tuple[AdapterState, dict[str, Any]]:
        """Clip, sum and release in one call (central DP without secure aggregation)."""
        state = state or ServerState()
        out, report, _ = self.release(server_round, sent_global, self.clip_sum(sent_global, updates, weights, state),
                                      state)
        return out, report

    # -- accounting --------------------------------------------------------------------------------------
    @staticmethod
    def history(state: ServerState) -> list[list[float]]:
        return [list(h) for h in state.meta.get(META_KEY, {}).get("history", [])]

    def spent(self, state: ServerState) -> float:
        return epsilon(self.history(state), self.delta, self.accountant)

    def _server_view(self, meta: dict[str, Any]) -> float:
        if self.mode == "distributed" and self.secure_aggregation:
            return epsilon(meta["history"], self.delta, self.accountant)
        if "server_view" in meta and self.noise_multiplier > 0:
            return epsilon(meta["server_view"], self.delta, self.accountant)
        return math.inf

    def would_exceed(self, state: ServerState) -> bool:
        """Whether one more round (at the full expected noise) would spend more than ``target_epsilon``."""
        if self.target_epsilon is None:
            return False
        nxt = self.history(state) + [[self.sample_rate, self.noise_multiplier]]
        return epsilon(nxt, self.delta, self.accountant) > self.target_epsilon

