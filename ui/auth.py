"""Admin login: check a user and password against settings or a generated, hashed password."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import sys
import threading
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from personabot.core.settings import Settings
    from personabot.core.store import Store

PASSWORD_HASH_KEY = "admin_password_hash"
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
HASHING_AT_ONCE = 2


class AuthError(ValueError):
    """The stored password hash cannot be read; the message says how to reset it."""


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """A salted scrypt hash: 'scrypt$n$r$p$salt$digest' (base64 parts)."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P,
                            dklen=32)
    parts = ("scrypt", str(_SCRYPT_N), str(_SCRYPT_R), str(_SCRYPT_P),
             base64.b64encode(salt).decode(), base64.b64encode(digest).decode())
    return "$".join(parts)


def verify_password(password: str, encoded: str) -> bool:
    try:
        scheme, n, r, p, salt_b64, digest_b64 = encoded.split("$")
        if scheme != "scrypt":
            raise ValueError(scheme)
        salt, expected = base64.b64decode(salt_b64), base64.b64decode(digest_b64)
        digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=int(n), r=int(r), p=int(p),
                                dklen=len(expected))
    except ValueError as error:
        raise AuthError(
            f"the stored {PASSWORD_HASH_KEY} is unreadable; delete that config entry and restart the "
            "UI to generate a new password, or set PERSONABOT_ADMIN_PASSWORD"
        ) from error
    return hmac.compare_digest(digest, expected)


class AdminAuth:
    """The one admin account: `user` from settings; password from settings or a stored hash."""

    def __init__(self, user: str, *, password: str | None = None, password_hash: str | None = None) -> None:
        if password is None and password_hash is None:
            raise AuthError("an admin password or its hash is needed")
        self.user = user
        self._password = password
        self._password_hash = password_hash
        self._hashing = threading.BoundedSemaphore(HASHING_AT_ONCE)
        self._verified: set[bytes] = set()

    def check(self, user: str, password: str) -> bool:
        """Constant-time check of a login attempt; a name with spaces around it is refused.

        At most HASHING_AT_ONCE scrypt checks run at once; a verified login is remembered (as a
        keyed digest) so later checks of the same credentials cost no scrypt.
        """
        if user != user.strip():
            return False
        key = hmac.new(self._cache_key, f"{user}\0{password}".encode("utf-8", "surrogatepass"), "sha256").digest()
        if key in self._verified:
            return True
        with self._hashing:
            ok = self._check(user, password)
        if ok:
            self._verified.add(key)
        return ok

    _cache_key = secrets.token_bytes(32)

    def _check(self, user: str, password: str) -> bool:
        user_ok = hmac.compare_digest(user.encode("utf-8"), self.user.encode("utf-8"))
        if self._password is not None:
            password_ok = hmac.compare_digest(password.encode("utf-8"), self._password.encode("utf-8"))
        else:
            password_ok = verify_password(password, self._password_hash or "")
        return user_ok and password_ok

    def __call__(self, user: str, password: str) -> bool:
        return self.check(user, password)

    def __repr__(self) -> str:
        return f"AdminAuth(user={self.user!r})"


def ensure_admin_auth(settings: Settings, store: Store, *, out: TextIO | None = None) -> AdminAuth:
    """The admin login for this install.

    With PERSONABOT_ADMIN_PASSWORD set, that password. Otherwise the first start generates a
    strong password, stores only its scrypt hash (store config `admin_password_hash`) and prints
    the password once to `out` (stdout); it is never logged.
    """
    if settings.admin_password is not None and settings.admin_password.get_secret_value():
        return AdminAuth(settings.admin_user, password=settings.admin_password.get_secret_value())
    stored = store.get_config(PASSWORD_HASH_KEY)
    if stored:
        return AdminAuth(settings.admin_user, password_hash=stored)
    password = secrets.token_urlsafe(18)
    encoded = hash_password(password)
    store.set_config(PASSWORD_HASH_KEY, encoded, actor="ui")
    stream = out if out is not None else sys.stdout
    stream.write(
        f"\npersonabot admin login (shown once, only its hash is stored):\n"
        f"  user: {settings.admin_user}\n  password: {password}\n"
        "Set PERSONABOT_ADMIN_PASSWORD to choose your own.\n\n"
    )
    stream.flush()
    return AdminAuth(settings.admin_user, password_hash=encoded)
