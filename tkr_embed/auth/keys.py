"""API key material: generation, parsing, digests, permissions.

A key is `tke_<id>_<secret>`: a public 12-hex-digit id (used to look the key up) and a 256-bit
random secret (43 base64url characters). Only a digest of the secret is stored: SHA-256, or
HMAC-SHA256 with a server secret when one is configured (a stolen database then cannot be
checked offline). Digests are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

PREFIX = "tke"
PERMISSIONS = ("embed:text", "embed:image", "embed:multimodal", "similarity", "admin")
ADMIN = "admin"
MAX_KEY_LENGTH = 256  # anything longer is malformed, not looked up

_KEY_RE = re.compile(r"^tke_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class NewKey:
    id: str
    secret: str

    @property
    def token(self) -> str:
        return f"{PREFIX}_{self.id}_{self.secret}"


def generate() -> NewKey:
    return NewKey(secrets.token_hex(6), secrets.token_urlsafe(32))


def parse(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed key, else None."""
    if len(token) > MAX_KEY_LENGTH:
        return None
    m = _KEY_RE.match(token)
    return (m.group(1), m.group(2)) if m else None


class Hasher:
    def __init__(self, server_secret: str | None):
        self._server_secret = server_secret.encode() if server_secret else None

    @property
    def kind(self) -> str:
        return "hmac-sha256" if self._server_secret else "sha256"

    def digest(self, secret: str) -> str:
        if self._server_secret:
            return hmac.new(self._server_secret, secret.encode(), hashlib.sha256).hexdigest()
        return hashlib.sha256(secret.encode()).hexdigest()

    def matches(self, secret: str, stored: str, stored_kind: str) -> bool:
        # A digest made with another scheme (server secret added or removed) never matches.
        computed = self.digest(secret)
        return hmac.compare_digest(computed, stored) and stored_kind == self.kind


def check_permissions(perms: list[str]) -> list[str]:
    unknown = [p for p in perms if p not in PERMISSIONS]
    if unknown:
        raise ValueError(f"unknown permission(s) {', '.join(unknown)}; valid: {', '.join(PERMISSIONS)}")
    if not perms:
        raise ValueError(f"a key needs at least one permission: {', '.join(PERMISSIONS)}")
    return sorted(set(perms), key=PERMISSIONS.index)


def grants(perms: frozenset[str] | set[str], needed: str) -> bool:
    """admin grants everything; otherwise the exact permission is needed."""
    return ADMIN in perms or needed in perms
