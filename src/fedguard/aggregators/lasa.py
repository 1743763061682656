"""LASA (Xu et al., WACV 2025, "Achieving Byzantine-resilient federated learning via layer-adaptive
sparsified model aggregation"), the rule Safe-FedLLM added to its baselines."""

from __future__ import annotations

import torch

from fedguard.aggregators.base import Aggregator, median_norm, weighted_average, weighted_median
from fedguard.aggregators.clipping import clip_rows


def sparsify(rows: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per row, keep the ⌊d·(1 − sparsity)⌋ entries largest in magnitude (ties at the cut kept, zeros
    never) and zero the rest. LASA's code keeps only entries strictly above the cut, one fewer."""
    if sparsity == 0:
        return rows
    keep = max(int(rows.shape[1] * (1 - sparsity)), 1)
    magnitude = rows.abs()
    cut = torch.topk(magnitude, keep, dim=1).values[:, -1:]
    return torch.where((magnitude >= cut) & (magnitude > 0), rows, 0.0)


def sign_purity(layer: torch.Tensor, sparsity: float) -> torch.Tensor:
    """½(1 + Σ sign / #non-zero · (1 − sparsity)) per row, as in LASA's code; ½ for an all-zero row."""
    signs = torch.sign(layer)
    nonzero = signs.abs().sum(dim=1)
    return torch.where(nonzero > 0, 0.5 * (1 + signs.sum(dim=1) / nonzero.clamp_min(1) * (1 - sparsity)), 0.5)


def mz_screen(values: torch.Tensor, bound: float) -> torch.Tensor:
    """|x − median| / std < bound (population std, as LASA); everyone passes when the values agree."""
    spread = float(values.std(correction=0))
    if spread == 0:
        return torch.ones_like(values, dtype=torch.bool)
    centre = weighted_median(values, torch.ones_like(values))
    return (values - centre).abs() / spread < bound


class Lasa(Aggregator):
    """LASA: clip every delta to the median delta norm; sparsify each client's delta (top-k by
    magnitude over all tensors); then per layer (adapter tensor), keep the clients that pass both
    the norm screen (MZ-score of the layer norm < λ_n) and the sign screen (MZ-score of the sign
    purity < λ_s), everyone if nobody does, and add their mean (weighted by the defense weights)
    of the clipped, sparsified layer.
    """

    name = "lasa"

    def __init__(self, sparsity: float = 0.3, lambda_n: float = 1.0, lambda_s: float = 1.0):
        if not (0 <= sparsity < 1 and lambda_n > 0 and lambda_s > 0):
            raise ValueError(f"lasa needs 0 <= sparsity < 1 and positive bounds, got {sparsity}, {lambda_n}, "
                             f"{lambda_s}")
        self.sparsity, self.lambda_n, self.lambda_s = float(sparsity), float(lambda_n), float(lambda_s)

    @classmethod
    def from_config(cls, server, seed):
        c = server.lasa
        return cls(c.sparsity, c.lambda_n, c.lambda_s)

    def combine(self, batch, state):
        rows = sparsify(clip_rows(batch.deltas, median_norm(batch.deltas)), self.sparsity)
        out = torch.zeros(batch.layout.size, dtype=torch.float64)
        layers = batch.layout.slices().values()
        chosen_in = torch.zeros(batch.n, dtype=torch.float64)  # per client, the layers it was chosen in
        for columns in layers:
            layer = rows[:, columns]
            passes = mz_screen(layer.norm(dim=1), self.lambda_n) & \
                mz_screen(sign_purity(layer, self.sparsity), self.lambda_s)
            chosen = passes.nonzero().flatten() if bool(passes.any()) else torch.arange(batch.n)
            chosen_in[chosen] += 1
            out[columns] = weighted_average(layer[chosen], batch.weights[chosen])
        self.record_shares(batch, chosen_in / len(layers))  # LASA screens per layer: the share of layers
        return out
