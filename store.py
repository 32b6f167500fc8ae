"""Durable history for the broker (``--db PATH``): every sequenced event in SQLite.

The broker writes the events of one loop pass in one transaction, before it
publishes or acknowledges any of them: an acknowledged message is on disk,
and a restarted broker never hands out a sequence number twice. WAL mode
with synchronous=NORMAL survives a killed process (what an operator sees:
SIGKILL, OOM, a crash); only a power loss may take the last transactions.

A restarted broker reads back its epoch (so clients keep counting), the last
events for its in-memory history, and the message ids it accepted recently
(so a client's resend after the restart is acknowledged, not doubled).
"""

from __future__ import annotations

import secrets
import sqlite3
from typing import Any, Iterable

import messages as m

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    type TEXT NOT NULL,
    time REAL NOT NULL,
    name TEXT NOT NULL,
    text TEXT,
    reason TEXT,
    client_key TEXT,   -- the sender's name key, for message ids
    client_id TEXT     -- the sender's message id
);
"""


def _row(event: Any, client_id: str | None) -> tuple:
    if isinstance(event, m.Message):
        return (event.seq, event.TYPE, event.time, event.sender, event.text, None,
                m.name_key(event.sender), client_id)
    reason = event.reason if isinstance(event, m.Leave) else None
    return (event.seq, event.TYPE, event.time, event.name, None, reason, None, None)


def _event(row: tuple) -> Any:
    seq, kind, time, name, text, reason = row
    if kind == m.Message.TYPE:
        return m.Message(seq, time, name, text)
    if kind == m.Join.TYPE:
        return m.Join(seq, time, name)
    return m.Leave(seq, time, name, reason)


class EventStore:
    """The broker's SQLite file; used by the broker's thread only."""

    def __init__(self, path: str):
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def epoch(self) -> str:
        """This history's epoch, created on first use."""
        row = self.db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
        if row:
            return row[0]
        epoch = secrets.token_hex(8)
        self.db.execute("INSERT INTO meta VALUES ('epoch', ?)", (epoch,))
        return epoch

    def last_seq(self) -> int:
        return self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]

    def recent_events(self, count: int) -> list:
        rows = self.db.execute(
            "SELECT seq, type, time, name, text, reason FROM events "
            "ORDER BY seq DESC LIMIT ?", (count,)).fetchall()
        return [_event(row) for row in reversed(rows)]

    def recent_ids(self, count: int) -> list[tuple[tuple[str, str], int]]:
        """((name key, message id), seq) of the last accepted messages, oldest first."""
        rows = self.db.execute(
            "SELECT client_key, client_id, seq FROM events WHERE client_id IS NOT NULL "
            "ORDER BY seq DESC LIMIT ?", (count,)).fetchall()
        return [((key, msg_id), seq) for key, msg_id, seq in reversed(rows)]

    def append(self, records: Iterable[tuple[Any, str | None]]) -> None:
        """Write (event, client message id) pairs in one transaction."""
        rows = [_row(event, client_id) for event, client_id in records]
        if not rows:
            return
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT INTO events VALUES (?,?,?,?,?,?,?,?)", rows)

    def close(self) -> None:
        self.db.close()
