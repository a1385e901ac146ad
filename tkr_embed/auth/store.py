"""The API key store, through SQLAlchemy: a SQLite file by default, PostgreSQL by URL.

It holds ids, names, permissions, dates, usage counters and digests, never a secret. The server
and the `tkr-embed keys` command open the same database, so keys made by either are seen by both
on the next request (no caching of key records).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import DateTime, Integer, String, Text, create_engine, event, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .keys import Hasher, NewKey, check_permissions, generate, parse


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _aware(dt: datetime | None) -> datetime | None:
    # SQLite gives naive datetimes back; everything is stored in UTC.
    return dt.replace(tzinfo=timezone.utc) if dt is not None and dt.tzinfo is None else dt


class Base(DeclarativeBase):
    pass


class APIKeyRow(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    digest: Mapped[str] = mapped_column(String(128))
    digest_kind: Mapped[str] = mapped_column(String(32))
    permissions: Mapped[str] = mapped_column(Text)  # JSON list
    rate_limits: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON object or null
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    rotated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    request_count: Mapped[int] = mapped_column(Integer, default=0)
    item_count: Mapped[int] = mapped_column(Integer, default=0)


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    permissions: tuple[str, ...]
    rate_limits: dict | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    rotated_at: datetime | None
    last_used_at: datetime | None
    request_count: int
    item_count: int

    @classmethod
    def from_row(cls, r: APIKeyRow) -> "KeyRecord":
        return cls(r.id, r.name, tuple(json.loads(r.permissions)),
                   json.loads(r.rate_limits) if r.rate_limits else None, _aware(r.created_at),
                   _aware(r.expires_at), _aware(r.revoked_at), _aware(r.rotated_at), _aware(r.last_used_at),
                   r.request_count, r.item_count)

    def status(self, now: datetime | None = None) -> str:
        now = now or utcnow()
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def public(self) -> dict[str, Any]:
        """What the admin API and CLI show: everything but secrets and digests."""
        iso = lambda d: d.isoformat() if d else None  # noqa: E731
        return {
            "id": self.id, "name": self.name, "permissions": list(self.permissions),
            "rate_limits": self.rate_limits, "status": self.status(),
            "created_at": iso(self.created_at), "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at), "rotated_at": iso(self.rotated_at),
            "last_used_at": iso(self.last_used_at),
            "usage": {"requests": self.request_count, "items": self.item_count},
        }


class AuthFailure(Exception):
    """Why a presented key was refused: malformed, unknown, revoked or expired."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class KeyNotFound(LookupError):
    pass


UNSET: Any = object()
RATE_LIMIT_FIELDS = ("per_minute", "per_hour", "per_day", "burst")


def check_rate_limits(limits: dict | None) -> dict | None:
    if limits is None:
        return None
    unknown = set(limits) - set(RATE_LIMIT_FIELDS)
    if unknown:
        raise ValueError(f"unknown rate limit field(s) {', '.join(sorted(unknown))}; valid: {', '.join(RATE_LIMIT_FIELDS)}")
    clean = {}
    for k, v in limits.items():
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"rate limit {k} must be a positive integer")
        clean[k] = v
    return clean or None


class KeyStore:
    def __init__(self, url: str, server_secret: str | None = None):
        connect_args = {"timeout": 10, "check_same_thread": False} if url.startswith("sqlite") else {}
        self.engine = create_engine(url, connect_args=connect_args, pool_pre_ping=True)
        if url.startswith("sqlite"):
            @event.listens_for(self.engine, "connect")
            def _sqlite_pragmas(conn, _):  # readers never block the writer (server + CLI at once)
                cur = conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA busy_timeout=10000")
                cur.close()
        Base.metadata.create_all(self.engine)
        self.hasher = Hasher(server_secret)
        self._usage_lock = threading.Lock()
        self._pending_usage: dict[str, list] = {}  # id -> [requests, items, last_used]

    # ---- management -----------------------------------------------------------------------
    def create(self, name: str, permissions: list[str], expires_in_days: float | None = None,
               rate_limits: dict | None = None) -> tuple[KeyRecord, str]:
        """Returns the record and the full key, which is never retrievable again."""
        name = name.strip()
        if not 1 <= len(name) <= 200:
            raise ValueError("name must be 1 to 200 characters")
        perms = check_permissions(permissions)
        limits = check_rate_limits(rate_limits)
        now = utcnow()
        expires = now + timedelta(days=expires_in_days) if expires_in_days else None
        for _ in range(5):  # ids are random: retry on the (unlikely) collision
            new: NewKey = generate()
            row = APIKeyRow(id=new.id, name=name, digest=self.hasher.digest(new.secret), digest_kind=self.hasher.kind,
                            permissions=json.dumps(perms), rate_limits=json.dumps(limits) if limits else None,
                            created_at=now, expires_at=expires, request_count=0, item_count=0)
            try:
                with Session(self.engine) as s, s.begin():
                    s.add(row)
                return self.get(new.id), new.token
            except IntegrityError:
                continue
        raise RuntimeError("could not allocate a unique key id")

    def get(self, key_id: str) -> KeyRecord:
        with Session(self.engine) as s:
            row = s.get(APIKeyRow, key_id)
            if row is None:
                raise KeyNotFound(key_id)
            return KeyRecord.from_row(row)

    def list(self) -> list[KeyRecord]:
        with Session(self.engine) as s:
            return [KeyRecord.from_row(r) for r in s.scalars(select(APIKeyRow).order_by(APIKeyRow.created_at))]

    def count(self) -> int:
        with Session(self.engine) as s:
            return s.scalar(select(func.count()).select_from(APIKeyRow)) or 0

    def update(self, key_id: str, *, name: str | None = None, permissions: list[str] | None = None,
               expires_in_days: Any = UNSET, rate_limits: Any = UNSET) -> KeyRecord:
        """Change what is given; expires_in_days/rate_limits = None clear them, UNSET leaves them."""
        with Session(self.engine) as s, s.begin():
            row = s.get(APIKeyRow, key_id)
            if row is None:
                raise KeyNotFound(key_id)
            if name is not None:
                name = name.strip()
                if not 1 <= len(name) <= 200:
                    raise ValueError("name must be 1 to 200 characters")
                row.name = name
            if permissions is not None:
                row.permissions = json.dumps(check_permissions(permissions))
            if expires_in_days is not UNSET:
                row.expires_at = utcnow() + timedelta(days=expires_in_days) if expires_in_days else None
            if rate_limits is not UNSET:
                limits = check_rate_limits(rate_limits)
                row.rate_limits = json.dumps(limits) if limits else None
        return self.get(key_id)

    def revoke(self, key_id: str) -> KeyRecord:
        with Session(self.engine) as s, s.begin():
            row = s.get(APIKeyRow, key_id)
            if row is None:
                raise KeyNotFound(key_id)
            if row.revoked_at is None:
                row.revoked_at = utcnow()
        return self.get(key_id)

    def rotate(self, key_id: str) -> tuple[KeyRecord, str]:
        """New secret, same id, permissions and history; the old secret stops working at once."""
        new = generate()
        token = f"tke_{key_id}_{new.secret}"
        with Session(self.engine) as s, s.begin():
            row = s.get(APIKeyRow, key_id)
            if row is None:
                raise KeyNotFound(key_id)
            if row.revoked_at is not None:
                raise ValueError("a revoked key cannot be rotated")
            row.digest, row.digest_kind, row.rotated_at = self.hasher.digest(new.secret), self.hasher.kind, utcnow()
        return self.get(key_id), token

    # ---- the request path -----------------------------------------------------------------
    def authenticate(self, token: str) -> KeyRecord:
        parsed = parse(token)
        if parsed is None:
            raise AuthFailure("malformed API key")
        key_id, secret = parsed
        with Session(self.engine) as s:
            row = s.get(APIKeyRow, key_id)
            stored, kind = (row.digest, row.digest_kind) if row is not None else ("0" * 64, "none")
            ok = self.hasher.matches(secret, stored, kind)  # computed even for unknown ids (timing)
            if row is None or not ok:
                raise AuthFailure("invalid API key")
            record = KeyRecord.from_row(row)
        status = record.status()
        if status != "active":
            raise AuthFailure(f"API key {status}")
        return record

    def record_usage(self, key_id: str, requests: int = 1, items: int = 0) -> None:
        """Counted in memory; written by flush_usage (the server flushes every few seconds)."""
        with self._usage_lock:
            entry = self._pending_usage.setdefault(key_id, [0, 0, None])
            entry[0] += requests
            entry[1] += items
            entry[2] = utcnow()

    def flush_usage(self) -> None:
        with self._usage_lock:
            pending, self._pending_usage = self._pending_usage, {}
        if not pending:
            return
        with Session(self.engine) as s, s.begin():
            for key_id, (reqs, items, last) in pending.items():
                s.execute(update(APIKeyRow).where(APIKeyRow.id == key_id).values(
                    request_count=APIKeyRow.request_count + reqs, item_count=APIKeyRow.item_count + items,
                    last_used_at=last))

    def close(self) -> None:
        self.flush_usage()
        self.engine.dispose()
