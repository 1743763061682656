"""`fedguard deploy certs | node-key | superlink | register | supernode | submit | local`: a real Flower
deployment (docs/guide/deployment.md gives the order of the steps).

The handler imports the launcher when it runs (a lazy import): `fedguard --help` stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedguard.config import ConfigError, add_config_arguments, load_config


def register(sub) -> None:
    dp = sub.add_parser("deploy", help="a real Flower deployment: credentials, SuperLink, SuperNodes, runs",
                        description="Run fedguard on Flower's deployment engine: one SuperLink (TLS, SuperNode "
                                    "authentication) and one SuperNode per organisation. docs/guide/deployment.md gives "
                                    "the order of the steps.")
    dp.set_defaults(handler=_deploy)
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
    add_config_arguments(sb)
    sb.add_argument("--run-dir", type=Path, required=True, help="where the SuperLink's machine writes the run")
    lo = dsub.add_parser("local", help="all of it on this machine (credentials, SuperLink, N SuperNodes, the run)")
    add_config_arguments(lo)
    lo.add_argument("--run-dir", type=Path, required=True)
    lo.add_argument("--workdir", type=Path, default=Path("deploy-local"))
    lo.add_argument("--port", type=int, default=9093, help="the SuperLink's port; nodes use the next ones")


def _deploy(args) -> int:
    # lazy: the launcher imports Flower's environment settings; certificates need cryptography
    from fedguard import pki as certs
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
