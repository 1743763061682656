"""The contract between the round loop and an engine's client side.

The loop (``fedguard.simulation.runner``) configures each round, hands every sampled client's ``Instructions`` to
the engine's client side and aggregates the ``Replies`` that come back. How instructions reach clients is the
engine's business: in this process on one resident model (``simulation.embedded.EmbeddedClients``), or over
Flower's Grid to SuperNodes (``flower.server_app.FlowerClients``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from fedguard.messages import ClientUpdate, Instructions, UpdateSum

if TYPE_CHECKING:  # annotations only
    from fedguard.config import ExperimentConfig
    from fedguard.factories import Resident
    from fedguard.federated.client import ClientState
    from fedguard.simulation.population import Population
    from fedguard.simulation.progress import RunProgress


@dataclass
class Replies:
    """What came back from one round's clients."""

    messages: list[ClientUpdate]  # what arrived, for the server to judge
    metrics: dict[str, dict[str, float]]  # client id -> its training metrics (clients that trained)
    failed: dict[str, str] = field(default_factory=dict)  # client id -> why its message never arrived
    # networked engines: bytes the transport itself carried per client ({"down": n, "up": n}, whole messages)
    transport: dict[str, dict[str, int]] = field(default_factory=dict)
    # secure aggregation: the sum the protocol produced (``messages`` is then empty)
    summed: UpdateSum | None = None


class ClientSide(Protocol):
    """An engine's side of the round: reaches the sampled clients and brings back what they sent."""

    population: Population  # ground truth (which clients are malicious): metrics only, never the server's view

    def exchange(self, server_round: int, instructions: dict[str, Instructions], progress: RunProgress
                 ) -> Replies: ...

    def state_dict(self) -> dict[str, ClientState]:
        """Client state the run's checkpoints keep ({} where the clients keep their own)."""
        ...

    def load_state_dict(self, states: dict[str, ClientState]) -> None: ...


class ClientsFactory(Protocol):
    """Builds an engine's client side for a run: (config, the server process's resident model, the probe the
    attackers know)."""

    def __call__(self, cfg: ExperimentConfig, resident: Resident, attacker_probe: Any) -> ClientSide: ...
