"""Fuzzing every reader of untrusted input: only FedFactoryError (one line) may come out.

The generators live in tests/fuzzing.py (their long run: `python benchmarks/fuzz.py --seconds 300`);
here hypothesis drives them (a derandomized random.Random), a few thousand cases in all. Then
the hostile pickles, the bounded-memory checks, and one regression test per bug that fuzzing found.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzzing
from fedfactory.errors import FedFactoryError
from helpers import benchmark_script

# cases per target: about 3,000 in all, under a minute on 2 cores
EXAMPLES = {"manifest": 400, "module_weights": 150, "module_manifest": 250, "messages": 400, "npz": 400,
            "medmnist": 200, "cifar10": 300, "isic2019": 200, "idx": 400, "folder": 300}


@pytest.fixture(scope="module")
def trained_module():
    """A real tiny diffusion module (trained once; fuzzing.valid_module caches it for the generators)."""
    return fuzzing.valid_module()


@pytest.fixture(autouse=True)
def _quiet(recwarn):
    """Pillow and numpy warn about the inputs: expected, not failures."""
    yield


@pytest.mark.parametrize("target", sorted(EXAMPLES))
def test_fuzz(target, trained_module):
    assert set(EXAMPLES) == set(fuzzing.TARGETS)

    @settings(max_examples=EXAMPLES[target], deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(rng=st.randoms(use_true_random=False))
    def check(rng):
        fuzzing.run_case(fuzzing.TARGETS[target], rng)

    check()


def test_valid_seeds_are_accepted(trained_module, tmp_path):
    """The generators start from valid inputs: each must load (else the mutations prove nothing)."""
    from fedfactory.data import cifar10, idx, npz
    from fedfactory.modules import load_module
    from fedfactory.runners.flower import messages

    blob, manifest = trained_module
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "module.safetensors").write_bytes(blob)
    (tmp_path / "m" / "manifest.json").write_bytes(manifest)
    assert load_module(tmp_path / "m", device="cpu").classes == [0, 1]
    (tmp_path / "d.npz").write_bytes(fuzzing.valid_npz("plain", True))
    assert npz.load(str(tmp_path / "d.npz")).x_train.shape == (6, 8, 8, 1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i, name in enumerate(fuzzing.CIFAR_FILES):
        (folder / name).write_bytes(fuzzing.cifar_batch(2, i, protocol=[0, 1, 2, 3, 4, 2][i]))
    assert cifar10.load(str(tmp_path)).x_train.shape == (10, 32, 32, 3)
    (tmp_path / "f-idx.gz").write_bytes(gzip.compress(fuzzing.idx_bytes(np.zeros((2, 3, 4), np.uint8))))
    assert idx.read_idx(tmp_path / "f-idx.gz").shape == (2, 3, 4)
    m = {"weights_sha256": hashlib.sha256(blob).hexdigest()}
    assert messages.read_module(messages.module_content(blob, m)) == (blob, m)


# -- pickles: refused, and nothing runs --------------------------------------------------------

@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("which", range(len(fuzzing.hostile_pickles(Path("/nonexistent")))))
def test_hostile_pickles_are_refused_and_never_run(tmp_path, which, protocol):
    from fedfactory.data import cifar10

    marker = tmp_path / "PWNED"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    evil = fuzzing.hostile_pickles(marker)[which]
    for i, name in enumerate(fuzzing.CIFAR_FILES):
        (folder / name).write_bytes(fuzzing.cifar_batch(2, i))
    for payload in (evil, {b"data": evil, b"labels": [1, 2]}, {b"data": np.zeros((2, 3072), np.uint8), b"labels": evil}):
        (folder / "data_batch_3").write_bytes(fuzzing._pickle_dumps(payload, protocol))
        with pytest.raises(FedFactoryError) as e:
            cifar10.load(str(tmp_path))
        assert "\n" not in str(e.value)
        assert not marker.exists(), "a pickle ran code"


def test_cifar_refuses_classes_outside_the_allow_list_by_name(tmp_path):
    import os

    from fedfactory.data import cifar10

    (tmp_path / "b").write_bytes(pickle.dumps(fuzzing.Reduce(os.system, f"touch {tmp_path / 'PWNED'}"), protocol=2))
    with pytest.raises(FedFactoryError, match=r"refused to load (posix|os)\.system"):
        cifar10.read_batch(tmp_path / "b")
    assert not (tmp_path / "PWNED").exists()
    assert issubclass(cifar10._AllowListUnpickler, pickle._Unpickler)  # never the stock, unrestricted loader


def test_cifar_object_array_state_cannot_crash_the_interpreter(tmp_path):
    """numpy's ndarray.__setstate__ reads past a short list for object arrays (a segfault): the loader
    never hands pickle state to numpy. Run in a child process, so a regression fails instead of killing pytest."""
    evil = tmp_path / "data_batch_1"
    # _reconstruct(ndarray, (0,), b'b') then BUILD (1, (100000,), dtype('O'), False, [1, 2])
    evil.write_bytes(b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R"
                     b"(K\x01J\xa0\x86\x01\x00\x85cnumpy\ndtype\nX\x02\x00\x00\x00O8K\x00K\x01\x87R"
                     b"(K\x03X\x01\x00\x00\x00|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK?tb\x89]q\x00(K\x01K\x02etb.")
    code = ("from fedfactory.data import cifar10; from fedfactory.errors import FedFactoryError\n"
            f"try:\n    cifar10.read_batch(__import__('pathlib').Path({str(evil)!r}))\n"
            "except FedFactoryError as e:\n    print('refused', e)\n")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("refused"), (r.returncode, r.stdout, r.stderr[-500:])


# -- bounded: huge claims fail fast, before any allocation -------------------------------------

def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(FedFactoryError):
            fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dims", [(60000, 2 ** 31 - 1, 2 ** 31 - 1), (2 ** 31 - 1,), (100_000, 28, 28)])
def test_idx_header_claiming_huge_dims_fails_fast(tmp_path, gz, dims):
    from fedfactory.data import idx

    raw = bytes([0, 0, 8, len(dims)]) + b"".join(struct.pack(">i", d) for d in dims) + b"\x00" * 64
    path = tmp_path / ("x-idx.gz" if gz else "x-idx")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    t0 = time.perf_counter()
    assert _peak_bytes(lambda: idx.read_idx(path)) < 4 << 20
    assert time.perf_counter() - t0 < 5


def test_idx_gzip_bomb_is_not_decompressed_past_its_header(tmp_path):
    from fedfactory.data import idx

    path = tmp_path / "bomb-idx.gz"  # declares 10 bytes, holds 64 MiB of zeros after them (64 KiB on disk)
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + struct.pack(">i", 10) + bytes(64 << 20)))
    assert _peak_bytes(lambda: idx.read_idx(path)) < 8 << 20


@pytest.mark.parametrize("shape", [(2 ** 40,), (10 ** 6, 10 ** 6), (10 ** 5, 10 ** 5, 10 ** 5, 1)])
def test_npz_member_claiming_huge_shape_fails_fast(tmp_path, shape):
    from fedfactory.data import npz

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for key in npz.PLAIN_KEYS:
            z.writestr(key + ".npy", fuzzing.npy_bytes("|u1", shape, body=b"\x00" * 64))
    (tmp_path / "d.npz").write_bytes(buf.getvalue())
    assert _peak_bytes(lambda: npz.load(str(tmp_path / "d.npz"))) < 4 << 20


def test_npz_header_that_would_overflow_the_python_parser_is_refused(tmp_path):
    """np.load evaluates the header with ast.literal_eval: '-' * 9000 + '1' makes it raise MemoryError."""
    from fedfactory.data import npz

    header = ("{'descr': '|u1', 'fortran_order': False, 'shape': (" + "-" * 9000 + "1,), }").encode()
    member = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header) + 1) + header + b"\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("x_train.npy", member)
    (tmp_path / "d.npz").write_bytes(buf.getvalue())
    with pytest.raises(FedFactoryError, match="unsupported .npy header"):
        npz.load(str(tmp_path / "d.npz"))


def test_npz_labels_cannot_declare_a_trillion_classes(tmp_path):
    from fedfactory.data import npz

    x = np.zeros((2, 4, 4), np.uint8)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=np.array([0, 10 ** 12]), x_test=x, y_test=np.array([0, 1]))
    t0 = time.perf_counter()
    with pytest.raises(FedFactoryError, match="at most"):
        npz.load(str(tmp_path / "d.npz"))
    assert time.perf_counter() - t0 < 5


def test_cifar_memo_index_bomb_allocates_nothing(tmp_path):
    """LONG_BINPUT 2**27 makes the C unpickler allocate and zero 2 GiB for its memo: 10 bytes of pickle."""
    from fedfactory.data import cifar10

    (tmp_path / "b").write_bytes(b"\x80\x02N" + b"r" + struct.pack("<I", 2 ** 27) + b".")
    assert _peak_bytes(lambda: cifar10.read_batch(tmp_path / "b")) < 4 << 20


def test_cifar_bytearray8_claim_allocates_nothing(tmp_path):
    from fedfactory.data import cifar10

    (tmp_path / "b").write_bytes(b"\x80\x05\x96" + struct.pack("<Q", 2 ** 36) + b"abc.")
    assert _peak_bytes(lambda: cifar10.read_batch(tmp_path / "b")) < 4 << 20


@pytest.mark.parametrize("shape", [(2 ** 40,), (2 ** 62,), (-1,)])
def test_message_array_claiming_huge_size_fails_fast(shape):
    from flwr.app import Array, ArrayRecord, RecordDict

    from fedfactory.runners.flower import messages

    data = fuzzing.npy_bytes("|u1", shape if shape[0] >= 0 else (4,), body=b"abcd")
    rec = ArrayRecord()
    rec["bytes"] = Array(dtype="uint8", shape=shape, stype="numpy.ndarray", data=data)
    content = RecordDict({"weights": rec})
    assert _peak_bytes(lambda: messages.read_weights_blob(content)) < 1 << 20


def test_message_byte_cap_is_checked_before_the_bytes_are_read(monkeypatch):
    from fedfactory.runners.flower import messages

    monkeypatch.setattr(messages, "MAX_MESSAGE_BYTES", 100)
    assert messages.read_weights_blob(messages.weights_content(bytes(100))) == bytes(100)
    with pytest.raises(FedFactoryError, match="cap"):
        messages.read_weights_blob(messages.weights_content(bytes(101)))


@pytest.mark.parametrize("text, match", [
    ("[1, 2]", "JSON object"), ("7", "JSON object"), ("not json", "not valid JSON"),
    ("[" * 100_000, "not valid JSON"), ('{"a": ' + "1" * 5000 + "}", "not valid JSON"),
])
def test_message_manifest_must_be_a_json_object(text, match):
    from flwr.app import ConfigRecord

    from fedfactory.runners.flower import messages

    content = messages.module_content(b"x", {})
    content["manifest"] = ConfigRecord({"json": text})
    with pytest.raises(FedFactoryError, match=match):
        messages.read_module(content)
    content = messages.config_content("", "expert", [(b"x", {})])
    content["manifest-0"] = ConfigRecord({"json": text})
    with pytest.raises(FedFactoryError, match=match):
        messages.read_modules(content)


# -- regressions: bugs that fuzzing found in the module loader and the message decoder ------------

def _module_dir(tmp: Path, blob: bytes, manifest) -> Path:
    fuzzing._write_module(tmp / "m", blob, manifest)
    return tmp / "m"


def test_fuzz_found_unhashable_kind(trained_module, tmp_path):
    from fedfactory.modules import load_module

    manifest = {**json.loads(trained_module[1]), "kind": ["diffusion"]}
    with pytest.raises(FedFactoryError):
        load_module(_module_dir(tmp_path, trained_module[0], manifest), device="cpu")


@pytest.mark.parametrize("text", ["[" * 100_000, '{"a":' * 100_000])
def test_fuzz_found_manifest_deep_json(tmp_path, text):
    from fedfactory.modules.fileformat import read_manifest

    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(FedFactoryError):
        read_manifest(tmp_path)


def test_fuzz_found_manifest_long_int(tmp_path):
    from fedfactory.modules.fileformat import read_manifest

    (tmp_path / "manifest.json").write_text('{"format_version": ' + "1" * 5000 + "}")
    with pytest.raises(FedFactoryError):
        read_manifest(tmp_path)


@pytest.mark.parametrize("dtype, per_byte", [("F8_E8M0", 1), ("F4", 2)])
def test_fuzz_found_safetensors_dtype(trained_module, tmp_path, dtype, per_byte):
    from fedfactory.modules import load_module

    blob = trained_module[0]
    n = struct.unpack("<Q", blob[:8])[0]
    header, body = json.loads(blob[8:8 + n]), blob[8 + n:]
    name = next(k for k in header if k != "__metadata__")
    a, b = header[name]["data_offsets"]
    header[name].update(dtype=dtype, shape=[(b - a) * per_byte])
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    blob = struct.pack("<Q", len(raw)) + raw + body
    manifest = {**json.loads(trained_module[1]), "weights_sha256": hashlib.sha256(blob).hexdigest()}
    with pytest.raises(FedFactoryError):
        load_module(_module_dir(tmp_path, blob, manifest), device="cpu")


def test_fuzz_found_have_deep_json():
    from flwr.app import ConfigRecord, RecordDict

    from fedfactory.runners.flower import messages

    content = RecordDict({"fedfactory": ConfigRecord({"config-toml": "", "phase": "module", "have": "[" * 100_000})})
    assert messages.read_have(content) == set()  # "malformed means none", its docstring says


def test_fuzz_cli_smoke(tmp_path, trained_module):
    """The long run's entry point: a table and a JSON file, zero other exceptions."""
    out = tmp_path / "fuzz.json"
    assert benchmark_script("fuzz").main(["--examples", "20", "--targets", "idx,messages", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["totals"]["cases"] == 20 and result["totals"]["other"] == 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
