"""A CA and a server certificate for an embedded server that listens beyond loopback.

Made once under `data_dir/auth/tls/` with `cryptography` (no openssl subprocess): the
CA (ca.pem, its key ca-key.pem) signs server.pem (key server-key.pem) for the names the
server is reached by: loopback, this host's name and addresses, and the listen host. A
listen host the certificate does not name gets a new server certificate from the same
CA, so clients keep trusting ca.pem. Keys are 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gatefleet.security.jwt import write_private

TLS_DIR = "tls"
CA_YEARS = 10
SERVER_YEARS = 2
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def server_names(listen: str) -> tuple[list[str], list[_Address]]:
    """(DNS names, IP addresses) the server certificate is for."""
    names = {"localhost", socket.gethostname()}
    addresses: set[_Address] = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            addresses.add(ipaddress.ip_address(str(info[4][0]).split("%")[0]))
    except OSError:
        pass  # no resolvable host name: loopback and the listen host only
    try:
        address = ipaddress.ip_address(listen)
    except ValueError:
        names.add(listen)
    else:
        if not address.is_unspecified:  # 0.0.0.0 is no address to connect to
            addresses.add(address)
    return sorted(names), sorted(addresses, key=str)


def ensure_tls(auth_dir: Path, listen: str) -> tuple[Path, Path, Path]:
    """(server certificate, its key, CA certificate), made or kept under auth_dir/tls."""
    tls = auth_dir / TLS_DIR
    ca_cert, ca_key = tls / "ca.pem", tls / "ca-key.pem"
    cert, key = tls / "server.pem", tls / "server-key.pem"
    if not ca_cert.exists() or not ca_key.exists():
        _write_ca(ca_cert, ca_key)
    names, addresses = server_names(listen)
    if not _names_all(cert, names, addresses) or not key.exists():
        _write_server(cert, key, ca_cert, ca_key, names, addresses)
    return cert, key, ca_cert


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _write_ca(cert_path: Path, key_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gatefleet CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=365 * CA_YEARS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(key_path, _pem_key(key))
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM).decode())
    cert_path.chmod(0o644)  # the CA certificate is for handing out


def _write_server(
    cert_path: Path,
    key_path: Path,
    ca_cert_path: Path,
    ca_key_path: Path,
    names: list[str],
    addresses: list[_Address],
) -> None:
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    alt_names += [x509.IPAddress(a) for a in addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=365 * SERVER_YEARS))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    write_private(key_path, _pem_key(key))
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM).decode())


def _names_all(cert_path: Path, names: list[str], addresses: list[_Address]) -> bool:
    """Whether the certificate there is valid a while yet and names all of these."""
    if not cert_path.exists():
        return False
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    if cert.not_valid_after_utc - _now() < datetime.timedelta(days=30):
        return False
    alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(names) <= set(alt.get_values_for_type(x509.DNSName)) and set(addresses) <= set(
        alt.get_values_for_type(x509.IPAddress)
    )
