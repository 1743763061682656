"""fedguard command line: a dispatcher.

Each command family registers its own sub-commands and handlers from its package (``register(subparsers)`` in
``recipes/cli.py``, ``alignment/cli.py``, ``deploy/cli.py``, ``split/cli.py``); a handler only calls its package.
Those modules import what a command runs when it runs (lazy imports), so `fedguard --help`, `show-config` and a
config error answer in 0.4 s instead of the 3 s that importing torch and transformers takes.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from fedguard.config import ConfigError

ROOMS = ("fedguard.recipes.cli", "fedguard.alignment.cli", "fedguard.deploy.cli", "fedguard.split.cli")

EXAMPLES = """examples:
  fedguard run tiny                      # a shipped config by name (seconds, a tiny random model)
  fedguard init my-configs               # write the shipped configs out to edit
  fedguard run configs/default.yaml
  fedguard run configs/default.yaml --set federation.rounds=5 --set train.lr=1e-4
  fedguard resume runs/default-20261122-101500
  fedguard show-config configs/tiny.yaml --set lora.r=16
  fedguard sweep configs/default.yaml
  fedguard align configs/default.yaml
  fedguard aggregator-study configs/aggregator-study.yaml
  fedguard split train configs/split.yaml
  fedguard split generate configs/split.yaml --prompt "Name three colours." --adapters RUN_DIR/adapters
  fedguard split certs split-pki --clients 2
  fedguard split serve configs/split.yaml --address 127.0.0.1:50051 --credentials split-pki
  fedguard split train configs/split.yaml --set split.aggregate_clients=false --server 127.0.0.1:50051 \\
      --client-id 0 --credentials split-pki
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedguard",
        description="Secure, private federated LoRA fine-tuning of LLMs: embedded simulation, Flower simulation and "
                    "deployment.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for room in ROOMS:
        import_module(room).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except Exception as exc:
        if isinstance(exc, _user_errors()):
            print(f"fedguard: {exc}", file=sys.stderr)
            return 2
        raise


def _user_errors() -> tuple[type[Exception], ...]:
    """What a command reports as one line (a config, a file, data, a model or a probe that does not fit) rather
    than a traceback."""
    # lazy: only once a command has failed (these modules import torch)
    from fedguard.data.schema import DataError
    from fedguard.defenses.probe import ProbeMismatch
    from fedguard.model.registry import ModelNotFoundError

    return ConfigError, FileNotFoundError, DataError, ModelNotFoundError, ProbeMismatch
