"""store.py: the SQLite history behind --db, and the broker's clear errors about it."""

from __future__ import annotations

import sqlite3
import subprocess

import pytest

import messages as m
from broker_core import Persist
from procs import PYTHON, ROOT, free_port_pair
from store import EventStore, StoreError

WALL = 1_700_000_000.0


def records(stream: str, first: int, count: int) -> list[Persist]:
    room = stream if stream.startswith("#") else None
    to = None if room else stream[1:]
    return [Persist(stream, m.Message(seq, WALL + seq, "bob", f"t{seq}", room, to),
                    ("bob", f"id{seq}"))
            for seq in range(first, first + count)]


def test_events_round_trip_per_stream_and_survive_a_reopen(tmp_path):
    path = str(tmp_path / "chat.db")
    store = EventStore(path)
    epoch = store.epoch()
    store.append(records(m.GENERAL_ROOM, 1, 5))
    store.append(records("#lab", 1, 3) + [Persist("#lab", m.Presence(4, WALL, [], [["ann", "quit"]], "#Lab")),
                                           Persist("#lab", m.Topic(5, WALL, "ann", "hw", "#Lab"))])
    store.append(records("@ann", 1, 1))
    store.close()
    again = EventStore(path)
    assert again.epoch() == epoch
    assert again.streams() == [m.GENERAL_ROOM, "#lab", "@ann"]
    assert [e.seq for e in again.recent_events(m.GENERAL_ROOM, 3)] == [3, 4, 5]
    lab = again.recent_events("#lab", 10)
    assert lab[-2:] == [m.Presence(4, WALL, [], [["ann", "quit"]], "#Lab"), m.Topic(5, WALL, "ann", "hw",
                                                                          "#Lab")]
    assert lab[0] == m.Message(1, WALL + 1, "bob", "t1", "#lab")
    assert again.recent_events("@ann", 1) == [m.Message(1, WALL + 1, "bob", "t1", to="ann")]
    assert again.recent_ids("#lab", 2) == [(("bob", "id2"), 2), (("bob", "id3"), 3)]
    again.close()


def file_of(path, script: str) -> str:
    """A database file made by ``script``, as an older zchat left it."""
    db = sqlite3.connect(path)
    db.executescript(script)
    db.commit()
    db.close()
    return str(path)


def test_a_file_from_before_streams_is_migrated_into_the_main_stream(tmp_path):
    path = file_of(tmp_path / "old.db", """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE events (seq INTEGER PRIMARY KEY, type TEXT NOT NULL, time REAL NOT NULL,
            name TEXT NOT NULL, text TEXT, reason TEXT, client_key TEXT, client_id TEXT);
        INSERT INTO meta VALUES ('epoch', 'oldepoch');
        INSERT INTO events VALUES (1, 'join', 1.0, 'ann', NULL, NULL, NULL, NULL);
        INSERT INTO events VALUES (2, 'message', 2.0, 'ann', 'hello', NULL, 'ann', 'm1');
    """)
    store = EventStore(path)
    assert store.epoch() == "oldepoch"
    assert store.recent_events(m.GENERAL_ROOM, 10) == [m.Presence(1, 1.0, ["ann"], [], m.GENERAL_ROOM),
                                                      m.Message(2, 2.0, "ann", "hello",
                                                                m.GENERAL_ROOM)]
    assert store.recent_ids(m.GENERAL_ROOM, 10) == [(("ann", "m1"), 2)]
    store.close()


def test_a_corrupt_file_is_a_clear_error(tmp_path):
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(StoreError, match="cannot use database .*junk.db: file is not a database"):
        EventStore(str(path))


def run_broker(db: str, **kw) -> subprocess.CompletedProcess:
    port = free_port_pair()
    return subprocess.run([PYTHON, "broker.py", "--port", str(port), "--db", db], cwd=ROOT,
                          capture_output=True, text=True, timeout=20, **kw)


def test_the_broker_refuses_a_corrupt_file_in_one_line_without_a_traceback(tmp_path):
    path = tmp_path / "junk.db"
    path.write_bytes(b"\x00garbage" * 1000)
    done = run_broker(str(path))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"broker: cannot use database {path}: file is not a database"]


def test_the_broker_refuses_a_path_it_cannot_create_in_one_line(tmp_path):
    path = tmp_path / "no such directory" / "chat.db"
    done = run_broker(str(path))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"broker: cannot use database {path}: unable to open database file"]


def test_a_restarted_core_continues_every_room_and_direct_messages(tmp_path):
    """What a broker restarted on its --db gets back: each stream's numbers,
    a room's name as created and its topic."""
    from broker_core import BrokerCore
    path = str(tmp_path / "chat.db")
    store = EventStore(path)
    store.append([Persist("#lab", m.Presence(1, WALL, ["ann"], [], "#Lab")),
                  Persist("#lab", m.Topic(2, WALL, "ann", "homework", "#Lab")),
                  *records("@bob", 1, 2)])
    core = BrokerCore()
    for stream_id in store.streams():
        core.restore(stream_id, store.recent_events(stream_id, 100),
                     store.recent_ids(stream_id, 100))
    room = core.rooms["#lab"]
    assert (room.name, room.topic, room.stream.seq) == ("#Lab", "homework", 2)
    assert core.streams["@bob"].seq == 2 and core.streams["@bob"].accepted_seq(("bob", "id2"))
    store.close()


def test_a_protocol_1_file_with_the_stream_all_becomes_general(tmp_path):
    path = file_of(tmp_path / "v1.db", """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE stream_events (stream TEXT NOT NULL, seq INTEGER NOT NULL,
            type TEXT NOT NULL, time REAL NOT NULL, name TEXT NOT NULL, text TEXT, reason TEXT,
            client_key TEXT, client_id TEXT, PRIMARY KEY (stream, seq)) WITHOUT ROWID;
        INSERT INTO meta VALUES ('epoch', 'e1');
        INSERT INTO stream_events VALUES ('all', 1, 'message', 1.0, 'ann', 'hi', NULL, 'ann', 'm1');
    """)
    store = EventStore(path)
    assert store.streams() == [m.GENERAL_ROOM]
    assert store.recent_events(m.GENERAL_ROOM, 5) == [m.Message(1, 1.0, "ann", "hi",
                                                                m.GENERAL_ROOM)]
    store.append(records(m.GENERAL_ROOM, 2, 1))
    store.close()
