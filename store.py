"""Durable history for the broker (``--db PATH``): every sequenced event in SQLite.

Each event is stored under its stream, with the stream's own sequence
number. The broker writes the events of one loop pass in one transaction,
before it publishes or acknowledges any of them (the core's Persist outputs
come first): an acknowledged message is on disk, and a restarted broker
never hands out a sequence number twice. WAL mode with synchronous=NORMAL
survives a killed process (what an operator sees: SIGKILL, OOM, a crash);
only a power loss may take the last transactions.

A restarted broker reads back its epoch (so clients keep counting), and for
each stream its last events for the in-memory history and the message ids
it accepted recently (so a client's resend after the restart is
acknowledged, not doubled).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sqlite3
from typing import Any, Iterable

import messages as m

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS stream_events (
    stream TEXT NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    time REAL NOT NULL,
    name TEXT NOT NULL,
    text TEXT,
    reason TEXT,
    client_key TEXT,   -- the sender's name key, for message ids
    client_id TEXT,    -- the sender's message id
    room TEXT,         -- a room's event: the room's name as created
    addressee TEXT,    -- a direct message: whom it was to
    PRIMARY KEY (stream, seq)
) WITHOUT ROWID;
"""

# A file from before streams had names: one table of the chat's events.
LEGACY_MIGRATION = f"""
INSERT INTO stream_events
    SELECT '{m.GENERAL_ROOM}', seq, type, time, name, text, reason, client_key, client_id,
           '{m.GENERAL_ROOM}', NULL
    FROM events;
DROP TABLE events;
"""

# A file from protocol 1 with one stream named "all": it becomes #general,
# and events learn which room and addressee they belong to.
ROOMS_MIGRATION = f"""
ALTER TABLE stream_events ADD COLUMN room TEXT;
ALTER TABLE stream_events ADD COLUMN addressee TEXT;
UPDATE stream_events SET stream = '{m.GENERAL_ROOM}', room = '{m.GENERAL_ROOM}' WHERE stream = 'all';
"""

# Protocol 2 stored each join and leave as an event of its own: read back as
# a presence event naming one person.
LEGACY_JOIN = "join"

_COLUMNS = "seq, type, time, name, text, reason, room, addressee"


class StoreError(Exception):
    """The database cannot be used: the message says why, for the operator."""


def _row(stream: str, event: Any, sender_id: tuple[str, str] | None) -> tuple:
    client_key, client_id = sender_id or (None, None)
    if isinstance(event, m.Message):
        return (stream, event.seq, event.TYPE, event.time, event.sender, event.text, None,
                client_key, client_id, event.room, event.to)
    if isinstance(event, m.Presence):  # the names, as JSON, in the text column
        people = json.dumps({"joined": event.joined, "left": event.left})
        return (stream, event.seq, event.TYPE, event.time, "", people, None, None, None,
                event.room, None)
    return (stream, event.seq, event.TYPE, event.time, event.name, event.text, None, None, None,
            event.room, None)


def _event(row: tuple) -> Any:
    seq, kind, time, name, text, reason, room, addressee = row
    if kind == m.Message.TYPE:
        return m.Message(seq, time, name, text, room, addressee)
    if kind == m.Topic.TYPE:
        return m.Topic(seq, time, name, text, room)
    if kind == m.Presence.TYPE:
        people = json.loads(text)
        return m.Presence(seq, time, people["joined"], people["left"], room)
    # protocol 2 stored one join or leave per event
    if kind == LEGACY_JOIN:
        return m.Presence(seq, time, [name], [], room)
    return m.Presence(seq, time, [], [[name, reason]], room)


class EventStore:
    """The broker's SQLite file; used by the broker's thread only."""

    def __init__(self, path: str):
        try:
            self.db = sqlite3.connect(path, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
            if self._has_table("events"):
                self._migrate(LEGACY_MIGRATION)
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(stream_events)")}
            if "room" not in columns:
                self._migrate(ROOMS_MIGRATION)
            self._epoch = self._read_or_create_epoch()
        except sqlite3.Error as e:
            raise StoreError(f"cannot use database {path}: {e}") from None

    def _migrate(self, script: str) -> None:
        """Bring an older file to this schema, all or nothing."""
        with self.db:
            self.db.execute("BEGIN")
            for statement in script.strip().split(";\n"):
                self.db.execute(statement)

    def _has_table(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?",
                               (name,)).fetchone() is not None

    def _read_or_create_epoch(self) -> str:
        row = self.db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
        if row:
            return row[0]
        epoch = secrets.token_hex(8)
        self.db.execute("INSERT INTO meta VALUES ('epoch', ?)", (epoch,))
        return epoch

    def epoch(self) -> str:
        """This history's epoch, created on first use."""
        return self._epoch

    def streams(self) -> list[str]:
        """Every stream that has events, #general first when it has."""
        rows = self.db.execute("SELECT DISTINCT stream FROM stream_events").fetchall()
        return sorted((row[0] for row in rows), key=lambda s: (s != m.GENERAL_ROOM, s))

    def recent_events(self, stream: str, count: int) -> list:
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM stream_events WHERE stream=? "
            "ORDER BY seq DESC LIMIT ?", (stream, count)).fetchall()
        return [_event(row) for row in reversed(rows)]

    def recent_ids(self, stream: str, count: int) -> list[tuple[tuple[str, str], int]]:
        """((name key, message id), seq) of the last accepted messages, oldest first."""
        rows = self.db.execute(
            "SELECT client_key, client_id, seq FROM stream_events "
            "WHERE stream=? AND client_id IS NOT NULL "
            "ORDER BY seq DESC LIMIT ?", (stream, count)).fetchall()
        return [((key, msg_id), seq) for key, msg_id, seq in reversed(rows)]

    def append(self, records: Iterable) -> None:
        """Write the events of Persist outputs in one transaction, or none
        of them (StoreError); the caller may try again later."""
        rows = [_row(r.stream, r.event, r.sender_id) for r in records]
        if not rows:
            return
        try:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT INTO stream_events VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
            self.db.execute("COMMIT")
        except sqlite3.Error as e:  # a full disk, a read-only file, an I/O error
            # All or nothing; a COMMIT that failed leaves the transaction
            # open, and the next BEGIN would fail for that alone. (Should
            # the rollback fail too, the next write says so.)
            with contextlib.suppress(sqlite3.Error):
                if self.db.in_transaction:
                    self.db.rollback()
            raise StoreError(f"cannot write to the database: {e}") from None

    def close(self) -> None:
        self.db.close()
