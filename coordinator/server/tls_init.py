"""``dptrain tls init DIR --host NAME...``: what a coordinator needs to listen beyond loopback.

A coordinator that other hosts' workers reach must serve TLS (`server.serve` refuses a
plaintext non-loopback bind), and setting up a CA by hand is where deployments stall. This
writes, with the ``cryptography`` library:

==============  ============================================================================
``ca.pem``      a fresh CA certificate: what workers (``DPTRAIN_TLS_CA``) and users
                (``--tls-ca``) verify the coordinator with; not secret
``server.pem``  the coordinator's certificate, signed by that CA, valid for every ``--host``
                name and address (subject alternative names)
``server.key``  its private key (mode 0600)
==============  ============================================================================

The CA's own key is never written: it signs this one certificate and is gone, so no other
certificate can ever be issued under it. Running the command again makes a new CA (hand out
the new ``ca.pem``). Every file is written atomically; existing ones are kept unless ``force``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dptrain.atomic_files import write_atomically
from dptrain.coordinator.server.private_files import make_private_dir, write_private

__all__ = ["TlsFiles", "init_tls", "usage_lines"]

_VALID_DAYS = 825  # the longest validity clients such as browsers and macOS accept for a leaf


@dataclass(frozen=True)
class TlsFiles:
    """The files `init_tls` wrote."""

    ca: Path
    cert: Path
    key: Path


def _subject_alt_name(name: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _check_host(name: str) -> str:
    try:
        ipaddress.ip_address(name)
        return name
    except ValueError:
        pass
    labels = name.rstrip(".").split(".")
    if not name or any(not label or len(label) > 63 or not all(
            c.isalnum() or c == "-" for c in label) or label.startswith("-")
            for label in labels):
        raise ValueError(f"--host: must be a DNS name or an IP address, got {name!r}")
    return name


def init_tls(directory: str | os.PathLike, hosts: Sequence[str], *,
             force: bool = False) -> TlsFiles:
    """Write a CA certificate and a server certificate and key for `hosts` into `directory`.

    Args:
        directory: where to write (created private if missing).
        hosts: the names and addresses clients and workers use to reach the coordinator.
        force: replace existing files.

    Returns:
        The paths written.

    Raises:
        ValueError: no host, a malformed one, or a file that exists (without `force`).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise ValueError("--host: give at least one name or address the coordinator is "
                         "reached at")
    names = list(dict.fromkeys(_check_host(h) for h in hosts))
    directory = Path(directory).absolute()  # the printed flags work from any directory
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    for path in (files.ca, files.cert, files.key):
        if path.exists() and not force:
            raise ValueError(f"{path}: exists already; remove it or pass --force to replace "
                             f"the CA and the server's certificate")
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=_VALID_DAYS)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"dptrain CA for {names[0]}")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(
              digital_signature=False, content_commitment=False, key_encipherment=False,
              data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
              encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([_subject_alt_name(n) for n in names]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))

    make_private_dir(directory)
    pem = serialization.Encoding.PEM
    write_private(files.key, key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()).decode("ascii"))
    write_atomically(files.cert, [cert.public_bytes(pem)], mode=0o644)
    write_atomically(files.ca, [ca.public_bytes(pem)], mode=0o644)
    return files


def usage_lines(files: TlsFiles, hosts: Sequence[str], port: int) -> list[str]:
    """The commands to use the files with, for `init_tls`'s caller to print.

    Args:
        files: what `init_tls` wrote.
        hosts: the ``--host`` names, the first being how workers and users reach it.
        port: the coordinator's port.
    """
    first = hosts[0]
    try:
        ipaddress.ip_address(first)
        bind, reach = f"--host {first}", f"{first}:{port}"
    except ValueError:
        bind, reach = f"--host 0.0.0.0 --advertise-address {first}:{port}", f"{first}:{port}"
    if ":" in first:
        reach = f"[{first}]:{port}"
    return [
        f"wrote {files.ca} (give it to users and hosts), {files.cert} and {files.key} (0600)",
        "run the coordinator:",
        f"  dptrain serve {bind} --port {port} --tls-cert {files.cert} --tls-key {files.key} "
        f"--tls-ca {files.ca}",
        "clients (or DPTRAIN_ADDRESS and DPTRAIN_TLS_CA in the environment):",
        f"  dptrain --address {reach} --tls-ca {files.ca} jobs",
        "workers get the CA from the coordinator (DPTRAIN_TLS_CA): keep ca.pem at this path "
        "on every host",
    ]
