"""A mosquitto broker with a TLS listener that requires client certificates, and the throwaway
certificates for it: the cloud link's TLS tests and bench/sync.py use them."""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import ipaddress
import socket
import subprocess
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.mqtt_broker import free_port, mosquitto_binary

BROKER_START_S = 15.0


def make_certificates(
    folder: Path, *, client_cn: str = "VMC-TEST", server_ip: str = "127.0.0.1"
) -> dict[str, Path]:
    """A throwaway CA, a server certificate for ``server_ip`` (the name the client checks)
    and a client certificate for ``client_cn``."""
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, cert: x509.Certificate, k: ec.EllipticCurvePrivateKey) -> None:
        (folder / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{stem}.key").write_bytes(
            k.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    ca_key = key()
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("vmc test CA"))
        .issuer_name(name("vmc test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    write("ca", ca, ca_key)
    for stem, cn, san in (
        ("server", server_ip, x509.IPAddress(ipaddress.ip_address(server_ip))),
        ("client", client_cn, x509.DNSName("vmc-client")),
    ):
        k = key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca.subject)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        write(stem, cert, k)
    return {
        n: folder / n for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")
    }


class TlsBroker:
    """mosquitto with a plain listener (the backend, a test's publisher) and a TLS listener that
    requires a client certificate of the test CA (the machine)."""

    def __init__(self, workdir: Path, certs: dict[str, Path]) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (scripts/test installs it)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.port, self.tls_port = free_port(), free_port()
        conf = workdir / "mosquitto.conf"
        conf.write_text(
            "\n".join(
                [
                    f"user {getpass.getuser()}",
                    "allow_anonymous true",
                    f"log_dest file {workdir / 'mosquitto.log'}",
                    "set_tcp_nodelay true",  # as tests/mqtt_broker.py says why
                    f"listener {self.port} 127.0.0.1",
                    f"listener {self.tls_port} 127.0.0.1",
                    f"cafile {certs['ca.crt']}",
                    f"certfile {certs['server.crt']}",
                    f"keyfile {certs['server.key']}",
                    "require_certificate true",
                    "",
                ]
            )
        )
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + BROKER_START_S
        while not all(self._accepts(p) for p in (self.port, self.tls_port)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (workdir / "mosquitto.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"mosquitto with TLS did not start: {log}")
            time.sleep(0.05)

    @staticmethod
    def _accepts(port: int) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return True
        return False

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def __enter__(self) -> TlsBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
