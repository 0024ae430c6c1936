"""Signed bearer tokens: HS256 JWTs whose ``sub`` is the user id."""

from __future__ import annotations

import time

import jwt

__all__ = ["InvalidTokenError", "TokenSigner"]


class InvalidTokenError(Exception):
    """A token that is missing, malformed, forged or not ours."""


class TokenSigner:
    """Issues and verifies tokens with one shared secret (every web node reads the same file)."""

    _ALGORITHM = "HS256"

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            raise ValueError("the token secret must be at least 32 bytes")
        self._secret = secret

    def issue(self, user_id: str, now_s: int | None = None) -> str:
        iat = int(time.time()) if now_s is None else now_s
        return jwt.encode({"sub": user_id, "iat": iat}, self._secret, algorithm=self._ALGORITHM)

    def verify(self, token: str) -> str:
        """The user id the token was issued for. Raises InvalidTokenError."""
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[self._ALGORITHM],
                options={"require": ["sub", "iat"]},
            )
        except jwt.PyJWTError as exc:
            raise InvalidTokenError(str(exc)) from exc
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise InvalidTokenError("token has no subject")
        return sub

    def __repr__(self) -> str:
        return "TokenSigner(<secret>)"
