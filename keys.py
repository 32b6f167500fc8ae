"""CurveZMQ keys for zchat: generate key pairs, load them, turn sockets secure.

    python keys.py generate DIR NAME

writes DIR/NAME.key (the public key, to share) and DIR/NAME.key_secret (the
key pair, mode 0600, to keep). The broker takes its own secret file with
``--curve-secret``; clients take the broker's public key with
``--server-key`` and, where the broker admits only listed keys
(``--allow DIR``), their own secret file with ``--key``. A public key file
in the allow directory named NAME.key lets its owner join only as NAME.

Encryption and authentication are libzmq's own (CurveZMQ, ZAP through
pyzmq's zmq.auth); this module only handles the files and socket options.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
import zmq.utils.z85

# CVE-2019-13132 (a remote stack overflow with CURVE) and other fixes:
# older libzmq must not face a network.
MIN_LIBZMQ = (4, 3, 3)
Z85_KEY_CHARS = 40


class KeyFileError(ValueError):
    """A key or key file that cannot be used, with the reason."""


@dataclass(frozen=True)
class KeyPair:
    public: bytes
    secret: bytes


def generate(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write NAME.key and NAME.key_secret (0600) in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    old_umask = os.umask(0o077)  # the secret file is never readable by others
    try:
        public, secret = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old_umask)
    os.chmod(public, 0o644)
    return Path(public), Path(secret)


def _read_key_file(path: str | os.PathLike) -> tuple[bytes, bytes | None]:
    """(public, secret or None) from a key file, or a KeyFileError saying why."""
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise KeyFileError(f"cannot read key file {path}: {e}") from None


def load_key_pair(path: str | os.PathLike) -> KeyPair:
    """The key pair in a ``.key_secret`` file."""
    public, secret = _read_key_file(path)
    if not secret:
        raise KeyFileError(f"{path} holds no secret key (use the .key_secret file)")
    return KeyPair(public, secret)


def load_public_key(key_or_path: str) -> bytes:
    """A public key given as 40 Z85 characters or as a key file."""
    if os.path.exists(key_or_path):
        return _read_key_file(key_or_path)[0]
    if len(key_or_path) != Z85_KEY_CHARS:
        raise KeyFileError(f"{key_or_path!r} is neither a key file nor a 40-character Z85 key")
    try:
        zmq.utils.z85.decode(key_or_path)
    except (ValueError, KeyError):
        raise KeyFileError(f"{key_or_path!r} is not a valid Z85 key") from None
    return key_or_path.encode()


def names_by_key(directory: str | os.PathLike) -> dict[str, str]:
    """Public key (Z85) -> the name of its file, for every NAME.key in ``directory``."""
    bound = {}
    for path in sorted(Path(directory).glob("*.key")):
        public, _ = _read_key_file(path)
        bound[public.decode()] = path.stem
    return bound


def make_server(sock: zmq.Socket, pair: KeyPair) -> None:
    sock.curve_secretkey = pair.secret
    sock.curve_publickey = pair.public
    sock.curve_server = True


def make_client(sock: zmq.Socket, server_public: bytes, pair: KeyPair | None) -> None:
    """Encrypt ``sock`` to the broker; without a pair, a throwaway one."""
    if pair is None:
        public, secret = zmq.curve_keypair()
        pair = KeyPair(public, secret)
    sock.curve_secretkey = pair.secret
    sock.curve_publickey = pair.public
    sock.curve_serverkey = server_public


def libzmq_problem(version: tuple[int, int, int] | None = None) -> str | None:
    """Why this libzmq (or the given version) must not be used, or None."""
    version = version or zmq.zmq_version_info()
    if version < MIN_LIBZMQ:
        have, wanted = (".".join(map(str, v)) for v in (version, MIN_LIBZMQ))
        return f"libzmq {have} is too old; zchat needs {wanted} or newer"
    if not zmq.has("curve"):
        return "this libzmq was built without CURVE support"
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name or a wildcard such as "*"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Generate a CurveZMQ key pair for zchat.")
    sub = p.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write DIR/NAME.key and DIR/NAME.key_secret")
    gen.add_argument("directory")
    gen.add_argument("name", help="the key's name; in an --allow directory, the user's name")
    args = p.parse_args(argv)
    public, secret = generate(args.directory, args.name)
    print(f"public key: {public} (share it)\nsecret key: {secret} (keep it, mode 0600)")
    print(f"public key text: {load_public_key(str(public)).decode()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
