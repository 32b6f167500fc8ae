"""Who you are across connections: a random secret kept in your config directory.

The broker lets a name that is in use be taken by a further connection only
when its hello presents the same secret as the first (protocol 2), so the
window, a ``listen`` in one terminal and a ``send`` in another can all be
one person, and someone else still cannot use that name. There are no
accounts: the secret is made at random the first time a client needs it
and kept in ``$XDG_CONFIG_HOME/zchat/secret`` (default
``~/.config/zchat/secret``), a file only its owner may read (0600, in a
directory 0700). ``ZCHAT_SECRET_FILE`` names another file (tests give each
process its own, so that each is a different person).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import messages as m

SECRET_FILE_ENV = "ZCHAT_SECRET_FILE"
# 128 random bits, as 32 hex digits: far within messages.MAX_SECRET_CHARS.
SECRET_BYTES = 16


class SecretFileError(Exception):
    """The secret file cannot be read, made, or holds no valid secret."""


def secret_path() -> Path:
    """Where the secret is kept: $ZCHAT_SECRET_FILE, else the config directory's."""
    explicit = os.environ.get(SECRET_FILE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or ""
    # The XDG spec: a relative XDG_CONFIG_HOME is invalid and to be ignored.
    base = Path(config) if os.path.isabs(config) else Path.home() / ".config"
    return base / "zchat" / "secret"


def load_secret(path: Path | None = None) -> str:
    """The secret in ``path`` (default: secret_path()), made first if the
    file does not exist. Two clients starting at once get the same secret:
    the file appears whole or not at all (a hard link of a finished file)."""
    path = secret_path() if path is None else path
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise SecretFileError(f"cannot read {path}: {e.strerror}") from None
    try:
        _create(path)
        return _read(path)
    except OSError as e:
        raise SecretFileError(f"cannot make {path}: {e.strerror}") from None


def _read(path: Path) -> str:
    secret = path.read_text(encoding="ascii", errors="replace").strip()
    if not (0 < len(secret) <= m.MAX_SECRET_CHARS and secret.isascii() and secret.isprintable()):
        raise SecretFileError(f"{path} holds no valid secret (1 to {m.MAX_SECRET_CHARS} "
                              "printable ASCII characters); remove it to make a new one")
    return secret


def _create(path: Path) -> None:
    """Write a new secret to a private temporary file, then link it into
    place; if another process was first, its secret stays."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="ascii") as file:
            file.write(secrets.token_hex(SECRET_BYTES) + "\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another client made it meanwhile: use theirs
    finally:
        temporary.unlink(missing_ok=True)


def load_secret_or_none(warn) -> str | None:
    """load_secret(), or None after telling ``warn`` why not: a client
    still works without it, but its name then takes one connection at a time."""
    try:
        return load_secret()
    except SecretFileError as e:
        warn(f"{e}; without it, your name can be in use by one connection at a time")
        return None
