"""The LoRA-Probe's levels on non-iid honest clients: per round TPR / FPR of the shadow level (its own verdicts) and
of the client level (its statistic, the probe's score of each update, at the client level's tau), and the score
distributions of honest and malicious clients per setting, from the cells of probe-study sweeps.

Every shadow-level verdict also carries ``update_score``, the probe's probability for the update itself (what the
client level reads), so one shadow-level run gives both levels' statistics on the same updates; the client level's
round-2 numbers here are on the shadow level's trajectory. Ground truth (who is malicious) is recomputed from the
config with the simulation's own choice, as the runner scores detection.

    .venv/bin/python docs/results/probe_heterogeneity.py OUT_PNG SWEEP_DIR [SWEEP_DIR ...]
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

from fedguard.defenses.probe import LoRAProbe
from fedguard.io import read_ndjson
from fedguard.simulation.population import choose_malicious


def _rates(flags: list[bool], truth: list[bool]) -> tuple[float | None, float | None]:
    pos = [f for f, t in zip(flags, truth) if t]
    neg = [f for f, t in zip(flags, truth) if not t]
    return (sum(pos) / len(pos) if pos else None), (sum(neg) / len(neg) if neg else None)


def cell(run_dir: Path) -> dict:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    probe_path = re.search(r"probe (\S+) \(held-out AUROC", (run_dir / "run.log").read_text()).group(1)
    probe = LoRAProbe.load(probe_path)
    bad = set(choose_malicious(cfg["federation"]["num_clients"], cfg["attack"]["malicious_clients"], cfg["seed"]))
    out = {"name": run_dir.name, "alpha": cfg["data"]["partition"].get("alpha"), "level": cfg["defense"]["level"],
           "ratio": f"{cfg['federation']['num_clients'] - len(bad)}:{len(bad)}", "tau_client": probe.threshold_for("client"),
           "tau_shadow": probe.threshold_for("shadow"), "rounds": []}
    for rec in read_ndjson(run_dir / "metrics.ndjson"):
        if not rec.get("round") or "defense" not in rec:
            continue
        vs = rec["defense"]["verdicts"]
        truth = [int(v["client_id"]) in bad for v in vs]
        level_flag = [v["weight"] < 0.5 for v in vs]
        client_flag = [v["update_score"] is not None and v["update_score"] >= out["tau_client"] for v in vs]
        tpr, fpr = _rates(level_flag, truth)
        ctpr, cfpr = _rates(client_flag, truth)
        out["rounds"].append({"round": rec["round"], "level_tpr": tpr, "level_fpr": fpr, "client_tpr": ctpr,
                              "client_fpr": cfpr, "skipped": rec["defense"]["skipped"],
                              "update_scores": [(v["update_score"], t) for v, t in zip(vs, truth)],
                              "level_scores": [(max(v["probabilities"] or [0.0]), t) for v, t in zip(vs, truth)]})
    return out


def main(out_png: str, sweeps: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [cell(d) for s in sweeps for d in sorted(Path(s).iterdir())
             if (d / "metrics.ndjson").is_file() and (d / "run.log").is_file()]
    fmt = lambda x: "–" if x is None else f"{x:.2f}"  # noqa: E731
    print("| alpha | ratio | level | tau client / shadow | round | level TPR / FPR | client-level TPR / FPR | skipped |")
    print("|---|---|---|---|---:|---|---|---|")
    for c in cells:
        for r in c["rounds"]:
            print(f"| {c['alpha']} | {c['ratio']} | {c['level']} | {c['tau_client']:.3f} / {c['tau_shadow']:.3f} | "
                  f"{r['round']} | {fmt(r['level_tpr'])} / {fmt(r['level_fpr'])} | "
                  f"{fmt(r['client_tpr'])} / {fmt(r['client_fpr'])} | {r['skipped']} |")
    # top row: the update's score (the client level's statistic) and the client tau; bottom: the shadow level's
    # statistic (the highest of its shadow steps) and the shadow tau
    fig, axes = plt.subplots(2, len(cells), figsize=(3.2 * len(cells), 6.6), sharey=True, squeeze=False)
    for col, c in enumerate(cells):
        for row, (key, tau, name) in enumerate((("update_scores", c["tau_client"], "update (client level)"),
                                                ("level_scores", c["tau_shadow"], "shadow statistic"))):
            ax = axes[row][col]
            for r in c["rounds"]:
                for (score, bad) in r[key]:
                    ax.scatter(r["round"] + (0.12 if bad else -0.12), score, s=14,
                               color="tab:red" if bad else "tab:blue", marker="x" if bad else "o")
            ax.axhline(tau, color="grey", ls="--", lw=1)
            ax.set_title(f"α {c['alpha']} · {c['ratio']} · {name}", fontsize=8)
            ax.set_xlabel("round")
            ax.set_yscale("logit")
            ax.set_xticks(sorted({r["round"] for r in c["rounds"]}))
    axes[0][0].set_ylabel("probe P(malicious) of the update\n(blue honest, red malicious; dashed: τ)")
    axes[1][0].set_ylabel("highest shadow-step P(malicious)\n(dashed: the shadow level's τ)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    Path(out_png).with_suffix(".json").write_text(json.dumps(cells, indent=1))
    print(f"plot: {out_png}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
