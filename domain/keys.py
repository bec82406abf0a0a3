"""API keys: stored as SHA-256 hashes, never in the clear."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import ApiKey


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return "mp_" + secrets.token_urlsafe(32)


def create_key(session: Session, owner: str, key: str | None = None, name: str = "") -> str:
    """Store a key for ``owner`` (idempotent for an existing key). Returns the clear key."""
    key = key or generate_key()
    h = hash_key(key)
    if session.scalar(select(ApiKey).where(ApiKey.key_hash == h)) is None:
        session.add(ApiKey(owner=owner, key_hash=h, name=name))
    return key


def owner_for_key(session: Session, key: str) -> str | None:
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key),
                                              ApiKey.revoked.is_(False)))
    return row.owner if row else None
