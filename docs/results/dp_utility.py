"""Utility and safety against epsilon: client-level DP-FedAvg on SmolLM2, plain LoRA and FFA-LoRA.

    FEDGUARD_CACHE=.cache/fedguard .venv/bin/python docs/results/dp_utility.py --out runs/dp-utility

The default experiment's benign federation (10 clients, all sampled each round: q = 1, 2 rounds x 10 local
steps, aligned SmolLM2 start) with client-level DP. Per variant: first sigma 0 with no clipping (epsilon
infinite: plain FedAvg), whose median client update norm becomes the clipping bound C; then the noise
multiplier that spends exactly epsilon 8, 4 and 1 over the 2 rounds (delta 1e-5). Runs one after another.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

from fedguard.config import load_config  # noqa: E402
from fedguard.simulation.runner import run_experiment  # noqa: E402


def _run(cfg, run_dir: Path):
    """A finished run of the same config is read back, not run again."""
    import json
    from types import SimpleNamespace

    final = run_dir / "final_metrics.json"
    if final.is_file() and (run_dir / "config.yaml").read_text() == cfg.to_yaml():
        return SimpleNamespace(run_dir=run_dir, final_metrics=json.loads(final.read_text()))
    return run_experiment(cfg, run_dir, quiet=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/dp-utility"))
    ap.add_argument("--epsilons", default="8,4,1")
    args = ap.parse_args()
    common = ["attack.malicious_clients=0", "defense.level=none", "eval.harmful_prompts=48",
              "eval.overrefusal_prompts=0", "privacy.client_dp=central", "privacy.delta=1e-5"]
    rows = []
    t0 = time.perf_counter()
    for variant in ("standard", "ffa"):
        base = load_config(REPO / "configs" / "default.yaml", common + [f"lora.variant={variant}",
                                                                         "privacy.noise_multiplier=0",
                                                                         "privacy.clip=1e9"])
        run = _run(base, args.out / f"{variant}-inf")
        import json

        records = [json.loads(line) for line in (run.run_dir / "metrics.ndjson").read_text().splitlines()]
        norms = [r["privacy"]["median_norm"] for r in records if r.get("round", 0) > 0]
        clip = float(sorted(norms)[len(norms) // 2])
        rows.append((variant, "inf", 0.0, clip, run.final_metrics))
        print(rows[-1][:4], run.final_metrics["after"], flush=True)
        for eps in [float(e) for e in args.epsilons.split(",")]:
            cfg = load_config(REPO / "configs" / "default.yaml", common + [
                f"lora.variant={variant}", f"privacy.clip={clip}", "privacy.noise_multiplier=auto",
                f"privacy.target_epsilon={eps}"])
            run = _run(cfg, args.out / f"{variant}-eps{eps:g}")
            records = [json.loads(line) for line in (run.run_dir / "metrics.ndjson").read_text().splitlines()]
            sigma = records[-1]["privacy"]["noise_multiplier"]
            rows.append((variant, f"{run.final_metrics['privacy']['epsilon']:.2f}", sigma, clip, run.final_metrics))
            print(rows[-1][:4], run.final_metrics["after"], flush=True)
            print(f"done {variant} eps {eps} ({time.perf_counter() - t0:.0f} s)", flush=True)
    before = rows[0][4]["before"]
    print(f"\nbefore: held-out loss {before['eval_loss']:.3f}, exact match {before['exact_match']:.1f} %, "
          f"refusal {before['refusal_rate']:.1f} %")
    print("| variant | epsilon | sigma | clip C | held-out loss | exact match % | refusal % |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for variant, eps, sigma, clip, final in rows:
        a = final["after"]
        print(f"| {variant} | {eps} | {sigma:.3f} | {clip:.4f} | {a['eval_loss']:.3f} | {a['exact_match']:.1f} | "
              f"{a['refusal_rate']:.1f} |")
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
