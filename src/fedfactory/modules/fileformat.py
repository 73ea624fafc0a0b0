"""The module file format: a folder with `module.safetensors` (weights only) and `manifest.json`.

Loading never unpickles: safetensors holds raw tensors, JSON holds everything else. A module is
accepted only when its format version is known, the weights file hashes to the manifest's
SHA-256, and every tensor has the name and shape that the declared architecture expects.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..errors import FedFactoryError
from ..utils import atomic_write_json, default_mode, sha256_file

FORMAT_VERSION = 1
WEIGHTS = "module.safetensors"
MANIFEST = "manifest.json"


class ModuleFileError(FedFactoryError):
    """A module folder that is missing, tampered with, truncated or mismatched."""


# A client id names a folder on the server: it is data from a peer, so it must never be a path.
CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_client_id(client_id) -> str:
    if not isinstance(client_id, str) or not CLIENT_ID.fullmatch(client_id):
        raise FedFactoryError(f"client id {str(client_id)[:80]!r} is not allowed: use 1-64 letters, digits, '.', '_' "
                              "or '-', starting with a letter or digit")
    return client_id


def serialize(state: dict[str, torch.Tensor], manifest: dict) -> tuple[bytes, dict]:
    """Weights -> safetensors bytes, and the manifest completed with format version and hash."""
    blob = save_safetensors({k: v.detach().cpu().contiguous() for k, v in state.items()})
    return blob, {**manifest, "format_version": FORMAT_VERSION, "weights_file": WEIGHTS,
                  "weights_sha256": hashlib.sha256(blob).hexdigest()}


def write_module_dir(path: str | Path, blob: bytes, manifest: dict) -> dict:
    """Write weights bytes + manifest into a temp folder beside `path`, then rename it into place.

    A crash leaves either the old folder or the new one, never a half-written module. The bytes
    are stored as given (a received module is kept byte for byte; load_module verifies it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        with open(tmp / WEIGHTS, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        atomic_write_json(tmp / MANIFEST, manifest)
        os.chmod(tmp / WEIGHTS, default_mode())
        os.chmod(tmp, default_mode(directory=True))
        if path.exists() or path.is_symlink():
            if not is_module_dir(path):  # never delete what is not a module folder
                raise FedFactoryError(f"refusing to replace {path}: it is not a module folder")
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def is_module_dir(path: Path) -> bool:
    """A real folder (not a link) holding nothing but a module's two files."""
    return path.is_dir() and not path.is_symlink() and set(os.listdir(path)) <= {WEIGHTS, MANIFEST}


def read_manifest(path: str | Path) -> dict:
    mpath = Path(path) / MANIFEST
    if not mpath.exists():
        raise ModuleFileError(f"{mpath}: not found (is {path} a module folder?)")
    try:
        manifest = json.loads(mpath.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # ValueError: JSON errors, 4,300-digit ints
        raise ModuleFileError(f"{mpath}: not valid JSON: {str(e)[:200]}") from None
    if not isinstance(manifest, dict):
        raise ModuleFileError(f"{mpath}: must hold a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ModuleFileError(f"{mpath}: unknown format version {version!r} (this fedfactory reads version {FORMAT_VERSION})")
    for key in ("kind", "arch", "classes", "counts", "image_shape", "weights_sha256", "client_id"):
        if key not in manifest:
            raise ModuleFileError(f"{mpath}: missing key {key!r}")
    try:
        check_client_id(manifest["client_id"])
    except FedFactoryError as e:
        raise ModuleFileError(f"{mpath}: {e}") from None
    return manifest


def read_weights(path: str | Path, manifest: dict, expected: dict[str, torch.Tensor],
                 max_bytes: int = 1 << 30) -> dict[str, torch.Tensor]:
    """Read and check the weights against the manifest's hash and the architecture's tensors."""
    wpath = Path(path) / WEIGHTS
    if not wpath.is_file():
        raise ModuleFileError(f"{wpath}: not found")
    if wpath.stat().st_size > max_bytes:
        raise ModuleFileError(f"{wpath}: {wpath.stat().st_size:,} bytes, over the cap of {max_bytes:,}")
    digest = sha256_file(wpath)
    if digest != manifest["weights_sha256"]:
        raise ModuleFileError(f"{wpath}: SHA-256 {digest[:12]}... does not match the manifest's "
                              f"{str(manifest['weights_sha256'])[:12]}...: the file was altered or truncated")
    try:
        state = load_safetensors(wpath.read_bytes())
    except (SafetensorError, ValueError, RuntimeError, KeyError) as e:  # KeyError: a dtype torch lacks (F4, ...)
        raise ModuleFileError(f"{wpath}: not a valid safetensors file: {e}") from None
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ModuleFileError(f"{wpath}: weights do not match the declared architecture "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for k, t in expected.items():
        if tuple(state[k].shape) != tuple(t.shape) or state[k].dtype != t.dtype:
            raise ModuleFileError(f"{wpath}: tensor {k!r} has shape {tuple(state[k].shape)} {state[k].dtype}, "
                                  f"the declared architecture needs {tuple(t.shape)} {t.dtype}")
    return state
