"""Makes docs/screenshot.png: the real chat window with a few users chatting.

    python docs/make_screenshot.py [--out docs/screenshot.png]

Starts a broker on free loopback ports, its own Xvfb screen, the window
(gui_client.py) as alice and a few command-line users, lets them talk,
types alice's reply into the window with xdotool, then captures the window
with xwd and writes it as PNG (converted here with the standard library:
no Pillow or ImageMagick needed).

Needs (Debian): xvfb, xdotool, x11-apps (for xwd).
"""

from __future__ import annotations

import argparse
import hashlib
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

from procs import Broker, Client, listen, wait_until  # noqa: E402
from xvfb import Xvfb  # noqa: E402

WINDOW_TITLE = "alice - zchat"
# (who, text): alice's lines are typed into the window, the others piped.
CONVERSATION = [
    ("bob", "morning all! build 142 is green again"),
    ("chloe", "nice — was it the flaky cache test?"),
    ("bob", "yes, fixed the ordering in the fixture"),
    ("alice", "great, thanks bob! I'll cut the release after lunch"),
    ("dmitri", "Привет! tests pass on my side too ✓"),
    ("chloe", "café ☕ first, then the release notes ☺"),
    ("bob", "release notes draft: https://intranet.example/notes/142 — comments welcome, "
            "especially on the migration section, which got long"),
]


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
    env = dict(os.environ, DISPLAY=display)
    env.pop("CHAT_NAME", None)
    return subprocess.Popen([sys.executable, "gui_client.py", "--port", str(broker.port),
                             "--name", "alice"], cwd=ROOT, env=env)


def chat(broker: Broker, display: str, clients: list) -> None:
    """Everyone joins and says their lines, in order, each seen by a witness."""
    witness = listen(broker, "erin")  # a quiet reader who confirms each line
    clients.append(witness)
    senders = {}
    for who in dict.fromkeys(w for w, _ in CONVERSATION if w != "alice"):
        senders[who] = Client(broker, "send", "--timeout", "60", name=who, stdin=subprocess.PIPE)
        clients.append(senders[who])
        witness.out.wait_for(lambda line, w=who: f'"name": "{w}"' in line, 10, f"{who} to join")
    window_id = xdotool(display, "search", "--name", WINDOW_TITLE).split()[0]
    for number, (who, text) in enumerate(CONVERSATION, 1):
        if who == "alice":
            xdotool(display, "windowfocus", "--sync", window_id)
            xdotool(display, "type", "--delay", "20", text)
            xdotool(display, "key", "Return")
        else:
            senders[who].proc.stdin.write(text + "\n")
            senders[who].proc.stdin.flush()
        wait_until(lambda: len(witness.messages()) >= number, 15, f"message {number}")


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
        wait_until(lambda: xdotool(xvfb.display, "search", "--name", WINDOW_TITLE), 15,
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
