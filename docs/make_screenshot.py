"""Makes docs/screenshot.png: the real chat window with a few users chatting.

    python docs/make_screenshot.py [--out docs/screenshot.png]

Starts a broker on free loopback ports, its own Xvfb screen, the window
(gui_client.py) as alice and a few command-line users. Alice enters three
rooms and sets a topic by typing commands into the window (xdotool); the
others talk in #general (a multi-line code message, a mention of alice, a
link) and in the other rooms, and one writes to her directly, so the
sidebar shows unread and mention counts. Then it captures the window with
xwd and writes it as PNG (converted here with the standard library: no
Pillow or ImageMagick needed).

Needs (Debian): xvfb, xdotool, x11-apps (for xwd).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from procs import Broker, Client, listen, new_secret_file, run_cli, wait_until  # noqa: E402
from xvfb import Xvfb  # noqa: E402

# The title with the unread counts the picture shows (see SCENE).
WINDOW_TITLE = "(3 · @1) alice - zchat"
START_TITLE = "alice - zchat"
CODE = """the flaky one, fixed in the fixture:
```
@pytest.fixture
def cache(tmp_path):
    store = Cache(tmp_path / "c.db")
    yield store
    store.close()  # was missing: the next test saw its lock
```"""
# What alice types into the window first: three rooms, #general on screen.
ALICE_TYPES = ["/join #release", "/join #design", "/switch #general",
               "/topic build 142 is green, release 1.4 on Thursday"]
# (who, where, text), in order: a room, or "@alice" for a direct message.
SCENE = [
    ("bob", "#general", "morning all! build 142 is green again"),
    ("chloe", "#general", "nice — was it the flaky cache test?"),
    ("bob", "#general", CODE),
    ("alice", "#general", "great, thanks bob! I'll cut the release after lunch"),
    ("dmitri", "#general", "Привет! tests pass on my side too ✓"),
    ("chloe", "#general", "alice, can you check the notes before 3? "
                          "https://intranet.example/notes/142"),
    ("chloe", "#release", "changelog is in, 14 entries"),
    ("bob", "#design", "@alice new icons are up for review"),
    ("dmitri", "@alice", "got a minute for the migration question?"),
]
PEOPLE = ("bob", "chloe", "dmitri")


def xwd_to_png(xwd: bytes) -> bytes:
    """A 24/32-bit ZPixmap XWD image (what xwd writes for Xvfb) as PNG."""
    fields = struct.unpack(">25I", xwd[:100])
    header_size, byte_order, bits_per_pixel, bytes_per_line = (
        fields[0], fields[7], fields[11], fields[12])
    width, height, ncolors = fields[4], fields[5], fields[19]
    red_mask, green_mask, blue_mask = fields[14:17]
    if bits_per_pixel != 32 or (red_mask, green_mask, blue_mask) != (0xFF0000, 0xFF00, 0xFF):
        raise ValueError(f"unsupported XWD image: {bits_per_pixel} bits per pixel")
    # In memory order a pixel is B,G,R,X (LSB first) or X,R,G,B (MSB first).
    red, green, blue = (2, 1, 0) if byte_order == 0 else (1, 2, 3)
    pixels = xwd[header_size + 12 * ncolors:]
    rows = []
    for y in range(height):
        row = pixels[y * bytes_per_line:y * bytes_per_line + 4 * width]
        rgb = bytearray(3 * width)
        rgb[0::3], rgb[1::3], rgb[2::3] = row[red::4], row[green::4], row[blue::4]
        rows.append(b"\0" + bytes(rgb))
    return png(width, height, b"".join(rows))


def png(width: int, height: int, filtered_rows: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(filtered_rows, 9)) + chunk(b"IEND", b""))


def capture(display: str) -> bytes:
    env = {"DISPLAY": display, "PATH": "/usr/bin:/bin"}
    return subprocess.run(["xwd", "-silent", "-name", WINDOW_TITLE], env=env, check=True,
                          capture_output=True, timeout=10).stdout


def xdotool(display: str, *args: str) -> str:
    env = {"DISPLAY": display, "PATH": "/usr/bin:/bin"}
    return subprocess.run(["xdotool", *args], env=env, capture_output=True, text=True,
                          timeout=10).stdout.strip()


def settled_capture(display: str, timeout: float = 10) -> bytes:
    """A capture once two in a row are the same (the window has drawn everything)."""
    previous = capture(display)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.3)  # a frame's worth of redraw between looks
        current = capture(display)
        if hashlib.sha256(current).digest() == hashlib.sha256(previous).digest():
            return current
        previous = current
    return previous


def start_window(broker: Broker, display: str) -> subprocess.Popen:
    env = dict(os.environ, DISPLAY=display, ZCHAT_SECRET_FILE=new_secret_file())
    env.pop("CHAT_NAME", None)
    return subprocess.Popen([sys.executable, "gui_client.py", "--port", str(broker.port),
                             "--name", "alice"], cwd=ROOT, env=env)


def alice_types(display: str, window_id: str, text: str) -> None:
    xdotool(display, "windowfocus", "--sync", window_id)
    xdotool(display, "type", "--delay", "15", text)
    xdotool(display, "key", "Return")


def in_room(broker: Broker, room: str) -> list[str]:
    answer = run_cli(broker, "users", "--room", room, "--json")
    return json.loads(answer.stdout) if answer.returncode == 0 else []


def chat(broker: Broker, display: str, clients: list) -> None:
    """Everyone joins, alice enters her rooms, then each line is said in order."""
    secrets = {who: {"ZCHAT_SECRET_FILE": new_secret_file()} for who in PEOPLE}
    for who in PEOPLE:  # online in every room, and the same person as their sends
        clients.append(listen(broker, who, "--room", "#general", "--room", "#release",
                              "--room", "#design", env=secrets[who]))
    window_id = xdotool(display, "search", "--name", START_TITLE).split()[0]
    for text in ALICE_TYPES:
        alice_types(display, window_id, text)
        if text.startswith("/join"):
            room = text.split()[1]
            wait_until(lambda: "alice" in in_room(broker, room), 15, f"alice in {room}")
    for who, where, text in SCENE:
        if who == "alice":
            alice_types(display, window_id, text)
            continue
        target = ["--to", where[1:]] if where.startswith("@") else ["--room", where]
        sent = run_cli(broker, "send", *target, text, name=who, env=secrets[who])
        if sent.returncode != 0:
            raise RuntimeError(f"{who} could not send: {sent.stderr}")
    # The window leaves the screen's focus to nobody: a click elsewhere would
    # not be seen. The unread counts show once its title says so.
    def titles() -> str:
        return xdotool(display, "search", "--name", "zchat", "getwindowname", "%@")

    wait_until(lambda: WINDOW_TITLE in titles().splitlines(), 20, "the counts in the title")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshot.png")
    args = p.parse_args()
    for tool in ("Xvfb", "xdotool", "xwd"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed (apt-get install xvfb xdotool x11-apps)")
    with ExitStack() as cleanup:
        xvfb = Xvfb(shutil.which("Xvfb"))
        cleanup.callback(xvfb.stop)
        broker = Broker().start()
        cleanup.callback(broker.kill)
        window = start_window(broker, xvfb.display)
        cleanup.callback(stop, window)
        wait_until(lambda: xdotool(xvfb.display, "search", "--name", START_TITLE), 15,
                   "the window")
        clients: list[Client] = []
        cleanup.callback(lambda: [client.stop() for client in clients])
        chat(broker, xvfb.display, clients)
        args.out.write_bytes(xwd_to_png(settled_capture(xvfb.display)))
        print(f"wrote {args.out}")
    return 0


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(10)


if __name__ == "__main__":
    sys.exit(main())
