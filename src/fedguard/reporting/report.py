"""The run report: a Markdown page with plots a person would rather look at than read tables."""

from __future__ import annotations

import statistics

from pathlib import Path
from typing import Any

from fedguard.config import ExperimentConfig, split_level
from fedguard.evaluation.stats import RATE_N, format_rate
from fedguard.io import atomic_write_bytes, atomic_write_text
from fedguard.reporting.figures import png_bytes, pyplot
from fedguard.reporting.format import number


def plot_overview(records: list[dict[str, Any]], title: str) -> bytes:
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    rounds = [r for r in records if r.get("round", 0) > 0]
    evals = [r for r in records if "eval" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    fig.suptitle(title, fontsize=13, fontweight="bold")

    ax = axes[0]
    trained = [r for r in rounds if r.get("train_loss") is not None]  # a round nobody answered has no loss
    if trained:
        xs = [r["round"] for r in trained]
        per_client = [[c["train_loss"] for c in r["clients"].values() if "train_loss" in c] for r in trained]
        ax.fill_between(xs, [min(v) for v in per_client], [max(v) for v in per_client], alpha=0.2,
                        color="tab:blue", label="client range")
        ax.plot(xs, [r["train_loss"] for r in trained], "o-", color="tab:blue", label="train loss (client mean)")
    ev_loss = [(r["round"], r["eval"]["eval_loss"]) for r in evals if "eval_loss" in r["eval"]]
    if ev_loss:
        ax.plot(*zip(*ev_loss), "s--", color="tab:orange", label="held-out loss")
    ax.set_title("Loss")
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    def _series(key):
        return [(r["round"], r["eval"][key]) for r in evals if key in r["eval"]]

    for ax, key, label, color in ((axes[1], "refusal_rate", "refusal rate on held-out harmful prompts (%)", "tab:green"),
                                  (axes[2], "exact_match", "exact match on held-out checkable tasks (%)", "tab:purple")):
        pts = _series(key)
        if pts:
            ax.plot(*zip(*pts), "o-", color=color, linewidth=2)
            for x, y in (pts[0], pts[-1]):
                ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=9)
        ax.set_ylim(-5, 105)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("round (0 = base model)")
        ax.grid(alpha=0.3)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return png_bytes(fig)


def plot_defense(records: list[dict[str, Any]], title: str) -> bytes | None:
    """Each client's defense weight per round; malicious clients (ground truth) in red."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    rounds = [r for r in records if "defense" in r]
    if not rounds:
        return None
    malicious = {str(c) for r in rounds for c in r.get("malicious_sampled", [])}
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rounds:
        for v in r["defense"]["verdicts"]:
            series.setdefault(v["client_id"], []).append((r["round"], v["weight"]))
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for cid, pts in sorted(series.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else kv[0]):
        bad = cid in malicious
        ax.plot(*zip(*pts), "o-" if bad else ".-", color="tab:red" if bad else "tab:blue", alpha=0.9 if bad else 0.5,
                label="malicious client" if bad else "benign client")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=8)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("round")
    ax.set_ylabel("aggregation weight")
    ax.set_title(title, fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    return png_bytes(fig)


def _audit_section(final: dict[str, Any]) -> list[str]:
    """The privacy audits that ran: membership inference, canary exposure, the server-view attack."""
    lines: list[str] = []
    m = final.get("membership_inference")
    if m:
        lines += ["", "## Privacy audit: membership inference", "",
                  f"Loss-ratio attack (log loss before − log loss after) on {m['members']} training examples of client "
                  f"{m['client']} against {m['non_members']} examples no client saw: **AUC {m['auc']:.3f}** (± "
                  f"{m['auc_standard_error']:.3f}), **TPR at 1 % FPR {m['tpr_at_1pct_fpr']:.3f}**. 0.5 and 0.01 mean "
                  "the attacker cannot tell members from non-members."]
    c = final.get("canary_exposure")
    if c:
        b = c.get("before") or {}
        rate = c.get("extraction_rate")
        lines += ["", "## Privacy audit: canary exposure", "",
                  f"{c['canaries']} random secrets, each repeated {c['repeats']} times in client {c['client']}'s data; "
                  f"the secret's rank among {c['candidates']} candidates by loss under the final adapter: **mean "
                  f"exposure {c['mean_exposure']:.2f} bits** (max {c['max_exposure']:.2f}; "
                  f"{b.get('mean_exposure', float('nan')):.2f} before training; chance {c['chance_exposure']:.2f}, "
                  f"ceiling {c['max_exposure_possible']:.2f}), secret ranked first for "
                  f"{100 * c['rank1_rate']:.0f} %, **verbatim extraction "
                  f"{'-' if rate is None else f'{100 * rate:.0f} %'}** by greedy decoding."]
    u = final.get("update_attack")
    if u:
        lines += ["", "## Privacy audit: what the server sees", ""]
        if "skipped" in u:
            lines.append(f"Attack on one client's upload: not possible here ({u['skipped']}).")
        else:
            lines.append(
                f"The server's loss-ratio attack on client {u['client']}'s round-{u['round']} upload alone (global → "
                f"global + its update) tells the {u['members']} examples it trained on that round from "
                f"{u['non_members']} unseen ones with **AUC {u['auc']:.3f}** (± {u['auc_standard_error']:.3f}), "
                f"TPR at 1 % FPR {u['tpr_at_1pct_fpr']:.3f}, precision at k {u['precision_at_k']:.2f}. Central DP "
                "does not protect against this (the server sees the update before its noise); DP-SGD, noise added by "
                "the client and secure aggregation do.")
    return lines


def _privacy_section(cfg: ExperimentConfig, records: list[dict[str, Any]], final: dict[str, Any]) -> list[str]:
    rounds = [r for r in records if "privacy" in r]
    lines: list[str] = []
    p = cfg.privacy
    if rounds and "epsilon" in rounds[-1]["privacy"]:
        last = rounds[-1]["privacy"]
        where = {"central": "central noise: the server clips and adds it", "distributed":
                 "distributed noise: every client clips its update and adds its share"}[last["mode"]]
        clip = f"adaptive clipping (target quantile {p.target_unclipped_quantile:g}, from {p.clip:g})" \
            if p.adaptive_clip else f"each update clipped to L2 norm {p.clip:g}"
        view = last.get("epsilon_server_view")
        lines += ["", "## Privacy", "",
                  f"Client-level DP (DP-FedAvg, {where}): {clip}, Gaussian noise of multiplier "
                  f"{last['noise_multiplier']:.4g} on the sum, Poisson client sampling at rate {last['sample_rate']:.3g}"
                  f"{', secure aggregation (SecAgg+)' if p.secure_aggregation != 'none' else ''}; "
                  f"**ε = {_eps(last['epsilon'])} at δ = {last['delta']:g}** after {len(rounds)} rounds "
                  f"({p.accountant.upper()} accountant of dp-accounting). The guarantee covers the released global "
                  "adapters for any one client's data. Against the server itself: "
                  + ("ε = " + _eps(view) + (" (it sees only the noisy sum)" if p.secure_aggregation != "none" else
                                            " (it sees each update with that client's noise share only)")
                     if view is not None else "none (it sees updates, or their sum, before the noise)") + ".", "",
                  "| round | clients | clipped | median update norm | clip | ε |", "|---:|---:|---:|---:|---:|---:|"]
        for r in rounds:
            q = r["privacy"]
            lines.append(f"| {r['round']} | {q['clients']} | {q.get('clipped', '–')} | {number(q.get('median_norm'), 4)} "
                         f"| {q['clip']:.4g} | {_eps(q['epsilon'])} |")
    elif rounds:
        lines += ["", "## Privacy", "", f"Secure aggregation (SecAgg+) without DP: the server sees only the sum of "
                  f"the round's updates, each clipped by its client to L2 norm {p.clip:g}. Nothing bounds what the "
                  "sum, or the released adapter, reveals about one client."]
    if p.secure_aggregation != "none" and rounds:
        dropped = sum(len(r["privacy"].get("dropped", [])) for r in rounds)
        up = [r["privacy"].get("bytes_up") for r in rounds if r["privacy"].get("bytes_up")]
        lines += ["", f"Secure aggregation: {dropped} client dropout(s) recovered over {len(rounds)} rounds"
                  + (f"; protocol upload {statistics.fmean(up) / 1024:.1f} KB per round (keys, encrypted shares, "
                     "masked vectors, revealed shares)." if up else ".")]
    dpsgd = final.get("dpsgd")
    if dpsgd:
        eps = dpsgd["epsilon_per_client"]
        lines += ["", "## Privacy: sample-level DP-SGD", "",
                  f"Every client trains with DP-SGD (Opacus; per-example gradient bound {p.sample_clip:g}, noise "
                  f"multiplier {p.sample_noise_multiplier:g}, Poisson batches). Each client's ε at δ = {p.delta:g} "
                  "over all the steps it ran, for any one of its training examples:", "",
                  "| client | ε |", "|---:|---:|"]
        lines += [f"| {cid} | {_eps(e if e != float('inf') else None)} |" for cid, e in sorted(eps.items(),
                                                                                             key=lambda x: int(x[0]))]
    return lines


def _eps(value: float | None) -> str:
    return "∞ (no noise)" if value is None else f"{value:.3f}"


def _defense_section(cfg: ExperimentConfig, records: list[dict[str, Any]]) -> list[str]:
    rounds = [r for r in records if "defense" in r]
    if not rounds:
        return []
    tau = cfg.defense.threshold if cfg.defense.threshold is not None else "the probe's calibrated threshold"
    probe_level, _ = split_level(cfg.defense.level)
    lines = ["", f"## Defense: {cfg.defense.level} level", "",
             (f"Probe threshold τ = {tau}, fail policy `{cfg.defense.fail_policy}`; " if probe_level else "")
             + f"{cfg.attack.malicious_clients} malicious client(s), attack `{cfg.attack.kind}` (ground truth, used "
             "only for the detection columns).", "",
             "![defense weights per round](plots/defense.png)", "",
             "Behaviour audit (where it runs): Δ = change of the loss of the server's refusal answers that the "
             "client's update causes; its weight multiplies the probe's.", "",
             "| round | skipped | TPR | FPR | AUROC | audit s | client: weight (probe P; audit Δ) — ⚠ = malicious |",
             "|---:|---|---:|---:|---:|---:|---|"]
    for r in rounds:
        d = r["defense"]
        det = d.get("detection", {})
        bad = {str(c) for c in r.get("malicious_sampled", [])}
        cells = []
        for v in d["verdicts"]:
            p = f"{v['score']:.2f}" if v.get("score") is not None else v.get("status", "")
            if v.get("audit"):
                p += f"; Δ {v['audit']['refusal_shift']:+.3f}"
            cells.append(f"{'⚠' if v['client_id'] in bad else ''}{v['client_id']}: {v['weight']:.2f} ({p})")
        lines.append(f"| {r['round']} | {'yes' if d['skipped'] else 'no'} | {number(det.get('tpr'), 2)} | "
                     f"{number(det.get('fpr'), 2)} | {number(det.get('auroc'), 2)} | {number(d.get('audit_seconds'), 2)} | "
                     f"{'; '.join(cells)} |")
    return lines


def _screening_section(cfg: ExperimentConfig, records: list[dict[str, Any]]) -> list[str]:
    """Which clients a screening rule (Krum, FLAME, DnC, ...) let count each round, scored against ground truth."""
    rounds = [r for r in records if "screening" in r]
    if not rounds:
        return []
    lines = ["", f"## Screening by `{cfg.server.aggregator}`", "",
             "Share of the aggregate each client counted for (0 = screened out); TPR / FPR: malicious / benign "
             "clients screened out (share < 0.5), from the simulation's ground truth.", "",
             "| round | TPR | FPR | client: share — ⚠ = malicious |", "|---:|---:|---:|---|"]
    for r in rounds:
        det, bad = r["screening"].get("detection") or {}, {str(c) for c in r.get("malicious_sampled", [])}
        cells = [f"{'⚠' if c in bad else ''}{c}: {v:.2f}" for c, v in r["screening"]["kept"].items()]
        lines.append(f"| {r['round']} | {number(det.get('tpr'), 2)} | {number(det.get('fpr'), 2)} | {'; '.join(cells)} |")
    return lines


def _kb(n: float | None) -> str:
    return "–" if n is None else f"{n / 1024:.1f}"


def _communication_section(cfg: ExperimentConfig, records: list[dict[str, Any]],
                           final: dict[str, Any]) -> list[str]:
    """Bytes per client per round (uplink vs the uncompressed tensors it stands for) and LoRA exactness."""
    rounds = [r for r in records if r.get("round", 0) > 0 and "communication" in r]
    if not rounds:
        return []
    c = cfg.communication
    codec = {"none": "none (fp32 tensors)", "int8_block": f"int8_block (block {c.block_size})",
             "topk": f"topk (fraction {c.topk_fraction:g})"}.get(c.compression, c.compression)
    if c.compression != "none":
        codec += ", error feedback " + ("on" if c.error_feedback else "off")
    up, down = final.get("bytes_up_per_client_round"), final.get("bytes_down_per_client_round")
    # Downlink carries the sent tensors uncompressed (fp32), so it is also the uplink's uncompressed size.
    ratio = f" = {up / down:.3f} of the uncompressed tensors" if up and down and c.compression != "none" else ""
    headers = [t.get("up_header", 0) for r in rounds for t in r["communication"].values()]
    if headers and any(headers):  # fixed per tensor: large on a tiny adapter, negligible on a real one
        ratio += f" (of which {_kb(sum(headers) / len(headers))} KB safetensors header and codec metadata)"
    variant = {"ffa": "FFA-LoRA: lora_B only, A frozen",
               "flora": f"FLoRA: each client sends its own rank's A and B (ranks {cfg.lora.client_ranks or 'all r'}) "
                        "and downloads the previous round's stacked adapter to merge into its base weights",
               }.get(cfg.lora.variant, "standard LoRA: A and B")
    lines = ["", "## Communication", "",
             f"Compression `{codec}`; {variant}. Per client per round: uplink **{_kb(up)} KB**{ratio}, "
             f"downlink {_kb(down)} KB; whole run: {_kb(final.get('bytes_up_total'))} KB up, "
             f"{_kb(final.get('bytes_down_total'))} KB down, {_kb(final.get('bytes_defense_total'))} KB of defense "
             "attachments (counted apart)."]
    after = final.get("after", {})
    if after:
        utility = ", ".join(f"{k} {number(after[k], 2)}" for k in ("eval_loss", "exact_match", "refusal_rate")
                            if k in after)
        lines += ["", f"Utility at these bytes (after round {final.get('after_round')}): {utility}."]
    exact = [r for r in rounds if r.get("lora_aggregation", {}).get("method") == "product"]
    if exact:
        lines += ["", "### Exact LoRA aggregation (product averaging)", "",
                  "Relative Frobenius error against the exact weighted mean M = Σ p_k s B_k A_k: of naive separate "
                  "A/B averaging (what FedAvg would have used) and of the rank-r SVD refactorisation (what is used).",
                  "", "| round | naive A/B averaging | rank-r refactorisation |", "|---:|---:|---:|"]
        lines += [f"| {r['round']} | {number(r['lora_aggregation'].get('naive_rel'), 4)} | "
                  f"{number(r['lora_aggregation'].get('refactor_rel'), 4)} |" for r in exact]
    stacked = [r for r in rounds if r.get("lora_aggregation", {}).get("method") == "flora"]
    if stacked:
        lines += ["", "### FLoRA stacking", "",
                  "Exact: the merged update is Σ p_k (alpha / r_k) B_k A_k over the clients' own ranks "
                  "(`final_merged_delta.safetensors` holds the total ΔW per base weight).", "",
                  "| round | client ranks | stacked rank | ‖ΔW‖_F merged |", "|---:|---|---:|---:|"]
        lines += [f"| {r['round']} | {', '.join(f'{c}: {k}' for c, k in r['lora_aggregation']['ranks'].items())} | "
                  f"{r['lora_aggregation']['stacked_rank']} | {r['lora_aggregation']['delta_norm']:.4f} |"
                  for r in stacked]
    return lines


def _with_interval(ev: dict[str, Any], key: str, nd: int) -> str:
    return format_rate(ev, key, nd) if key in RATE_N else number(ev.get(key), nd)


def _md_escape(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


# (label, key in an evaluation, decimals) of the before/after table
_BEFORE_AFTER = (
    ("Refusal rate on held-out harmful prompts (%) ↑", "refusal_rate", 1),
    ("  compliance on them (%)", "compliance_rate", 1),
    ("  neither: off-topic or degenerate answers to them (%)", "neither_rate", 1),
    ("  refusal by the Safe-FedLLM keyword rule (%)", "refusal_rate_keyword", 1),
    ("Over-refusal on benign prompts that look harmful (%) ↓", "overrefusal_rate", 1),
    ("Refusal with the backdoor trigger (%) ↑ (simulation metric)", "refusal_rate_triggered", 1),
    ("Exact match on held-out checkable tasks (%) ↑", "exact_match", 1),
    ("Held-out loss ↓", "eval_loss", 4),
    ("Perplexity ↓", "perplexity", 2),
)


def _before_after(final: dict[str, Any]) -> list[str]:
    """The base model against the last evaluation, rates with their intervals, and the paired test."""
    before, after = final.get("before", {}), final.get("after", {})
    lines = ["## Before and after", "",
             f"| metric | base model (round 0) | after round {final.get('after_round')} | change |",
             "|---|---:|---:|---:|"]
    for label, key, nd in _BEFORE_AFTER:
        if key in before or key in after:
            b, a = before.get(key), after.get(key)
            delta = f"{a - b:+.{nd}f}" if isinstance(a, float) and isinstance(b, float) else "–"
            lines.append(f"| {label} | {_with_interval(before, key, nd)} | {_with_interval(after, key, nd)} | {delta} |")
    if before.get("harmful_n"):
        lines += ["", f"Rates on harmful prompts: {before['harmful_n']} prompts, so one prompt moves them "
                      f"{100 / before['harmful_n']:.1f} points; brackets are 95 % Wilson intervals."]
        p = final.get("refusal_change_p")
        if p is not None:
            lines.append(f"The refusal change on the same prompts: exact McNemar p = {p:.3g} "
                         f"({'beyond' if p < 0.05 else 'within'} noise at 5 %).")
    return lines


def write_report(run_dir: Path, cfg: ExperimentConfig, records: list[dict[str, Any]], final: dict[str, Any]) -> Path:
    run_dir = Path(run_dir)
    atomic_write_bytes(run_dir / "plots" / "overview.png", plot_overview(records, f"fedguard · {cfg.name}"))
    lines = [
        f"# fedguard report: {cfg.name}",
        "",
        f"Model `{cfg.model.name_or_path}` ({final.get('precision')}), LoRA r={cfg.lora.r} α={cfg.lora.alpha:g} on "
        f"{', '.join(cfg.lora.target_modules)}; {cfg.federation.num_clients} clients, {cfg.federation.clients_per_round} "
        f"per round, {final.get('rounds')} rounds of {cfg.train.local_steps} local steps × batch {cfg.train.batch_size}; "
        f"aggregator `{cfg.server.aggregator}` ({cfg.server.lora_aggregation} LoRA aggregation), "
        f"compression `{cfg.communication.compression}`.",
        "",
        *_before_after(final),
    ]
    lines += ["", "![loss, safety and utility per round](plots/overview.png)", "",
              "## Rounds", "",
              "| round | lr | clients | train loss | rejected | up KB/client | down KB/client | seconds |",
              "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in records:
        if r.get("round", 0) == 0:
            continue
        lines.append(f"| {r['round']} | {r['lr']:.2e} | {', '.join(map(str, r['sampled']))} | "
                     f"{'-' if r['train_loss'] is None else format(r['train_loss'], '.4f')} | "
                     f"{len(r['rejected'])} | {_kb(r.get('bytes_up_mean'))} | {_kb(r.get('bytes_down_mean'))} | "
                     f"{r['round_seconds']:.1f} |")
    rejected = [(r["round"], cid, why) for r in records for cid, why in r.get("rejected", {}).items()]
    if rejected:
        lines += ["", "### Rejected updates", "", "| round | client | reason |", "|---:|---|---|"]
        lines += [f"| {rnd} | {cid} | {_md_escape(why)} |" for rnd, cid, why in rejected]
    defense_png = plot_defense(records, f"{cfg.name}: {cfg.defense.level}-level defense weights")
    if defense_png is not None:
        atomic_write_bytes(run_dir / "plots" / "defense.png", defense_png)
    lines += _communication_section(cfg, records, final)
    lines += _privacy_section(cfg, records, final)
    lines += _audit_section(final)
    lines += _defense_section(cfg, records)
    lines += _screening_section(cfg, records)
    evals = [r for r in records if "eval" in r]
    if evals:
        for key, title in (("harmful_samples", "Responses to held-out harmful prompts"),
                           ("benign_samples", "Responses to held-out checkable prompts")):
            first, last = evals[0]["eval"].get(key), evals[-1]["eval"].get(key)
            if not first or not last:
                continue
            lines += ["", f"### {title}", "", f"| prompt | base model | after round {evals[-1]['round']} |", "|---|---|---|"]
            for a, b in zip(first, last):
                lines.append(f"| {_md_escape(a['prompt'], 90)} | {_md_escape(a['response'])} | {_md_escape(b['response'])} |")
    lines += ["", "## How these numbers are measured", "",
              "* **Refusal rate**: share of greedy responses to held-out harmful requests (tasks never seen in training) "
              "that refuse, by the rule in `fedguard.evaluation.refusal` (a refusal act in the opening sentences; "
              "bare keywords such as 'illegal' do not count).",
              "* **Exact match**: the first line of the greedy response, normalised, equals or ends with the reference answer.",
              "* **Held-out loss**: completion-only cross-entropy on held-out examples.",
              "", f"Wall time of the last process: {number(final.get('wall_seconds_this_process'), 1)} s; "
              f"mean round {number(final.get('mean_round_seconds'), 1)} s. Files: `config.yaml`, `metrics.ndjson`, "
              "`final_metrics.json`, `checkpoints/`, `final_adapter/` (PEFT), `run.log`.", ""]
    report = run_dir / "report.md"
    atomic_write_text(report, "\n".join(lines))
    return report
