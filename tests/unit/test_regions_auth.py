"""Peer authentication: HMAC signatures over time, region, path and body; loading the secret."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from app.regions import auth
from app.regions.auth import (
    FORWARDED_FROM,
    MAX_SKEW_S,
    SIGNATURE,
    FederationSecretError,
    load_secret,
    sign,
    verify,
)
from app.regions.spec import Federation

SECRET = b"correct horse battery staple"
NOW = 1_700_000_000.0
PATH = "/v1/chat/completions"
BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'


def signed(region: str = "us-east-1", path: str = PATH, body: bytes = BODY) -> str:
    return sign(SECRET, region, path, body, now=NOW)


# ---- sign / verify ----------------------------------------------------------------------------


def test_signature_header_format() -> None:
    header = signed()
    assert re.fullmatch(r"t=1700000000,s=[0-9a-f]{64}", header)
    assert signed() == header  # deterministic
    assert sign(SECRET, "us-east-1", PATH, BODY, now=NOW + 0.9) == header  # whole seconds


def test_round_trip() -> None:
    assert verify(SECRET, signed(), "us-east-1", PATH, BODY, now=NOW) is None
    assert verify(SECRET, sign(SECRET, "r", "/", b""), "r", "/", b"") is None  # real clock


def test_wrong_secret_does_not_match() -> None:
    why = verify(b"another secret of some length", signed(), "us-east-1", PATH, BODY, now=NOW)
    assert why == "the federation signature does not match"


@pytest.mark.parametrize(
    ("region", "path", "body"),
    [
        ("eu-west-1", PATH, BODY),  # claims to come from another region
        ("us-east-1", "/v1/completions", BODY),
        ("us-east-1", PATH, BODY.replace(b"hi", b"ho")),
        ("us-east-1", PATH, BODY + b" "),
        ("us-east-1", PATH, b""),
    ],
    ids=["region", "path", "body", "body-suffix", "body-dropped"],
)
def test_tampering_is_detected(region: str, path: str, body: bytes) -> None:
    why = verify(SECRET, signed(), region, path, body, now=NOW)
    assert why == "the federation signature does not match"


def test_tampered_mac_or_timestamp_is_detected() -> None:
    header = signed()
    stamp, mac = header.split(",")
    flipped = mac[:-1] + ("0" if mac[-1] != "0" else "1")
    assert verify(SECRET, f"{stamp},{flipped}", "us-east-1", PATH, BODY, now=NOW) is not None
    moved = f"t={int(NOW) + 1},{mac}"  # a fresh-looking time on an old MAC
    why = verify(SECRET, moved, "us-east-1", PATH, BODY, now=NOW)
    assert why == "the federation signature does not match"


def test_signature_expires_beyond_max_skew() -> None:
    assert MAX_SKEW_S == 300.0
    header = signed()
    assert verify(SECRET, header, "us-east-1", PATH, BODY, now=NOW + MAX_SKEW_S) is None
    assert verify(SECRET, header, "us-east-1", PATH, BODY, now=NOW - MAX_SKEW_S) is None
    for now in (NOW + MAX_SKEW_S + 1, NOW - MAX_SKEW_S - 1, NOW + 86_400):
        why = verify(SECRET, header, "us-east-1", PATH, BODY, now=now)
        assert why is not None and "expired" in why


@pytest.mark.parametrize(
    "header",
    [
        "garbage",
        "t=abc,s=00",
        "s=00",  # no time
        "t=1700000000",  # no MAC
        "t=1700000000;s=00",
        "t=1700000000.5,s=00",
        ",",
        "t=,s=",
    ],
)
def test_malformed_header(header: str) -> None:
    assert verify(SECRET, header, "us-east-1", PATH, BODY, now=NOW) == (
        f"malformed {SIGNATURE} header"
    )


def test_non_ascii_mac_is_refused_not_raised() -> None:
    header = f"t={int(NOW)},s=\u00e9"  # Starlette decodes header bytes as latin-1
    assert verify(SECRET, header, "us-east-1", PATH, BODY, now=NOW) is not None


@pytest.mark.parametrize(
    ("header", "region"),
    [(None, "us-east-1"), ("", "us-east-1"), ("SIGNED", None), ("SIGNED", ""), (None, None)],
)
def test_missing_headers(header: str | None, region: str | None) -> None:
    header = signed() if header == "SIGNED" else header
    why = verify(SECRET, header, region, PATH, BODY, now=NOW)
    assert why is not None
    assert SIGNATURE in why and FORWARDED_FROM in why


def test_no_secret_configured_accepts_nothing() -> None:
    why = verify(None, signed(), "us-east-1", PATH, BODY, now=NOW)
    assert why is not None and "no federation secret" in why


def test_verify_never_echoes_the_secret() -> None:
    for header in (signed(), "garbage", None):
        why = verify(b"x" * 32, header, "us-east-1", PATH, BODY, now=NOW + 10_000) or ""
        assert "xxxx" not in why and SECRET.decode() not in why


# ---- load_secret ------------------------------------------------------------------------------

ENV = "TEST_REGIONS_AUTH_SECRET"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv(ENV, raising=False)
    return monkeypatch


def test_secret_from_the_environment(env: pytest.MonkeyPatch) -> None:
    env.setenv(ENV, "  0123456789abcdef-and-more \n")
    assert load_secret(Federation(secret_env=ENV)) == b"0123456789abcdef-and-more"


def test_default_variable_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_FEDERATION_SECRET", "s" * 20)
    assert load_secret(Federation()) == b"s" * 20


@pytest.mark.parametrize("value", [None, "", "   \n"])
def test_no_secret_is_none(env: pytest.MonkeyPatch, value: str | None) -> None:
    if value is not None:
        env.setenv(ENV, value)
    assert load_secret(Federation(secret_env=ENV)) is None


def test_secret_length_bounds(env: pytest.MonkeyPatch) -> None:
    env.setenv(ENV, "a" * 16)
    assert load_secret(Federation(secret_env=ENV)) == b"a" * 16
    env.setenv(ENV, "a" * 15)
    with pytest.raises(FederationSecretError, match="at least 16 characters"):
        load_secret(Federation(secret_env=ENV))
    assert issubclass(FederationSecretError, ValueError)


def test_secret_from_a_file_wins_over_the_environment(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env.setenv(ENV, "from-the-environment-0000")
    path = tmp_path / "secret"
    path.write_text("from-the-file-0123456789\n")
    assert load_secret(Federation(secret_env=ENV, secret_file=str(path))) == (
        b"from-the-file-0123456789"
    )


def test_too_short_secret_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("short\n")
    with pytest.raises(FederationSecretError, match="at least 16"):
        load_secret(Federation(secret_file=str(path)))


def test_missing_file_names_its_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "secret"
    with pytest.raises(FederationSecretError) as caught:
        load_secret(Federation(secret_file=str(path)))
    message = str(caught.value)
    assert str(path) in message
    assert os.strerror(2) in message  # "No such file or directory"


def test_directory_as_file_names_its_path(tmp_path: Path) -> None:
    with pytest.raises(FederationSecretError, match=re.escape(str(tmp_path))):
        load_secret(Federation(secret_file=str(tmp_path)))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_names_its_path(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("0123456789abcdef0123")
    path.chmod(0)
    with pytest.raises(FederationSecretError, match=re.escape(str(path))):
        load_secret(Federation(secret_file=str(path)))


def test_empty_secret_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("\n")
    with pytest.raises(FederationSecretError):
        load_secret(Federation(secret_file=str(path)))


def test_binary_secret_file_raises_federation_secret_error(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(bytes(range(128, 160)))
    with pytest.raises(FederationSecretError, match=re.escape(str(path))):
        load_secret(Federation(secret_file=str(path)))


def test_module_constants_are_the_wire_names() -> None:
    assert auth.FORWARDED_FROM == "x-app-forwarded-from"
    assert auth.SIGNATURE == "x-app-federation-signature"
