"""Aggregation strategies: how the server combines the clients' LoRA adapters (see ``base``).

Adding a method is one new file with an ``AggregationStrategy`` subclass and one line in ``STRATEGIES`` (or
``register_strategy`` from outside the package); ``server.lora_aggregation`` (FLoRA: ``lora.variant``) names it.
Client-level DP and secure summation wrap a strategy (``private``)."""

from __future__ import annotations

from fedguard.federated.strategies.base import Aggregated, AggregationStrategy, RoundInput
from fedguard.federated.strategies.flora import FLoRAStacking, flora_merged
from fedguard.federated.strategies.naive import NaiveRule
from fedguard.federated.strategies.private import ClientLevelDPRelease, SecureSummation
from fedguard.federated.strategies.product import ProductAveraging

STRATEGIES: dict[str, type[AggregationStrategy]] = {
    NaiveRule.name: NaiveRule,
    ProductAveraging.name: ProductAveraging,
    FLoRAStacking.name: FLoRAStacking,
}

__all__ = ["STRATEGIES", "Aggregated", "AggregationStrategy", "ClientLevelDPRelease", "FLoRAStacking", "NaiveRule",
           "ProductAveraging", "RoundInput", "SecureSummation", "build_strategy", "flora_merged", "register_strategy"]


def register_strategy(cls: type[AggregationStrategy]) -> type[AggregationStrategy]:
    """Make ``cls`` available by its ``name`` (usable as a class decorator)."""
    STRATEGIES[cls.name] = cls
    return cls


def build_strategy(name: str, aggregator, lora_alpha: float = 1.0, seed: int = 0) -> AggregationStrategy:
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown lora_aggregation '{name}' (known: {', '.join(sorted(STRATEGIES))})") from None
    return cls.build(aggregator, lora_alpha, seed)
