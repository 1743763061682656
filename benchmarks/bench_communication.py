"""Bytes per client per round for every wire format, as ratios against plain fp32 tensors.

One round of a small federation per format (tiny model by default; ``--model`` for another, e.g.
smollm2-135m-instruct) reading the run's own metering (``bytes_up_mean`` / ``bytes_down_mean``).
On a tiny adapter the safetensors header of a compressed payload is most of it; the header column
shows how much.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import _common  # noqa: F401  (puts src/ on the path, sets the cache)

from fedguard.config import build_config
from fedguard.io import read_ndjson
from fedguard.simulation.runner import run_experiment

FORMATS = [("none", {}, {}), ("fp16", {}, {"compression": "fp16"}), ("int8", {}, {"compression": "int8"}),
           ("int8_block", {}, {"compression": "int8_block"}),
           ("topk 1%", {}, {"compression": "topk", "topk_fraction": 0.01}), ("ffa (B only)", {"variant": "ffa"}, {})]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()
    base_up = None
    print(f"model {args.model}, LoRA r={args.rank} on q/v; bytes per client per round")
    print(f"{'format':14s} {'uplink':>10s} {'header':>8s} {'downlink':>10s} {'uplink vs none':>15s}")
    for name, lora, comm in FORMATS:
        cfg = build_config({
            "model": {"name_or_path": args.model}, "lora": {"r": args.rank, "alpha": 2 * args.rank, **lora},
            "data": {"examples_per_client": 16, "max_length": 64},
            "federation": {"num_clients": 2, "clients_per_round": 2, "rounds": 1},
            "train": {"local_steps": 1, "batch_size": 2},
            "eval": {"harmful_prompts": 0, "benign_prompts": 0, "loss_examples": 0},
            "communication": comm})
        with tempfile.TemporaryDirectory() as d:
            run = run_experiment(cfg, Path(d) / "r", quiet=True)
            rec = read_ndjson(run.run_dir / "metrics.ndjson")[1]
        up, down = rec["bytes_up_mean"], rec["bytes_down_mean"]
        header = sum(c["up_header"] for c in rec["communication"].values()) / len(rec["communication"])
        base_up = base_up or up
        print(f"{name:14s} {up:10.0f} {header:8.0f} {down:10.0f} {up / base_up:14.3f}x")


if __name__ == "__main__":
    main()
