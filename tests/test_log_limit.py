"""log_limit.LogLimiter with no broker: first lines, counts, summaries, bounds."""

from __future__ import annotations

import logging

from log_limit import INTERVAL_S, PEERS_NAMED, Cause, LogLimiter

DROPPED = Cause("reply to {peer} dropped: {detail}",
                "dropped {count} more replies to {peer} in the last {seconds} s")
REFUSED = Cause("refused from {peer}: {detail}",
                "refused {count} more requests from {peer} in the last {seconds} s")


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def limiter() -> tuple[LogLimiter, list[str]]:
    logger = logging.getLogger("test_log_limit")
    logger.propagate = False
    logger.handlers = [handler := Lines()]
    return LogLimiter(logger), handler.lines


def test_a_repeated_warning_is_one_line_then_one_summary_with_its_count():
    limits, lines = limiter()
    for i in range(1582 + 1):
        limits.warn(DROPPED, "peer-a", "its queue is full", 100.0 + i * 0.001)
    assert lines == ["reply to peer-a dropped: its queue is full"]
    limits.flush(100.0 + INTERVAL_S - 0.01)
    assert len(lines) == 1
    limits.flush(100.0 + INTERVAL_S)
    assert lines[1] == "dropped 1,582 more replies to peer-a in the last 10 s"
    limits.flush(200.0)  # nothing more to say
    limits.warn(DROPPED, "peer-a", "its queue is full", 201.0)  # a new interval
    assert len(lines) == 3 and lines[2] == lines[0]


def test_causes_count_apart_and_a_lone_warning_gets_no_summary():
    limits, lines = limiter()
    limits.warn(DROPPED, "a", "full", 0.0)
    limits.warn(REFUSED, "a", "bad frame", 0.0)
    limits.warn(REFUSED, "a", "bad frame", 0.0)
    limits.flush(INTERVAL_S)
    assert lines == ["reply to a dropped: full", "refused from a: bad frame",
                     "refused 1 more requests from a in the last 10 s"]


def test_ten_thousand_peers_cost_a_few_lines_per_interval():
    limits, lines = limiter()
    for interval in range(3):  # 30 s of attack
        for peer in range(10_000):
            for cause in (DROPPED, REFUSED):
                limits.warn(cause, f"p{peer}", "x", interval * INTERVAL_S + peer * 1e-4)
        limits.flush((interval + 1) * INTERVAL_S)
    per_interval = 2 * (PEERS_NAMED + 1)  # each cause: first lines and the others' summary
    assert len(lines) == 3 * per_interval < 100
    assert "dropped 9,997 more replies to 9,997 other peers in the last 10 s" in lines
