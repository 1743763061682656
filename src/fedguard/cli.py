"""fedguard command line.

Each command imports its package when it runs (lazy imports): `fedguard --help`, `show-config` and a config
error answer in 0.4 s instead of the 3 s that importing torch and transformers takes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fedguard.config import DEFENSE_LEVELS, ConfigError, load_config

EXAMPLES = """examples:
  fedguard run tiny                      # a shipped config by name (seconds, a tiny random model)
  fedguard init my-configs               # write the shipped configs out to edit
  fedguard run configs/default.yaml
  fedguard run configs/default.yaml --set federation.rounds=5 --set train.lr=1e-4
  fedguard resume runs/default-20261122-101500
  fedguard show-config configs/tiny.yaml --set lora.r=16
  fedguard sweep configs/default.yaml
  fedguard align configs/default.yaml
  fedguard aggregator-study configs/aggregator-study.yaml
  fedguard split train configs/split.yaml
  fedguard split generate configs/split.yaml --prompt "Name three colours." --adapters RUN_DIR/adapters
  fedguard split certs split-pki --clients 2
  fedguard split serve configs/split.yaml --address 127.0.0.1:50051 --credentials split-pki
  fedguard split train configs/split.yaml --set split.aggregate_clients=false --server 127.0.0.1:50051 \\
      --client-id 0 --credentials split-pki
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedguard",
        description="Secure, private federated LoRA fine-tuning of LLMs: embedded simulation, Flower simulation and deployment.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _run_parsers(sub)
    _study_parsers(sub)
    _deploy_parser(sub)
    _split_parser(sub)
    init = sub.add_parser("init", help="write the shipped example configs (tiny, default, ...) into a folder to edit")
    init.add_argument("dir", type=Path, nargs="?", default=Path("configs"))
    init.add_argument("--force", action="store_true", help="overwrite configs that are already there")
    prep = sub.add_parser("prepare-model", help="convert the embedded model to a cached safetensors folder")
    prep.add_argument("name", nargs="?", default="smollm2-135m-instruct")
    return p


def _run_parsers(sub) -> None:
    """One run: run, resume, report, compare, show-config."""
    run = sub.add_parser("run", help="run an experiment from a YAML config",
                         description="Run an experiment. Writes a run directory with the resolved config, "
                                     "per-round metrics (NDJSON), PEFT checkpoints, final metrics and a report.")
    run.add_argument("config", help="experiment YAML, or a shipped config by name (tiny, default, ...)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field by its dotted name, e.g. --set train.lr=1e-4 (repeatable)")
    run.add_argument("--run-dir", type=Path, default=None, help="write here instead of OUTPUT_DIR/NAME-TIMESTAMP")
    run.add_argument("--quiet", action="store_true", help="no progress bars or console logs (run.log still written)")
    run.add_argument("--engine", choices=("embedded", "flower-sim"), default="embedded",
                     help="embedded: every client in this process (default); flower-sim: Flower's ServerApp and "
                          "ClientApp through Flower's simulation runtime (Ray), the same result for the same config")
    run.add_argument("--stop-after-round", type=int, default=None, help=argparse.SUPPRESS)

    res = sub.add_parser("resume", help="continue an interrupted run from its last checkpoint",
                         description="Continue a run from its last complete checkpoint; the result equals an "
                                     "uninterrupted run of the same config.")
    res.add_argument("run_dir", type=Path)
    res.add_argument("--quiet", action="store_true")
    res.add_argument("--stop-after-round", type=int, default=None, help=argparse.SUPPRESS)

    rep = sub.add_parser("report", help="rebuild the report of a finished run from its metrics")
    rep.add_argument("run_dir", type=Path)

    cmp_ = sub.add_parser("compare", help="two finished runs side by side, with the paired test on the same prompts")
    cmp_.add_argument("run_a", type=Path)
    cmp_.add_argument("run_b", type=Path)

    show = sub.add_parser("show-config", help="print the resolved, validated config (defaults filled in)")
    show.add_argument("config", nargs="?", default=None, help="experiment YAML (omit for the defaults)")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _study_parsers(sub) -> None:
    """Many runs and the artifacts they share: sweep, aggregator-study, probe build, align."""
    sw = sub.add_parser("sweep", help="benign:malicious ratios x defense levels, one comparison report",
                        description="Run one config over a grid of benign:malicious ratios and defense levels; "
                                    "writes every run plus sweep.md (table + plots). Finished cells are reused.")
    sw.add_argument("config")
    sw.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sw.add_argument("--ratios", default=None, help="comma-separated BENIGN:MALICIOUS ratios (default: sweep.ratios)")
    sw.add_argument("--levels", default=None, help="comma-separated defense levels (default: sweep.levels)")
    sw.add_argument("--attacks", default=None,
                    help="comma-separated attack kinds (default: sweep.attacks, else attack.kind)")
    sw.add_argument("--aggregators", default=None,
                    help="comma-separated server.aggregator names (default: sweep.aggregators, else server.aggregator)")
    sw.add_argument("--jobs", type=int, default=1,
                    help="cells run in parallel processes (each loads the model; useful on a GPU or many cores)")
    sw.add_argument("--out", type=Path, default=None, help="sweep folder (default: OUTPUT_DIR/NAME-sweep)")
    sw.add_argument("--report-only", action="store_true", help="report the finished cells; run nothing")
    sw.add_argument("--quiet", action="store_true")

    st = sub.add_parser("aggregator-study", help="every aggregation rule on the same one-round client updates",
                        description="Per scenario (ATTACK@BENIGN:MALICIOUS) every client trains once from the base "
                                    "adapter; each rule, the LoRA-Probe client level and the benign-only reference "
                                    "aggregate those same updates and are evaluated. Then wire formats vs utility on "
                                    "the all-benign federation. Writes study.md (tables + plots); rows already "
                                    "measured in --out are reused.")
    st.add_argument("config")
    st.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    st.add_argument("--scenarios", default=None,
                    help="comma-separated ATTACK@BENIGN:MALICIOUS (default: aggregator_study.scenarios)")
    st.add_argument("--aggregators", default=None, help="comma-separated rules (default: aggregator_study.aggregators)")
    st.add_argument("--codecs", default=None, help="comma-separated wire formats, '' for none "
                                                   "(default: aggregator_study.codecs)")
    st.add_argument("--out", type=Path, default=None, help="study folder (default: OUTPUT_DIR/NAME)")
    st.add_argument("--quiet", action="store_true")

    probe = sub.add_parser("probe", help="LoRA-Probe commands (build)")
    probe_sub = probe.add_subparsers(dest="probe_command", metavar="PROBE_COMMAND")
    pb = probe_sub.add_parser("build", help="train the LoRA-Probe for a run config (same model, LoRA, A-seed, lr)",
                              description="Generate labelled ΔLoRA features by local training from θ₀ on the built-in "
                                          "probe split (benign vs harmful), train the probe, report held-out "
                                          "AUROC / precision / recall / F1 / FPR, and save the artifact.")
    pb.add_argument("config")
    pb.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    pb.add_argument("--out", type=Path, default=None, help="artifact folder (default: the cache, keyed by config)")
    pb.add_argument("--compare-selections", action="store_true",
                    help="also report held-out detection for every feature selection on the same snapshots")

    al = sub.add_parser("align", help="build (or find) the safety-aligned starting model of a config and report it",
                        description="Fine-tune the base model on built-in harmful-request -> refusal pairs and benign "
                                    "data (model.align), merge it into the base weights and cache the folder; "
                                    "model.aligned: true makes runs start from it. Prints refusal on held-out harm "
                                    "categories and an independent harmful set, over-refusal on benign look-alikes, "
                                    "and benign utility, for the base and the aligned model.")
    al.add_argument("config")
    al.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "resume":
            from fedguard.run_dir import load_run_config
            from fedguard.simulation.runner import run_experiment

            cfg = load_run_config(args.run_dir)
            result = run_experiment(cfg, args.run_dir, resume=True, stop_after_round=args.stop_after_round,
                                    quiet=args.quiet)
            print(f"report: {result.report}")
            return 0
        if args.command == "report":
            return _report(args.run_dir)
        if args.command == "compare":
            from fedguard.recipes.sweep import compare_runs

            print("\n".join(compare_runs(args.run_a, args.run_b)))
            return 0
        if args.command == "show-config":
            print(load_config(args.config, args.overrides).to_yaml(), end="")
            return 0
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "aggregator-study":
            return _aggregator_study(args)
        if args.command == "probe":
            if args.probe_command != "build":
                parser.parse_args(["probe", "--help"])
            return _probe_build(load_config(args.config, args.overrides), args.out, args.compare_selections)
        if args.command == "align":
            return _align(load_config(args.config, args.overrides))
        if args.command == "deploy":
            return _deploy(args)
        if args.command == "split":
            return _split(args)
        if args.command == "init":
            return _init(args.dir, args.force)
        if args.command == "prepare-model":
            from fedguard.model.registry import resolve_model_path

            print(resolve_model_path(args.name))
            return 0
    except (ConfigError, FileNotFoundError) as exc:
        print(f"fedguard: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from fedguard.data.schema import DataError
        from fedguard.model.registry import ModelNotFoundError

        from fedguard.defenses.probe import ProbeMismatch

        if isinstance(exc, (DataError, ModelNotFoundError, ProbeMismatch)):
            print(f"fedguard: {exc}", file=sys.stderr)
            return 2
        raise
    parser.error(f"unknown command {args.command}")
    return 2


def _init(folder: Path, force: bool) -> int:
    from fedguard.config import shipped_configs
    from fedguard.io import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    for name, text in shipped_configs().items():
        path = folder / f"{name}.yaml"
        if path.exists() and not force:
            print(f"kept {path} (exists; --force overwrites)")
            continue
        atomic_write_text(path, text)
        print(f"wrote {path}")
    return 0


def _run(args) -> int:
    from fedguard.simulation.runner import run_experiment

    cfg = load_config(args.config, args.overrides)
    if args.engine == "flower-sim":
        if args.stop_after_round is not None:
            raise ConfigError("--stop-after-round is for the embedded engine")
        from fedguard.flower.simulation import run_flower_simulation

        result = run_flower_simulation(cfg, args.run_dir)
    else:
        result = run_experiment(cfg, args.run_dir, stop_after_round=args.stop_after_round, quiet=args.quiet)
    print(f"report: {result.report}")
    print(f"run directory: {result.run_dir}")
    return 0


def _aggregator_study(args) -> int:
    from fedguard.recipes.aggregator_study import run_aggregator_study

    cfg = load_config(args.config, args.overrides)

    def given(flag: str | None) -> list[str] | None:
        return None if flag is None else [x.strip() for x in flag.split(",") if x.strip()]

    out = args.out or Path(cfg.output_dir) / cfg.name
    report = run_aggregator_study(cfg, out, quiet=args.quiet, scenarios=given(args.scenarios),
                                  aggregators=given(args.aggregators), codecs=given(args.codecs))
    print(f"study report: {report}")
    return 0


def _deploy_parser(sub) -> None:
    dp = sub.add_parser("deploy", help="a real Flower deployment: credentials, SuperLink, SuperNodes, runs",
                        description="Run fedguard on Flower's deployment engine: one SuperLink (TLS, SuperNode "
                                    "authentication) and one SuperNode per organisation. See the README's "
                                    "deployment guide for the order of the steps.")
    dsub = dp.add_subparsers(dest="deploy_command", metavar="STEP", required=True)
    c = dsub.add_parser("certs", help="a CA, the SuperLink's TLS certificate and node key pairs")
    c.add_argument("out", type=Path)
    c.add_argument("--nodes", type=int, default=0, help="node key pairs to make here (each site can make its own)")
    c.add_argument("--host", action="append", default=[],
                   help="a name or IP the SuperLink is reached at (repeatable; default localhost, 127.0.0.1)")
    k = dsub.add_parser("node-key", help="one SuperNode's key pair (run at the node's site; send only the .pub)")
    k.add_argument("out", type=Path, help="the private key file; the public key is written beside it as .pub")

    def common(q, ca: bool = True):
        q.add_argument("--superlink", default="127.0.0.1:9093", help="host:port of the SuperLink")
        q.add_argument("--workdir", type=Path, default=Path("deploy"), help="logs, the CLI profile, the app")
        if ca:
            q.add_argument("--ca", type=Path, required=True, help="the federation's CA certificate (ca.crt)")

    sl = dsub.add_parser("superlink", help="start the SuperLink in the foreground")
    common(sl)
    sl.add_argument("--cert", type=Path, required=True)
    sl.add_argument("--key", type=Path, required=True)
    sl.add_argument("--listen", default=None, help="host:port to bind (e.g. 0.0.0.0:9093; default --superlink)")
    sl.add_argument("--database", type=Path, default=None, help="keep SuperLink state (registrations) in a file")
    rg = dsub.add_parser("register", help="enrol SuperNode public keys with the running SuperLink")
    common(rg)
    rg.add_argument("public_keys", type=Path, nargs="+")
    sn = dsub.add_parser("supernode", help="start one SuperNode in the foreground")
    common(sn)
    sn.add_argument("--key", type=Path, required=True, help="this node's private key")
    who = sn.add_mutually_exclusive_group(required=True)
    who.add_argument("--partition-id", type=int, help="which client of the config this node is")
    who.add_argument("--data-path", help="this node's own data file (JSON/JSONL/CSV/Parquet); needs --client-id")
    sn.add_argument("--client-id", type=int, default=None, help="with --data-path: the node's client id")
    sn.add_argument("--port", type=int, default=9094, help="the node's local runtime port (one per node per machine)")
    sb = dsub.add_parser("submit", help="run an experiment on the deployment and stream its log")
    common(sb)
    sb.add_argument("config")
    sb.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sb.add_argument("--run-dir", type=Path, required=True, help="where the SuperLink's machine writes the run")
    lo = dsub.add_parser("local", help="all of it on this machine (credentials, SuperLink, N SuperNodes, the run)")
    lo.add_argument("config")
    lo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    lo.add_argument("--run-dir", type=Path, required=True)
    lo.add_argument("--workdir", type=Path, default=Path("deploy-local"))
    lo.add_argument("--port", type=int, default=9093, help="the SuperLink's port; nodes use the next ones")


def _split_parser(sub) -> None:
    sp = sub.add_parser("split", help="FedSEA-style split learning: clients hold the first and last blocks, the "
                                      "server the middle (certs, serve, train, generate)",
                        description="U-shaped split learning (fedguard.split), in process (every message between "
                                    "the clients and the server goes through bytes and is metered) or across "
                                    "processes: `split serve` runs the server over gRPC with mutual TLS, "
                                    "`split train|generate --server HOST:PORT` run one client against it.")
    ssub = sp.add_subparsers(dest="split_command", metavar="STEP", required=True)
    ce = ssub.add_parser("certs", help="a CA, the split server's TLS certificate and one certificate per client",
                         description="Writes DIR/ca.crt, DIR/ca.key (keep it offline), DIR/server.pem, "
                                     "DIR/server.key and DIR/clients/<ID>.pem, <ID>.key for client ids 0 .. N-1 "
                                     "(CN and SAN = the id: the server binds requests to it). A client site needs "
                                     "ca.crt and its own pair, in that layout.")
    ce.add_argument("out", type=Path)
    ce.add_argument("--clients", type=int, default=0, help="client certificates for ids 0 .. N-1")
    ce.add_argument("--client-id", dest="client_ids", action="append", default=[], metavar="ID",
                    help="a client certificate for this id (repeatable; in addition to --clients)")
    ce.add_argument("--host", action="append", default=[],
                    help="a name or IP the server is reached at (repeatable; localhost and 127.0.0.1 always)")
    se = ssub.add_parser("serve", help="run the split server (the middle blocks) over gRPC with mutual TLS",
                         description="Loads the model once, keeps only the middle blocks and their LoRA, and "
                                     "serves clients until SIGINT/SIGTERM, one thread per call. Writes run.log, "
                                     "metrics.ndjson, server_metrics.json (bytes per client and message kind) and "
                                     "adapters/server.safetensors to its run folder.")
    se.add_argument("config")
    se.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    se.add_argument("--address", required=True, help="HOST:PORT to bind (port 0: pick a free one, printed)")
    se.add_argument("--credentials", type=Path, required=True,
                    help="folder with ca.crt, server.pem, server.key (`fedguard split certs`)")
    se.add_argument("--clients", default=None,
                    help="comma-separated client ids allowed (default: any with a certificate from the CA); "
                         "batch_parallel / hierarchical wait for all of them before the first step")
    se.add_argument("--adapters", type=Path, default=None,
                    help="start from a finished run's adapters/server.safetensors (e.g. to serve generation)")
    se.add_argument("--run-dir", type=Path, default=None, help="default: OUTPUT_DIR/NAME-split-server-TIMESTAMP")
    se.add_argument("--quiet", action="store_true", help="no console logs (run.log still written)")
    se.add_argument("--flush-seconds", type=float, default=5.0, help=argparse.SUPPRESS)
    tr = ssub.add_parser("train", help="split-train every client (config section `split`) and write a run folder",
                         description="Train split.steps steps per client in split.mode; writes config.yaml, "
                                     "metrics.ndjson (per step: loss, bytes per message kind, mean|h_A|, noise), "
                                     "final_metrics.json and adapters/ (safetensors).")
    tr.add_argument("config")
    tr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    tr.add_argument("--run-dir", type=Path, default=None, help="default: OUTPUT_DIR/NAME-split-TIMESTAMP")
    tr.add_argument("--quiet", action="store_true", help="no console logs (run.log still written)")
    _remote_options(tr)
    tr.add_argument("--partition", type=int, default=None,
                    help="with --server: which data partition is this client's (default: the client id as a number)")
    ge = ssub.add_parser("generate", help="collaborative greedy decoding through the server (KV cache per party)",
                         description="Greedy decoding of chat prompts with the client's parts and the server's "
                                     "middle, each with its own KV cache; one [B,1,H] hidden state each way per "
                                     "token. Prints the answers and the bytes per message kind.")
    ge.add_argument("config")
    ge.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ge.add_argument("--prompt", action="append", required=True, help="a user message (repeatable: one batch)")
    ge.add_argument("--adapters", type=Path, default=None,
                    help="a `split train` run's adapters/ folder (default: the untrained LoRA θ₀)")
    ge.add_argument("--client", default=None,
                    help="whose client parts to use from --adapters (default: 0, with --server the --client-id)")
    ge.add_argument("--max-new-tokens", type=int, default=None, help="default: eval.max_new_tokens")
    ge.add_argument("--json", type=Path, default=None, help="also write answers, tokens and bytes to this file")
    _remote_options(ge)


def _remote_options(p) -> None:
    p.add_argument("--server", default=None, metavar="HOST:PORT",
                   help="run this one client against a `fedguard split serve` server over mutual TLS")
    p.add_argument("--client-id", default=None, help="with --server: this client's id (its certificate's CN/SAN)")
    p.add_argument("--credentials", type=Path, default=None,
                   help="with --server: folder with ca.crt and clients/<ID>.pem, clients/<ID>.key")
    p.add_argument("--server-name", default=None,
                   help="with --server: the name to check the server's certificate against (default: its host)")


def _split(args) -> int:
    from fedguard.split.messages import ProtocolError

    if args.split_command == "certs":
        return _split_certs(args)
    try:
        return _split_step(args, load_config(args.config, args.overrides))
    except Exception as exc:
        remote = sys.modules.get("fedguard.split.grpc_transport")  # imported only by the network paths
        errors = (ProtocolError,) if remote is None else (ProtocolError, remote.SplitTransportError,
                                                          remote.SplitRemoteError)
        if isinstance(exc, errors):
            print(f"fedguard: {exc}", file=sys.stderr)
            return 2
        raise


def _split_certs(args) -> int:
    from fedguard.deploy.certs import make_client_cert, make_credentials

    if args.clients < 0:
        raise ConfigError("--clients must be >= 0")
    ids = list(dict.fromkeys([*(str(i) for i in range(args.clients)), *args.client_ids]))
    creds = make_credentials(args.out, 0, args.host or None)
    for cid in ids:
        try:
            make_client_cert(creds, cid)
        except ValueError as exc:
            raise ConfigError(f"--client-id: {exc}") from None
    print(f"CA: {creds.ca_cert} (keep {creds.ca_key} offline)\nserver: {creds.server_cert}, {creds.server_key}\n"
          f"clients: {', '.join(ids) or 'none'} in {creds.root / 'clients'} (give each site ca.crt and its own pair)")
    return 0


def _remote(args) -> tuple[str, str, Path] | None:
    """(server, client id, credentials) of --server, or None for the in-process path."""
    given = [f for f in ("client_id", "credentials", "server_name") if getattr(args, f) is not None]
    if args.server is None:
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} is only used with --server HOST:PORT")
        return None
    missing = [f for f in ("client_id", "credentials") if getattr(args, f) is None]
    if missing:
        raise ConfigError(f"--server needs --{missing[0].replace('_', '-')}")
    return args.server, args.client_id, args.credentials


def _split_serve(args, cfg) -> int:
    import signal
    import threading

    from fedguard.split.network import serve_split

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    clients = [c.strip() for c in args.clients.split(",") if c.strip()] if args.clients else None

    def ready(address: str, run_dir: Path) -> None:
        print(f"split server listening on {address} (mutual TLS); run directory: {run_dir}; "
              "SIGINT/SIGTERM stops it", flush=True)

    run_dir = serve_split(cfg, args.address, args.credentials, args.run_dir, clients=clients, adapters=args.adapters,
                          quiet=args.quiet, stop=stop, on_ready=ready, flush_seconds=args.flush_seconds)
    print(f"split server stopped; run directory: {run_dir}", flush=True)
    return 0


def _split_step(args, cfg) -> int:
    if args.split_command == "serve":
        return _split_serve(args, cfg)
    remote = _remote(args)
    if args.split_command == "train":
        if remote is not None:
            from fedguard.split.network import connect, train_remote

            if args.partition is not None and args.partition < 0:
                raise ConfigError("--partition must be >= 0")
            with connect(cfg, remote[0], remote[1], remote[2], server_name=args.server_name) as transport:
                result = train_remote(cfg, transport, remote[1], args.run_dir, partition=args.partition,
                                      quiet=args.quiet)
            m = result.final_metrics
            print(f"client {m['client']}: loss {m['loss_first']:.4f} -> {m['loss_last']:.4f} over "
                  f"{m['client_steps']} steps; {m['seconds_per_step']:.2f} s and {m['bytes_per_step']:.0f} bytes "
                  f"per step; {m['bytes_total']} bytes over the wire")
            print(f"run directory: {result.run_dir}")
            return 0
        if args.partition is not None:
            raise ConfigError("--partition is only used with --server HOST:PORT")
        from fedguard.split.train import train_split

        result = train_split(cfg, args.run_dir, quiet=args.quiet)
        m = result.final_metrics
        print(f"loss {m['loss_first']:.4f} -> {m['loss_last']:.4f} over {m['client_steps']} client steps; "
              f"{m['bytes_total']} bytes over the wire")
        print(f"run directory: {result.run_dir}")
        return 0
    max_new = args.max_new_tokens or cfg.eval.max_new_tokens
    if max_new < 1:
        raise ConfigError("--max-new-tokens must be at least 1")
    if remote is not None:
        from fedguard.split.network import connect, generate_remote

        with connect(cfg, remote[0], remote[1], remote[2], server_name=args.server_name) as transport:
            out = generate_remote(cfg, transport, remote[1], args.prompt, max_new_tokens=max_new,
                                  adapters=args.adapters, adapters_client=args.client)
    else:
        out = _generate_in_process(args, cfg, max_new)
    for prompt, answer in zip(args.prompt, out["answers"]):
        print(f"> {prompt}\n{answer}\n")
    print("bytes per message kind (up/down): " + ", ".join(f"{k} {v['up']}/{v['down']}"
                                                         for k, v in out["bytes"].items()))
    if args.json is not None:
        from fedguard.io import atomic_write_json

        atomic_write_json(args.json, out)
    return 0


def _generate_in_process(args, cfg, max_new: int) -> dict:
    from fedguard.alignment import load_start_model
    from fedguard.split.generate import generate_chat
    from fedguard.split.train import build_split_system, load_split_adapters

    owner = args.client or "0"
    loaded = load_start_model(cfg.model)
    system = build_split_system(cfg, loaded, client_ids=[owner])
    if args.adapters is not None:
        load_split_adapters(system, args.adapters, owner)
    client = system.clients[0]
    client.hello()
    t0 = time.perf_counter()
    answers, tokens = generate_chat(client, loaded.tokenizer, args.prompt, max_new_tokens=max_new,
                                    system_prompt=cfg.data.system_prompt)
    return {"prompts": list(args.prompt), "answers": answers, "tokens": tokens.tolist(),
            "bytes": system.transport.bytes_of(), "decode_steps": system.transport.messages.get("decode", 0),
            "seconds": time.perf_counter() - t0}


def _deploy(args) -> int:
    import os

    from fedguard.deploy import certs
    from fedguard.deploy.launch import Deployment, local

    step = args.deploy_command
    if step == "certs":
        creds = certs.make_credentials(args.out, args.nodes, args.host or None)
        print(f"CA: {creds.ca_cert} (keep {creds.root / 'ca.key'} offline)\nSuperLink: {creds.server_cert}, "
              f"{creds.server_key}\nnode keys: {args.nodes} in {creds.root / 'nodes'}")
        return 0
    if step == "node-key":
        certs.write_node_key(args.out)
        print(f"private key {args.out} (stays here); public key {args.out}.pub (send it to the SuperLink's operator)")
        return 0
    if step == "local":
        cfg = load_config(args.config, args.overrides)
        return local(cfg.to_yaml(), args.run_dir, args.workdir, cfg.federation.num_clients, args.port)
    dep = Deployment(args.workdir, args.ca, superlink=args.superlink)
    if step == "superlink":
        cmd = dep.superlink_command(args.cert, args.key, listen=args.listen, database=args.database)
        dep.write_profile()
    elif step == "register":
        dep.write_profile()
        for key in args.public_keys:
            print(f"{key}: SuperNode {dep.register(key)} registered")
        return 0
    elif step == "supernode":
        if args.data_path and args.client_id is None:
            raise ConfigError("--data-path needs --client-id (which client of the federation this node is)")
        cid = args.partition_id if args.partition_id is not None else args.client_id
        cmd = dep.supernode_command(args.key, cid, data_path=args.data_path, port=args.port)
    else:  # submit
        cfg = load_config(args.config, args.overrides)
        dep.write_profile()
        return dep.submit(cfg.to_yaml(), args.run_dir).returncode
    print(" ".join(cmd), flush=True)
    os.execve(cmd[0], cmd, dep.env())  # the foreground process is Flower's own
    return 0


def _report(run_dir: Path) -> int:
    from fedguard.io import read_ndjson
    from fedguard.reporting.report import write_report
    from fedguard.run_dir import FINAL_METRICS_FILE, METRICS_FILE, load_run_config

    cfg = load_run_config(run_dir)
    final_path = run_dir / FINAL_METRICS_FILE
    if not final_path.is_file():
        raise ConfigError(f"{run_dir} has not finished (no {FINAL_METRICS_FILE}); resume it first")
    final = json.loads(final_path.read_text(encoding="utf-8"))
    print(write_report(run_dir, cfg, read_ndjson(run_dir / METRICS_FILE), final))
    return 0


def _sweep(args) -> int:
    from fedguard.recipes.sweep import run_sweep

    cfg = load_config(args.config, args.overrides)

    def listed(flag: str | None, default):
        return [x.strip() for x in flag.split(",") if x.strip()] if flag else default

    levels = listed(args.levels, list(cfg.sweep.levels))
    bad = [lv for lv in levels if lv not in DEFENSE_LEVELS]
    if bad:
        raise ConfigError(f"--levels: unknown defense level(s) {bad}")
    out = args.out or Path(cfg.output_dir) / f"{cfg.name}-sweep"
    if args.jobs < 1:
        raise ConfigError("--jobs must be at least 1")
    t0 = time.perf_counter()
    report = run_sweep(cfg, listed(args.ratios, list(cfg.sweep.ratios)), levels, out, quiet=args.quiet,
                       attacks=listed(args.attacks, cfg.sweep.attacks), jobs=args.jobs,
                       aggregators=listed(args.aggregators, cfg.sweep.aggregators), report_only=args.report_only,
                       benign_only=cfg.sweep.benign_only)
    for line in json.loads((report.parent / "sweep.json").read_text(encoding="utf-8"))["headline"]:
        print(f"\n{line}")
    print(f"\nsweep report: {report}")
    print(f"done in {_duration(time.perf_counter() - t0)} (cells already finished are not run again)")
    return 0


def _duration(seconds: float) -> str:
    m, sec = divmod(round(seconds), 60)
    return f"{m} min {sec:02d} s" if m else f"{sec} s"


def _console_log() -> None:
    import logging

    from rich.logging import RichHandler

    logger = logging.getLogger("fedguard")
    logger.setLevel(logging.INFO)
    logger.addHandler(RichHandler(show_path=False))


def _align(cfg) -> int:
    from fedguard.alignment.align import REPORT_FILE, ensure_aligned

    _console_log()
    path = ensure_aligned(cfg.model)
    report = json.loads((path / REPORT_FILE).read_text(encoding="utf-8"))
    print(f"aligned model: {path}")
    stages = [s for s in ("base", "supervised", "aligned") if s in report]  # supervised: before a preference phase
    print(f"{'set':<28} " + " ".join(f"{s:>10}" for s in stages) + "   (n)")
    for name, base in report["base"].items():
        if isinstance(base, dict):
            key = "rate" if "rate" in base else "refusal_rate"
            print(f"{name:<28} " + " ".join(f"{report[s][name][key]:>9.1f}%" for s in stages) + f"   ({base['n']})")
        else:
            print(f"{name:<28} " + " ".join(f"{report[s][name]:>10.4f}" for s in stages))
    return 0


def _probe_build(cfg, out: Path | None, compare: bool) -> int:
    from fedguard.defenses.build import build_probe
    from fedguard.federated.client import LocalTrainer
    from fedguard.alignment import load_start_model
    from fedguard.model import attach_lora

    _console_log()
    loaded = load_start_model(cfg.model)
    peft_model, slot = attach_lora(loaded.model, cfg.lora)
    theta0 = slot.read()
    probe, path, comparison = build_probe(cfg, loaded, LocalTrainer(loaded, peft_model, slot), theta0, out, compare)
    m = probe.metrics
    f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"probe: {path}")
    print(f"threshold tau {probe.threshold:.4f} ({m.get('calibration', 'fixed')})")
    for level in ("client", "shadow"):
        if f"{level}_level" in m:
            r = m[f"{level}_level"]
            print(f"  {level} level: tau {probe.threshold_for(level):.4f}; held-out clients TPR {f(r['recall'])}, "
                  f"FPR {f(r['fpr'])} ({r['tp'] + r['fn']} malicious, {r['fp'] + r['tn']} benign trainings)")
    print(f"unseen clients ({m['samples']['heldout']} step samples): AUROC {f(m['auroc'])}, TPR {f(m['recall'])}, "
          f"FPR {f(m['fpr'])} at tau; precision {f(m['precision'])}; benign-client FPR {f(m['benign_client_fpr'])}")
    for name, label in (("leave_categories_out", "unseen harm categories"), ("leave_styles_out", "unseen response styles")):
        r = m.get(name)
        if r:
            print(f"{label} ({len(r['folds'])} folds, worst fold): AUROC {f(r['auroc_min'])}, TPR {f(r['tpr_min'])}, "
                  f"FPR {f(r['fpr_max'])} at each fold's calibrated tau")
    if m.get("transfer_source"):
        t = m["transfer_source"]
        print(f"transfer to {t['source']} ({t['malicious_samples']} samples, never trained on): AUROC {f(t['auroc'])}, "
              f"TPR {f(t['tpr'])}, FPR {f(t['fpr'])} at tau")
    for sel, r in comparison.items():
        print(f"  selection {sel:<11} dim {r['dim']:>7}  AUROC {r['auroc']:.4f}  recall {r['recall']}  fpr {r['fpr']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
