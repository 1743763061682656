"""Exact aggregation of LoRA adapters: the pure-tensor core.

A LoRA module computes ``W x + s · B A x`` with ``A`` (r × in), ``B`` (out × r) and the scaling
``s = alpha / r`` (PEFT's default; ``alpha / sqrt(r)`` with rsLoRA). What a client contributes to
the model is the product ``s · B A``, so what the server should average is

    M = Σ_k p_k s_k B_k A_k            (weights p_k ≥ 0, normalised to sum to 1).

FedAvg as OpenFedLLM / FedIT run it averages ``A`` and ``B`` separately, which gives
``s · (Σ p_k B_k)(Σ p_k A_k)`` — not ``M``: the cross terms ``p_j p_k B_j A_k`` are noise
(FFA-LoRA, Sun et al. ICLR 2024, arXiv 2403.12313; FLoRA, Wang et al. NeurIPS 2024,
arXiv 2409.05976; LoRA-FAIR, Bian et al. ICCV 2025, arXiv 2411.14961). This module offers:

* ``split_pairs`` / ``join_pairs``: an ``AdapterState`` (PEFT keys ``<module>.lora_A.weight`` and
  ``<module>.lora_B.weight``) as ``{module: LoraPair(A, B)}`` and back.
* ``product_average``: ``M`` re-factorised to rank r by truncated SVD (best rank-r approximation,
  Eckart–Young), with an ``AggregationReport`` giving, per module and overall, the relative
  Frobenius error of that refactorisation and of naive averaging (the separate A/B mean) against ``M``.
* FLoRA: ``flora_stack`` (stacking gives ``M`` exactly for mixed ranks), ``merge_delta`` and
  ``reinit_adapter`` (FLoRA merges ``M`` into the base weights and starts a fresh local LoRA each
  round).

FFA-LoRA needs nothing here: its clients send ``lora_B`` only (``transport.WireSpec``) and the
server's aggregator averages B with every A frozen, which is exact because A is shared.

Scaling is always explicit: every function that forms a product takes the per-client scalings
``s_k`` (see ``lora_scaling``) and, where it produces an adapter, the scaling
``out_scaling`` under which that adapter will be used (PEFT computes it from the adapter's rank, so
a rank-R stacked adapter loaded with ``lora_alpha = alpha`` runs with ``alpha / R``). All products,
SVDs and error norms are computed in float64; adapters come back in ``dtype`` (float32 by default,
the project's adapter format).

Module names are the PEFT key prefixes, e.g. ``base_model.model.model.layers.0.self_attn.q_proj``;
in the live PEFT model that module's frozen weight is ``<module>.base_layer.weight``
(``base_layer_key``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedguard.aggregators.base import normalised
from fedguard.model.keys import AdapterState, a_key, b_key, is_lora_a, module_of
from fedguard.model.lora import initial_adapter_state

Float = float | int


# ---------------------------------------------------------------------------------------------
# Pairing


@dataclass(frozen=True)
class LoraPair:
    """One LoRA module: ``A`` (r × in) and ``B`` (out × r)."""

    A: torch.Tensor
    B: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])














def split_pairs(adapter: Mapping[str, torch.Tensor]) -> dict[str, LoraPair]:
    """Group an ``AdapterState`` into ``{module: LoraPair}`` (modules sorted by name).

    Raises ValueError for a key that is not a LoRA A/B weight, a module missing its A or B, a
    tensor that is not 2-D, or A and B whose ranks differ.
    """
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    for key, t in adapter.items():
        module = module_of(key)
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{key}: expected a 2-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
        (a if is_lora_a(key) else b)[module] = t
    unpaired = sorted(set(a) ^ set(b))
    if unpaired:
        m = unpaired[0]
        raise ValueError(f"{m}: has {'lora_A' if m in a else 'lora_B'} but not its partner ({len(unpaired)} unpaired modules)")
    pairs: dict[str, LoraPair] = {}
    for m in sorted(a):
        if a[m].shape[0] != b[m].shape[1]:
            raise ValueError(f"{m}: lora_A has rank {a[m].shape[0]} but lora_B has rank {b[m].shape[1]}")
        pairs[m] = LoraPair(a[m], b[m])
    return pairs


def join_pairs(pairs: Mapping[str, LoraPair]) -> AdapterState:
    """Inverse of ``split_pairs``: ``{module: LoraPair}`` -> PEFT-keyed ``AdapterState``."""
    out: AdapterState = {}
    for m in sorted(pairs):
        out[a_key(m)] = pairs[m].A
        out[b_key(m)] = pairs[m].B
    return out


def adapter_ranks(adapter: Mapping[str, torch.Tensor]) -> dict[str, int]:
    return {m: p.rank for m, p in split_pairs(adapter).items()}


# ---------------------------------------------------------------------------------------------
# Scaling, weights, low-rank products


def lora_scaling(alpha: Float, rank: int, *, rslora: bool = False) -> float:
    """PEFT's LoRA scaling: ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``)."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


def _weights(weights: Sequence[Float] | None, n: int) -> torch.Tensor:
    """One weight per adapter (uniform when None), normalised to sum to 1 in float64."""
    if weights is not None and len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} adapters")
    return normalised([1.0] * n if weights is None else weights)


def _scalings(scalings: Float | Sequence[Float], n: int) -> list[float]:
    s = [float(scalings)] * n if isinstance(scalings, (int, float)) else [float(x) for x in scalings]
    if len(s) != n:
        raise ValueError(f"{len(s)} scalings for {n} adapters")
    if not all(math.isfinite(x) for x in s):
        raise ValueError(f"scalings must be finite: {s}")
    return s


def _client_pairs(adapters: Sequence[Mapping[str, torch.Tensor]]) -> tuple[list[str], list[dict[str, LoraPair]]]:
    """Pairs of every client; all clients must have the same modules with matching in/out sizes."""
    if not adapters:
        raise ValueError("at least one client adapter is required")
    per_client = [split_pairs(ad) for ad in adapters]
    modules = list(per_client[0])
    for i, pairs in enumerate(per_client[1:], start=1):
        if list(pairs) != modules:
            diff = sorted(set(pairs) ^ set(modules))
            raise ValueError(f"client {i} has different LoRA modules than client 0 (e.g. {diff[:2]})")
        for m in modules:
            p, q = pairs[m], per_client[0][m]
            if (p.in_features, p.out_features) != (q.in_features, q.out_features):
                raise ValueError(f"client {i} module {m}: (out, in) = {(p.out_features, p.in_features)}, "
                                 f"client 0 has {(q.out_features, q.in_features)}")
    return modules, per_client


def _stacked(per_client: list[dict[str, LoraPair]], module: str, coef: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA stacking in float64: B = [c_1 B_1 | ... | c_K B_K], A = [A_1; ...; A_K], so B A = Σ c_k B_k A_k."""
    B = torch.cat([c * pairs[module].B.double() for c, pairs in zip(coef, per_client)], dim=1)
    A = torch.cat([pairs[module].A.double() for pairs in per_client], dim=0)
    return B, A


def lowrank_fro(X: torch.Tensor, Y: torch.Tensor) -> float:
    """``‖X @ Y‖_F`` without forming the product: with X = Q_X R_X and Yᵀ = Q_Y R_Y (QR),
    ``‖X Y‖_F = ‖R_X R_Yᵀ‖_F``. Cost O((out + in) m²) for inner size m; backward stable in float64."""
    X, Y = X.double(), Y.double()
    if X.shape[1] == 0:
        return 0.0
    rx = torch.linalg.qr(X, mode="r").R
    ry = torch.linalg.qr(Y.T, mode="r").R
    return float(torch.linalg.matrix_norm(rx @ ry.T))


def lowrank_svd(X: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``U S Vh`` of ``X @ Y`` (float64) via QR of the factors and an SVD of the small core."""
    X, Y = X.double(), Y.double()
    qx, rx = torch.linalg.qr(X)
    qy, ry = torch.linalg.qr(Y.T)
    u, s, vh = torch.linalg.svd(rx @ ry.T, full_matrices=False)
    return qx @ u, s, vh @ qy.T


# ---------------------------------------------------------------------------------------------
# Reports


@dataclass(frozen=True)
class AggregationError:
    """How far one module's aggregate is from the exact weighted mean ``M = Σ p_k s_k B_k A_k``.

    ``*_abs`` are Frobenius norms of (aggregate − M) in ΔW units; ``*_rel`` divide by ``‖M‖_F``.
    ``naive_abs`` is None where naive averaging is undefined (clients of different rank).
    ``singular_values`` are those of ``M`` (at most Σ r_k of them).
    """

    module: str
    rank: int
    exact_norm: float
    refactor_abs: float
    naive_abs: float | None
    singular_values: tuple[float, ...] = ()

    @staticmethod
    def _rel(err: float, norm: float) -> float:
        if norm > 0:
            return err / norm
        return 0.0 if err == 0 else math.inf

    @property
    def refactor_rel(self) -> float:
        return self._rel(self.refactor_abs, self.exact_norm)

    @property
    def naive_rel(self) -> float | None:
        return None if self.naive_abs is None else self._rel(self.naive_abs, self.exact_norm)

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "rank": self.rank, "exact_norm": self.exact_norm,
                "refactor_abs": self.refactor_abs, "refactor_rel": self.refactor_rel,
                "naive_abs": self.naive_abs, "naive_rel": self.naive_rel,
                "singular_values": list(self.singular_values)}


@dataclass(frozen=True)
class AggregationReport:
    """Per-module ``AggregationError`` plus overall errors over all modules (norms of the concatenation)."""

    modules: dict[str, AggregationError]

    @property
    def exact_norm(self) -> float:
        return math.sqrt(sum(e.exact_norm ** 2 for e in self.modules.values()))

    @property
    def refactor_rel(self) -> float:
        err = math.sqrt(sum(e.refactor_abs ** 2 for e in self.modules.values()))
        return AggregationError._rel(err, self.exact_norm)

    @property
    def naive_rel(self) -> float | None:
        if any(e.naive_abs is None for e in self.modules.values()):
            return None
        err = math.sqrt(sum(e.naive_abs ** 2 for e in self.modules.values()))  # type: ignore[operator]
        return AggregationError._rel(err, self.exact_norm)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary: overall errors plus every module's."""
        return {"exact_norm": self.exact_norm, "refactor_rel": self.refactor_rel, "naive_rel": self.naive_rel,
                "modules": {m: e.to_dict() for m, e in self.modules.items()}}


@dataclass(frozen=True)
class ExactAggregate:
    """An aggregated adapter, the scaling it is meant to run with, and how exact it is."""

    adapter: AdapterState
    scaling: float
    report: AggregationReport


# ---------------------------------------------------------------------------------------------
# Naive vs exact product averaging


def _homogeneous(per_client: list[dict[str, LoraPair]], module: str) -> bool:
    return len({pairs[module].rank for pairs in per_client}) == 1


def _weighted_pairs(adapters, weights, scalings, out_scaling):
    """Each client's (A, B) per module, its weight p_k and coefficient p_k · s_k; ``out_scaling`` checked."""
    modules, per_client = _client_pairs(adapters)
    w = _weights(weights, len(adapters))
    s = _scalings(scalings, len(adapters))
    out_scaling = float(out_scaling)
    if not math.isfinite(out_scaling) or out_scaling == 0:
        raise ValueError(f"out_scaling must be finite and non-zero, got {out_scaling}")
    return modules, per_client, w, [float(wk) * sk for wk, sk in zip(w, s)], out_scaling


def product_average(
    adapters: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[Float] | None = None,
    *,
    scalings: Float | Sequence[Float],
    out_scaling: Float,
    rank: int | None = None,
    dtype: torch.dtype = torch.float32,
    fill_seed: int | None = None,
) -> ExactAggregate:
    """Exact weighted mean of the clients' LoRA products, re-factorised to rank ``rank``.

    Per module, ``M = Σ p_k s_k B_k A_k`` (``p`` = normalised ``weights``, ``s_k`` = ``scalings``)
    is factorised without forming it densely (QR of the FLoRA-stacked factors, SVD of the small
    core) as ``M = U S Vᵀ``; with ``T = M / out_scaling = U S' Vᵀ`` the new adapter is

        B = U_r sqrt(S'_r),   A = sqrt(S'_r) V_rᵀ      (singular values split symmetrically),

    so ``out_scaling · B A`` is the best rank-r approximation of ``M`` (Eckart–Young): its error is
    ``sqrt(Σ_{i>r} σ_i²)``, zero when ``rank ≥ Σ r_k``. When ``rank`` exceeds the rank available
    the extra rows of A / columns of B are zero. ``rank`` defaults to the largest client rank.

    Directions M does not use (zero singular values, or beyond its rank) get zero rows of A and
    zero columns of B by default; such directions can never train again (both gradients vanish).
    Pass ``fill_seed`` to draw those rows of A Kaiming-uniform instead (B stays zero there, so the
    product is unchanged) when the result starts the next round of training.

    The report also gives the error of naive separate averaging (``out_scaling · B̄ Ā``) where all
    clients share a rank. ``out_scaling`` must be the scaling the new adapter runs with (PEFT:
    ``alpha / rank``); it is not inferred, so that mixed ranks cannot silently mis-scale.
    """
    modules, per_client, w, coef, out_scaling = _weighted_pairs(adapters, weights, scalings, out_scaling)
    g = torch.Generator().manual_seed(int(fill_seed)) if fill_seed is not None else None
    out: dict[str, LoraPair] = {}
    errors: dict[str, AggregationError] = {}
    for m in modules:
        r = rank if rank is not None else max(pairs[m].rank for pairs in per_client)
        if r <= 0:
            raise ValueError(f"rank must be positive, got {r}")
        Bs, As = _stacked(per_client, m, coef)
        U, S, Vh = lowrank_svd(Bs, As)
        k = min(r, S.numel())
        root = torch.sqrt(S[:k] / abs(out_scaling))
        sign = 1.0 if out_scaling > 0 else -1.0
        B = torch.zeros(Bs.shape[0], r, dtype=torch.float64)
        A = torch.zeros(r, As.shape[1], dtype=torch.float64)
        B[:, :k] = sign * U[:, :k] * root
        A[:k] = root[:, None] * Vh[:k]
        if g is not None:
            tol = float(S.max()) * max(Bs.shape[0], As.shape[1]) * torch.finfo(torch.float64).eps if S.numel() else 0.0
            used = int((S[:k] > tol).sum())
            if used < r:
                fill = torch.empty(r - used, As.shape[1], dtype=torch.float64)
                torch.nn.init.kaiming_uniform_(fill, a=math.sqrt(5), generator=g)
                A[used:], B[:, used:] = fill, 0.0
        out[m] = LoraPair(A.to(dtype), B.to(dtype))
        # Errors measured against M itself (not from the tail of S), with the adapter as stored.
        refactor = lowrank_fro(torch.cat([Bs, -out_scaling * out[m].B.double()], 1),
                               torch.cat([As, out[m].A.double()], 0))
        naive = None
        if _homogeneous(per_client, m):
            Bn = sum(float(wk) * pairs[m].B.double() for wk, pairs in zip(w, per_client))
            An = sum(float(wk) * pairs[m].A.double() for wk, pairs in zip(w, per_client))
            naive = lowrank_fro(torch.cat([Bs, -out_scaling * Bn], 1), torch.cat([As, An], 0))
        errors[m] = AggregationError(m, r, float(torch.linalg.vector_norm(S)), refactor, naive,
                                     tuple(float(x) for x in S))
    return ExactAggregate(join_pairs(out), out_scaling, AggregationReport(errors))


# ---------------------------------------------------------------------------------------------
# FLoRA (Wang et al., NeurIPS 2024, arXiv 2409.05976)


@dataclass(frozen=True)
class FloraAggregate:
    """FLoRA's stacked global adapter and the dense update it stands for.

    ``adapter`` has rank ``Σ r_k`` per module and satisfies ``scaling · B A == delta`` (up to
    ``dtype`` rounding); ``delta[module]`` is ``Σ p_k s_k B_k A_k`` (out × in), what FLoRA merges
    into the base weight (``merge_delta``). ``ranks[k]`` is client k's rank per module.
    """

    adapter: AdapterState
    delta: dict[str, torch.Tensor]
    scaling: float
    ranks: tuple[dict[str, int], ...]


def flora_stack(
    adapters: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[Float] | None = None,
    *,
    scalings: Float | Sequence[Float],
    out_scaling: Float = 1.0,
    dtype: torch.dtype = torch.float32,
    delta_dtype: torch.dtype = torch.float64,
) -> FloraAggregate:
    """Stack heterogeneous-rank client adapters (FLoRA): exact, no padding, no cross terms.

    With ``c_k = p_k s_k / out_scaling``: ``B = [c_1 B_1 | … | c_K B_K]`` (out × Σr_k) and
    ``A = [A_1; …; A_K]`` (Σr_k × in), so ``out_scaling · B A = Σ p_k s_k B_k A_k`` exactly; each
    client keeps its own scaling ``s_k = alpha / r_k`` (``lora_scaling(alpha, r_k)``).
    Per FLoRA, the server sends the stacked adapter (traffic grows with Σ r_k), every client merges
    ``delta`` into its base weights and starts the next round from a fresh ``reinit_adapter``.
    ``out_scaling`` = 1.0 makes the stacked adapter carry the whole scaling in B; pass
    ``alpha / Σr_k`` to load it into a PEFT LoRA of rank Σ r_k with ``lora_alpha = alpha``.
    """
    modules, per_client, _, coef, out_scaling = _weighted_pairs(adapters, weights, scalings, out_scaling)
    stacked: dict[str, LoraPair] = {}
    delta: dict[str, torch.Tensor] = {}
    for m in modules:
        Bs, As = _stacked(per_client, m, coef)
        delta[m] = (Bs @ As).to(delta_dtype)
        stacked[m] = LoraPair(As.to(dtype), (Bs / out_scaling).to(dtype))
    ranks = tuple({m: pairs[m].rank for m in modules} for pairs in per_client)
    return FloraAggregate(join_pairs(stacked), delta, out_scaling, ranks)


def merge_delta(base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{module: W + ΔW}`` (new tensors, in W's dtype; the sum is done in float64).

    ``base`` maps module names to base weights (in a PEFT model: ``base_layer_key(module)``);
    every module of ``delta`` must be present with the same (out, in) shape.
    """
    out: dict[str, torch.Tensor] = {}
    for m, d in delta.items():
        if m not in base:
            raise ValueError(f"no base weight for module {m}")
        W = base[m]
        if tuple(W.shape) != tuple(d.shape):
            raise ValueError(f"{m}: base weight {tuple(W.shape)} vs delta {tuple(d.shape)}")
        out[m] = (W.double() + d.double()).to(W.dtype)
    return out


def reinit_adapter(shapes: Mapping[str, Sequence[int]], rank: int, seed: int, *, dtype: torch.dtype = torch.float32) -> AdapterState:
    """A fresh LoRA adapter of rank ``rank`` for the modules in ``shapes`` (PEFT keys -> shapes, any rank).

    ``fedguard.model.lora.initial_adapter_state`` at the new rank (PEFT's default init, A
    Kaiming-uniform and B = 0, from a generator seeded with ``seed``), so it equals θ₀ when ``rank``
    is the shapes' rank. FLoRA re-initialises every round: derive the seed from the round so rounds
    differ but runs repeat.
    """
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    modules: dict[str, tuple[int, int]] = {}
    for key, shape in shapes.items():
        m = module_of(key)
        if len(shape) != 2:
            raise ValueError(f"{key}: expected a 2-D shape, got {tuple(shape)}")
        inn, out = modules.get(m, (-1, -1))
        if is_lora_a(key):
            inn = int(shape[1])
        else:
            out = int(shape[0])
        modules[m] = (inn, out)
    target: dict[str, tuple[int, ...]] = {}
    for m, (inn, out) in modules.items():
        if inn < 0 or out < 0:
            raise ValueError(f"{m}: shapes need both lora_A and lora_B")
        target[a_key(m)] = (rank, inn)
        target[b_key(m)] = (out, rank)
    return {k: t.to(dtype) for k, t in initial_adapter_state(target, seed).items()}
