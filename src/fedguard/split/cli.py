"""`fedguard split certs | serve | train | generate`: FedSEA-style split learning, in process or over gRPC with
mutual TLS.

Handlers import what they run when they run (lazy imports): `fedguard --help` never imports torch or gRPC.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fedguard.config import ConfigError, add_config_arguments, load_config
from fedguard.io import atomic_write_json


def register(sub) -> None:
    sp = sub.add_parser("split", help="FedSEA-style split learning: clients hold the first and last blocks, the "
                                      "server the middle (certs, serve, train, generate)",
                        description="U-shaped split learning (fedguard.split), in process (every message between "
                                    "the clients and the server goes through bytes and is metered) or across "
                                    "processes: `split serve` runs the server over gRPC with mutual TLS, "
                                    "`split train|generate --server HOST:PORT` run one client against it.")
    sp.set_defaults(handler=_split)
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
    add_config_arguments(se)
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
    add_config_arguments(tr)
    tr.add_argument("--run-dir", type=Path, default=None, help="default: OUTPUT_DIR/NAME-split-TIMESTAMP")
    tr.add_argument("--quiet", action="store_true", help="no console logs (run.log still written)")
    _remote_options(tr)
    tr.add_argument("--partition", type=int, default=None,
                    help="with --server: which data partition is this client's (default: the client id as a number)")
    ge = ssub.add_parser("generate", help="collaborative greedy decoding through the server (KV cache per party)",
                         description="Greedy decoding of chat prompts with the client's parts and the server's "
                                     "middle, each with its own KV cache; one [B,1,H] hidden state each way per "
                                     "token. Prints the answers and the bytes per message kind.")
    add_config_arguments(ge)
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
    # lazy: the split package imports torch
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
    # lazy: certificates need cryptography, which nothing else here does
    from fedguard.pki import make_client_cert, make_credentials

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

    # lazy: the server loads the model and gRPC
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
            # lazy: one remote client loads the model and gRPC
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
        # lazy: the in-process recipe loads the model
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
        # lazy: one remote client loads the model and gRPC
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
        atomic_write_json(args.json, out)
    return 0


def _generate_in_process(args, cfg, max_new: int) -> dict:
    # lazy: the model and the split recipe (torch, transformers)
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
