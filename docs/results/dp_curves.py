"""Utility against epsilon on SmolLM2, from the finished runs of dp_utility.py (client-level DP-FedAvg) and
dp_sgd.py (sample-level DP-SGD): one figure, held-out loss and refusal rate, LoRA and FFA-LoRA.

    .venv/bin/python docs/results/dp_curves.py --utility runs/dp-utility --dpsgd runs/dp-sgd --out docs/results/dp-curves.png

Reads ``final_metrics.json`` of each run folder; runs nothing.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def _points(folder: Path, pattern: str):
    out = []
    for run in sorted(folder.glob(pattern)):
        f = run / "final_metrics.json"
        if not f.is_file():
            continue
        m = json.loads(f.read_text())
        eps = (m.get("privacy") or {}).get("epsilon")
        per_client = (m.get("dpsgd") or {}).get("epsilon_per_client")
        if per_client:
            eps = max(per_client.values())
        out.append((math.inf if eps is None else float(eps), m["after"]["eval_loss"], m["after"]["refusal_rate"]))
    return sorted(out, key=lambda p: -p[0])


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser()
    ap.add_argument("--utility", type=Path, default=Path("runs/dp-utility"))
    ap.add_argument("--dpsgd", type=Path, default=Path("runs/dp-sgd"))
    ap.add_argument("--out", type=Path, default=Path("docs/results/dp-curves.png"))
    args = ap.parse_args()
    series = {
        "client-level DP, LoRA": _points(args.utility, "standard-*"),
        "client-level DP, FFA-LoRA": _points(args.utility, "ffa-*"),
        "DP-SGD, FFA-LoRA (max client ε)": _points(args.dpsgd, "ffa-DP-SGD-*") + _points(args.dpsgd, "ffa-none"),
        "DP-SGD, LoRA (max client ε)": _points(args.dpsgd, "standard-DP-SGD-*") + _points(args.dpsgd, "standard-none"),
    }
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    finite_max = max([e for pts in series.values() for e, _, _ in pts if math.isfinite(e)] or [10.0])
    inf_at = finite_max * 2.5  # ε = ∞ (no DP) drawn at the right edge
    for name, pts in series.items():
        if not pts:
            continue
        xs = [inf_at if not math.isfinite(e) else e for e, _, _ in pts]
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        for ax, col in zip(axes, (1, 2)):
            ax.plot([xs[i] for i in order], [pts[i][col] for i in order], marker="o", label=name)
    for ax, title in zip(axes, ("held-out loss (lower is better)", "refusal on 48 harmful prompts, %")):
        ax.set_xscale("log")
        ax.set_xlabel("ε at δ = 1e-5 (rightmost point: no DP)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M, 10 clients, 2 rounds x 10 steps: utility against ε", fontsize=11)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
