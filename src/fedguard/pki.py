"""The federation's PKI, made with ``cryptography`` (no openssl scripts), and the rule for a participant's name.

A client id travels in messages and is what a certificate names (TLS CN and DNS SAN): one rule
(``CLIENT_ID``) for certificates, the split protocol and the command line. Certificates and keys serve a Flower
deployment (``fedguard deploy``) and the split-learning transport (``fedguard split``).

``make_credentials(out, nodes, hosts)`` writes:

  ca.crt, ca.key                 the federation's certificate authority (keep ca.key offline)
  server.pem, server.key         the SuperLink's TLS certificate (SANs: every host it is reached by)
  nodes/node-K, nodes/node-K.pub each SuperNode's authentication key pair (EC P-384, OpenSSH format,
                                 what flower-supernode --auth-supernode-private-key and node registration read)

``make_client_cert(creds, client_id)`` adds, signed by the same CA (for mutual TLS, e.g. the split-learning
transport, which binds the certificate's CN/SAN to the client id a client claims):

  clients/<id>.pem, clients/<id>.key   one client's TLS certificate (CN and DNS SAN = the client id,
                                       extended key usage clientAuth) and its private key

Private keys are written 0600. Only the public keys (and ca.crt) ever leave the site that made them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path


CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
CLIENT_ID_RULE = "1-64 of [A-Za-z0-9._-], starting with a letter or digit"
VALID_DAYS = 365


def is_client_id(value: object) -> bool:
    return isinstance(value, str) and CLIENT_ID.fullmatch(value) is not None


@dataclass(frozen=True)
class Credentials:
    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    def node_key(self, k: int) -> Path:
        return self.root / "nodes" / f"node-{k}"

    def node_public_key(self, k: int) -> Path:
        return self.root / "nodes" / f"node-{k}.pub"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    def client_cert(self, client_id: str) -> Path:
        return self.root / "clients" / f"{client_id}.pem"

    def client_key(self, client_id: str) -> Path:
        return self.root / "clients" / f"{client_id}.key"


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedguard"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: list[str]):
    from cryptography import x509

    names = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_credentials(out: str | Path, nodes: int, hosts: list[str] | None = None) -> Credentials:
    """A CA, the SuperLink's certificate for ``hosts`` (plus localhost and 127.0.0.1) and ``nodes`` node keys."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    creds = Credentials(Path(out))
    # the SuperLink's own ServerApp process reaches it over loopback, so those names are always in
    hosts = list(dict.fromkeys([*(hosts or []), "localhost", "127.0.0.1"]))
    now = dt.datetime.now(dt.timezone.utc)
    pem = serialization.Encoding.PEM
    pkcs8 = dict(encoding=pem, format=serialization.PrivateFormat.PKCS8,
                 encryption_algorithm=serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(_name("fedguard federation CA")).issuer_name(_name("fedguard federation CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA384()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
              .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
              .add_extension(_san(hosts), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA384()))
    _write(creds.ca_cert, ca.public_bytes(pem))
    _write(creds.root / "ca.key", ca_key.private_bytes(**pkcs8), private=True)
    _write(creds.server_cert, server.public_bytes(pem))
    _write(creds.server_key, server_key.private_bytes(**pkcs8), private=True)
    for k in range(nodes):
        node_key(creds, k)
    return creds


def node_key(creds: Credentials, k: int) -> None:
    write_node_key(creds.node_key(k))


def write_node_key(path: str | Path) -> Path:
    """One SuperNode's authentication key pair: ``path`` (private, 0600) and ``path.pub``. Made at the node's
    site in a real deployment; only the public key travels."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = Path(path)
    key = ec.generate_private_key(ec.SECP384R1())
    _write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()), private=True)
    _write(path.with_name(path.name + ".pub"), key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return path


# a client id that is safe as a file name, a certificate CN and a DNS SAN
def make_client_cert(creds: Credentials, client_id: str, valid_days: int = VALID_DAYS) -> tuple[Path, Path]:
    """A TLS client certificate for ``client_id`` signed by the federation's CA (``creds.ca_key`` must be
    present: run where the CA lives). CN and DNS SAN are the client id, so a server can bind the TLS identity to
    the client id a request claims. Returns (certificate, private key) paths; the key is written 0600."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not is_client_id(client_id):
        raise ValueError(f"client id {client_id!r}: use {CLIENT_ID_RULE}")
    pem = serialization.Encoding.PEM
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(creds.ca_key.read_bytes(), password=None)
    now = dt.datetime.now(dt.timezone.utc)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder().subject_name(_name(client_id)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=valid_days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(client_id)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write(creds.client_cert(client_id), cert.public_bytes(pem))
    _write(creds.client_key(client_id), key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()), private=True)
    return creds.client_cert(client_id), creds.client_key(client_id)
