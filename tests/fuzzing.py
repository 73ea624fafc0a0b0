"""The fuzz generators for the readers of untrusted input: what a peer or a download sends is data.

The rule under test: bad input gives only fedfactory's own clear error (FedFactoryError, one
line), never another exception, a hang or an unbounded allocation; pickles are never executed.

Each target is a function `target(rng, tmp)` that builds one input from `rng` (a random.Random)
inside the empty folder `tmp`, feeds it to the reader and checks what an accepted input gives
back. It returns "accepted" or raises; `run_case` turns a FedFactoryError into "refused".

Two drivers: tests/test_fuzz.py (hypothesis, a few thousand cases in CI) and the long run,
benchmarks/fuzz.py (seeded, for minutes: `python benchmarks/fuzz.py --seconds 300`).
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import io
import json
import math
import os
import pickle
import random
import struct
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from fedfactory.errors import FedFactoryError

CASE_SECONDS = 30.0  # a case slower than this counts as a hang

# -- generic generators ---------------------------------------------------------------------

INTERESTING_32 = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 3072, 10 ** 6)


def random_bytes(rng: random.Random, max_len: int = 256) -> bytes:
    return rng.randbytes(rng.randint(0, max_len))


def mutate_bytes(rng: random.Random, data: bytes, others: tuple[bytes, ...] = ()) -> bytes:
    """1-4 random edits: bit flips, interesting bytes and 32-bit ints, truncation, insertion,
    deletion, duplication, and splices from `others` (other valid files)."""
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        op = rng.randrange(9)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:  # flip one bit
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:  # one byte to an interesting or random value
            b[rng.randrange(len(b))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == 2 and len(b) >= 4:  # a 32-bit integer, either byte order
            i = rng.randrange(len(b) - 3)
            b[i:i + 4] = struct.pack(rng.choice(("<I", ">I")), rng.choice(INTERESTING_32) & 0xFFFFFFFF)
        elif op == 3:  # truncate
            del b[pos:]
        elif op == 4:  # insert random bytes
            b[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 5 and b:  # delete a range
            del b[pos:pos + rng.randint(1, 64)]
        elif op == 6 and b:  # duplicate a chunk elsewhere
            i = rng.randrange(len(b))
            chunk = b[i:i + rng.randint(1, 64)]
            b[pos:pos] = chunk
        elif op == 7 and others:  # splice from another valid file
            other = rng.choice(others)
            if other:
                i = rng.randrange(len(other))
                chunk = other[i:i + rng.randint(1, 128)]
                b[pos:pos + len(chunk) * rng.randint(0, 1)] = chunk
        elif op == 8 and b:  # overwrite a range with one byte value
            n = rng.randint(1, 32)
            b[pos:pos + n] = bytes([rng.choice((0, 0xFF, 0x20, 0x30))]) * n
    return bytes(b)


def small_int(rng: random.Random) -> int:
    return rng.randint(-3, 8) if rng.random() < 0.85 else rng.randint(-3, 64)


def random_text(rng: random.Random, max_len: int = 12) -> str:
    alphabet = "abcXYZ019 _-./\\:\"'\n\t,\x00é€{}[]"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, max_len)))


def random_json(rng: random.Random, depth: int = 3):
    """A random JSON value: every type, awkward numbers (huge, NaN, infinity), nesting."""
    k = rng.randrange(10 if depth > 0 else 7)
    if k == 0:
        return None
    if k == 1:
        return rng.random() < 0.5
    if k == 2:
        return small_int(rng)
    if k == 3:
        return rng.choice((-1, 0, 2 ** 31, 2 ** 63, -(2 ** 64), 10 ** 30, 3072))
    if k == 4:
        return rng.choice((0.5, -0.0, 1e308, -1e-308, math.nan, math.inf, -math.inf, 1.0, 3.0))
    if k in (5, 6):
        return random_text(rng)
    if k in (7, 8):
        return [random_json(rng, depth - 1) for _ in range(rng.randint(0, 4))]
    return {random_text(rng, 6): random_json(rng, depth - 1) for _ in range(rng.randint(0, 4))}


def small_value(rng: random.Random):
    """A wrong-typed or out-of-range value for a manifest field: kept small (no huge architectures)."""
    k = rng.randrange(9)
    if k <= 2:
        return small_int(rng)
    if k == 3:
        return rng.random() < 0.5
    if k == 4:
        return rng.choice((0.5, -1.0, 2.0, math.nan, math.inf, 1e300))
    if k == 5:
        return rng.choice(("", "a", "1", "8", "../x", "diffusion"))
    if k == 6:
        return [small_int(rng) for _ in range(rng.randint(0, 4))]
    if k == 7:
        return [rng.choice(("a", "1", "", True, None, 1.5)) for _ in range(rng.randint(0, 4))]
    return rng.choice((None, {}, {"a": 1}, [[1, 2]], [None]))


def nested_json(rng: random.Random) -> str:
    """Deeply nested arrays or objects (a recursion bomb for recursive parsers)."""
    n = rng.choice((100, 1000, 5000, 100_000))
    return "[" * n + "]" * n if rng.random() < 0.5 else '{"a":' * n + "1" + "}" * n


def run_case(target, rng: random.Random) -> str:
    """One case in a fresh folder: 'accepted' or 'refused' (a one-line FedFactoryError); anything else raises."""
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        t0 = time.perf_counter()
        try:
            outcome = target(rng, Path(tmp))
        except FedFactoryError as e:
            msg = str(e)
            assert msg and "\n" not in msg, f"{type(e).__name__} message is not one line: {msg[:500]!r}"
            outcome = "refused"
        elapsed = time.perf_counter() - t0
        assert elapsed < CASE_SECONDS, f"case took {elapsed:.1f} s"
        assert outcome in ("accepted", "refused"), outcome
        return outcome


# -- module files: manifest.json and module.safetensors ---------------------------------------

@functools.cache
def valid_module() -> tuple[bytes, bytes]:
    """A real, tiny trained diffusion module as saved on disk: (safetensors bytes, manifest bytes)."""
    from fedfactory.modules.diffusion import DiffusionModule

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 8, 8, 1), dtype=np.uint8)
    labels = np.arange(32) % 2
    module = DiffusionModule({"channels": 8, "channel_mult": [1, 2], "num_blocks": 1},
                             {"budget_images": 64, "batch_size": 32}, client_id="client-0", progress=False,
                             device="cpu", bf16="off").fit(images, labels)
    with tempfile.TemporaryDirectory() as tmp:
        module.save(Path(tmp) / "m")
        return (Path(tmp) / "m" / "module.safetensors").read_bytes(), (Path(tmp) / "m" / "manifest.json").read_bytes()


def valid_manifest() -> dict:
    return json.loads(valid_module()[1])


MANIFEST_KEYS = ("format_version", "kind", "arch", "classes", "counts", "image_shape", "weights_sha256",
                 "client_id", "training", "stats", "weights_file", "normalisation", "library_version")


def mutate_manifest(rng: random.Random, m: dict, values=small_value) -> dict:
    """1-3 field edits: delete, replace (whole field or inside arch/training), wrong types."""
    m = json.loads(json.dumps(m))
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(MANIFEST_KEYS)
        op = rng.randrange(4)
        if op == 0:
            m.pop(key, None)
        elif op == 1 or not isinstance(m.get(key), (dict, list)):
            m[key] = values(rng)
        elif isinstance(m[key], dict):
            sub = rng.choice(sorted(m[key]) + ["extra"])
            if rng.random() < 0.2:
                m[key].pop(sub, None)
            else:
                m[key][sub] = values(rng)
        elif m[key]:
            m[key][rng.randrange(len(m[key]))] = values(rng)
        else:
            m[key].append(values(rng))
    if rng.random() < 0.2:
        m["client_id"] = rng.choice(("", "../../etc", "a/b", "x" * 80, ".hidden", "client 1", 7, None))
    return m


def fuzz_manifest(rng: random.Random, tmp: Path) -> str:
    """fileformat.read_manifest on random bytes, random JSON, and mutated real manifests."""
    from fedfactory.modules.fileformat import read_manifest

    mode = rng.randrange(6)
    if mode == 5:  # deep JSON (RecursionError) and 5,000-digit integers (ValueError), both found by fuzzing
        text = (nested_json(rng) if rng.random() < 0.5 else '{"format_version": ' + "1" * 5000 + "}").encode()
    elif mode == 0:
        text = random_bytes(rng, 200)
    elif mode == 1:
        text = json.dumps(random_json(rng)).encode()
    elif mode == 2:
        text = mutate_bytes(rng, valid_module()[1])
    else:
        text = json.dumps(mutate_manifest(rng, valid_manifest(), random_json if mode == 3 else small_value)).encode()
    (tmp / "manifest.json").write_bytes(text)
    m = read_manifest(tmp)
    assert isinstance(m, dict) and m["format_version"] == 1
    return "accepted"


def _write_module(folder: Path, blob: bytes, manifest) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "module.safetensors").write_bytes(blob)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _check_module(module) -> None:
    assert module.net is not None and len(module.image_shape) == 3


ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
            "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8, "C64": 8, "F4": 0.5}
SAFETENSORS_DTYPES = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16", "BF16", "I32", "U32",
                      "F32", "F64", "I64", "U64", "F4", "F6_E2M3", "F6_E3M2", "C64", "X", "")


def mutate_safetensors(rng: random.Random, blob: bytes) -> bytes:
    """Edit the JSON header (dtypes, shapes, offsets, names, metadata) and re-frame it; or mutate bytes."""
    if rng.random() < 0.4 or len(blob) < 8:
        return mutate_bytes(rng, blob)
    n = struct.unpack("<Q", blob[:8])[0]
    header, body = json.loads(blob[8:8 + n]), blob[8 + n:]
    names = [k for k in header if k != "__metadata__"]
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(names)
        field = rng.choice(("dtype", "shape", "data_offsets", "name", "drop", "metadata"))
        if field == "dtype":
            dtype = rng.choice(SAFETENSORS_DTYPES)
            header[name]["dtype"] = dtype
            a, b = (header[name]["data_offsets"] + [0, 0])[:2]  # (an earlier edit may have broken them)
            if dtype in ITEMSIZE and rng.random() < 0.5 and (b - a) % ITEMSIZE[dtype] == 0:  # a consistent size
                header[name]["shape"] = [int((b - a) / ITEMSIZE[dtype])]
        elif field == "shape":
            header[name]["shape"] = [rng.choice((0, 1, 2, 3, 8, 16, -1, 2 ** 32, 2 ** 63)) for _ in range(rng.randint(0, 5))]
        elif field == "data_offsets":
            a, b = (header[name]["data_offsets"] + [0, 0])[:2]
            header[name]["data_offsets"] = rng.choice(([b, a], [a, a], [a, len(body) + 4], [0, 2 ** 62], [a, b + 1], [a]))
        elif field == "name":
            header[name + rng.choice(("x", ".weight", ""))] = header.pop(name)
            names = [k for k in header if k != "__metadata__"]
        elif field == "drop":
            header.pop(name)
            names = [k for k in header if k != "__metadata__"] or [name]
            if name not in header:
                header[name] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
        else:
            header["__metadata__"] = rng.choice(({"a": "b"}, {"a": 1}, [], "x"))
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    length = len(raw) if rng.random() < 0.9 else rng.choice((0, len(raw) + 1, 2 ** 40))
    return struct.pack("<Q", length) + raw + body


def fuzz_module_weights(rng: random.Random, tmp: Path) -> str:
    """load_module on a real module whose safetensors bytes are mutated, the manifest's hash recomputed
    (so the mutation reaches the safetensors parser and the shape checks)."""
    from fedfactory.modules import load_module

    blob = mutate_safetensors(rng, valid_module()[0])
    manifest = valid_manifest()
    manifest["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    _write_module(tmp / "m", blob, manifest)
    _check_module(load_module(tmp / "m", device="cpu"))
    return "accepted"


def fuzz_module_manifest(rng: random.Random, tmp: Path) -> str:
    """load_module on a real module whose manifest fields are mutated (small values only)."""
    from fedfactory.modules import load_module

    blob = valid_module()[0]
    manifest = mutate_manifest(rng, valid_manifest())
    _write_module(tmp / "m", blob, manifest)
    _check_module(load_module(tmp / "m", device="cpu"))
    return "accepted"


# -- Flower messages --------------------------------------------------------------------------

def npy_bytes(descr: str, shape, fortran: bool = False, body: bytes = b"", version: int = 1) -> bytes:
    """A .npy file with any header (numpy's writer refuses inconsistent ones)."""
    header = repr({"descr": descr, "fortran_order": fortran, "shape": shape}).encode()
    if version == 1:
        pre = 10
        header += b" " * (-(pre + len(header) + 1) % 64) + b"\n"
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + body
    pre = 12
    header += b" " * (-(pre + len(header) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x02\x00" + struct.pack("<I", len(header)) + header + body


HUGE_SHAPES = ((2 ** 40,), (10 ** 6, 10 ** 6), (2 ** 62, 4), (-1,), (3, -2), (2 ** 31, 2 ** 31, 8))


def random_array(rng: random.Random):
    """A Flower Array: honest numpy arrays of the wrong dtype or shape, hand-made fields with
    wrong or huge claims, or fields of the wrong type (as a peer's message could inflate to)."""
    from flwr.app import Array

    k = rng.randrange(5)
    if k == 0:
        dtype = rng.choice((np.uint8, np.int8, np.float32, np.int64, np.bool_, np.uint16, "S2", "U1", "V2"))
        shape = rng.choice(((rng.randint(0, 40),), (2, 3), (), (0, 0), (1, 1, 1)))
        arr = np.frombuffer(rng.randbytes(int(np.prod(shape)) * np.dtype(dtype).itemsize), dtype).reshape(shape)
        return Array(ndarray=arr.copy())
    if k == 1:  # a valid npy body with lying dtype/shape/stype fields
        data = npy_bytes("|u1", (4,), body=b"abcd")
        return Array(dtype=rng.choice(("uint8", "float32", "object", "")), shape=rng.choice(((4,), (2, 2), (2 ** 40,), ())),
                     stype=rng.choice(("numpy.ndarray", "torch", "")), data=data)
    if k == 2:  # hand-made npy headers: huge or negative shapes, other dtypes, Fortran order, version 2
        shape = rng.choice(HUGE_SHAPES + ((4,), (0,), (2, 2), ()))
        descr = rng.choice(("|u1", "<u1", ">u4", "<f4", "|O", "|V1", "|b1", "bogus", "<U1"))
        body = rng.randbytes(rng.choice((0, 4, 7, 64)))
        data = npy_bytes(descr, shape, rng.random() < 0.3, body, rng.choice((1, 2)))
        if rng.random() < 0.3:
            data = mutate_bytes(rng, data)
        claim = shape if all(isinstance(s, int) and s >= 0 for s in shape) else (4,)
        return Array(dtype="uint8", shape=tuple(claim), stype="numpy.ndarray", data=data)
    if k == 3:  # random data bytes
        return Array(dtype="uint8", shape=(rng.randint(0, 64),), stype="numpy.ndarray", data=random_bytes(rng, 128))
    arr = Array(ndarray=np.frombuffer(rng.randbytes(8), np.uint8).copy())  # then fields of the wrong type
    field = rng.choice(("dtype", "shape", "stype", "data"))
    setattr(arr, field, rng.choice((None, 5, "x", (), ("a",), [4], {"a": 1}, b"\x93NUMPY", (2 ** 70,))))
    return arr


def random_config_value(rng: random.Random):
    return rng.choice((
        random_text(rng), small_int(rng), 2 ** 62, 1.5, math.nan, True, b"\x00\xff", rng.randbytes(8),
        [1, 2], ["a", "b"], [b"x"], [1.0], [True, False], "module", "expert", "",
        "[" * 5000, json.dumps(random_json(rng)), "not json", '{"weights_sha256": 1}', nested_json(rng),
    ))


def random_record(rng: random.Random):
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    k = rng.randrange(3)
    if k == 0:
        rec = ArrayRecord()
        for _ in range(rng.randint(0, 2)):  # set one by one: the constructor would re-check tampered Arrays
            rec[rng.choice(("bytes", "x", ""))] = random_array(rng)
        return rec
    if k == 1:
        return ConfigRecord({rng.choice(("json", "config-toml", "phase", "bytes", "x")): random_config_value(rng)
                             for _ in range(rng.randint(0, 3))})
    return MetricRecord({rng.choice(("bytes", "json", "x")): rng.choice((1, 2.5, [1, 2])) for _ in range(rng.randint(0, 2))})


MESSAGE_KEYS = {"module": ("module", "manifest"), "weights": ("weights",), "config": ("fedfactory",),
                "modules": ("module-0", "manifest-0", "module-1", "manifest-1", "fedfactory")}


def mutate_content(rng: random.Random, content, which: str) -> None:
    """Edit a RecordDict in place: drop or replace records, arrays and config fields (mostly those `which` reads)."""
    from flwr.app import ArrayRecord, ConfigRecord

    key = rng.choice(MESSAGE_KEYS[which] if rng.random() < 0.9 else sum(MESSAGE_KEYS.values(), ()) + ("x",))
    op = rng.randrange(6)
    if op == 0:
        if key in content:
            del content[key]
    elif op == 1 or key not in content:
        content.pop(key, None)  # (replacing a record by one of another type makes Flower log a warning)
        content[key] = random_record(rng)
    elif isinstance(content[key], ArrayRecord):
        rec = content[key]
        if op == 2 and "bytes" in rec:
            del rec["bytes"]
        else:
            rec[rng.choice(("bytes", "bytes", "other"))] = random_array(rng)
    elif isinstance(content[key], ConfigRecord):
        rec = content[key]
        field = rng.choice(("json", "config-toml", "phase", "have", "other"))
        if op == 2:
            rec.pop(field, None)
        elif op == 3 and field == "json" and isinstance(rec.get("json"), str):  # a valid manifest's text, mutated
            rec["json"] = mutate_bytes(rng, rec["json"].encode()).decode("utf-8", "replace")
        elif op == 4:
            rec[field] = json.dumps(random_json(rng))
        else:
            rec[field] = random_config_value(rng)


def fuzz_messages(rng: random.Random, tmp: Path) -> str:
    """read_module / read_modules / read_config / read_weights_blob on mutated Flower RecordDicts."""
    from fedfactory.runners.flower import messages as msg

    blob = random_bytes(rng, 64)
    manifest = {"client_id": "client-0", "weights_sha256": hashlib.sha256(blob).hexdigest(),
                **({"x": random_json(rng)} if rng.random() < 0.5 else {})}
    which = rng.choice(("module", "modules", "config", "weights"))
    if which == "module":
        content = msg.module_content(blob, manifest)
    elif which == "weights":
        content = msg.weights_content(blob)
    else:
        content = msg.config_content("seed = 1\n", rng.choice(msg.PHASES), [(blob, manifest)] * rng.randint(0, 2))
    for _ in range(rng.choice((0, 1, 1, 2, 3))):
        mutate_content(rng, content, which)
    if which == "module":
        b, m = msg.read_module(content)
        assert isinstance(b, bytes) and isinstance(m, dict) and hashlib.sha256(b).hexdigest() == m["weights_sha256"]
    elif which == "modules":
        for b, m in msg.read_modules(content):
            assert isinstance(b, bytes) and isinstance(m, dict) and hashlib.sha256(b).hexdigest() == m["weights_sha256"]
    elif which == "config":
        assert all(isinstance(c, str) for c in msg.read_have(content))  # the modules a resumed run holds
        text, phase = msg.read_config(content)
        assert isinstance(text, str) and phase in msg.PHASES
    else:
        assert isinstance(msg.read_weights_blob(content), bytes)
    return "accepted"


# -- data loaders -----------------------------------------------------------------------------

def _npz_bytes(arrays: dict, compressed: bool = False) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


@functools.cache
def valid_npz(keys: str = "plain", compressed: bool = False) -> bytes:
    rng = np.random.default_rng(3)
    x_tr, y_tr = rng.integers(0, 256, (6, 8, 8), dtype=np.uint8), np.arange(6) % 3
    x_te, y_te = rng.integers(0, 256, (3, 8, 8, 1), dtype=np.uint8), np.arange(3)[:, None]
    names = {"plain": ("x_train", "y_train", "x_test", "y_test"),
             "medmnist": ("train_images", "train_labels", "test_images", "test_labels"),
             "site": ("images", "labels", "x_test", "y_test")}[keys]
    return _npz_bytes(dict(zip(names, (x_tr, y_tr, x_te, y_te))), compressed)


ARRAY_DTYPES = ("u1", "u1", "u1", "i8", "f4", "f8", "?", "i2", "u8", "c8", "U3", "S2", "V4", "M8[s]", "f2",
                [("a", "u1"), ("b", "<f4")], ">i4")


def random_ndarray(rng: random.Random, labels: bool = False) -> np.ndarray:
    dtype = np.dtype(rng.choice(ARRAY_DTYPES))
    if labels:
        shape = rng.choice(((rng.randint(0, 8),), (rng.randint(0, 8), 1), (4, 2), (), (0,)))
    else:
        shape = rng.choice(((rng.randint(0, 6), rng.randint(0, 9), rng.randint(0, 9)),
                            (rng.randint(0, 6), rng.randint(1, 9), rng.randint(1, 9), rng.choice((1, 2, 3, 4))),
                            (5,), (), (2, 1, 4, 4, 1), (0, 8, 8)))
    n = int(np.prod(shape))
    if dtype.kind in "iu" and labels:
        arr = np.array([rng.randint(-2, 12) for _ in range(n)], dtype=np.int64).astype(dtype)
    elif dtype.kind == "f":
        pool = (0.0, 0.5, 1.0, 2.0, 255.0, 1e30, -1.0, math.nan, math.inf, -math.inf)
        arr = np.array([rng.choice(pool) for _ in range(n)], np.float64).astype(dtype)
    else:
        arr = np.frombuffer(rng.randbytes(n * dtype.itemsize), dtype) if dtype.itemsize else np.zeros(n, dtype)
    return arr.reshape(shape)


def random_npz(rng: random.Random, keys: tuple[str, ...]) -> bytes:
    """A well-formed npz whose arrays have random dtypes, shapes and values (object arrays included:
    np.savez pickles them, the loader must refuse them)."""
    arrays = {}
    for k in keys:
        if rng.random() < 0.1:
            continue
        if rng.random() < 0.05:
            arrays[k] = np.array([{"a": 1}, None], dtype=object)
        else:
            arrays[k] = random_ndarray(rng, labels="label" in k or k.startswith("y"))
    if rng.random() < 0.1:
        arrays["junk"] = np.zeros(3)
    return _npz_bytes(arrays, compressed=rng.random() < 0.3)


def crafted_npz(rng: random.Random, keys: tuple[str, ...]) -> bytes:
    """An npz whose members are hand-made .npy files: huge claimed shapes, bad headers, short bodies."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", rng.choice((zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED))) as z:
        for k in keys:
            if rng.random() < 0.5:
                shape = rng.choice(HUGE_SHAPES + ((10 ** 5, 10 ** 5, 10 ** 5, 1), (10 ** 4, 10 ** 4), (2, 8, 8)))
                descr = rng.choice(("|u1", "<i8", "<f8", "|O", "|V8", "<U4", "|u1"))
                data = npy_bytes(descr, shape, rng.random() < 0.2, rng.randbytes(rng.choice((0, 16, 128))), rng.choice((1, 2)))
            else:
                member = zipfile.ZipFile(io.BytesIO(valid_npz())).read(rng.choice(["x_train.npy", "y_train.npy"]))
                data = mutate_bytes(rng, member)
            z.writestr(k + ".npy", data)
    return buf.getvalue()


def near_valid_npz(rng: random.Random, kind: str) -> bytes:
    """The valid arrays with one or two of them changed: dtype, shape, awkward values, or dropped."""
    with zipfile.ZipFile(io.BytesIO(valid_npz(kind))) as z:
        arrays = {n[:-4]: np.load(io.BytesIO(z.read(n))) for n in z.namelist()}
    for _ in range(rng.randint(1, 2)):
        key = rng.choice(sorted(arrays))
        a = arrays[key]
        op = rng.randrange(5)
        if op == 0:
            arrays[key] = a.astype(rng.choice(("f4", "f8", "i8", "u2", "?", "f2", "i1")))
        elif op == 1:
            arrays[key] = rng.choice((a[:0], a[:1], a[..., :0] if a.ndim > 1 else a[:0], a.reshape(-1), a[None], np.stack([a] * 3, -1)))
        elif op == 2:
            b = a.astype("f8")
            b.flat[rng.randrange(max(b.size, 1)) if b.size else 0:][:1] = rng.choice((math.nan, math.inf, -1, 2.5, 1e20, 255.0, 0.5))
            arrays[key] = b
        elif op == 3:
            b = a.astype("i8")
            if b.size:
                b.flat[rng.randrange(b.size)] = rng.choice((-1, 10, 2 ** 40, 2 ** 62, -(2 ** 63), 9999))
            arrays[key] = b
        else:
            arrays.pop(key)
    return _npz_bytes(arrays, compressed=rng.random() < 0.3)


def npz_case(rng: random.Random, kind: str) -> bytes:
    keys = {"plain": ("x_train", "y_train", "x_test", "y_test"),
            "medmnist": ("train_images", "train_labels", "test_images", "test_labels"),
            "site": ("images", "labels", "x_test", "y_test")}[kind]
    mode = rng.randrange(8)
    if mode == 0:
        return random_bytes(rng, 400)
    if mode in (1, 2):
        seeds = (valid_npz(kind), valid_npz(kind, True))
        return mutate_bytes(rng, seeds[mode - 1], seeds)
    if mode == 3:
        return crafted_npz(rng, keys)
    if mode == 4:
        return random_npz(rng, keys)
    return near_valid_npz(rng, kind)


def check_dataset(ds) -> None:
    ds.validate()
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64 and ds.x_train.ndim == 4
    assert min(ds.x_train.shape[1:3]) >= 1, ds.x_train.shape


def fuzz_npz(rng: random.Random, tmp: Path) -> str:
    """data.npz.load: mutated, random, crafted and random-array npz files."""
    from fedfactory.data import npz

    path = tmp / "d.npz"
    path.write_bytes(npz_case(rng, "plain" if rng.random() < 0.85 else "medmnist"))
    check_dataset(npz.load(str(path), size=rng.choice((0, 0, 0, 6))))
    return "accepted"


def fuzz_medmnist(rng: random.Random, tmp: Path) -> str:
    """data.medmnist.load: a bloodmnist.npz in a tmp root, mutated like the npz target."""
    from fedfactory.data import medmnist

    (tmp / "bloodmnist.npz").write_bytes(npz_case(rng, "medmnist"))
    ds = medmnist.load("medmnist:bloodmnist", root=str(tmp))
    check_dataset(ds)
    assert ds.num_classes == 8
    return "accepted"


def cifar_batch(n: int, seed: int, protocol: int = 2) -> bytes:
    """The layout of cifar-10-batches-py: a pickled dict (bytes keys) of uint8 N x 3072 data and labels."""
    rng = np.random.default_rng(seed)
    return pickle.dumps({b"batch_label": b"x", b"labels": [int(v) for v in rng.integers(0, 10, n)],
                         b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"a.png"] * n},
                        protocol=protocol)


CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


class Reduce:
    """Pickles as `func(*args)`: how a hostile pickle makes the unpickler call something."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def hostile_pickles(marker: Path) -> list:
    """Objects whose pickles would run code or allocate without bound if the unpickler obeyed them."""
    import builtins
    import subprocess

    _reconstruct = np.zeros(1).__reduce__()[0]  # numpy's own pickle helpers (allow-listed by the loader)
    scalar = np.float64(1).__reduce__()[0]

    touch = f"touch {marker}"
    return [
        Reduce(os.system, touch),
        Reduce(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        Reduce(builtins.eval, f"__import__('os').system({touch!r})"),
        Reduce(subprocess.call, ["touch", str(marker)]),
        Reduce(Path.touch, Path(marker)),
        Reduce(getattr, Reduce(builtins.__import__, "os"), "system"),
        Reduce(np.load, str(marker)),
        Reduce(np.ndarray, (2 ** 40,)),                       # allowed class, huge allocation
        Reduce(np.ndarray, (10 ** 5, 10 ** 5, 10 ** 5)),
        Reduce(_reconstruct, np.ndarray, (2 ** 40,), b"b"),    # allowed function, huge allocation
        Reduce(_reconstruct, np.ndarray, (10 ** 6, 10 ** 6), b"b"),
        Reduce(np.dtype, "V2147483647"),
        Reduce(np.dtype, ("U", 2 ** 40)),
        Reduce(scalar, np.dtype("V16"), b"ab"),
        Reduce(scalar, np.dtype("O"), Reduce(os.system, touch)),
        Reduce(codecs_encode(), "x", "no-such-codec"),
        Reduce(codecs_encode(), "x", "rot13"),
        Reduce(codecs_encode(), b"x", "zlib"),
        Reduce(codecs_encode(), "x" * 10, "base64"),
    ]


def codecs_encode():
    import _codecs

    return _codecs.encode


def _pickle_dumps(obj, protocol: int) -> bytes:
    try:
        return pickle.dumps(obj, protocol=protocol)
    except (pickle.PicklingError, TypeError, AttributeError):
        return pickle.dumps(obj, protocol=2)


def random_cifar_value(rng: random.Random, marker: Path):
    k = rng.randrange(8)
    if k == 0:
        return rng.choice(hostile_pickles(marker))
    if k == 1:
        return random_ndarray(rng, labels=rng.random() < 0.3)
    if k == 2:
        return [rng.choice((0, 9, 10, -1, 2 ** 70, 1.5, "a", None, b"x")) for _ in range(rng.randint(0, 6))]
    if k == 3:
        return np.zeros((rng.choice((0, 1, 2)), rng.choice((3072, 3071, 0))), rng.choice((np.uint8, np.float64, np.int64)))
    if k == 4:
        return random_json(rng)
    if k == 5:  # shared references: a tiny pickle of a huge nested list
        inner = [0] * 64
        return [[inner] * 64] * 64
    if k == 6:
        return rng.randbytes(rng.randint(0, 16))
    return np.int64(3)


def cifar_batch_case(rng: random.Random, marker: Path) -> bytes:
    mode = rng.randrange(6)
    seeds = (cifar_batch(2, 1), cifar_batch(2, 2, protocol=rng.choice((0, 1, 3, 4, 5))))
    if mode == 0:
        return random_bytes(rng, 200)
    if mode in (1, 2):
        return mutate_bytes(rng, seeds[mode - 1], seeds)
    if mode == 3:  # a hostile object alone, in any protocol
        return _pickle_dumps(rng.choice(hostile_pickles(marker)), rng.randint(0, 5))
    d = {b"batch_label": b"x", b"labels": [1, 2], b"data": np.zeros((2, 3072), np.uint8), b"filenames": [b"a", b"b"]}
    for _ in range(rng.randint(1, 2)):
        key = rng.choice((b"labels", b"data", b"filenames", b"batch_label", "data", b"\xff"))
        if rng.random() < 0.2:
            d.pop(key, None)
        else:
            d[key] = random_cifar_value(rng, marker)
    obj = d if mode == 4 else rng.choice((d, [d], random_cifar_value(rng, marker)))
    return _pickle_dumps(obj, rng.choice((2, 2, 0, 4)))


def fuzz_cifar10(rng: random.Random, tmp: Path) -> str:
    """data.cifar10.load on a cifar-10-batches-py folder with one or two mutated or hostile batches;
    nothing in a pickle may run (a marker file must not appear)."""
    from fedfactory.data import cifar10

    folder, marker = tmp / "cifar-10-batches-py", tmp / "PWNED"
    folder.mkdir()
    bad = set(rng.sample(CIFAR_FILES, rng.choice((1, 1, 2))))
    for i, name in enumerate(CIFAR_FILES):
        (folder / name).write_bytes(cifar_batch_case(rng, marker) if name in bad else cifar_batch(2, i))
    try:
        ds = cifar10.load(str(tmp))
        check_dataset(ds)
        assert ds.x_train.shape[1:] == (32, 32, 3)
    finally:
        assert not marker.exists(), "a pickle ran code"
    return "accepted"


@functools.cache
def valid_images() -> dict[str, bytes]:
    """Small images in the formats Pillow reads: the seeds of the image mutations."""
    rng = np.random.default_rng(5)
    out = {}
    for fmt, mode in (("PNG", "L"), ("PNG", "RGB"), ("JPEG", "RGB"), ("GIF", "P"), ("BMP", "RGB"), ("TIFF", "L"),
                      ("WEBP", "RGB")):
        im = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).convert(mode)
        buf = io.BytesIO()
        im.save(buf, fmt)
        out[f"{fmt}-{mode}"] = buf.getvalue()
    out["bomb"] = _png_header(60000, 60000)   # header claims 3.6 G pixels
    out["big"] = _png_header(9000, 9000)      # 81 M pixels: under Pillow's bomb limit, over any sane image
    return out


def _png_header(w: int, h: int) -> bytes:
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def image_case(rng: random.Random) -> bytes:
    seeds = valid_images()
    if rng.random() < 0.15:
        return rng.choice((seeds["bomb"], seeds["big"], random_bytes(rng, 64)))
    return mutate_bytes(rng, seeds[rng.choice(sorted(seeds))], tuple(seeds.values()))


def fuzz_isic2019(rng: random.Random, tmp: Path) -> str:
    """data.isic2019.load on a FLamby-style folder: a mutated train_test_split CSV or a mutated image."""
    from fedfactory.data import isic2019

    img_dir = tmp / "ISIC_2019_Training_Input_preprocessed"
    img_dir.mkdir()
    jpg = valid_images()["JPEG-RGB"]
    rows = [{"image": f"ISIC_{i}", "target": i % 8, "center": i % 3, "fold": "test" if i == 3 else "train"} for i in range(4)]
    for r in rows:
        (img_dir / f"{r['image']}.jpg").write_bytes(jpg)
    mode = rng.randrange(4)
    if mode == 0:
        (img_dir / f"ISIC_{rng.randrange(4)}.jpg").write_bytes(image_case(rng))
    elif mode == 1:  # structured: fields with awkward values, missing or extra columns
        for _ in range(rng.randint(1, 3)):
            r = rng.choice(rows)
            r[rng.choice(("image", "target", "center", "fold", "extra"))] = rng.choice(
                ("", "-1", "8", "99999999999999999999999", "1.5", "train", "test", "TRAIN", "../ISIC_1", "nope",
                 " 3 ", "\x00", None, "9" * 5000, "2147483648"))
    buf = io.StringIO()
    fields = [f for f in ("image", "target", "center", "fold", "extra") if any(f in r for r in rows)]
    if mode == 1 and rng.random() < 0.3:
        fields = rng.sample(fields, rng.randint(0, len(fields)))
    w = csv.DictWriter(buf, fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    text = buf.getvalue().encode()
    if mode >= 2:
        text = mutate_bytes(rng, text)
    (tmp / rng.choice(("train_test_split", "train_test_split.csv"))).write_bytes(text)
    ds = isic2019.load(str(tmp), size=8)
    check_dataset(ds)
    assert ds.groups_train is not None and len(ds.groups_train) == len(ds.x_train)
    return "accepted"


def idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">i", d) for d in arr.shape) + arr.astype(np.uint8).tobytes()


def idx_case(rng: random.Random) -> bytes:
    seed = idx_bytes(np.arange(2 * 5 * 4, dtype=np.uint8).reshape(2, 5, 4))
    mode = rng.randrange(4)
    if mode == 0:
        return random_bytes(rng, 64)
    if mode == 1:
        return mutate_bytes(rng, seed, (idx_bytes(np.arange(7, dtype=np.uint8)),))
    # a header with any dimension count and sizes: huge, negative, zero, overflowing products
    ndim = rng.choice((0, 1, 2, 3, 4, 8, 40, 255))
    pool = (0, 1, 2, 3, 7, 28, -1, -7, 2 ** 31 - 1, 2 ** 16, 60000)
    dims = [rng.choice(pool) for _ in range(ndim)]
    head = bytes([0, 0, 0x08, ndim]) + b"".join(struct.pack(">i", d) for d in dims[: rng.choice((ndim, ndim, max(0, ndim - 1)))])
    return head + rng.randbytes(rng.choice((0, 1, 6, 40, 64)))


def fuzz_idx(rng: random.Random, tmp: Path) -> str:
    """data.idx.read_idx on raw and gzipped IDX files (mutated before or after compression, crafted
    headers); and data.idx.load on a folder with one such file."""
    from fedfactory.data import idx

    raw = idx_case(rng)
    gz = rng.random() < 0.5
    data = gzip.compress(raw, mtime=0) if gz else raw
    if gz and rng.random() < 0.3:
        data = mutate_bytes(rng, data)
    if rng.random() < 0.2:  # the whole Fashion-MNIST folder, one file bad
        rs = np.random.default_rng(2)
        files = {"x_train": rs.integers(0, 256, (5, 6, 6)), "y_train": np.arange(5) % 10,
                 "x_test": rs.integers(0, 256, (3, 6, 6)), "y_test": np.arange(3)}
        for key, name in idx.FILES.items():
            (tmp / name).write_bytes(gzip.compress(idx_bytes(files[key]), mtime=0))
        (tmp / idx.FILES[rng.choice(sorted(idx.FILES))]).write_bytes(gzip.compress(raw, mtime=0))
        check_dataset(idx.load(str(tmp)))
        return "accepted"
    path = tmp / ("f-idx.gz" if gz else "f-idx")
    path.write_bytes(data)
    arr = idx.read_idx(path)
    assert arr.dtype == np.uint8 and arr.ndim == raw[3]
    return "accepted"


FOLDER_CLASSES = ["cat", "dog", "fox"]


def fuzz_folder(rng: random.Random, tmp: Path) -> str:
    """data.folder.load_labelled on a `path,label` CSV with mutated rows or images, or on a mutated npz."""
    from fedfactory.data.folder import load_labelled

    size, channels = rng.choice((0, 0, 5)), rng.choice((0, 0, 1, 3, 2))
    max_bytes = rng.choice((8 << 30, 8 << 30, 300))
    if rng.random() < 0.4:
        source = tmp / "site.npz"
        source.write_bytes(npz_case(rng, rng.choice(("site", "plain", "medmnist"))))
        split = rng.choice(("train", "train", "test", "valid"))
    else:
        seeds = valid_images()
        rows = []
        for i in range(3):
            name = f"img{i}.png"
            (tmp / name).write_bytes(seeds["PNG-L"])
            rows.append([name, rng.choice(FOLDER_CLASSES + ["0", "2"])])
        mode = rng.randrange(3)
        if mode == 0:
            (tmp / rows[rng.randrange(3)][0]).write_bytes(image_case(rng))
        text = "path,label\n" + "".join(f"{p},{lab}\n" for p, lab in rows)
        if mode == 1:
            r = rng.choice(rows)
            r[rng.randrange(2)] = rng.choice(("", "3", "-1", "Cat", "../img0.png", "/etc/passwd", "img9.png", "\x00",
                                              "1e3", "9" * 5000, '"', "a,b", "img0.png,extra"))
            text = "path,label\n" + "".join(f"{p},{lab}\n" for p, lab in rows)
        data = text.encode()
        if mode == 2:
            data = mutate_bytes(rng, data)
        source = tmp / "site.csv"
        source.write_bytes(data)
        split = "train"
    x, y = load_labelled(source, FOLDER_CLASSES, split=split, size=size, channels=channels, max_bytes=max_bytes)
    assert x.dtype == np.uint8 and x.ndim == 4 and y.dtype == np.int64 and len(x) == len(y) > 0
    assert x.shape[-1] in (1, 3) and (not channels or x.shape[-1] == channels) and min(x.shape[1:3]) >= 1
    assert (not size or x.shape[1:3] == (size, size)) and 0 <= y.min() and y.max() < len(FOLDER_CLASSES)
    return "accepted"


TARGETS = {
    "manifest": fuzz_manifest,
    "module_weights": fuzz_module_weights,
    "module_manifest": fuzz_module_manifest,
    "messages": fuzz_messages,
    "npz": fuzz_npz,
    "medmnist": fuzz_medmnist,
    "cifar10": fuzz_cifar10,
    "isic2019": fuzz_isic2019,
    "idx": fuzz_idx,
    "folder": fuzz_folder,
}
