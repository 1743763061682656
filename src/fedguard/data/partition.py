"""Split a pool of examples across clients: IID, or Dirichlet over domains (label skew)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def partition_iid(n: int, num_clients: int, rng: np.random.Generator) -> list[list[int]]:
    """Shuffle and deal out as evenly as possible (sizes differ by at most one)."""
    order = rng.permutation(n)
    return [sorted(order[i::num_clients].tolist()) for i in range(num_clients)]


def partition_dirichlet(domains: Sequence[str], num_clients: int, alpha: float, rng: np.random.Generator,
                        min_per_client: int = 1) -> list[list[int]]:
    """Each domain's examples are split across clients in proportions drawn from Dir(alpha).

    Small alpha gives each client a few dominant domains; large alpha approaches IID. Draws are
    repeated (from the same seeded stream) until every client has ``min_per_client`` examples.
    """
    if len(domains) < num_clients * min_per_client:
        raise ValueError(f"{len(domains)} examples cannot give {num_clients} clients {min_per_client} each")
    by_domain: dict[str, list[int]] = {}
    for i, d in enumerate(domains):
        by_domain.setdefault(d, []).append(i)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for d in sorted(by_domain):
            idx = np.array(by_domain[d])
            rng.shuffle(idx)
            props = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for c, chunk in enumerate(np.split(idx, cuts)):
                parts[c].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_per_client:
            return [sorted(p) for p in parts]
    raise ValueError(f"Dirichlet(alpha={alpha}) left a client with fewer than {min_per_client} examples")
