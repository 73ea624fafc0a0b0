"""A site signs its module; the server checks the signature against the key the consortium's roster
lists for that site (roster.py), never against a key that the module brings along.

    blob, manifest = signed_bytes(module, "keys/hospital-a")   # at the site: module.to_bytes(), signed
    verify_manifest(manifest, roster["hospital-a"].public_key)  # at the server: FedFactoryError if not

The signature is ECDSA on P-384 with SHA-384 (the key kind that Flower's SuperNode authentication
uses, so a site's SuperNode key will do), over the manifest without its `signature` block, encoded
as `json.dumps(sort_keys=True, separators=(",", ":"))`. The manifest holds `weights_sha256`, so the
weights are covered through their hash, and every other field (classes, counts, audit, terms) is
covered as written. The block, in manifest.json:

    "signature": {"algorithm": "ecdsa-p384-sha384", "public_key": "ecdsa-sha2-nistp384 AAAA...",
                  "value": "<base64 DER signature>"}

Changing any field of a signed manifest breaks its signature: `GenerativeModule.save` writes the
manifest it builds, unsigned, so a module saved again (e.g. the embedded runner's, after a sampling
setting changed) must be signed again by its site.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from pathlib import Path

from .errors import FedFactoryError

ALGORITHM = "ecdsa-p384-sha384"
MAX_KEY_FILE_BYTES = 1 << 16
MAX_KEY_CHARS = 1 << 12      # a P-384 OpenSSH public key line is about 230 characters
MAX_SIGNATURE_CHARS = 1 << 9  # a P-384 DER signature is at most 104 bytes: 140 base64 characters


def _curve_ok(key) -> bool:
    from cryptography.hazmat.primitives.asymmetric import ec

    return isinstance(getattr(key, "curve", None), ec.SECP384R1)


def load_private_key(path: str | Path):
    """A site's signing key: an unencrypted OpenSSH private key, ECDSA on P-384 (write_node_keys makes one)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    try:
        if Path(path).stat().st_size > MAX_KEY_FILE_BYTES:
            raise FedFactoryError(f"signing key {path} is too large for a private key")
        data = Path(path).read_bytes()
    except OSError as e:
        raise FedFactoryError(f"cannot read signing key {path}: {e.strerror or e}") from None
    try:
        key = load_ssh_private_key(data, password=None)
    except TypeError:
        raise FedFactoryError(f"signing key {path} is encrypted: give an unencrypted key (as a SuperNode's)") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise FedFactoryError(f"signing key {path} is not an OpenSSH private key: {str(e)[:120]}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not _curve_ok(key):
        raise FedFactoryError(f"signing key {path} is not ECDSA on P-384 (ecdsa-sha2-nistp384), the only kind accepted")
    return key


def load_public_key(text: str):
    """An OpenSSH one-line public key (ecdsa-sha2-nistp384 ...), checked."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    if not isinstance(text, str) or len(text) > MAX_KEY_CHARS:
        raise FedFactoryError("public key is not an OpenSSH one-line key of reasonable length")
    try:
        key = load_ssh_public_key(text.strip().encode())
    except (ValueError, UnsupportedAlgorithm, UnicodeEncodeError) as e:
        raise FedFactoryError(f"public key is not an OpenSSH one-line key: {str(e)[:120]}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not _curve_ok(key):
        raise FedFactoryError("public key is not ECDSA on P-384 (ecdsa-sha2-nistp384), the only kind accepted")
    return key


def openssh_line(public_key) -> str:
    from cryptography.hazmat.primitives import serialization as ser

    return public_key.public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH).decode()


def fingerprint(text: str) -> str:
    """ssh-keygen's SHA256:... fingerprint of an OpenSSH key line (or "?" if it has no key blob)."""
    try:
        blob = base64.b64decode(text.split()[1], validate=True)
    except (IndexError, ValueError, binascii.Error, AttributeError):
        return "?"
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def canonical(manifest: dict) -> bytes:
    """What is signed: the manifest without its signature block, keys sorted, no spaces."""
    try:
        return json.dumps({k: v for k, v in manifest.items() if k != "signature"}, sort_keys=True,
                          separators=(",", ":")).encode()
    except (TypeError, ValueError, RecursionError) as e:
        raise FedFactoryError(f"the manifest cannot be encoded for its signature: {str(e)[:120]}") from None


def sign_manifest(manifest: dict, private_key_path: str | Path) -> dict:
    """The manifest with a `signature` block by this site's key (any earlier signature replaced)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = load_private_key(private_key_path)
    value = key.sign(canonical(manifest), ec.ECDSA(hashes.SHA384()))
    return {**{k: v for k, v in manifest.items() if k != "signature"},
            "signature": {"algorithm": ALGORITHM, "public_key": openssh_line(key.public_key()),
                          "value": base64.b64encode(value).decode()}}


def signed_bytes(module, private_key_path: str | Path = "") -> tuple[bytes, dict]:
    """A module as it travels (`module.to_bytes()`), its manifest signed with the key at
    `private_key_path`; unsigned without one. Sign the final manifest: after the audit and the terms."""
    blob, manifest = module.to_bytes()
    return blob, (sign_manifest(manifest, private_key_path) if private_key_path else manifest)


def verify_manifest(manifest: dict, public_key_text: str) -> None:
    """Nothing if `manifest` is signed by the key `public_key_text` (the roster's, never the manifest's own);
    else FedFactoryError with the reason in one line."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    public = load_public_key(public_key_text)
    sig = manifest.get("signature") if isinstance(manifest, dict) else None
    if sig is None:
        raise FedFactoryError("unsigned: its manifest carries no signature, and the roster lists a key for it")
    if not isinstance(sig, dict) or set(sig) != {"algorithm", "public_key", "value"} or \
            not all(isinstance(v, str) for v in sig.values()):
        raise FedFactoryError("malformed signature block: it must hold algorithm, public_key and value, as text")
    if sig["algorithm"] != ALGORITHM:
        raise FedFactoryError(f"unsupported signature algorithm {sig['algorithm'][:40]!r} (only {ALGORITHM})")
    if len(sig["public_key"]) > MAX_KEY_CHARS or len(sig["value"]) > MAX_SIGNATURE_CHARS:
        raise FedFactoryError("malformed signature block: its key or value is too long")
    expected = openssh_line(public)
    if sig["public_key"].split()[:2] != expected.split()[:2]:
        raise FedFactoryError(f"signed by another key ({fingerprint(sig['public_key'])}), not the one the roster "
                              f"lists for this site ({fingerprint(expected)})")
    try:
        value = base64.b64decode(sig["value"], validate=True)
    except (ValueError, binascii.Error):
        raise FedFactoryError("malformed signature block: its value is not base64") from None
    try:
        public.verify(value, canonical(manifest), ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        raise FedFactoryError("bad signature: the manifest (or the weights' hash in it) changed after it was "
                              "signed, or the signature did") from None
