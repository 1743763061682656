"""What privacy costs per round, as ratios against plain training, in one process and one run.

Variants (the same config otherwise; every client in every round):

* ``plain``: FedAvg, no privacy;
* ``central-dp``: client-level DP-FedAvg, the server clips and adds noise;
* ``dpsgd``: sample-level DP-SGD with Opacus in every client's training (per-example gradients, Poisson batches);
* ``secagg``: SecAgg+ among the round's clients (Flower's primitives in process), clients clip;
* ``secagg+distributed``: SecAgg+ with distributed noise and adaptive clipping.

Per-round time is the mean over rounds 2..N of the round's wall time (training, aggregation, no evaluation);
``agg s`` is the aggregation's share of it (with SecAgg+: every party's protocol work, run in this process).
The protocol's bytes (keys, encrypted shares, masked vectors, revealed shares) replace the adapter's upload. The model is loaded once per variant
(each variant is a run of the embedded engine in this process, one after another).

    python benchmarks/bench_privacy.py                                    # tiny model
    python benchmarks/bench_privacy.py --model smollm2-135m-instruct --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import _common  # noqa: F401  (puts src/ on the path, sets the cache)

from fedguard.config import build_config
from fedguard.io import read_ndjson
from fedguard.simulation.runner import run_experiment

VARIANTS = {
    "plain": {},
    "central-dp": {"client_dp": "central", "clip": 0.05, "noise_multiplier": 1.0},
    "dpsgd": {"sample_dp": "dpsgd", "sample_clip": 1.0, "sample_noise_multiplier": 1.0},
    "secagg": {"secure_aggregation": "secagg+", "clip": 0.05},
    "secagg+distributed": {"secure_aggregation": "secagg+", "client_dp": "distributed", "clip": 0.05,
                           "noise_multiplier": 0.8, "adaptive_clip": True, "clipped_count_stddev": 1.0},
}


def _config(args, privacy: dict):
    return build_config({
        "name": "bench-privacy", "seed": 0,
        "model": {"name_or_path": args.model}, "lora": {"r": 8, "alpha": 16},
        "data": {"examples_per_client": 32, "max_length": 128},
        "federation": {"num_clients": args.clients, "clients_per_round": args.clients, "rounds": args.rounds},
        "train": {"local_steps": args.steps, "batch_size": 4},
        "eval": {"every": 0, "harmful_prompts": 0, "benign_prompts": 0, "overrefusal_prompts": 0,
                 "loss_examples": 4},
        "checkpoint": {"every": 1000},
        "privacy": privacy,
    })


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            run = run_experiment(_config(args, VARIANTS[name]), Path(tmp) / name, quiet=True)
            rounds = [r for r in read_ndjson(run.run_dir / "metrics.ndjson") if r.get("round", 0) > 0]
            later = rounds[1:] or rounds
            train = statistics.fmean(r["train_seconds"] for r in later)
            total = statistics.fmean(r["round_seconds"] for r in later)
            up = statistics.fmean(r["bytes_up"] for r in later) / max(len(later[0]["sampled"]), 1)
            secure = statistics.fmean(r.get("privacy", {}).get("seconds", 0.0) for r in later)
            rows[name] = (total, train - secure, total - train + secure, up, run.final_metrics)
    base = rows.get("plain", next(iter(rows.values())))
    print(f"model {args.model}, {args.clients} clients per round, {args.steps} local steps, rounds 2..{args.rounds}")
    print(f"{'variant':<20} {'s/round':>8} {'x plain':>8} {'train s':>8} {'agg s':>9} {'up KB/client':>13}  privacy")
    for name, (total, train, server, up, final) in rows.items():
        eps = final.get("privacy", {}).get("epsilon")
        dpsgd = final.get("dpsgd", {}).get("epsilon_max")
        what = (f"client eps {eps:.2f}" if eps else "") + (f"sample eps {dpsgd:.2f}" if dpsgd else "")
        print(f"{name:<20} {total:8.2f} {total / base[0]:8.2f} {train:8.2f} {server:9.3f} {up / 1024:13.1f}  {what}")


if __name__ == "__main__":
    main()
