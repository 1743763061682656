"""The server's aggregation rule, chosen by name in the config (``server.aggregator``).

The rules themselves live in ``fedguard.aggregators`` (``base`` documents the interface, the
client-delta view, how Safe-FedLLM defense weights compose with every rule, and where stateful
rules keep their state); this module maps a ``ServerConfig`` to one of them.
"""

from __future__ import annotations

import logging

from fedguard.aggregators import ALL_RULES, Aggregator, FedAvg
from fedguard.config import ServerConfig

AGGREGATORS: dict[str, type[Aggregator]] = {cls.name: cls for cls in ALL_RULES}
# Rules whose screening is sized by f (Krum's neighbourhood, Bulyan's selection, DnC's filter).
NEEDS_ATTACKER_COUNT = frozenset({"krum", "multikrum", "bulyan", "dnc"})

log = logging.getLogger(__name__)

__all__ = ["AGGREGATORS", "Aggregator", "FedAvg", "build_aggregator"]


def build_aggregator(server: ServerConfig | str, seed: int = 0) -> Aggregator:
    """The rule named by ``server.aggregator`` with its hyper-parameters; ``seed`` (the run seed) seeds
    the rules that draw random numbers (DnC's coordinates, FLAME's noise). A bare name gets defaults."""
    if isinstance(server, str):
        if server not in AGGREGATORS:
            raise ValueError(f"unknown aggregator '{server}' (known: {', '.join(sorted(AGGREGATORS))})")
        server = ServerConfig(aggregator=server)
    try:
        rule = AGGREGATORS[server.aggregator]
    except KeyError:
        raise ValueError(f"unknown aggregator '{server.aggregator}' (known: {', '.join(sorted(AGGREGATORS))})") \
            from None
    if server.aggregator in NEEDS_ATTACKER_COUNT and server.expected_malicious == 0:
        log.warning("server.aggregator '%s' with server.expected_malicious 0 screens out nobody; set it to the "
                    "number of attackers the federation should withstand", server.aggregator)
    return rule.from_config(server, int(seed))
