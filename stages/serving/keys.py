"""Principals: who may query, how much, how fast, and what happens when they look like a thief.

A keys file is TOML, one table per principal under `principals`. API keys are `ini_<key id>_<secret>`; the file
keeps the key id (to find the principal without trying every hash) and the argon2id hash of the whole key, never
the key itself. A verified key is remembered in memory by its SHA-256, so argon2's deliberate cost (tens of
milliseconds) is paid once per key and process, not per request.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from models.params import UserError
from stages.core.artifacts import atomic_path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ACTIONS = ("log", "throttle", "block")
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
PREFIX = "ini_"
KEY_ID_HEX = 8


@dataclass(frozen=True)
class Principal:
    name: str
    key_id: str
    key_hash: str  # argon2id, PHC string
    budget: int  # images over the key's lifetime
    rate: float  # images per second, token bucket refill
    burst: float  # bucket size in images
    action: str  # on an extraction alert: log, throttle or block
    prior: Optional[tuple[float, ...]] = None  # declared share of each class in the key's traffic


def _hasher():
    from argon2 import PasswordHasher

    return PasswordHasher()  # argon2id, RFC 9106 low-memory profile


def read(path: Path) -> dict[str, Principal]:
    """Every principal of a keys file, checked; by key id."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such keys file; create one with `python cli.py serve-key NAME --keys {path}`")
    try:
        tables = tomllib.loads(path.read_text()).get("principals", {})
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a TOML keys file ({e})") from None
    principals = {}
    for name, t in tables.items():
        try:
            p = Principal(
                name,
                str(t["key_id"]),
                str(t["key_hash"]),
                int(t["budget"]),
                float(t["rate"]),
                float(t["burst"]),
                str(t["action"]),
                tuple(float(v) for v in t["prior"]) if "prior" in t else None,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}: principal {name!r} lacks or mistypes {e}") from None
        _check(p, f"{path}: principal {name!r}")
        if p.key_id in principals:
            raise UserError(f"{path}: key id {p.key_id} appears twice")
        principals[p.key_id] = p
    return principals


def _check(p: Principal, where: str) -> None:
    if not NAME.match(p.name):
        raise UserError(f"{where}: names are 1-64 letters, digits, '_', '.' or '-'")
    if p.budget < 0 or not 0 < p.rate < float("inf") or not 1 <= p.burst < float("inf"):
        raise UserError(f"{where}: budget must be >= 0, rate > 0 and burst >= 1 (finite)")
    if p.action not in ACTIONS:
        raise UserError(f"{where}: action must be one of {', '.join(ACTIONS)}, got {p.action!r}")
    if p.prior is not None and (min(p.prior, default=-1) < 0 or abs(sum(p.prior) - 1.0) > 1e-3):
        raise UserError(f"{where}: prior must be shares >= 0 summing to 1, got {list(p.prior)}")
    if not p.key_hash.startswith("$argon2") or not re.fullmatch(f"[0-9a-f]{{{KEY_ID_HEX}}}", p.key_id):
        raise UserError(f"{where}: key_id and key_hash must be those `serve-key` writes")


def add(
    path: Path,
    name: str,
    budget: int,
    rate: float,
    burst: Optional[float],
    action: str,
    prior: Optional[tuple[float, ...]] = None,
) -> str:
    """Add a principal to the keys file (created if missing) and return its new API key, the only time it exists."""
    path = Path(path)
    existing = read(path) if path.exists() else {}
    if any(p.name == name for p in existing.values()):
        raise UserError(f"{path}: principal {name!r} exists already")
    key_id = secrets.token_hex(KEY_ID_HEX // 2)
    while key_id in existing:
        key_id = secrets.token_hex(KEY_ID_HEX // 2)
    key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(24)}"
    principal = Principal(
        name, key_id, _hasher().hash(key), budget, rate, burst if burst is not None else max(rate, 1.0), action, prior
    )
    _check(principal, f"principal {name!r}")
    with atomic_path(path) as partial:
        partial.write_text(_render([*existing.values(), principal]))
    return key


def _render(principals: list[Principal]) -> str:
    lines = [
        "# ini-toolkit serve: principals and the argon2id hashes of their API keys (never the keys).",
        "# budget: images over the key's lifetime; rate: images/s (token bucket of `burst` images);",
        "# action on an extraction alert: log, throttle or block; prior: declared share of each class in its traffic.",
        "",
    ]
    for p in principals:
        lines += [
            f"[principals.{json.dumps(p.name)}]",
            f"key_id = {json.dumps(p.key_id)}",
            f"key_hash = {json.dumps(p.key_hash)}",
            f"budget = {p.budget}",
            f"rate = {p.rate!r}",
            f"burst = {p.burst!r}",
            f"action = {json.dumps(p.action)}",
            *([f"prior = {json.dumps(list(p.prior))}"] if p.prior is not None else []),
            "",
        ]
    return "\n".join(lines)


class Authenticator:
    """API key -> principal; each key verified against its argon2 hash once, then known by its SHA-256."""

    def __init__(self, principals: dict[str, Principal]):
        self._by_id = principals
        self._known: dict[bytes, Principal] = {}
        self._refused: set[bytes] = set()  # wrong secrets of real key ids: not hashed again
        self._hasher = _hasher()

    def identify(self, key: Optional[str]) -> Optional[Principal]:
        if not key or not key.startswith(PREFIX) or len(key) > 200:
            return None
        digest = hashlib.sha256(key.encode()).digest()
        if digest in self._known:
            return self._known[digest]
        principal = self._by_id.get(key[len(PREFIX) : len(PREFIX) + KEY_ID_HEX])
        if principal is None or digest in self._refused:
            return None
        from argon2.exceptions import InvalidHashError, VerificationError

        try:
            self._hasher.verify(principal.key_hash, key)
        except (VerificationError, InvalidHashError):
            if len(self._refused) < 100_000:
                self._refused.add(digest)
            return None
        self._known[digest] = principal
        return principal
