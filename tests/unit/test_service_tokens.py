from __future__ import annotations

import jwt
import pytest

from photostack.service._tokens import InvalidTokenError, TokenSigner

SECRET = b"s" * 32


def test_issue_and_verify() -> None:
    signer = TokenSigner(SECRET)
    token = signer.issue("user123", now_s=1_700_000_000)
    assert signer.verify(token) == "user123"
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims == {"sub": "user123", "iat": 1_700_000_000}
    assert "s" * 32 not in repr(signer)


def test_other_secret_is_rejected() -> None:
    token = TokenSigner(b"o" * 32).issue("u")
    with pytest.raises(InvalidTokenError):
        TokenSigner(SECRET).verify(token)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b.c",
        jwt.encode({"sub": "u"}, SECRET, algorithm="HS256"),  # no iat
        jwt.encode({"iat": 1}, SECRET, algorithm="HS256"),  # no sub
        jwt.encode({"sub": "u", "iat": 1}, None, algorithm="none"),  # unsigned
        jwt.encode({"sub": 5, "iat": 1}, SECRET, algorithm="HS256"),
    ],
)
def test_invalid_tokens(token: str) -> None:
    with pytest.raises(InvalidTokenError):
        TokenSigner(SECRET).verify(token)


def test_tampered_token() -> None:
    signer = TokenSigner(SECRET)
    header, _payload, sig = signer.issue("alice").split(".")
    forged = jwt.encode({"sub": "mallory", "iat": 1}, b"x" * 32, algorithm="HS256").split(".")[1]
    with pytest.raises(InvalidTokenError):
        signer.verify(f"{header}.{forged}.{sig}")


def test_short_secret_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        TokenSigner(b"short")
