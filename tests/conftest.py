"""Fixtures shared by the tests: real brokers and clients, cleaned up after."""

import os
import signal

import pytest

from procs import Broker, new_secret_file


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


def pytest_configure(config):
    """Before the run. Children must be able to get Ctrl-C: a SIGINT that
    was ignored when the test run started (a job started in the background
    by a shell without job control) is inherited through exec, so the tests'
    clients would ignore it too. A handler is reset to the default at exec
    instead."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # Sessions made in this process (the window's tests) keep their secret
    # in a file of the run's, not in the real ~/.config.
    os.environ["ZCHAT_SECRET_FILE"] = new_secret_file()


@pytest.fixture
def redis_server():
    """A real redis-server on a free loopback port, with its own directory;
    stopped by its pid and removed after the test."""
    from redis_proc import RedisServer
    server = RedisServer().start()
    yield server
    server.remove()
