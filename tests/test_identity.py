"""The secret that makes several connections one person (identity.py): where
it is kept, with what permissions, and that racing clients share one."""

import os
import stat
import threading

import pytest

import identity
import messages as m


@pytest.fixture
def config_home(tmp_path, monkeypatch):
    """An empty XDG config directory, and no ZCHAT_SECRET_FILE."""
    monkeypatch.delenv(identity.SECRET_FILE_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path / "config"


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_the_secret_is_made_once_private_in_the_config_directory(config_home):
    secret = identity.load_secret()
    path = config_home / "zchat" / "secret"
    assert identity.secret_path() == path
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    assert len(secret) == 2 * identity.SECRET_BYTES and len(secret) <= m.MAX_SECRET_CHARS
    assert identity.load_secret() == secret  # read, not made again
    assert sorted(os.listdir(path.parent)) == ["secret"]  # no temporary file left


def test_home_config_is_the_default_and_the_variable_overrides_it(tmp_path, monkeypatch):
    monkeypatch.delenv(identity.SECRET_FILE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/is/ignored")  # as the XDG spec says
    assert identity.secret_path() == tmp_path / ".config" / "zchat" / "secret"
    monkeypatch.setenv(identity.SECRET_FILE_ENV, str(tmp_path / "mine"))
    assert identity.secret_path() == tmp_path / "mine"


def test_clients_starting_together_share_one_secret(config_home):
    found: list[str] = []
    start = threading.Barrier(8)

    def client() -> None:
        start.wait()
        found.append(identity.load_secret())

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(found) == 8 and len(set(found)) == 1


def test_a_file_without_a_valid_secret_is_an_error_that_says_what_to_do(tmp_path, monkeypatch):
    path = tmp_path / "secret"
    monkeypatch.setenv(identity.SECRET_FILE_ENV, str(path))
    for content in ["", "\n", "x" * (m.MAX_SECRET_CHARS + 1), "caf\u00e9", "a\x1bb"]:
        path.write_text(content)
        with pytest.raises(identity.SecretFileError, match="remove it to make a new one"):
            identity.load_secret()


def test_without_a_place_for_the_secret_a_client_warns_and_goes_on(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(identity.SECRET_FILE_ENV, str(blocker / "secret"))
    warnings: list[str] = []
    assert identity.load_secret_or_none(warnings.append) is None
    [warning] = warnings
    assert str(blocker) in warning and "one connection at a time" in warning
