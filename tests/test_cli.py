"""The command line of cli_client.py: options in either position, ports and
hosts checked at once, --pub-port, and what `send`
says about a long stdin (progress, and where to resume after an interruption).

Real broker processes and real clients, as in test_chat_e2e.py (which has the
SIGINT and SIGTERM goodbye).
"""

import json
import re
import signal
import subprocess

import pytest

from procs import Client, free_port, listen, run_cli, run_cli_exactly, wait_until
from terminal import Terminal

# For each option: the environment that makes its default wrong, and its right value.
# --timeout has no variable: an unreachable host shows which timeout was used.
OPTION_CASES = {
    "--host": ({"CHAT_HOST": "127.0.0.2"}, "127.0.0.1"),  # nothing listens on .2
    "--port": ({"CHAT_PORT": "unused"}, "broker"),
    "--name": ({"CHAT_NAME": "from-env"}, "from-option"),
    "--timeout": ({"CHAT_HOST": "127.0.0.2"}, "0.5"),
}


@pytest.mark.parametrize("position", ["before", "after"])
@pytest.mark.parametrize("option", list(OPTION_CASES))
def test_each_common_option_means_the_same_before_or_after_the_command(broker, clients,
                                                                       option, position):
    ears = listen(broker, "ears")
    clients.append(ears)
    wrong_env, value = OPTION_CASES[option]
    env = {"CHAT_HOST": "127.0.0.1", "CHAT_PORT": str(broker.port), "CHAT_NAME": "from-env"}
    env.update(wrong_env)
    if env["CHAT_PORT"] == "unused":
        env["CHAT_PORT"] = str(free_port())
    if value == "broker":
        value = str(broker.port)
    text = f"{option} {position} the command"
    command = ["send", text]
    argv = [option, value, *command] if position == "before" else [*command, option, value]
    result = run_cli_exactly(*argv, env=env, timeout=20)
    if option == "--timeout":
        assert result.returncode == 3, result.stderr
        assert "no answer within 0.5s" in result.stderr
        return
    assert result.returncode == 0, result.stderr
    wait_until(lambda: ears.messages(), 10, "the message")
    [message] = ears.messages()
    assert message["text"] == text
    assert message["from"] == ("from-option" if option == "--name" else "from-env")


@pytest.mark.parametrize("argv, env, complaint", [
    (["--port", "99999", "users"], {}, "not a port number (1 to 65535)"),
    (["send", "x", "--port", "0"], {}, "not a port number (1 to 65535)"),
    (["listen", "--pub-port", "65536"], {}, "not a port number (1 to 65535)"),
    (["users"], {"CHAT_PORT": "http"}, "not a port number (1 to 65535)"),
    (["--host", "no-such-host.invalid", "send", "x"], {}, "does not resolve"),
    (["users", "--host", "no-such-host.invalid"], {}, "does not resolve"),
])
def test_a_bad_port_or_an_unknown_host_is_bad_usage_at_once(argv, env, complaint):
    # A long --timeout: waiting for an answer instead would overrun the run's own limit.
    result = run_cli_exactly(*argv, "--timeout", "60", env=env, timeout=15)
    assert result.returncode == 2, result.stderr
    assert complaint in result.stderr


def test_top_level_help_tells_of_the_interactive_chat_and_both_option_positions():
    result = run_cli_exactly("--help")
    assert result.returncode == 0
    assert "interactive" in result.stdout and "/help" in result.stdout
    assert "before or after the command" in result.stdout
    assert "143" in result.stdout and "CHAT_PUB_PORT" in result.stdout


def test_pub_port_reaches_a_broker_on_non_consecutive_ports(make_broker, clients):
    port = free_port()
    pub_port = free_port()
    while pub_port in (port, port + 1):
        pub_port = free_port()
    broker = make_broker("--heartbeat-interval", "0.2", port=port, pub_port=pub_port)
    ears = Client(broker, "--pub-port", str(pub_port), "listen", "--json", name="ears")
    clients.append(ears)
    ears.out.wait_for(lambda l: json.loads(l).get("name") == "ears", 15, "ears to join")
    # the environment variable, for the sender
    result = run_cli_exactly("send", "over the other port", "--port", str(port),
                             "--name", "w", env={"CHAT_PUB_PORT": str(pub_port)})
    assert result.returncode == 0, result.stderr
    wait_until(lambda: ears.messages(), 10, "the message")
    assert [r["text"] for r in ears.messages()] == ["over the other port"]


RESUME_REPORT = re.compile(r"interrupted: (\d+) line\(s\) accepted; line (\d+) is the first not "
                           r"accepted \(resume with: tail -n \+(\d+)\)$")


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_send_says_exactly_where_to_resume(make_broker, clients, sig, status):
    broker = make_broker("--heartbeat-interval", "0.2", "--rate", "50", "--burst", "10")
    ears = listen(broker, "ears")
    clients.append(ears)
    lines = [f"line {n}" for n in range(1, 2001)]
    sender = Client(broker, "send", name="piper", stdin=subprocess.PIPE)
    clients.append(sender)
    sender.proc.stdin.write("".join(f"{line}\n" for line in lines))
    sender.proc.stdin.close()
    wait_until(lambda: len(ears.messages()) >= 20, 30, "some lines accepted")
    sender.proc.send_signal(sig)
    assert sender.wait(15) == status
    report = sender.err.wait_for(RESUME_REPORT.match, 5, "the report")
    accepted, first_not_accepted, tail_from = map(int, RESUME_REPORT.match(report).groups())
    assert accepted == first_not_accepted - 1 == tail_from - 1
    assert 20 <= accepted < len(lines)
    # Sent after the sender left, the marker is ordered after all it had accepted.
    assert run_cli(broker, "send", "marker", name="marker").returncode == 0
    wait_until(lambda: ears.messages() and ears.messages()[-1]["text"] == "marker", 10,
               "the marker")
    assert [r["text"] for r in ears.messages()[:-1]] == lines[:accepted]


def test_send_on_a_terminal_says_it_reads_stdin_and_shows_progress(make_broker, clients):
    broker = make_broker("--heartbeat-interval", "0.2", "--rate", "50", "--burst", "10")
    ears = listen(broker, "ears")
    clients.append(ears)
    term = Terminal("cli_client.py", "send", "--name", "typist", *broker.client_args)
    try:
        term.wait_for("end with Ctrl-D", 15, "the hint that stdin is read")
        term.type("".join(f"typed {n}\n" for n in range(1, 101)) + "\x04")  # then Ctrl-D
        shown = term.wait_for(re.compile(r"\d+ accepted of \d+ lines read \(\d+/s\)").search, 15,
                              "progress")
        assert term.proc.wait(30) == 0, shown
    finally:
        term.close()
    wait_until(lambda: len(ears.messages()) >= 100, 10, "every line")
    assert [r["text"] for r in ears.messages()] == [f"typed {n}" for n in range(1, 101)]


def test_several_brokers_come_from_host_commas_and_broker_options():
    import cli_client
    from client_session import BrokerAddress
    args = cli_client.parse_args(["--host", "127.0.0.1,localhost", "--port", "7000",
                           "--broker", "127.0.0.1:7100", "users"])
    assert (args.host, args.port) == ("127.0.0.1", 7000)
    assert args.alternates == (BrokerAddress("localhost", 7000), BrokerAddress("127.0.0.1", 7100))
