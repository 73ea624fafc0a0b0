"""TLS and SuperNode keys for a Flower federation across real hosts (`fedfactory certs`).

A consortium needs three things before its first run: a CA that every site trusts, a certificate for
the SuperLink that names the host (and, if the sites use them, the IP addresses) the sites reach it
by, and one SuperNode key pair per site, whose public half the coordinator registers under the site's
client id (`flwr supernode register KEY CONNECTION --name ID`). `make_consortium` writes them in one
folder, a subfolder per site holding exactly what that site needs:

    OUT/ca.crt, OUT/server.pem, OUT/server.key            the coordinator's (server.key stays there)
    OUT/superexec.secret                                   the coordinator's: its SuperLink and SuperExec share it
    OUT/sites/<id>/<id>, <id>.pub, ca.crt                  site <id>'s: its private key, public key, the CA

The SuperExec secret matters because the SuperLink serves its Runtime API (where a SuperExec claims the
ServerApp's task) on the same address as the sites' Fleet API: with the secret (`--superexec-auth-secret-file`
on both, `--isolation process`), only the coordinator's own SuperExec may claim it.

The CA's private key is never written: once the server certificate is signed it is thrown away, so
no file here can sign another certificate. Existing files are never overwritten. Private keys are
created with mode 0600 (never readable by others, not even for an instant).
"""

from __future__ import annotations

import os
import re
import secrets
from datetime import datetime, timedelta, timezone
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

from ...errors import FedFactoryError

# a DNS name as a certificate holds it: ASCII labels of letters, digits and '-', dot-separated
HOSTNAME = re.compile(r"(?=.{1,253}\Z)(?!-)[A-Za-z0-9-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\Z")


def _write_new(path: Path, data: bytes, private: bool = False, overwrite: bool = False) -> None:
    """Write a file; a private one is created 0600 (and made so if it existed). Without `overwrite`, an
    existing file is an error and nothing is written."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600 if private else 0o644)
    except FileExistsError:
        raise FedFactoryError(f"{path} exists already: refusing to overwrite it") from None
    with os.fdopen(fd, "wb") as f:
        if private:
            os.fchmod(f.fileno(), 0o600)
        f.write(data)


def write_node_keys(stem: str | Path, overwrite: bool = True) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair as Flower 1.42 expects it: ECDSA on a NIST curve (P-384, what
    Flower itself generates), the private key in OpenSSH PEM (the SuperNode reads it with load_ssh_private_key),
    the public key in OpenSSH one-line form (what `flwr supernode register` reads). Returns (private, public)."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = Path(stem), Path(f"{stem}.pub")
    _write_new(private, key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption()),
               private=True, overwrite=overwrite)
    _write_new(public, key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH),
               overwrite=overwrite)
    return private, public


def server_names(hostnames=(), ips=()) -> tuple[list[str], list[IPv4Address | IPv6Address]]:
    """The names a SuperLink certificate is for, checked: DNS names and IP addresses (an address given as a
    hostname counts as an address, since a client checks an address against the IP names only)."""
    dns, addresses = [], []
    for name in hostnames:
        try:
            addresses.append(ip_address(name))
            continue
        except ValueError:
            pass
        if not HOSTNAME.fullmatch(name):
            raise FedFactoryError(f"hostname {name[:80]!r} is not a DNS name (letters, digits, '-' and dots; "
                                  "write an internationalised name in its xn-- form)")
        dns.append(name.lower())
    for ip in ips:
        try:
            addresses.append(ip_address(ip))
        except ValueError:
            raise FedFactoryError(f"--ip {ip[:80]!r} is not an IPv4 or IPv6 address") from None
    if not dns and not addresses:
        raise FedFactoryError("the SuperLink's certificate needs at least one hostname or IP address")
    return list(dict.fromkeys(dns)), list(dict.fromkeys(addresses))


def tls_pem(hostnames=("localhost",), ips=("127.0.0.1",), days: int = 30) -> dict[str, bytes]:
    """A self-signed CA and a server certificate it signs for `hostnames` and `ips`, as PEM bytes:
    {'ca', 'cert', 'key'}. The CA's key is dropped here."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if days < 1:
        raise FedFactoryError(f"certificates must be valid for at least one day, got {days}")
    dns, addresses = server_names(hostnames, ips)
    now = datetime.now(timezone.utc)

    def cert(subject: str, key, issuer: x509.Certificate | None, issuer_key, is_ca: bool, *extensions):
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        # what strict X.509 verification asks of a CA and of a server certificate: key ids, basic constraints, usage
        usage = x509.KeyUsage(digital_signature=True, key_cert_sign=is_ca, crl_sign=is_ca, content_commitment=False,
                              key_encipherment=False, data_encipherment=False, key_agreement=False,
                              encipher_only=False, decipher_only=False)
        b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer.subject if issuer else name)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=days))
             .add_extension(x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), critical=True)
             .add_extension(usage, critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                            critical=False))
        for ext in extensions:
            b = b.add_extension(ext, critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca = cert("fedfactory CA", ca_key, None, ca_key, True)
    sans = [x509.IPAddress(a) for a in addresses] + [x509.DNSName(d) for d in dns]
    common = dns[0] if dns else str(addresses[0])
    server = cert(common, server_key, ca, ca_key, False, x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                  x509.SubjectAlternativeName(sans))
    return {"ca": ca.public_bytes(ser.Encoding.PEM), "cert": server.public_bytes(ser.Encoding.PEM),
            "key": server_key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())}


def write_tls(folder: str | Path, hostnames=("localhost",), ips=("127.0.0.1",), days: int = 30,
              overwrite: bool = True) -> dict[str, Path]:
    """tls_pem's files in `folder`: ca.crt, server.pem, server.key (0600). Returns {'ca', 'cert', 'key': Path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pem = tls_pem(hostnames, ips, days)
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    if not overwrite:
        _refuse_existing(paths.values())
    for k, path in paths.items():
        _write_new(path, pem[k], private=k == "key", overwrite=overwrite)
    return paths


def _refuse_existing(paths) -> None:
    existing = [str(p) for p in paths if os.path.lexists(p)]
    if existing:
        raise FedFactoryError(f"refusing to overwrite {', '.join(existing[:4])}"
                              + (f" and {len(existing) - 4} more" if len(existing) > 4 else "")
                              + ": a key lost is a site locked out; choose another --out, or move them away")


def make_consortium(out: str | Path, hostnames=(), ips=(), sites=(), days: int = 365) -> dict:
    """The consortium's material in `out` (see the module's docstring). Nothing is written unless every file
    is new. Returns {'ca', 'cert', 'key', 'secret': Path, 'sites': {id: {'dir', 'key', 'pub', 'ca'}},
    'names': [...], 'not_after': datetime}."""
    from cryptography import x509

    from ...modules.fileformat import check_client_id

    out = Path(out)
    sites = [check_client_id(s) for s in sites]  # a site's id names its folder: never a path
    if len(set(sites)) != len(sites):
        raise FedFactoryError(f"a site is named twice: {', '.join(sorted({s for s in sites if sites.count(s) > 1}))}")
    dns, addresses = server_names(hostnames, ips)  # before anything is written
    site_files = {s: {"dir": out / "sites" / s, "key": out / "sites" / s / s, "pub": out / "sites" / s / f"{s}.pub",
                      "ca": out / "sites" / s / "ca.crt"} for s in sites}
    _refuse_existing([out / "ca.crt", out / "server.pem", out / "server.key", out / "superexec.secret"]
                     + [f[k] for f in site_files.values() for k in ("key", "pub", "ca")])
    paths = write_tls(out, dns, [str(a) for a in addresses], days, overwrite=False)
    paths["secret"] = out / "superexec.secret"
    _write_new(paths["secret"], secrets.token_hex(32).encode(), private=True)
    for s, f in site_files.items():
        f["dir"].mkdir(parents=True, exist_ok=True)
        write_node_keys(f["key"], overwrite=False)
        _write_new(f["ca"], paths["ca"].read_bytes())
    not_after = x509.load_pem_x509_certificate(paths["cert"].read_bytes()).not_valid_after_utc
    return {**paths, "sites": site_files, "names": dns + [str(a) for a in addresses], "not_after": not_after}
