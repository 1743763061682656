"""A participant's name as it travels and as certificates carry it (TLS CN and DNS SAN): one rule for the
PKI (``deploy.certs``), the split protocol and the command line."""

from __future__ import annotations

import re

CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
CLIENT_ID_RULE = "1-64 of [A-Za-z0-9._-], starting with a letter or digit"


def is_client_id(value: object) -> bool:
    return isinstance(value, str) and CLIENT_ID.fullmatch(value) is not None
