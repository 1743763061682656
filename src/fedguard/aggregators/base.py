"""What every aggregation rule shares: the interface, client deltas, defense-weight composition, state.

Every rule works on client deltas Δ_i = θ_i − θ_global, flattened over all adapter tensors (keys in
sorted order) into float64 rows, and returns θ_global + (aggregated Δ), cast back to each tensor's
dtype. A rule implements ``combine`` (deltas -> one delta); ``Aggregator.aggregate`` does the rest.

Safe-FedLLM defense weights compose with every rule the same way (the official code lets only
FedAvg-type rules read them, see shared/reference/safe-fedllm.md §3.0 and §6):

1. A client whose weight is 0 is removed before anything else: it counts for nothing, not even in n
   (which bounds f), in a statistic, a clustering or a client history.
2. Screening statistics (distances, scores, clusters, norm bounds) are computed on the remaining
   clients unweighted: a defense weight is not a vote on who is an outlier.
3. The rule's output statistic carries the weights: a mean becomes a mean weighted by the rule's own
   weight times the defense weight, a median a weighted median, a trimmed mean a weighted mean of the
   values kept, a geometric median a weighted one.
4. If every weight is 0 the global adapter is returned unchanged, and no state moves.

Stateful rules keep their state as float64 vectors in ``ServerState.tensors`` under keys prefixed by
the rule's name, so the round checkpoint (safetensors) carries it; the current round is
``state.round + 1`` and seeds every random stream, so a resumed run draws the same numbers.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fedguard.messages import AdapterState, ClientUpdate, ServerState

if TYPE_CHECKING:
    from fedguard.config import ServerConfig

log = logging.getLogger(__name__)


# -- flattening ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterLayout:
    """Where each adapter tensor lives in the flat vector: sorted keys, so dict order never matters."""

    keys: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]
    offsets: tuple[int, ...]  # start of each key, plus the total size at the end

    @classmethod
    def of(cls, adapter: AdapterState) -> AdapterLayout:
        keys = tuple(sorted(adapter))
        shapes = tuple(adapter[k].shape for k in keys)
        offsets = [0]
        for s in shapes:
            offsets.append(offsets[-1] + s.numel())
        return cls(keys, shapes, tuple(adapter[k].dtype for k in keys), tuple(offsets))

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def slices(self) -> dict[str, slice]:
        return {k: slice(a, b) for k, a, b in zip(self.keys, self.offsets, self.offsets[1:])}

    def flatten(self, adapter: AdapterState) -> torch.Tensor:
        if set(adapter) != set(self.keys):
            raise ValueError("an update's adapter keys differ from the global adapter's")
        return torch.cat([adapter[k].detach().reshape(-1).to("cpu", torch.float64) for k in self.keys])

    def unflatten(self, flat: torch.Tensor) -> AdapterState:
        return {k: flat[sl].reshape(shape).to(dtype).clone()
                for (k, sl), shape, dtype in zip(self.slices().items(), self.shapes, self.dtypes)}


@dataclass(frozen=True)
class ClientDeltas:
    """The round's updates as the rules see them: only clients with a positive defense weight."""

    client_ids: tuple[str, ...]
    deltas: torch.Tensor  # [n, d] float64
    num_examples: torch.Tensor  # [n] float64
    weights: torch.Tensor  # [n] float64, defense weights, all > 0 (1.0 without a defense)
    layout: AdapterLayout
    server_round: int

    @property
    def n(self) -> int:
        return self.deltas.shape[0]

    def subset(self, rows: Sequence[int] | torch.Tensor) -> ClientDeltas:
        idx = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        return ClientDeltas(tuple(self.client_ids[int(i)] for i in idx), self.deltas[idx], self.num_examples[idx],
                            self.weights[idx], self.layout, self.server_round)


# -- the interface ---------------------------------------------------------------------------------------
class Aggregator(ABC):
    """A server aggregation rule, chosen by ``name`` in the config (``server.aggregator``)."""

    name: ClassVar[str]
    # After ``aggregate``, for rules that screen clients: each counted client's id -> the share in [0, 1]
    # in which it counted (1 kept, 0 screened out), so a simulation can score the rule against ground
    # truth. None for rules that do not screen (mean, median, trimmed mean, geomed, norm clipping,
    # residual, the optimisers), and when every defense weight is 0; a client weighted 0 is not in it.
    screening: dict[str, float] | None = None

    @classmethod
    def from_config(cls, server: ServerConfig, seed: int) -> Aggregator:
        """The rule with the hyper-parameters of its ``server.<section>``; ``seed`` seeds its random streams."""
        return cls()

    def client_config(self) -> dict[str, Any]:
        """RoundConfig fields this rule sets on every client (FedProx: the proximal coefficient)."""
        return {}

    def aggregate(self, global_adapter: AdapterState, updates: Sequence[ClientUpdate], state: ServerState,
                  client_weights: Sequence[float] | None = None) -> AdapterState:
        """New global adapter from at least one validated update; see the module doc for ``client_weights``."""
        self.screening = None  # a screening rule sets it in combine; never last round's
        if not updates:
            raise ValueError("aggregation needs at least one update")
        counted = counted_updates(updates, client_weights)
        if not counted:  # every client weighted to zero: keep the global adapter
            return {k: v.clone() for k, v in global_adapter.items()}
        layout = AdapterLayout.of(global_adapter)
        base = layout.flatten(global_adapter)
        batch = ClientDeltas(
            client_ids=tuple(str(c.update.client_id) for c in counted),
            deltas=torch.stack([layout.flatten(c.update.tensors) - base for c in counted]),
            num_examples=torch.tensor([float(c.update.num_examples) for c in counted], dtype=torch.float64),
            weights=torch.tensor([c.defense_weight for c in counted], dtype=torch.float64),
            layout=layout,
            server_round=state.round + 1,
        )
        delta = self.combine(batch, state)
        if delta.shape != base.shape or not bool(torch.isfinite(delta).all()):
            raise RuntimeError(f"aggregator '{self.name}' produced a malformed or non-finite delta")
        return layout.unflatten(base + delta)

    @abstractmethod
    def combine(self, batch: ClientDeltas, state: ServerState) -> torch.Tensor:
        """The aggregated delta [d] (float64) of the clients in ``batch``; may update ``state.tensors``."""

    def record_shares(self, batch: ClientDeltas, shares: torch.Tensor | Sequence[float]) -> None:
        """``screening`` from one share in [0, 1] per client of ``batch``, in batch order."""
        values = torch.as_tensor(shares, dtype=torch.float64).reshape(-1).tolist()
        self.screening = dict(zip(batch.client_ids, values, strict=True))

    def record_kept(self, batch: ClientDeltas, kept: Sequence[int] | torch.Tensor) -> None:
        """``screening`` of a rule that keeps the rows ``kept`` of ``batch`` whole and drops the rest."""
        rows = {int(i) for i in torch.as_tensor(kept, dtype=torch.long).reshape(-1)}
        self.record_shares(batch, [1.0 if i in rows else 0.0 for i in range(batch.n)])


@dataclass(frozen=True)
class CountedUpdate:
    """An update that counts this round (rule 1 of the module doc: its defense weight is positive)."""

    update: ClientUpdate
    defense_weight: float  # > 0; 1.0 without a defense

    @property
    def example_weight(self) -> float:
        """FedAvg's weight of the update: its number of examples times its defense weight."""
        return self.update.num_examples * self.defense_weight


def counted_updates(updates: Sequence[ClientUpdate], client_weights: Sequence[float] | None) -> list[CountedUpdate]:
    """The updates whose defense weight is positive, in order; empty if every weight is 0. ValueError
    unless there is one finite, non-negative weight per update (None: all 1.0)."""
    n = len(updates)
    weights = [1.0] * n if client_weights is None else [float(w) for w in client_weights]
    if len(weights) != n:
        raise ValueError(f"one client weight per update is required ({len(weights)} weights, {n} updates)")
    bad = [w for w in weights if not (w >= 0 and w != float("inf"))]  # also catches NaN
    if bad:
        raise ValueError(f"client weights must be finite and non-negative, got {bad}")
    return [CountedUpdate(u, w) for u, w in zip(updates, weights) if w > 0]


# -- weighted statistics -----------------------------------------------------------------------------------
def normalised(weights: torch.Tensor | Sequence[float]) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    if (w < 0).any() or not torch.isfinite(w).all() or float(w.sum()) <= 0:
        raise ValueError(f"aggregation weights must be finite, non-negative and not all zero: {w.tolist()}")
    return w / w.sum()


def weighted_average(rows: torch.Tensor, weights: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Σ_i w_i rows_i / Σ_i w_i over the first dimension."""
    return torch.tensordot(normalised(weights), rows.to(torch.float64), dims=1)


def weighted_mean(tensors: Sequence[AdapterState], weights: Sequence[float]) -> AdapterState:
    """Weighted mean of whole adapters, tensor by tensor, in each tensor's dtype."""
    w = normalised(list(weights))
    return {key: torch.tensordot(w, torch.stack([t[key].to(torch.float64) for t in tensors]), dims=1)
            .to(tensors[0][key].dtype) for key in tensors[0]}


def weighted_median(values: torch.Tensor, weights: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Coordinate-wise weighted median over the first dimension of ``values`` [n, ...].

    The smallest value whose cumulative weight reaches half the total; where the cumulative weight
    equals exactly half, the midpoint of that value and the next (so equal weights give the usual
    median, with the mean of the two middle values for even n).
    """
    w = normalised(weights)
    v = values.to(torch.float64)
    order = torch.argsort(v, dim=0, stable=True)
    sorted_v = torch.gather(v, 0, order)
    cum = torch.cumsum(w[order], dim=0)
    tol = 1e-12
    lower = (cum < 0.5 - tol).sum(dim=0, keepdim=True)  # first index reaching half the weight
    at_half = (cum.gather(0, lower) - 0.5).abs() <= tol
    upper = torch.clamp(lower + at_half.long(), max=v.shape[0] - 1)
    return ((sorted_v.gather(0, lower) + sorted_v.gather(0, upper)) / 2).squeeze(0)


def median_norm(rows: torch.Tensor) -> float:
    """The median L2 norm of the rows (unweighted: a screening statistic)."""
    norms = rows.norm(dim=1)
    return float(weighted_median(norms, torch.ones_like(norms)))


def pairwise_distances(rows: torch.Tensor) -> torch.Tensor:
    """Euclidean distances [n, n] without the cancellation of the ‖a‖² + ‖b‖² − 2ab shortcut."""
    return torch.cdist(rows, rows, compute_mode="donot_use_mm_for_euclid_dist")


def cosine_similarities(rows: torch.Tensor) -> torch.Tensor:
    """Cosine similarity matrix [n, n]; a zero row is similar to nothing (0)."""
    norms = rows.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, rows / norms.clamp_min(torch.finfo(rows.dtype).tiny), torch.zeros_like(rows))
    return (unit @ unit.T).clamp(-1.0, 1.0)


# -- f, the expected number of attackers -------------------------------------------------------------
def admissible_attackers(rule: str, f: int, n: int, largest: int, requirement: str) -> int:
    """``f`` if the rule's requirement on n holds, else the largest admissible value, with a warning."""
    largest = max(int(largest), 0)
    if f <= largest:
        return f
    log.warning("%s: %d updates are too few for f = %d (%s); using f = %d this round", rule, n, f, requirement, largest)
    return largest


# -- state in ServerState.tensors ---------------------------------------------------------------------------
def read_state(state: ServerState, key: str, size: int) -> torch.Tensor | None:
    """A float64 state vector of ``size`` entries, or None if the rule has not stored it yet."""
    t = state.tensors.get(key)
    if t is None:
        return None
    if t.dim() != 1 or t.numel() != size:
        raise ValueError(f"server state '{key}' has shape {tuple(t.shape)}; this adapter needs ({size},)")
    return t.to(torch.float64)


def write_state(state: ServerState, key: str, value: torch.Tensor) -> None:
    state.tensors[key] = value.detach().to("cpu", torch.float64).contiguous().clone()
