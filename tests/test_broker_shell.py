"""broker.py's shell around the core: how broadcasts are framed and coalesced.

``frames_of`` packs encoded events into PUB bodies: in order, each event
once, each body a JSON array within FRAME_BYTES (an event larger than that
goes alone), and no body cut shorter than it had to be. BrokerShell holds
outputs for a few milliseconds under a backlog so they share a frame, and
sends at once when the loop is idle; these tests drive ``_send_or_hold``
with explicit clock values on a real shell bound to loopback, and watch
what a real SUB socket receives. ``_read_requests`` is driven by a real
DEALER.
"""

from __future__ import annotations

import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

import messages as m
from broker import FRAME_BYTES, BrokerShell, frames_of
from broker_core import BrokerConfig, BrokerCore, Publish, Reply
from procs import free_port_pair

T0 = 1_000.0
RECEIVE_TIMEOUT_S = 5

# --- frames_of ------------------------------------------------------------------------

# The encoded size of a message event with an empty text and a two-digit
# seq: its text adds one byte per ASCII character, so an event of any size
# can be made exactly.
EMPTY_MESSAGE_BYTES = len(m.encode(m.Message(10, T0, "alice", "")))


def message(seq: int, size: int = EMPTY_MESSAGE_BYTES + 4) -> m.Message:
    """A message event whose encoding is ``size`` bytes when ``seq`` has two
    digits (a byte more for each further digit)."""
    return m.Message(seq, T0, "alice", "x" * (size - EMPTY_MESSAGE_BYTES))


def frame_and_check(events: list) -> list[bytes]:
    """frames_of over ``events``, checked against every promise it makes."""
    encoded = [m.encode(event) for event in events]
    frames = list(frames_of(encoded))
    decoded = [m.decode_broadcast([m.BROADCAST_TOPIC, frame]) for frame in frames]
    assert [e for body in decoded for e in body] == events, "events lost, repeated or reordered"
    for frame, body in zip(frames, decoded):
        assert len(frame) <= FRAME_BYTES or len(body) == 1, (
            f"a {len(frame)}-byte frame of {len(body)} events")
    # Coalesced: no frame could have taken the first event of the next one.
    first_of_next = 0
    for frame, body in zip(frames[:-1], decoded):
        first_of_next += len(body)
        assert len(frame) + 1 + len(encoded[first_of_next]) > FRAME_BYTES, "a frame cut short"
    return frames


def test_no_events_make_no_frame():
    assert frame_and_check([]) == []


def test_a_lone_event_is_one_frame():
    assert frame_and_check([message(1)]) == [m.join_events([m.encode(message(1))])]


@pytest.mark.parametrize("sizes,frame_lengths", [
    # two events that fill a frame to the byte: 1 + a + 1 + b + 1 == FRAME_BYTES
    ([100, FRAME_BYTES - 103], [FRAME_BYTES]),
    # one byte more, and the second event needs a frame of its own
    ([100, FRAME_BYTES - 102], [102, FRAME_BYTES - 100]),
    ([FRAME_BYTES - 2], [FRAME_BYTES]),
    # an event larger than a frame goes alone, between its neighbours' frames
    ([100, FRAME_BYTES + 500, 100], [102, FRAME_BYTES + 502, 102]),
], ids=["exactly full", "one byte over", "one event filling a frame", "oversized event"])
def test_frames_fill_up_to_exactly_frame_bytes(sizes, frame_lengths):
    frames = frame_and_check([message(10 + i, size) for i, size in enumerate(sizes)])
    assert [len(frame) for frame in frames] == frame_lengths


def test_a_backlog_of_small_events_leaves_in_few_full_frames():
    events = [message(seq) for seq in range(10, 10_000)]
    frames = frame_and_check(events)
    total = sum(len(frame) for frame in frames)
    assert len(frames) == -(-total // FRAME_BYTES), "more frames than the bytes need"


@given(st.lists(st.integers(EMPTY_MESSAGE_BYTES + 1, FRAME_BYTES + 2_000), max_size=40))
def test_any_mix_of_sizes_is_framed_in_order_within_the_bound(sizes):
    # seqs of two digits keep each event exactly the size drawn
    frame_and_check([message(10 + i, size) for i, size in enumerate(sizes)])


# --- coalescing in BrokerShell --------------------------------------------------------


@pytest.fixture
def shell():
    """A real BrokerShell on free loopback ports, with the default coalescing."""
    for attempt in range(3):
        port = free_port_pair()
        try:
            shell = BrokerShell(BrokerCore(BrokerConfig()), "127.0.0.1", port, port + 1)
            break
        except zmq.ZMQError:  # taken between the check and the bind
            if attempt == 2:
                raise
    yield shell
    shell.pub.setsockopt(zmq.LINGER, 0)
    shell.close()


@pytest.fixture
def sub(shell):
    """A SUB on the shell's broadcasts, returned once the XPUB has its subscription."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(shell.pub.getsockopt_string(zmq.LAST_ENDPOINT))
    sock.setsockopt(zmq.SUBSCRIBE, m.BROADCAST_TOPIC)
    # The XPUB shows each subscription: once it has seen this one, every
    # frame published after reaches the SUB (no slow-joiner loss).
    assert shell.pub.poll(RECEIVE_TIMEOUT_S * 1000), "the subscription never reached the XPUB"
    assert shell.pub.recv() == b"\x01" + m.BROADCAST_TOPIC
    yield sock
    sock.close(linger=0)
    ctx.term()


def publish(*seqs: int) -> list[Publish]:
    return [Publish(message(seq), m.BROADCAST_TOPIC) for seq in seqs]


def next_frame_seqs(sub: zmq.Socket) -> list[int]:
    """The seqs of the next broadcast frame (it must come)."""
    assert sub.poll(RECEIVE_TIMEOUT_S * 1000), "no broadcast frame arrived"
    return [event.seq for event in m.decode_broadcast(sub.recv_multipart())]


def assert_nothing_else_was_sent(shell: BrokerShell, sub: zmq.Socket) -> None:
    """A marker published well after everything is the very next frame."""
    assert shell.held == [] and shell.release_at is None
    later = shell.last_publish + 10 * shell.coalesce + 1
    shell._send_or_hold(publish(99), later)
    assert next_frame_seqs(sub) == [99]


def test_a_lone_output_goes_at_once(shell, sub):
    shell._send_or_hold(publish(10), T0)
    assert shell.held == [] and shell.release_at is None
    assert next_frame_seqs(sub) == [10]
    assert_nothing_else_was_sent(shell, sub)


def test_a_backlog_within_the_window_is_held_and_released_on_time_together(shell, sub):
    window = shell.coalesce
    shell._send_or_hold(publish(10), T0, backlog=True)
    assert next_frame_seqs(sub) == [10]
    shell._send_or_hold(publish(11), T0 + window / 4, backlog=True)
    shell._send_or_hold(publish(12, 13), T0 + window / 2, backlog=True)
    assert shell.held == publish(11, 12, 13)
    assert shell.release_at == pytest.approx(T0 + window)
    # an early wake-up releases nothing while the backlog lasts
    shell._send_or_hold([], T0 + window * 0.99, backlog=True)
    assert shell.held == publish(11, 12, 13)
    shell._send_or_hold([], shell.release_at, backlog=True)
    assert shell.held == [] and shell.release_at is None
    assert next_frame_seqs(sub) == [11, 12, 13]
    assert_nothing_else_was_sent(shell, sub)


def test_an_output_arriving_at_the_release_time_leaves_with_the_held_ones(shell, sub):
    shell._send_or_hold(publish(10), T0, backlog=True)
    shell._send_or_hold(publish(11), T0 + shell.coalesce / 2, backlog=True)
    shell._send_or_hold(publish(12), shell.release_at, backlog=True)
    assert next_frame_seqs(sub) == [10]
    assert next_frame_seqs(sub) == [11, 12]
    assert_nothing_else_was_sent(shell, sub)


def test_a_backlog_after_a_quiet_spell_goes_at_once(shell, sub):
    shell._send_or_hold(publish(10), T0, backlog=True)
    shell._send_or_hold(publish(11), T0 + shell.coalesce, backlog=True)
    assert shell.held == []
    assert next_frame_seqs(sub) == [10]
    assert next_frame_seqs(sub) == [11]
    assert_nothing_else_was_sent(shell, sub)


def test_an_idle_pass_goes_at_once_even_right_after_a_frame(shell, sub):
    """At chat rates each pass finds the loop idle: no output waits."""
    shell._send_or_hold(publish(10), T0)
    shell._send_or_hold(publish(11), T0 + shell.coalesce / 10)
    assert shell.held == [] and shell.release_at is None
    assert next_frame_seqs(sub) == [10]
    assert next_frame_seqs(sub) == [11]
    assert_nothing_else_was_sent(shell, sub)


def test_an_idle_pass_takes_what_a_backlog_held_along(shell, sub):
    """The backlog is over: what it held leaves at once, with the new output."""
    shell._send_or_hold(publish(10), T0, backlog=True)
    shell._send_or_hold(publish(11), T0 + shell.coalesce / 4, backlog=True)
    assert shell.held == publish(11)
    shell._send_or_hold(publish(12), T0 + shell.coalesce / 2)
    assert shell.held == [] and shell.release_at is None
    assert next_frame_seqs(sub) == [10]
    assert next_frame_seqs(sub) == [11, 12]
    assert_nothing_else_was_sent(shell, sub)


def test_a_backlog_is_a_pass_of_several_requests_or_more_left_waiting(shell):
    assert shell.backlog_requests == 4
    assert not shell._backlog(0, False) and not shell._backlog(3, False)
    assert shell._backlog(4, False) and shell._backlog(0, True)
    shell.backlog_requests = 0  # --backlog-requests 0: every pass counts as one
    assert shell._backlog(0, False) and shell._backlog(1, False)


def test_without_coalescing_every_pass_goes_at_once(shell, sub):
    shell.coalesce = 0.0
    shell._send_or_hold(publish(10), T0, backlog=True)
    shell._send_or_hold(publish(11, 12), T0, backlog=True)
    assert shell.held == []
    assert next_frame_seqs(sub) == [10]
    assert next_frame_seqs(sub) == [11, 12]
    assert_nothing_else_was_sent(shell, sub)


def test_a_steady_backlog_shares_frames_and_no_output_waits_past_the_window(shell, sub):
    """An output every quarter window for 20 windows, each pass under a
    backlog, the clock waking at each release time as run() does; each pass
    notes what left the hold."""
    window = shell.coalesce
    count = 80
    arrivals = {10 + i: T0 + i * window / 4 for i in range(count)}
    departures: dict[int, float] = {}
    passes: list[list[int]] = []  # the seqs each delivering pass sent

    def one_pass(outputs: list[Publish], now: float) -> None:
        waiting = [p.event.seq for p in shell.held + outputs]
        shell._send_or_hold(outputs, now, backlog=True)
        still_held = {p.event.seq for p in shell.held}
        sent = [seq for seq in waiting if seq not in still_held]
        if sent:
            passes.append(sent)
            departures.update(dict.fromkeys(sent, now))

    for seq, now in arrivals.items():
        while shell.release_at is not None and shell.release_at <= now:
            one_pass([], shell.release_at)
        one_pass(publish(seq), now)
    while shell.release_at is not None:
        one_pass([], shell.release_at)

    for seq, arrived in arrivals.items():
        assert departures[seq] - arrived <= window + 1e-9, f"{seq} held too long"
    received = [next_frame_seqs(sub) for _ in passes]
    assert received == passes, "the SUB saw other frames than the shell sent"
    assert [seq for frame in received for seq in frame] == list(arrivals), "lost or reordered"
    assert len(received) <= count // 3, f"{len(received)} frames for {count} outputs"
    assert_nothing_else_was_sent(shell, sub)


# --- reading requests -----------------------------------------------------------------


@pytest.fixture
def dealer(shell):
    """A DEALER connected to the shell's ROUTER."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(shell.router.getsockopt_string(zmq.LAST_ENDPOINT))
    yield sock
    sock.close(linger=0)
    ctx.term()


def read_until(shell: BrokerShell, count: int) -> tuple[list, int]:
    """Outputs of reading requests until ``count`` were read (they must come)."""
    out: list = []
    read = 0
    while read < count:
        assert shell.router.poll(RECEIVE_TIMEOUT_S * 1000), f"{read} of {count} requests came"
        got, more = shell._read_requests(out, T0, T0)
        assert not more
        read += got
    return out, read


def test_requests_are_read_in_a_batch_and_counted(shell, dealer):
    for _ in range(5):
        dealer.send(m.encode(m.Who()))
    out, read = read_until(shell, 5)
    assert read == 5
    assert [type(o.message) for o in out] == [m.Users] * 5


def test_a_request_of_several_frames_is_refused_and_the_next_read_whole(shell, dealer):
    """A request is one frame: one of three frames is one malformed request,
    and the frame boundaries of the requests after it are kept."""
    dealer.send_multipart([m.encode(m.Who()), b"second", b"third"])
    dealer.send(m.encode(m.Who()))
    out, read = read_until(shell, 2)
    assert read == 2
    first, second = (o.message for o in out)
    assert isinstance(first, m.Error) and first.code == m.ErrorCode.MALFORMED
    assert "expected 1 frame, got 3" in first.reason
    assert isinstance(second, m.Users)


def test_a_reply_to_several_connections_is_encoded_once_and_reaches_each(shell, dealer):
    dealer.send(m.encode(m.Who()))
    (reply,), _ = read_until(shell, 1)
    event = m.Message(3, T0, "alice", "psst", to="bob")
    assert shell._send_replies([Reply(reply.peer, event), Reply(reply.peer, event)], T0) == []
    for _ in range(2):
        assert dealer.poll(RECEIVE_TIMEOUT_S * 1000)
        assert m.decode_reply(dealer.recv_multipart()) == event


def test_a_reply_to_an_unknown_routing_id_is_dropped_without_raising(shell):
    """ROUTER_MANDATORY refuses the first frame of a reply to a routing id
    it does not know: the core hears of it (no session: nothing to do)."""
    assert shell._send_replies([Reply(b"\x00nobody", m.Ack("1", 1))], T0) == []
