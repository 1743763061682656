"""The two federated roles and their contract.

* client role (``client.LocalTrainer.train``): (global adapter, round config, local data) -> ClientUpdate
* server role (``server.FederatedServer.aggregate_round``): (global adapter, updates, server state)
  -> (new global adapter, new state)

Nothing else passes between them, so the in-process simulation and a networked engine (Flower's
ClientApp / ServerApp) wire the same functions together.
"""

from fedguard.messages import ClientUpdate, Instructions, RoundConfig, ServerState

__all__ = ["ClientUpdate", "Instructions", "RoundConfig", "ServerState"]
