"""The admin login: generated password shown once and stored only as a hash; settings password wins."""

from __future__ import annotations

import io
import logging

import pytest

from ui.auth import (
    PASSWORD_HASH_KEY,
    AdminAuth,
    AuthError,
    ensure_admin_auth,
    hash_password,
    verify_password,
)


def test_hash_round_trip_and_salt() -> None:
    first, second = hash_password("s3cret"), hash_password("s3cret")
    assert first != second, "each hash gets its own salt"
    assert verify_password("s3cret", first) and verify_password("s3cret", second)
    assert not verify_password("s3cret ", first)


def test_unreadable_hash_says_how_to_reset() -> None:
    with pytest.raises(AuthError, match="PERSONABOT_ADMIN_PASSWORD"):
        verify_password("x", "md5$abc")


def test_first_start_generates_prints_once_and_stores_only_the_hash(
    settings_env, sqlite_store, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_env()
    out = io.StringIO()
    with caplog.at_level(logging.DEBUG):
        auth = ensure_admin_auth(settings, sqlite_store, out=out)
    printed = out.getvalue()
    password = printed.split("password: ", 1)[1].split()[0]
    assert len(password) >= 20
    stored = sqlite_store.get_config(PASSWORD_HASH_KEY)
    assert stored and password not in stored and stored.startswith("scrypt$")
    assert password not in caplog.text
    assert all(password not in str(entry.detail) for entry in sqlite_store.list_audit())
    assert auth.check("admin", password)
    assert not auth.check("admin", password[:-1] + "x")
    assert not auth.check("root", password)

    again = io.StringIO()
    second = ensure_admin_auth(settings, sqlite_store, out=again)
    assert again.getvalue() == "", "the password is printed only on the first start"
    assert second.check("admin", password)


def test_password_from_settings_wins(settings_env, sqlite_store) -> None:
    settings = settings_env(admin_password="from-env-password", admin_user="boss")
    out = io.StringIO()
    auth = ensure_admin_auth(settings, sqlite_store, out=out)
    assert out.getvalue() == ""
    assert sqlite_store.get_config(PASSWORD_HASH_KEY) is None
    assert auth.check("boss", "from-env-password")
    assert not auth.check("admin", "from-env-password")
    assert "from-env-password" not in repr(auth)


def test_auth_needs_a_secret() -> None:
    with pytest.raises(AuthError):
        AdminAuth("admin")
