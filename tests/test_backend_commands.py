"""The stand-in backend's signer (hil/backend/commands.py): its key pair kept in the state
directory, the public key in the form ``cloud.command_public_key`` takes, envelopes the
machine's checks accept, and its subcommands of ``python -m hil.backend``."""

from __future__ import annotations

import argparse
import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from hil.backend.commands import (
    CommandSigner,
    add_arguments,
    body_of,
    format_time,
    parse_fields,
)
from vmc.cloud.commands import parse_time
from vmc.config import parse_config

START = datetime(2026, 11, 22, 22, 40, tzinfo=UTC)


def test_the_key_pair_is_kept_private_and_reused(tmp_path: Path) -> None:
    first = CommandSigner.load_or_create(tmp_path)
    again = CommandSigner.load_or_create(tmp_path)
    assert first.public_key_b64 == again.public_key_b64
    assert (tmp_path / "command_key.pem").stat().st_mode & 0o777 == 0o600
    assert CommandSigner.load_or_create(tmp_path / "other").public_key_b64 != first.public_key_b64


def test_the_public_key_is_what_the_configuration_takes(tmp_path: Path) -> None:
    key = CommandSigner.load_or_create(tmp_path).public_key_b64
    config = parse_config(
        {
            "machine": {"id": "M1", "state_dir": str(tmp_path)},
            "mdb": {"simulate": True},
            "motor": {"simulate": True},
            "cloud": {"command_public_key": key},
            "slot": [{"id": "A1", "row": 0, "col": 0, "price": 100}],
        },
        tmp_path,
    )
    assert config.cloud.command_public_key_bytes == base64.b64decode(key)


def test_an_envelope_verifies_and_carries_contract_times(tmp_path: Path) -> None:
    signer = CommandSigner.load_or_create(tmp_path)
    envelope = signer.envelope("M1", "set_slot", {"slot": "A1", "enabled": False}, now=START)
    public = Ed25519PublicKey.from_public_bytes(base64.b64decode(signer.public_key_b64))
    public.verify(base64.b64decode(envelope["sig"]), envelope["body"].encode("utf-8"))
    body = body_of(envelope)
    assert body["machine"] == "M1" and body["type"] == "set_slot" and body["enabled"] is False
    assert len(body["cmd_id"]) == 36  # a UUID
    assert body["issued_at"] == "2026-11-22T22:40:00.000Z"
    assert body["expires_at"] == "2026-11-22T22:41:00.000Z"  # 60 s by default
    assert parse_time(body["expires_at"]) == START + timedelta(seconds=60)
    assert format_time(START + timedelta(microseconds=123_456)) == "2026-11-22T22:40:00.123Z"


def test_fields_from_the_command_line() -> None:
    assert parse_fields(["slot=12", "price=150", "enabled=false", "currency=EUR"]) == {
        "slot": "12",
        "price": 150,
        "enabled": False,
        "currency": "EUR",
    }
    with pytest.raises(SystemExit):
        parse_fields(["price"])


def main(argv: list[str]) -> int:
    """The way python -m hil.backend runs a provider's subcommands."""
    parser = argparse.ArgumentParser()
    handlers = add_arguments(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return handlers[args.command](args)


def test_the_subcommands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["public-key", "--state", str(tmp_path)]) == 0
    key = capsys.readouterr().out.strip()
    assert key == CommandSigner.load_or_create(tmp_path).public_key_b64
    argv = ["sign", "--state", str(tmp_path), "--machine", "M1", "--ttl", "30"]
    assert main([*argv, "set_price", "slot=A1", "price=180", "currency=EUR"]) == 0
    envelope = json.loads(capsys.readouterr().out)
    body = body_of(envelope)
    assert {k: body[k] for k in ("type", "slot", "price", "currency")} == {
        "type": "set_price",
        "slot": "A1",
        "price": 180,
        "currency": "EUR",
    }
    issued, expires = parse_time(body["issued_at"]), parse_time(body["expires_at"])
    assert issued is not None and expires is not None
    assert expires - issued == timedelta(seconds=30)
