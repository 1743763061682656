"""The Flower engine: a ServerApp and a ClientApp (Message API, flwr 1.41 and 1.42) around fedguard's own roles.

* ``client_app``: ``Client.run`` behind Flower's train handler (one node = one client);
* ``server_app``: the embedded engine's run loop with Flower's Grid as its exchange (``FlowerClients``);
* ``records``: fedguard's messages as Flower records, and back (what a node sends is untrusted);
* ``secagg``: ``privacy.secure_aggregation`` with Flower's SecAggPlusWorkflow and secaggplus_mod, per round;
* ``simulation``: ``fedguard run --engine flower-sim``, through Flower's simulation runtime (Ray).

Importing this package does not import flwr; ``quiet_flower`` switches Flower's and Ray's outbound calls off
before it is.
"""

import os

# Flower's telemetry and Ray's usage statistics phone home; fedguard runs where data may not leave the site.
# Flower's update check asks a web service for new versions from every CLI process.
OFFLINE_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_DISABLE_USAGE_STATS": "1", "RAY_DEDUP_LOGS": "0"}


def quiet_flower() -> None:
    """Set the variables that keep Flower and Ray offline (never overriding what a user set)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
