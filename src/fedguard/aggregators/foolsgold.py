"""FoolsGold (Fung et al., RAID 2020): down-weight clients whose update histories look alike (sybils)."""

from __future__ import annotations

import logging

import torch

from fedguard.aggregators.base import Aggregator, cosine_similarities, read_state, weighted_average, write_state

log = logging.getLogger(__name__)

_ROUNDING = 1e-12  # cosine similarities this close to 1 are identical directions


def foolsgold_weights(histories: torch.Tensor, confidence: float = 1.0) -> torch.Tensor:
    """FoolsGold's per-client learning rates α ∈ [0, 1] from the histories [n, d] (Algorithm 1):
    pairwise cosine similarity, pardoning, 1 − max similarity, rescaling, and the logit with κ."""
    n = histories.shape[0]
    similarity = cosine_similarities(histories) - torch.eye(n, dtype=torch.float64)
    max_similarity = similarity.max(dim=1).values  # ≥ 0: the diagonal is 0
    # Pardoning: a client less suspicious than a peer is not penalised by that peer's similarity.
    less_suspicious = max_similarity[:, None] < max_similarity[None, :]
    ratio = max_similarity[:, None] / max_similarity[None, :].clamp_min(torch.finfo(torch.float64).tiny)
    similarity = torch.where(less_suspicious, similarity * ratio, similarity)
    alpha = (1.0 - similarity.max(dim=1).values).clamp(0.0, 1.0)
    # identical histories have cosine 1 only up to rounding; without this the rescaling below would
    # blow a rounding residue up to full weight
    alpha = torch.where(alpha <= _ROUNDING, 0.0, alpha)
    if float(alpha.max()) == 0.0:  # every history has a twin
        return alpha
    alpha = alpha / alpha.max()
    alpha = torch.where(alpha == 1.0, torch.full_like(alpha, 0.99), alpha)
    alpha = confidence * (torch.log(alpha / (1.0 - alpha)) + 0.5)
    return alpha.nan_to_num(nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)


class FoolsGold(Aggregator):
    """FoolsGold with per-client update histories accumulated across rounds (kept in
    ``ServerState.tensors`` under ``foolsgold/history/<client id>``, so they checkpoint).

    The aggregate is Σ_i α_i c_i Δ_i / Σ_i c_i (c: defense weights): α acts as each client's learning
    rate, as in the paper. ``history=False`` is the Safe-FedLLM variant, similarity of this round's
    deltas only; that code also divides by the number of clients with α > 0 instead. The optional
    feature-importance weighting of the paper is not implemented. A client weighted 0 by the defense
    adds nothing to its history.
    """

    name = "foolsgold"

    def __init__(self, history: bool = True, confidence: float = 1.0):
        if not confidence > 0:
            raise ValueError(f"the FoolsGold confidence kappa must be positive, got {confidence}")
        self.history, self.confidence = bool(history), float(confidence)

    @classmethod
    def from_config(cls, server, seed):
        return cls(server.foolsgold.history, server.foolsgold.confidence)

    def accumulate(self, batch, state) -> torch.Tensor:
        """Each client's history including this round's delta, stored back into the state."""
        totals = []
        for client_id, delta in zip(batch.client_ids, batch.deltas):
            key = f"{self.name}/history/{client_id}"
            past = read_state(state, key, batch.layout.size)
            total = delta if past is None else past + delta
            write_state(state, key, total)
            totals.append(total)
        return torch.stack(totals)

    def combine(self, batch, state):
        features = self.accumulate(batch, state) if self.history else batch.deltas
        alpha = foolsgold_weights(features, self.confidence)
        self.record_shares(batch, alpha)  # α is how much of its delta each client adds
        if float(alpha.max()) == 0.0:
            log.warning("foolsgold: every client got learning rate 0; the global adapter is unchanged")
        return weighted_average(batch.deltas * alpha[:, None], batch.weights)
