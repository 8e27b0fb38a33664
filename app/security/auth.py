"""The API bearer token: where it lives, how it is made, and the check guarded routes run.

The token is ``EDGEBATCH_API_TOKEN`` when set (e.g. the Serve config's runtime_env), else
the file ``<state>/api_token`` (mode 0600, made by ``ensure_api_token``). With a token
configured, every state-changing route needs ``Authorization: Bearer <token>``, and
inference too where the deployment's ``auth_inference`` is on. With none configured the
check passes: the server then only listens on 127.0.0.1 (``edgebatch up`` enforces it).
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from app.errors import ConfigError, Unauthorized
from app.state import StateDir

TOKEN_ENV = "EDGEBATCH_API_TOKEN"
TOKEN_FILE = "api_token"
MIN_TOKEN_CHARS = 16


def token_path(state: StateDir) -> Path:
    return state.root / TOKEN_FILE


def _valid(token: str, where: str) -> str:
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ConfigError(f"the API token in {where} must be at least {MIN_TOKEN_CHARS} characters without "
                          f"spaces; delete it and let `edgebatch up` make one, or set {TOKEN_ENV}")
    return token


def ensure_api_token(state: StateDir) -> str:
    """The configured token: ``EDGEBATCH_API_TOKEN``, else the state folder's, made (random, 256 bits,
    file mode 0600) when there is none yet."""
    env = load_api_token(state) if os.environ.get(TOKEN_ENV, "").strip() else None
    if env is not None:
        return env  # the operator's own token wins over the file
    path = token_path(state)
    state.root.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)  # an older copy may be group-readable
        return _valid(path.read_text().strip(), str(path))
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token


def load_api_token(state: StateDir | None = None) -> str | None:
    """The configured token (env first, then the state folder's file), ``None`` when there is none."""
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return _valid(env, TOKEN_ENV)
    path = token_path(state or StateDir.default())
    try:
        return _valid(path.read_text().strip(), str(path))
    except FileNotFoundError:
        return None


class TokenCheck:
    """Compares a request's bearer token with the configured one; re-reads the file when it changes."""

    def __init__(self, state: StateDir | None = None) -> None:
        self._state = state
        self._seen: tuple[float, str | None] | None = None

    def token(self) -> str | None:
        state = self._state or StateDir.default()
        if os.environ.get(TOKEN_ENV, "").strip():
            return load_api_token(state)
        try:
            mtime = token_path(state).stat().st_mtime
        except FileNotFoundError:
            return None
        if self._seen is None or self._seen[0] != mtime:
            self._seen = (mtime, load_api_token(state))
        return self._seen[1]

    def require(self, headers: Mapping[str, str], what: str) -> None:
        """Unauthorized (401) unless the headers carry the configured token; passes when none is configured."""
        expected = self.token()
        if expected is None:
            return
        given = headers.get("authorization") or headers.get("Authorization") or ""
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthorized(f"{what} needs the API token: send the header 'Authorization: Bearer <token>' "
                               f"(the token is in the server's state folder, {TOKEN_FILE}, or {TOKEN_ENV})")
        if not hmac.compare_digest(value.strip().encode(), expected.encode()):
            raise Unauthorized(f"{what}: the bearer token is not this server's API token")
