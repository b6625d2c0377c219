"""The watermark's secret key: a file of random bytes, created 0600 when absent, never logged and never recorded;
artifacts carry only its fingerprint (models/defenses.py, `key_fingerprint`)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from models.defenses import key_fingerprint
from models.params import UserError

DEFAULT_KEY = Path("artifacts/watermark.key")
KEY_BYTES = 32  # HMAC-SHA256's block-size guidance: a key of at least the digest's length
MIN_BYTES = 16


def load(path: Path) -> bytes:
    """The key in `path`; a missing, unreadable or short file is the user's error."""
    path = Path(path)
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no watermark key there") from None
    except IsADirectoryError:
        raise UserError(f"{path}: a directory, not a watermark key") from None
    if len(key) < MIN_BYTES:
        raise UserError(f"{path}: a watermark key holds at least {MIN_BYTES} bytes, this one {len(key)}")
    return key


def load_or_create(path: Path) -> bytes:
    """The key in `path`, written first (random, mode 0600, never overwritten) when the file does not exist."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process wrote it first: use theirs
            return load(path)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(KEY_BYTES))
    return load(path)


def fingerprint(key: bytes) -> str:
    return key_fingerprint(key)
