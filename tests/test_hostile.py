"""A hostile peer's module folder or manifest: names are data, declared sizes are checked before
anything is allocated, and nothing outside the run folder is written or deleted."""

import json
import resource

import numpy as np
import pytest

from fedfactory.errors import FedFactoryError
from fedfactory.modules import ModuleFileError, load_module
from fedfactory.modules.diffusion import DiffusionModule
from fedfactory.modules.fileformat import check_client_id, serialize, write_module_dir
from fedfactory.modules.limits import Limits


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    """A real, tiny module and its bytes."""
    x = np.random.default_rng(0).integers(0, 255, (32, 8, 8, 1), dtype=np.uint8)
    m = DiffusionModule({"channels": 8, "channel_mult": [1, 2], "num_blocks": 1}, {"budget_images": 32, "batch_size": 16},
                        client_id="client-0", progress=False).fit(x, np.full(32, 2))
    folder = tmp_path_factory.mktemp("honest") / "client-0"
    m.save(folder)
    return folder, (folder / "module.safetensors").read_bytes(), json.loads((folder / "manifest.json").read_text())


def _forge(tmp_path, blob, manifest, **changes):
    """A module folder whose manifest declares `changes` (the weights' hash still matches)."""
    folder = tmp_path / "forged"
    write_module_dir(folder, blob, {**manifest, **changes})
    return folder


@pytest.mark.parametrize("cid", ["../../victim", "/etc", "a/b", "..", ".hidden", "", "x" * 65, 7, None, "client\n0"])
def test_client_ids_that_are_paths_or_not_names_are_refused(cid):
    with pytest.raises(FedFactoryError, match="client id"):
        check_client_id(cid)


def test_a_manifest_with_a_path_as_client_id_is_refused(honest, tmp_path):
    _, blob, manifest = honest
    with pytest.raises(ModuleFileError, match="client id"):
        load_module(_forge(tmp_path, blob, manifest, client_id="../../victim"), device="cpu")


def test_a_billion_parameter_declaration_is_refused_before_anything_is_built(honest, tmp_path):
    _, blob, manifest = honest
    huge = {"channels": 1024, "channel_mult": [16, 16, 16, 16, 16, 16], "num_blocks": 8, "attn_resolutions": [],
            "dropout": 0.0}
    folder = _forge(tmp_path, blob, manifest, arch=huge)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ModuleFileError, match=r"parameters, over the cap"):
        load_module(folder, device="cpu")
    # the network would need hundreds of GB; counting it on the meta device costs next to nothing
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB


@pytest.mark.parametrize("changes, message", [
    ({"arch": {"channels": 10**9, "channel_mult": [1], "num_blocks": 1}}, "arch.channels"),
    ({"arch": {"channels": 8, "channel_mult": [1] * 50, "num_blocks": 1}}, "arch.channel_mult"),
    ({"arch": {"channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "evil": 1}}, "arch must hold only"),
    ({"image_shape": [100_000, 100_000, 1]}, "image_shape"),
    ({"image_shape": [8, 8, 4]}, "image_shape"),
    ({"classes": [10**12], "counts": [5]}, "classes"),
    ({"classes": [2, 2], "counts": [5, 5]}, "classes"),
    ({"counts": [-5]}, "counts"),
    ({"counts": [10**9]}, "counts"),
    ({"counts": [True]}, "counts"),
    ({"training": {"sample_steps": 10**9}}, "training.sample_steps"),
    ({"training": {"sigma_min": 0}}, "training.sigma_min"),
    ({"training": "everything"}, "training must be an object"),
])
def test_declared_sizes_beyond_the_caps_are_refused(honest, tmp_path, changes, message):
    _, blob, manifest = honest
    with pytest.raises(ModuleFileError, match=message):
        load_module(_forge(tmp_path, blob, manifest, **changes), device="cpu")


def test_the_federation_decides_shape_classes_and_caps(honest, tmp_path):
    folder, _, _ = honest
    assert load_module(folder, device="cpu", limits=Limits(image_shape=(8, 8, 1), num_classes=3)).classes == [2]
    with pytest.raises(ModuleFileError, match="not the federation's"):
        load_module(folder, device="cpu", limits=Limits(image_shape=(16, 16, 1)))
    with pytest.raises(ModuleFileError, match="classes"):  # class 2 is outside a 2-class federation
        load_module(folder, device="cpu", limits=Limits(num_classes=2))
    with pytest.raises(ModuleFileError, match="over the cap"):
        load_module(folder, device="cpu", limits=Limits(max_module_bytes=1000))
    with pytest.raises(ModuleFileError, match="over the cap"):
        load_module(folder, device="cpu", limits=Limits(max_parameters=1000))


def test_only_a_module_folder_is_ever_replaced(honest, tmp_path):
    _, blob, manifest = honest
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "patients.csv").write_text("precious")
    with pytest.raises(FedFactoryError, match="not a module folder"):
        write_module_dir(victim, blob, manifest)
    assert (victim / "patients.csv").read_text() == "precious"
    link = tmp_path / "link"
    link.symlink_to(victim)
    with pytest.raises(FedFactoryError, match="not a module folder"):
        write_module_dir(link, blob, manifest)
    assert (victim / "patients.csv").exists()
    module_dir = tmp_path / "client-0"
    write_module_dir(module_dir, blob, manifest)
    write_module_dir(module_dir, *serialize({}, {"client_id": "client-0"}))  # a module folder: replaced
    assert json.loads((module_dir / "manifest.json").read_text())["weights_sha256"] != manifest["weights_sha256"]
