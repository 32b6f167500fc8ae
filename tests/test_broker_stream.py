"""One stream on the broker's side, with no sockets: numbering, history, ids."""

import messages as m
from broker_stream import REPLY_BYTES, Stream

WALL = 1_700_000_000.0


def filled(count: int, history: int = 10, text: str = "t") -> Stream:
    stream = Stream("#lab", history)
    for i in range(count):
        stream.append(lambda seq: m.Message(seq, WALL, "bob", f"{text}{seq}"), ("bob", f"id{i}"))
    return stream


def test_each_event_gets_the_next_number_and_the_history_keeps_the_newest():
    stream = filled(15)
    assert stream.seq == 15
    assert [e.seq for e in stream.history] == list(range(6, 16))
    assert stream.first_held() == 6
    assert Stream("x", 5).first_held() == 1  # empty: the next one


def test_streams_are_independent_and_name_their_topic():
    a, b = filled(3), Stream("#lab2", 10)
    b.append(lambda seq: m.Presence(seq, WALL, ["ann"], []))
    assert (a.seq, b.seq) == (3, 1)
    assert a.topic == b"r:#lab\0" and b.topic == b"r:#lab2\0"
    assert not b.topic.startswith(a.topic) and Stream("@bob", 1).topic is None


def test_an_accepted_id_is_remembered_within_a_bound():
    stream = Stream("#lab", 10, ids_remembered=3)
    for i in range(5):
        stream.append(lambda seq: m.Message(seq, WALL, "bob", "x"), ("bob", f"id{i}"))
    assert stream.accepted_seq(("bob", "id4")) == 5
    assert stream.accepted_seq(("bob", "id1")) is None  # forgotten, oldest first
    assert len(stream.accepted_ids) == 3


def test_fetch_answers_the_held_part_of_the_range_and_says_what_is_gone():
    stream = filled(15)
    h = stream.fetch(2, 8)
    assert [e.seq for e in h.events] == [6, 7, 8] and (h.first, h.until) == (6, 8)
    assert h.stream == "#lab"
    h = stream.fetch(15, 20)  # nothing after the newest: empty, until = newest
    assert h.events == [] and h.until == 15


def test_fetch_is_cut_at_the_reply_size_and_says_where_it_stopped():
    stream = filled(10, text="x" * (REPLY_BYTES // 3 - 200))
    h = stream.fetch(0, 10)
    assert len(h.events) == 3 and h.until == h.events[-1].seq == 3


def test_a_reply_is_bounded_in_encoded_bytes_not_characters():
    """U+0001 is one character and six bytes as JSON (\\u0001): counted in
    characters, a reply of such texts was six times its bound on the wire;
    many short events, each with its sender, time and seq, twice."""
    for text, count in (("\x01" * 3000, 40), ("", 2000)):
        stream = filled(count, history=count, text=text)
        for reply in (stream.fetch(0, count), stream.recent(count)):
            assert 1 < len(reply.events) < count
            assert len(m.encode(reply)) <= REPLY_BYTES + 200, (text[:1], len(m.encode(reply)))


def test_the_sizes_worked_out_for_replies_go_with_their_events():
    stream = filled(30, history=10)
    stream.fetch(0, 30)
    stream.truncate(27, [])
    for i in range(25):  # the held events change twice over
        stream.append(lambda seq: m.Message(seq, WALL, "bob", "again"), ("bob", f"re{i}"))
        stream.recent(10)
    assert set(stream._encoded_sizes) == {e.seq for e in stream.history}
    assert all(event is held for (event, _), held in zip(
        (stream._encoded_sizes[e.seq] for e in stream.history), stream.history))


def test_recent_gives_the_last_messages_oldest_first_and_skips_presence():
    stream = filled(4)
    stream.append(lambda seq: m.Presence(seq, WALL, ["ann"], []))
    h = stream.recent(2)
    assert [e.seq for e in h.events] == [3, 4] and h.recent and h.until == 5


def test_restore_continues_numbering_and_remembers_ids():
    stream = Stream("#lab", 10)
    stream.restore([m.Message(7, WALL, "bob", "x")], [(("bob", "id7"), 7)])
    assert stream.seq == 7 and stream.accepted_seq(("bob", "id7")) == 7
    assert stream.append(lambda seq: m.Presence(seq, WALL, ["ann"], [])).seq == 8
