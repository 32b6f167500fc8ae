"""The window as users run it: gui_client.py in its own process on Xvfb,
typed into with xdotool, checked from a command-line listener."""

import json
import os
import subprocess

import pytest

from procs import PYTHON, ROOT, listen, wait_until
from xvfb import need_tool, x_display  # noqa: F401  (the fixture)

pytestmark = pytest.mark.gui


def xdotool(*args: str) -> str:
    result = subprocess.run([need_tool("xdotool"), *args], capture_output=True, text=True,
                            timeout=10)
    return result.stdout.strip()


def start_window(broker, name: str) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("CHAT_NAME", None)
    return subprocess.Popen([PYTHON, "gui_client.py", "--port", str(broker.port), "--name", name],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)


def test_typed_message_reaches_a_listener_and_closing_leaves_with_quit(broker, clients,
                                                                          x_display):  # noqa: F811
    need_tool("xdotool")
    ears = listen(broker, "ears")
    clients.append(ears)
    window = start_window(broker, "gina")
    try:
        window_id = wait_until(lambda: xdotool("search", "--name", "^gina - zchat$"), 20,
                               "the window").split()[0]
        xdotool("windowfocus", "--sync", window_id)
        xdotool("type", "--delay", "10", "hi from the window")
        xdotool("key", "Return")
        said = ears.out.wait_for(lambda line: '"type": "message"' in line, 10, "the message")
        assert (json.loads(said)["from"], json.loads(said)["text"]) == ("gina",
                                                                        "hi from the window")
        # Ctrl+Q closes the window the way its close button does. (Not
        # `xdotool windowclose`: destroying the window from another client
        # makes Xlib's default error handler exit the process, bye or not.)
        xdotool("key", "ctrl+q")
        left = ears.out.wait_for(lambda line: '"type": "leave"' in line, 10, "gina to leave")
        assert (json.loads(left)["name"], json.loads(left)["reason"]) == ("gina", "quit")
        assert window.wait(10) == 0, window.stderr.read()
    finally:
        if window.poll() is None:
            window.kill()
            window.wait()
