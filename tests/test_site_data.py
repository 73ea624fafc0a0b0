import numpy as np
import pytest
from PIL import Image

from fedfactory.data.folder import load_labelled
from fedfactory.errors import FedFactoryError
from helpers import CLASSES, colour, grey, save


def test_folder_grey_round_trip_is_exact_and_ordered(tmp_path):
    # written out of name order; within a class, output is sorted by file name
    b, a, c = grey(1), grey(2), grey(3)
    save(tmp_path / "fox" / "b.png", b)
    save(tmp_path / "fox" / "a.png", a)
    save(tmp_path / "fox" / "c.PNG", c)
    (tmp_path / "fox" / "notes.txt").write_text("not an image")
    save(tmp_path / "fox" / ".hidden.png", grey(9))
    save(tmp_path / ".cache" / "x.png", grey(9))
    x, y = load_labelled(tmp_path, CLASSES)
    assert x.dtype == np.uint8 and x.shape == (3, 8, 8, 1)
    assert y.dtype == np.int64 and y.tolist() == [2, 2, 2]
    assert np.array_equal(x[..., 0], np.stack([a, b, c]))


def test_folder_orders_classes_by_global_id(tmp_path):
    save(tmp_path / "dog" / "1.png", grey(1))  # "dog" < "fox" alphabetically, but order is by class list
    save(tmp_path / "cat" / "1.png", grey(2))
    x, y = load_labelled(tmp_path, ["fox", "dog", "cat"], split="ignored")
    assert y.tolist() == [1, 2]
    assert np.array_equal(x[0, ..., 0], grey(1)) and np.array_equal(x[1, ..., 0], grey(2))


def test_folder_colour_and_channel_choice(tmp_path):
    save(tmp_path / "cat" / "a.png", colour(1))
    x, _ = load_labelled(tmp_path, CLASSES)
    assert x.shape == (1, 8, 8, 3) and np.array_equal(x[0], colour(1))
    save(tmp_path / "dog" / "b.png", grey(2))
    x, y = load_labelled(tmp_path, CLASSES)  # mixed grey + colour -> colour for all
    assert x.shape == (2, 8, 8, 3) and y.tolist() == [0, 1]
    assert all(np.array_equal(x[1, ..., k], grey(2)) for k in range(3))
    x, _ = load_labelled(tmp_path, CLASSES, channels=1)
    assert x.shape == (2, 8, 8, 1)
    assert np.array_equal(x[1, ..., 0], grey(2))
    assert np.array_equal(x[0, ..., 0], np.asarray(Image.fromarray(colour(1)).convert("L")))


def test_folder_jpeg_decodes(tmp_path):
    save(tmp_path / "dog" / "a.JPG", colour(1, 16, 16))
    x, y = load_labelled(tmp_path, CLASSES)
    assert x.shape == (1, 16, 16, 3) and y.tolist() == [1]


def test_unknown_class_folder_is_named(tmp_path):
    save(tmp_path / "cat" / "a.png", grey(1))
    save(tmp_path / "wolf" / "a.png", grey(1))
    with pytest.raises(FedFactoryError, match=r"wolf.*holds class 'wolf'.*not in the federation's class list") as e:
        load_labelled(tmp_path, CLASSES)
    assert "'fox'" in str(e.value)


def test_sizes_must_agree_unless_size_is_set(tmp_path):
    save(tmp_path / "cat" / "a.png", grey(1, 8, 8))
    save(tmp_path / "cat" / "b.png", grey(2, 10, 12))
    with pytest.raises(FedFactoryError, match=r"differ in size.*data\.size"):
        load_labelled(tmp_path, CLASSES)
    x, _ = load_labelled(tmp_path, CLASSES, size=8)
    assert x.shape == (2, 8, 8, 1)
    assert np.array_equal(x[0, ..., 0], grey(1, 8, 8))  # already at size: untouched
    assert np.array_equal(x[1, ..., 0], np.asarray(Image.fromarray(grey(2, 10, 12)).resize((8, 8), Image.BILINEAR)))


def test_csv_names_ids_and_relative_paths(tmp_path):
    save(tmp_path / "imgs" / "p.png", grey(1))
    save(tmp_path / "imgs" / "q.png", grey(2))
    absolute = save(tmp_path / "elsewhere" / "r.png", grey(3))
    (tmp_path / "site.csv").write_text(f"path,label\nimgs/q.png,fox\nimgs/p.png,0\n{absolute},dog\n")
    x, y = load_labelled(tmp_path / "site.csv", CLASSES)
    assert y.tolist() == [2, 0, 1]  # row order
    assert np.array_equal(x[..., 0], np.stack([grey(2), grey(1), grey(3)]))


def test_csv_bad_label_and_missing_file(tmp_path):
    save(tmp_path / "a.png", grey(1))
    (tmp_path / "bad.csv").write_text("path,label\na.png,cat\na.png,wolf\n")
    with pytest.raises(FedFactoryError, match=r"bad\.csv row 3: label 'wolf'"):
        load_labelled(tmp_path / "bad.csv", CLASSES)
    (tmp_path / "range.csv").write_text("path,label\na.png,3\n")
    with pytest.raises(FedFactoryError, match=r"row 2: label '3'"):
        load_labelled(tmp_path / "range.csv", CLASSES)
    (tmp_path / "gone.csv").write_text("path,label\nmissing.png,cat\n")
    with pytest.raises(FedFactoryError, match=r"missing\.png not found"):
        load_labelled(tmp_path / "gone.csv", CLASSES)
    (tmp_path / "header.csv").write_text("file,class\na.png,cat\n")
    with pytest.raises(FedFactoryError, match=r"header row must be 'path,label'"):
        load_labelled(tmp_path / "header.csv", CLASSES)


@pytest.mark.parametrize("keys", [("x_train", "y_train", "x_test", "y_test"),
                                  ("train_images", "train_labels", "test_images", "test_labels")])
def test_npz_train_and_test_splits(tmp_path, keys):
    rng = np.random.default_rng(0)
    tr, te = rng.integers(0, 256, (5, 6, 6), dtype=np.uint8), rng.integers(0, 256, (3, 6, 6), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", **dict(zip(keys, (tr, np.array([[0], [1], [2], [0], [1]]), te, np.array([2, 2, 1])))))
    x, y = load_labelled(tmp_path / "d.npz", CLASSES)
    assert x.shape == (5, 6, 6, 1) and np.array_equal(x[..., 0], tr) and y.tolist() == [0, 1, 2, 0, 1]
    x, y = load_labelled(tmp_path / "d.npz", CLASSES, split="test", size=4)
    assert x.shape == (3, 4, 4, 1) and y.dtype == np.int64 and y.tolist() == [2, 2, 1]


def test_npz_plain_images_labels_and_range(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (4, 5, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=imgs, labels=np.array([0, 1, 2, 1]))
    for split in ("train", "test"):
        x, y = load_labelled(tmp_path / "d.npz", CLASSES, split=split)
        assert np.array_equal(x, imgs) and y.tolist() == [0, 1, 2, 1]
    np.savez(tmp_path / "bad.npz", images=imgs, labels=np.array([0, 1, 3, 1]))
    with pytest.raises(FedFactoryError, match=r"bad\.npz.*out of range \[0, 3\)"):
        load_labelled(tmp_path / "bad.npz", CLASSES)
    np.savez(tmp_path / "none.npz", pictures=imgs)
    with pytest.raises(FedFactoryError, match=r"none\.npz: no train arrays"):
        load_labelled(tmp_path / "none.npz", CLASSES)


def test_corrupt_image_is_named(tmp_path):
    save(tmp_path / "cat" / "a.png", grey(1))
    (tmp_path / "cat" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(FedFactoryError, match=r"cannot read image .*b\.png"):
        load_labelled(tmp_path, CLASSES)


def test_truncated_image_is_named(tmp_path):
    path = save(tmp_path / "cat" / "a.png", grey(1, 64, 64))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(FedFactoryError, match=r"cannot read image .*a\.png"):
        load_labelled(tmp_path, CLASSES)


@pytest.mark.parametrize("limit, kind", [(300, "DecompressionBombWarning"), (150, "DecompressionBombError")])
def test_decompression_bomb_is_refused(tmp_path, monkeypatch, limit, kind):
    save(tmp_path / "cat" / "a.png", grey(1, 20, 20))  # 400 px: warns above the limit, errors above twice it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(FedFactoryError, match=rf"cannot read image .*a\.png: {kind}"):
        load_labelled(tmp_path, CLASSES)


def test_empty_and_missing_sources(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "readme.txt").write_text("no images here")
    with pytest.raises(FedFactoryError, match="holds no images"):
        load_labelled(tmp_path, CLASSES)
    with pytest.raises(FedFactoryError, match=r"nope does not exist.*\.csv.*\.npz"):
        load_labelled(tmp_path / "nope", CLASSES)
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(FedFactoryError, match=r"d\.txt is not a supported source"):
        load_labelled(tmp_path / "d.txt", CLASSES)


def test_argument_checks(tmp_path):
    save(tmp_path / "cat" / "a.png", grey(1))
    with pytest.raises(FedFactoryError, match="channels"):
        load_labelled(tmp_path, CLASSES, channels=2)
    with pytest.raises(FedFactoryError, match="duplicates"):
        load_labelled(tmp_path, ["cat", "dog", "cat"])


def test_max_bytes_cap(tmp_path):
    for i in range(3):
        save(tmp_path / "cat" / f"{i}.png", grey(i))
    x, _ = load_labelled(tmp_path, CLASSES, max_bytes=3 * 64)
    assert x.nbytes == 3 * 64
    with pytest.raises(FedFactoryError, match="above the cap"):
        load_labelled(tmp_path, CLASSES, max_bytes=3 * 64 - 1)
    with pytest.raises(FedFactoryError, match="above the cap"):
        load_labelled(tmp_path, CLASSES, size=16, max_bytes=3 * 64 * 2)
