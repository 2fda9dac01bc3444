"""The stand-in backend's command signer (contract: "Signed commands").

The backend keeps an Ed25519 key pair in its state directory (``command_key.pem``, PKCS#8, mode
0600), created on first use. The machine is given the public key, in the base64 form
``cloud.command_public_key`` takes (``python -m hil.backend public-key``). Each command is an
envelope ``{"body": "<JSON>", "sig": "<base64 signature of the body's UTF-8 bytes>"}``; the
body carries ``cmd_id`` (a UUID), ``machine``, ``issued_at`` (now) and ``expires_at`` (now +
60 s unless asked otherwise), ``type`` and the type's fields.

Tests build envelopes that break one rule at a time through the keyword arguments of
:meth:`CommandSigner.envelope` (another machine, old times, a long window, a chosen cmd_id).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

KEY_FILE: Final = "command_key.pem"
DEFAULT_TTL_S: Final = 60.0


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with milliseconds, as the contract writes times."""
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


class CommandSigner:
    """Signs command envelopes with the backend's private key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key

    @classmethod
    def generate(cls) -> CommandSigner:
        """A signer with a fresh key that is kept nowhere (tests: a forger's key)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, state_dir: Path) -> CommandSigner:
        """The key pair of ``state_dir/command_key.pem``, created (0600) when missing."""
        path = Path(state_dir) / KEY_FILE
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path} does not hold an Ed25519 private key")
            return cls(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        return cls(key)

    @property
    def public_key_b64(self) -> str:
        """The public key as ``cloud.command_public_key`` takes it (base64 of 32 bytes)."""
        raw = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return base64.b64encode(raw).decode("ascii")

    def body(
        self,
        machine: str,
        type: str,
        fields: Mapping[str, Any] | None = None,
        *,
        cmd_id: str | None = None,
        now: datetime | None = None,
        issued_at: datetime | None = None,
        expires_at: datetime | None = None,
        ttl_s: float = DEFAULT_TTL_S,
    ) -> dict[str, Any]:
        """A command body: ``cmd_id`` a new UUID, issued now, expiring ``ttl_s`` later."""
        issued = issued_at or now or datetime.now(UTC)
        expires = expires_at or issued + timedelta(seconds=ttl_s)
        return {
            "cmd_id": cmd_id or str(uuid.uuid4()),
            "machine": machine,
            "issued_at": format_time(issued),
            "expires_at": format_time(expires),
            "type": type,
            **(fields or {}),
        }

    def sign(self, body: Mapping[str, Any] | str) -> dict[str, str]:
        """The envelope of ``body`` (a dict is serialised to JSON first)."""
        text = body if isinstance(body, str) else json.dumps(body, separators=(",", ":"))
        sig = self._key.sign(text.encode("utf-8"))
        return {"body": text, "sig": base64.b64encode(sig).decode("ascii")}

    def envelope(
        self,
        machine: str,
        type: str,
        fields: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> dict[str, str]:
        """A signed envelope for one command (``options``: those of :meth:`body`)."""
        return self.sign(self.body(machine, type, fields, **options))

    def payload(
        self, machine: str, type: str, fields: Mapping[str, Any] | None = None, **options: Any
    ) -> bytes:
        """The envelope as the bytes published on ``vmc/M/cmd``."""
        return json.dumps(self.envelope(machine, type, fields, **options)).encode("utf-8")


def body_of(envelope: Mapping[str, str]) -> dict[str, Any]:
    """The command inside an envelope (its ``cmd_id`` and fields)."""
    body: dict[str, Any] = json.loads(envelope["body"])
    return body


# --------------------------------------------------------------------------------------------
# Command line: ``python -m hil.backend public-key|sign ...`` (through the backend's CLI; the
# commands that publish are in hil/backend/operator.py).


#: Fields that are always text, even when they look like a number (slot "12").
TEXT_FIELDS: Final = frozenset({"slot", "order_id", "currency", "origin", "cmd_id", "machine"})

#: What ``serve`` saves in the state folder for the command line: broker, prefix, machine.
SETTINGS_FILE: Final = "backend.json"


def save_settings(state_dir: Path, **settings: Any) -> None:
    """Write ``backend.json`` (atomically): the broker, prefix and default machine."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / SETTINGS_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({k: v for k, v in settings.items() if v is not None}) + "\n")
    os.replace(tmp, path)


def load_settings(state_dir: Path) -> dict[str, Any]:
    """``backend.json`` of ``state_dir`` (empty when there is none)."""
    try:
        data = json.loads((Path(state_dir) / SETTINGS_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def shared_options(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    """``--state``, ``--machine``, ``--broker``, ``--prefix``: accepted before the subcommand
    (``top``: the main parser, default None) and after it (default: not set, so a value given
    before the subcommand is kept)."""
    default = None if top else argparse.SUPPRESS
    parser.add_argument(
        "--state",
        "--state-dir",
        dest="state_dir",
        type=Path,
        default=default,
        metavar="DIR",
        help="the backend's state folder",
    )
    parser.add_argument(
        "--machine", default=default, help="the machine (default: backend.json's, or the only one)"
    )
    parser.add_argument(
        "--broker", default=default, help="HOST:PORT (default: backend.json's, or 127.0.0.1:1883)"
    )
    parser.add_argument("--prefix", default=default, help="topic prefix (default vmc)")


def state_dir_of(args: argparse.Namespace) -> Path:
    state_dir = getattr(args, "state_dir", None)
    if state_dir is None:
        raise SystemExit("--state DIR is required (the backend's state folder)")
    return Path(state_dir)


def add_arguments(subparsers: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    """The signer's subcommands for ``python -m hil.backend`` (hil/backend/__main__.py):

    * ``public-key --state DIR``: the key for ``cloud.command_public_key``;
    * ``sign --state DIR [--machine M] TYPE field=value ...``: print a signed envelope.

    (``send`` signs and publishes: hil/backend/operator.py.)
    """
    key = subparsers.add_parser("public-key", help="print the key for cloud.command_public_key")
    shared_options(key)
    sign = subparsers.add_parser("sign", help="print a signed command envelope")
    shared_options(sign)
    sign.add_argument("--ttl", type=float, default=DEFAULT_TTL_S, help="seconds (default 60)")
    sign.add_argument(
        "type", help="vend, cancel_order, set_price, set_inventory, set_slot, sync, dex"
    )
    sign.add_argument("fields", nargs="*", help="field=value (JSON where it parses)")
    return {"public-key": cmd_public_key, "sign": cmd_sign}


def cmd_public_key(args: argparse.Namespace) -> int:
    print(CommandSigner.load_or_create(state_dir_of(args)).public_key_b64)
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    state_dir = state_dir_of(args)
    machine = getattr(args, "machine", None) or load_settings(state_dir).get("machine")
    if not machine:
        raise SystemExit("--machine M is required")
    signer = CommandSigner.load_or_create(state_dir)
    envelope = signer.envelope(str(machine), args.type, parse_fields(args.fields), ttl_s=args.ttl)
    print(json.dumps(envelope))
    return 0


def parse_fields(items: list[str]) -> dict[str, Any]:
    """``["slot=A1", "price=150", "enabled=false"]`` → ``{"slot": "A1", "price": 150,
    "enabled": False}``; the fields of ``TEXT_FIELDS`` stay text."""
    fields: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"expected field=value, found {item!r}")
        if name in TEXT_FIELDS:
            fields[name] = text
            continue
        try:
            fields[name] = json.loads(text)
        except ValueError:
            fields[name] = text
    return fields
