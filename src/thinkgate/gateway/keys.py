"""API key secrets: made here, shown once, stored only as a SHA-256 hash plus a short display prefix.

A key is 32 random bytes (256 bits), so a fast hash is the right tool (as GitHub and OpenAI do): nothing to
brute-force, and a lookup by hash costs microseconds per request. Slow password hashes are for passwords.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

PREFIX = "sk-tg-"
DISPLAY_CHARS = 10  # "sk-tg-" and four characters of the secret, for listings


def new_secret() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def display_prefix(secret: str) -> str:
    return secret[:DISPLAY_CHARS] + "..."


def same_hash(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def looks_like_key(value: str) -> bool:
    return value.startswith(PREFIX) and len(value) > len(PREFIX) + 20
