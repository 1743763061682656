"""Wall time and bytes per round of the same config on each engine, as ratios against the embedded engine.

Engines: ``embedded`` (every client in this process), ``flower-sim`` (Flower's ServerApp and ClientApp through
its simulation runtime on Ray: clients in a Ray actor, messages through Flower's records) and, with
``--deploy``, ``flower-deploy`` (a SuperLink and one SuperNode per client as separate processes on localhost,
TLS and node authentication on). Each engine runs in its own process, one after another.

Per-round time is the exchange of rounds 2..N (round 1 includes loading the model in the client process);
start-up (Ray, SuperLink, nodes) is reported apart. Target: Flower simulation <= 10 % over embedded per round
on SmolLM2 once Ray is up.

    python benchmarks/bench_engines.py                                   # tiny model
    python benchmarks/bench_engines.py --model smollm2-135m-instruct --rounds 4
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts src/ on the path, sets the cache)

from fedguard.config import build_config
from fedguard.io import read_ndjson


def _config(args):
    return build_config({
        "name": "bench-engines", "seed": 0,
        "model": {"name_or_path": args.model}, "lora": {"r": 8, "alpha": 16},
        "data": {"examples_per_client": 32, "max_length": 128},
        "federation": {"num_clients": args.clients, "clients_per_round": args.clients, "rounds": args.rounds},
        "train": {"local_steps": args.steps, "batch_size": 4},
        "eval": {"every": 0, "harmful_prompts": 0, "benign_prompts": 0, "overrefusal_prompts": 0,
                 "loss_examples": 8},
    })


def _run(engine: str, cfg_path: Path, out: Path) -> tuple[float, list[dict]]:
    """Run one engine in a fresh process; returns its wall time and its round records."""
    t = time.perf_counter()
    if engine == "flower-deploy":
        cmd = [sys.executable, "-m", "fedguard", "deploy", "local", str(cfg_path), "--run-dir", str(out),
               "--workdir", str(out.parent / "deploy")]
    else:
        cmd = [sys.executable, "-m", "fedguard", "run", str(cfg_path), "--engine", engine, "--run-dir", str(out),
               "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{engine} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t, [r for r in read_ndjson(out / "metrics.ndjson") if r.get("round", 0) > 0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--deploy", action="store_true", help="also the localhost deployment (SuperLink + SuperNodes)")
    args = ap.parse_args()
    engines = ["embedded", "flower-sim"] + (["flower-deploy"] if args.deploy else [])
    cfg = _config(args)
    print(f"model {args.model}: {args.clients} clients x {args.steps} local steps, {args.rounds} rounds, LoRA r 8")
    print(f"{'engine':14s} {'wall s':>8s} {'round s (2..N)':>15s} {'vs embedded':>12s} {'start-up s':>11s} "
          f"{'up B/client':>12s} {'down B/client':>14s} {'on the wire up/down':>22s}")
    base = None
    with tempfile.TemporaryDirectory() as d:
        cfg_path = Path(d) / "c.yaml"
        cfg_path.write_text(cfg.to_yaml())
        for engine in engines:
            wall, rounds = _run(engine, cfg_path, Path(d) / engine)
            per_round = statistics.fmean(r["train_seconds"] for r in rounds[1:]) if len(rounds) > 1 else \
                rounds[0]["train_seconds"]
            startup = wall - sum(r["round_seconds"] for r in rounds)
            base = base or per_round
            wire = [t for r in rounds for t in r.get("transport_bytes", {}).values()]
            wire_text = (f"{statistics.fmean(t['up'] for t in wire):.0f}/{statistics.fmean(t['down'] for t in wire):.0f}"
                         if wire else "-")
            print(f"{engine:14s} {wall:8.1f} {per_round:15.2f} {per_round / base:11.3f}x {startup:11.1f} "
                  f"{statistics.fmean(r['bytes_up_mean'] for r in rounds):12.0f} "
                  f"{statistics.fmean(r['bytes_down_mean'] for r in rounds):14.0f} {wire_text:>22s}")


if __name__ == "__main__":
    main()
