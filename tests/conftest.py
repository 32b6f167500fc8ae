"""Fixtures shared by the tests: real brokers and clients, cleaned up after."""

import pytest

from procs import Broker


@pytest.fixture
def make_broker():
    """Start brokers with extra options; all are stopped after the test."""
    started: list[Broker] = []

    def make(*extra: str, **ports) -> Broker:
        broker = Broker(*extra, **ports).start()
        started.append(broker)
        return broker

    yield make
    for broker in started:
        broker.kill()


@pytest.fixture
def broker(make_broker):
    """A broker with a fast heartbeat, so liveness tests finish quickly."""
    return make_broker("--heartbeat-interval", "0.2")


@pytest.fixture
def clients():
    """Collects Client processes; any still running after the test is killed."""
    running = []
    yield running
    for client in running:
        client.stop()
