"""Sample-level DP-SGD (Opacus) inside each client on SmolLM2: utility and each client's epsilon, and what DP
does to the LoRA-Probe's detection at 7:3.

    FEDGUARD_CACHE=.cache/fedguard .venv/bin/python docs/results/dp_sgd.py --out runs/dp-sgd [--part utility|detection]

Utility: the default experiment's benign federation (10 clients, all sampled, 2 rounds x 10 local steps, aligned
SmolLM2 start, LoRA r 8 q/v), without DP and with DP-SGD in every client at per-example clip 1.0 (the median
per-example gradient norm at the start is about 0.9) and noise multipliers 0.5 and 1.0, FFA-LoRA and standard LoRA;
delta 1e-5. Each client's epsilon covers its own 20 steps at q = 4 / its examples.

Detection: the default 7:3 federation (3 data-poisoning clients), client-level LoRA-Probe defense, with no DP, with
client-level central DP (epsilon 8 over the 2 rounds, C 4.91), distributed DP (the same sigma, noise added by the
clients) and DP-SGD (noise multiplier 1.0). TPR / FPR per round of the probe's verdicts against ground truth.
Runs one after another; a finished run of the same config is read back.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

from fedguard.config import load_config  # noqa: E402
from fedguard.simulation.runner import run_experiment  # noqa: E402


def _run(cfg, run_dir: Path):
    from types import SimpleNamespace

    final = run_dir / "final_metrics.json"
    if final.is_file() and (run_dir / "config.yaml").read_text() == cfg.to_yaml():
        return SimpleNamespace(run_dir=run_dir, final_metrics=json.loads(final.read_text()))
    return run_experiment(cfg, run_dir, quiet=True)


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run.run_dir / "metrics.ndjson").read_text().splitlines()]


def utility(out: Path) -> None:
    common = ["attack.malicious_clients=0", "defense.level=none", "eval.harmful_prompts=48",
              "eval.overrefusal_prompts=0", "privacy.delta=1e-5", "privacy.sample_clip=1.0"]
    cells = [("standard", None), ("ffa", None), ("ffa", 0.5), ("ffa", 1.0), ("standard", 1.0)]
    rows, t0 = [], time.perf_counter()
    for variant, sigma in cells:
        extra = [] if sigma is None else ["privacy.sample_dp=dpsgd", f"privacy.sample_noise_multiplier={sigma}"]
        cfg = load_config(REPO / "configs" / "default.yaml", common + [f"lora.variant={variant}", *extra])
        run = _run(cfg, out / f"{variant}-{'none' if sigma is None else f'sigma{sigma:g}'}")
        final = run.final_metrics
        eps = final.get("dpsgd", {}).get("epsilon_per_client", {})
        rows.append((variant, sigma, min(eps.values()) if eps else None, max(eps.values()) if eps else None,
                     final["after"], final["mean_train_seconds_per_round"]))
        print(rows[-1], f"({time.perf_counter() - t0:.0f} s)", flush=True)
    before = run.final_metrics["before"]
    print(f"\nbefore: held-out loss {before['eval_loss']:.3f}, exact match {before['exact_match']:.1f} %, "
          f"refusal {before['refusal_rate']:.1f} %")
    print("| variant | DP-SGD sigma | client epsilon (min-max) | held-out loss | exact match % | refusal % | train s/round |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for variant, sigma, lo, hi, a, secs in rows:
        eps = "∞ (no DP)" if lo is None else f"{lo:.2f}-{hi:.2f}"
        print(f"| {variant} | {'-' if sigma is None else sigma} | {eps} | {a['eval_loss']:.3f} | "
              f"{a['exact_match']:.1f} | {a['refusal_rate']:.1f} | {secs:.0f} |")


def detection(out: Path) -> None:
    common = ["defense.level=client", "eval.harmful_prompts=48", "eval.overrefusal_prompts=0",
              "eval.benign_prompts=0", "privacy.delta=1e-5"]
    cells = {
        "no DP": [],
        "central DP eps 8": ["privacy.client_dp=central", "privacy.clip=4.911", "privacy.noise_multiplier=auto",
                             "privacy.target_epsilon=8"],
        "distributed DP eps 8": ["privacy.client_dp=distributed", "privacy.clip=4.911",
                                 "privacy.noise_multiplier=auto", "privacy.target_epsilon=8"],
        "DP-SGD sigma 1": ["privacy.sample_dp=dpsgd", "privacy.sample_clip=1.0", "privacy.sample_noise_multiplier=1.0"],
    }
    t0 = time.perf_counter()
    print("| privacy | round | TPR | FPR | AUROC | refusal after % |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, extra in cells.items():
        cfg = load_config(REPO / "configs" / "default.yaml", common + extra)
        run = _run(cfg, out / ("detect-" + name.replace(" ", "-")))
        for r in _records(run):
            if r.get("round", 0) > 0:
                d = r["defense"]["detection"]
                print(f"| {name} | {r['round']} | {d.get('tpr', float('nan')):.2f} | {d.get('fpr', float('nan')):.2f} | "
                      f"{d.get('auroc', float('nan')):.2f} | {run.final_metrics['after']['refusal_rate']:.1f} |",
                      flush=True)
    print(f"\n{time.perf_counter() - t0:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/dp-sgd"))
    ap.add_argument("--part", choices=["utility", "detection", "both"], default="both")
    args = ap.parse_args()
    if args.part in ("utility", "both"):
        utility(args.out)
    if args.part in ("detection", "both"):
        detection(args.out)


if __name__ == "__main__":
    main()
