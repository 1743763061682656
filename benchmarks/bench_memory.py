"""Memory: peak RSS of a federation of 50 simulated clients vs 1 client, on the embedded model.

Each case is a real `fedguard run` in its own process (1 round, every client sampled, 2 local steps),
so the peak includes the resident base model, every client's tokenised data, every client update
held for aggregation and the optimizer. Clients cost adapters, not model copies.

    .venv/bin/python benchmarks/bench_memory.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import _common


def peak_rss_mb(clients: int, workdir: str) -> float:
    code = (
        "import resource, sys; from fedguard.cli import main; rc = main(sys.argv[1:]); "
        "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)"
    )
    args = [sys.executable, "-c", code, "run", str(_common.REPO / "configs" / "default.yaml"), "--quiet",
            "--run-dir", os.path.join(workdir, f"c{clients}"),
            "--set", f"federation.num_clients={clients}", "--set", f"federation.clients_per_round={clients}",
            "--set", "federation.rounds=1", "--set", "train.local_steps=2", "--set", "data.examples_per_client=100",
            "--set", "eval.harmful_prompts=0", "--set", "eval.benign_prompts=0", "--set", "eval.loss_examples=0",
            "--set", "data.partition.method=iid"]
    out = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(_common.REPO / "src")})
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    kb = next(int(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("PEAK_KB"))
    return kb / 1024


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        one = peak_rss_mb(1, d)
        fifty = peak_rss_mb(50, d)
    print(f"peak RSS, 1 client:   {one:8.0f} MB")
    print(f"peak RSS, 50 clients: {fifty:8.0f} MB")
    print(f"ratio: {fifty / one:.3f}x (target <= 1.2x)")


if __name__ == "__main__":
    main()
