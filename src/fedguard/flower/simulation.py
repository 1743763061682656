"""``fedguard run --engine flower-sim``: the ServerApp and ClientApp through Flower's simulation runtime.

One Ray actor runs the clients one after another with every CPU (as the embedded engine does), so the
resident model is loaded once per actor; the ServerApp runs in this process, with its own copy of the model
for evaluation and the defense.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fedguard.config import ExperimentConfig
from fedguard.flower import quiet_flower
from fedguard.flower.client_app import client_app
from fedguard.flower.server_app import server_app
from fedguard.run_dir import new_run_dir

log = logging.getLogger("fedguard")


def backend_config(cpus: int | None = None) -> dict:
    cpus = cpus or os.cpu_count() or 1
    return {"client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "include_dashboard": False, "logging_level": "ERROR",
                          "log_to_driver": False}}


def run_flower_simulation(cfg: ExperimentConfig, run_dir: Path | None = None):
    """Run ``cfg`` on Flower's simulation engine; returns the ``RunResult`` (the same run folder as embedded)."""
    quiet_flower()
    from flwr.simulation import run_simulation

    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(cfg)
    outcome: dict = {}
    run_simulation(server_app(cfg, run_dir, outcome), client_app(cfg), num_supernodes=cfg.federation.num_clients,
                   backend_config=backend_config())
    if "error" in outcome:
        raise outcome["error"]
    if "result" not in outcome:
        raise RuntimeError("the Flower simulation ended without a result (see the log above)")
    return outcome["result"]
