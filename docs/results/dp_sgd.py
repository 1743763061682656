"""Sample-level DP-SGD (Opacus) inside each client on SmolLM2: utility and each client's epsilon, and what DP
does to the LoRA-Probe's detection at 7:3.

    FEDGUARD_CACHE=.cache/fedguard .venv/bin/python docs/results/dp_sgd.py --out runs/dp-sgd [--part utility|detection]

Utility and audits: the default experiment's benign federation (10 clients, all sampled, 2 rounds x 10 local
steps, aligned SmolLM2 start, LoRA r 8 q/v), without DP, with DP-SGD in every client at per-example clip 1.0 (the
median per-example gradient norm at the start is about 0.9) and noise multipliers 0.5 and 1.0, and with central
client-level DP at epsilon 8 (FFA-LoRA); delta 1e-5. Each client's DP-SGD epsilon covers its own 20 steps at
q = 4 / its examples. Every run ends with the three audits on client 0: membership inference (64 of its examples
against 64 unseen), canary exposure (8 secrets x 4 repeats planted in its data, 128 candidates each) and the
server's attack on its round-2 upload.

Detection: the default 7:3 federation (3 data-poisoning clients), client-level LoRA-Probe defense, with no DP,
distributed client-level DP (epsilon 8 over the 2 rounds, C 4.91, the noise added by the clients) and DP-SGD (noise
multiplier 1.0). TPR / FPR per round of the probe's verdicts against ground truth. Central DP is not run: the probe
judges the updates before the server clips and noises them, so its verdicts are those without DP
(tests/test_privacy_mechanisms.py::test_the_probe_judges_updates_before_central_noise_and_noisy_ones_under_distributed_dp).
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dp_utility import _run  # noqa: E402  (a finished run of the same config is read back)

from fedguard.config import load_config  # noqa: E402


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run.run_dir / "metrics.ndjson").read_text().splitlines()]


def utility(out: Path, only: list[str] | None = None) -> None:
    common = ["attack.malicious_clients=0", "defense.level=none", "eval.harmful_prompts=48",
              "eval.overrefusal_prompts=0", "privacy.delta=1e-5", "privacy.sample_clip=1.0",
              # the audits, on client 0: membership of 64 of its examples, 8 canaries x 4, the server's view
              "privacy.audit_membership=true", "privacy.audit_examples=64", "privacy.canaries=8",
              "privacy.canary_repeats=4", "privacy.audit_update=true"]
    dpsgd = lambda sigma: ["privacy.sample_dp=dpsgd", f"privacy.sample_noise_multiplier={sigma}"]  # noqa: E731
    central = ["privacy.client_dp=central", "privacy.clip=3.239", "privacy.noise_multiplier=auto",
               "privacy.target_epsilon=8"]  # C: the FFA-LoRA median update norm (privacy-smollm2.md)
    cells = [("standard", "none", []), ("ffa", "none", []), ("ffa", "DP-SGD sigma 0.5", dpsgd(0.5)),
             ("ffa", "DP-SGD sigma 1", dpsgd(1.0)), ("standard", "DP-SGD sigma 1", dpsgd(1.0)),
             ("ffa", "central DP eps 8", central)]
    if only:  # e.g. "ffa/none"
        cells = [c for c in cells if f"{c[0]}/{c[1]}" in only]
    rows, t0 = [], time.perf_counter()
    for variant, name, extra in cells:
        cfg = load_config(REPO / "configs" / "default.yaml", common + [f"lora.variant={variant}", *extra])
        run = _run(cfg, out / f"{variant}-{name.replace(' ', '-')}")
        rows.append((variant, name, run.final_metrics))
        print(variant, name, run.final_metrics["after"], f"({time.perf_counter() - t0:.0f} s)", flush=True)
    before = run.final_metrics["before"]
    print(f"\nbefore: held-out loss {before['eval_loss']:.3f}, exact match {before['exact_match']:.1f} %, "
          f"refusal {before['refusal_rate']:.1f} %")
    print("| LoRA | privacy | ε (client level / per client, sample level) | held-out loss | exact match % | refusal % "
          "| MIA AUC | canary exposure (before) | extraction | server-view AUC | train s/round |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for variant, name, f in rows:
        a, m, c, u = f["after"], f["membership_inference"], f["canary_exposure"], f["update_attack"]
        eps = f.get("dpsgd", {}).get("epsilon_per_client", {})
        level = f"{f['privacy']['epsilon']:.2f} (client)" if f.get("privacy", {}).get("epsilon") else \
            f"{min(eps.values()):.2f}-{max(eps.values()):.2f} (sample)" if eps else "∞"
        print(f"| {variant} | {name} | {level} | {a['eval_loss']:.3f} | {a['exact_match']:.1f} | "
              f"{a['refusal_rate']:.1f} | {m['auc']:.3f} ± {m['auc_standard_error']:.3f} | "
              f"{c['mean_exposure']:.2f} ({c['before']['mean_exposure']:.2f}) | {100 * (c['extraction_rate'] or 0):.0f} % | "
              f"{u['auc']:.3f} ± {u['auc_standard_error']:.3f} | {f['mean_train_seconds_per_round']:.0f} |")


def detection(out: Path) -> None:
    common = ["defense.level=client", "eval.harmful_prompts=48", "eval.overrefusal_prompts=0",
              "eval.benign_prompts=0", "privacy.delta=1e-5"]
    cells = {
        "no DP": [],
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
    ap.add_argument("--cells", nargs="*", help="utility cells to run, as LORA/PRIVACY (e.g. 'ffa/none')")
    args = ap.parse_args()
    if args.part in ("utility", "both"):
        utility(args.out, args.cells)
    if args.part in ("detection", "both"):
        detection(args.out)


if __name__ == "__main__":
    main()
