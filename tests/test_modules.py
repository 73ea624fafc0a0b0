import math
import copy
import json

import numpy as np
import pytest
import torch

from fedfactory.errors import FedFactoryError
from fedfactory import tensors, utils
from fedfactory.modules import base
from fedfactory.modules import ModuleFileError, load_module
from fedfactory.modules.diffusion import DiffusionModule, edm_loss, heun_sampler
from helpers import TINY_ARCH, TINY_TRAIN, tiny



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 12, 12, 1), dtype=np.uint8)
    y = np.array([2, 5] * 20)
    m = tiny().fit(x, y)
    path = tmp_path_factory.mktemp("mod") / "client-0"
    m.save(path)
    return m, path, x, y


def test_module_records_classes_and_counts(trained):
    m, path, _, _ = trained
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["classes"] == [2, 5] and manifest["counts"] == [20, 20]
    assert manifest["kind"] == "diffusion" and manifest["client_id"] == "client-0"
    assert manifest["image_shape"] == [12, 12, 1] and len(manifest["weights_sha256"]) == 64
    assert {"format_version", "arch", "training", "library_version", "normalisation"} <= set(manifest)


@pytest.mark.parametrize("kind", ["diffusion", "cvae"])
def test_round_trip_gives_identical_samples(tmp_path, kind):
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 256, (30, 12, 12, 1), dtype=np.uint8), np.arange(30) % 3
    m = tiny(kind).fit(x, y)
    m.save(tmp_path / "m")
    loaded = load_module(tmp_path / "m")
    a, b = m.sample(1, 7, seed=11), loaded.sample(1, 7, seed=11)
    assert a.shape == (7, 12, 12, 1) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, m.sample(1, 7, seed=12))


def test_sampling_is_a_fixed_sequence(trained):
    m = trained[0]
    long, short = m.sample(5, 130, seed=3), m.sample(5, 17, seed=3)
    assert np.array_equal(long[:17], short)


def test_sampling_several_chunks_per_call_keeps_each_chunks_noise(trained, monkeypatch):
    # A GPU samples several chunks in one network call; every chunk must keep its own noise stream,
    # so the images are those of one chunk per call, up to float rounding across batch sizes.
    m = trained[0]
    one = m.sample(2, 250, seed=4)
    monkeypatch.setattr(base, "chunks_per_call", lambda device, shape: 2)
    two = m.sample(2, 250, seed=4)
    assert one.shape == two.shape == (250, 12, 12, 1)
    assert np.abs(one.astype(int) - two).max() <= 2
    assert np.abs(one.astype(int) - m.sample(2, 250, seed=5)).mean() > 10 * np.abs(one.astype(int) - two).mean() + 1


def test_batch_indices_drawn_in_blocks_are_the_per_step_draws():
    a, b = np.random.default_rng(7), np.random.default_rng(7)
    blocks = list(tensors.index_blocks(a, 1000, 16, tensors.INDEX_BLOCK + 3, torch.device("cpu")))
    assert len(blocks) == tensors.INDEX_BLOCK + 3
    assert all(np.array_equal(blk.numpy(), b.integers(0, 1000, 16)) for blk in blocks)


@pytest.mark.parametrize("kind", ["diffusion", "cvae"])
def test_training_reads_no_value_back_from_the_device_per_step(kind, device_reads):
    # A GPU waits for every value read back to the host: fit may do so for the progress bar and once
    # at the end, never every step.
    rng = np.random.default_rng(0)
    m = tiny(kind)
    m.train_cfg["budget_images"] = 16 * 30
    m.fit(rng.integers(0, 256, (40, 12, 12, 1), dtype=np.uint8), np.array([0, 1] * 20))
    assert len(device_reads) <= 1


def test_device_reads_counts_fedfactorys_reads_wherever_torch_lies(device_reads):
    # Told by the reading function's module, not its file: torch in a virtual environment inside a
    # folder named fedfactory once counted Adam's per-parameter `step.item()` (a host scalar) as ours.
    def defined_in(module, path):
        ns = {"__name__": module}
        exec(compile("def read(t):\n    return t.item(), float(t), int(t), bool(t), t.tolist()", path, "exec"), ns)
        return ns["read"]

    one = torch.ones(())
    defined_in("torch.optim.optimizer", "/home/u/fedfactory/.venv/lib/torch/optim/optimizer.py")(one)
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(net.parameters())
    net(torch.ones(1, 2)).sum().backward()
    opt.step()
    assert device_reads == []
    defined_in("fedfactory.probe", "/elsewhere/probe.py")(one)
    assert device_reads == ["item", "__float__", "__int__", "__bool__", "tolist"]


@pytest.mark.parametrize("kind", ["diffusion", "cvae"])
def test_training_twice_with_one_seed_is_bit_identical(trained, kind):
    _, _, x, y = trained
    a, b = tiny(kind, seed=4).fit(x, y), tiny(kind, seed=4).fit(x, y)
    c = tiny(kind, seed=5).fit(x, y)
    sa, sb, sc = a.net.state_dict(), b.net.state_dict(), c.net.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("kind", ["diffusion", "cvae"])
def test_fit_records_its_loss_curve_at_the_site_not_in_the_manifest(trained, kind):
    _, _, x, y = trained
    m = tiny(kind).fit(x, y)  # 64 images in batches of 16: 4 steps, a point each
    assert [p["step"] for p in m.curve] == [1, 2, 3, 4] and [p["images_seen"] for p in m.curve] == [16, 32, 48, 64]
    assert all(math.isfinite(p["loss"]) and p["loss"] > 0 for p in m.curve)
    assert "curve" not in json.dumps(m.to_bytes()[1])  # what travels: the manifest carries no curve


def test_a_loss_curve_has_100_to_200_points_ending_at_the_last_step():
    for steps in (7, 199, 200, 250, 1000, 12345):
        curve = utils.LossCurve(steps, batch=8)
        for step in range(steps):
            curve.add(step, None if step == 3 else torch.tensor(float(step)))  # step 3: a DP step of noise alone
        last, points = curve.read(torch.tensor(-1.0))
        assert last == -1.0 and points[-1]["step"] == steps and points[-1]["images_seen"] == 8 * steps
        assert len(points) == steps - 1 if steps < 200 else 100 <= len(points) <= 200, steps  # step 3 made none
        every = points[1]["step"] - points[0]["step"]
        end = points[2]["step"]
        assert points[2]["loss"] == sum(range(end - every, end)) / every  # the mean over its steps


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_flipped_byte_is_refused(trained, tmp_path):
    path = _copy(trained[1], tmp_path / "m")
    data = bytearray((path / "module.safetensors").read_bytes())
    data[-5] ^= 0x01
    (path / "module.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModuleFileError, match="module.safetensors.*does not match.*altered or truncated"):
        load_module(path)


def test_truncated_file_is_refused(trained, tmp_path):
    path = _copy(trained[1], tmp_path / "m")
    data = (path / "module.safetensors").read_bytes()
    (path / "module.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModuleFileError, match="altered or truncated"):
        load_module(path)


def _edit_manifest(path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_wrong_shape_in_manifest_is_refused(trained, tmp_path):
    path = _copy(trained[1], tmp_path / "m")
    _edit_manifest(path, lambda m: m["arch"].update(channels=16))
    with pytest.raises(ModuleFileError, match="has shape .* the declared architecture needs"):
        load_module(path)
    path2 = _copy(trained[1], tmp_path / "m2")
    _edit_manifest(path2, lambda m: m.update(classes=[1, 2, 3], counts=[1, 1, 1]))
    with pytest.raises(ModuleFileError, match="declared architecture"):
        load_module(path2)


@pytest.mark.parametrize("patch", [1, 2, 3])
def test_a_patch_stem_keeps_any_image_size_and_travels_in_the_manifest(tmp_path, patch):
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, 256, (24, 13, 11, 3), dtype=np.uint8), np.arange(24) % 2
    m = DiffusionModule({**TINY_ARCH, "patch": patch}, TINY_TRAIN, progress=False).fit(x, y)
    assert m.net.conv_in.in_channels == 3 * patch**2  # the stem sees patch x patch pixels as one position
    m.save(tmp_path / "m")
    loaded = load_module(tmp_path / "m")
    assert loaded.arch["patch"] == patch and np.array_equal(loaded.sample(1, 3, seed=0), m.sample(1, 3, seed=0))
    assert m.sample(0, 3, seed=0).shape == (3, 13, 11, 3)
    _edit_manifest(tmp_path / "m", lambda mf: mf["arch"].update(patch=9))
    with pytest.raises(ModuleFileError, match="patch"):
        load_module(tmp_path / "m")


def test_unknown_format_version_and_kind_are_refused(trained, tmp_path):
    path = _copy(trained[1], tmp_path / "m")
    _edit_manifest(path, lambda m: m.update(format_version=99))
    with pytest.raises(ModuleFileError, match="unknown format version 99"):
        load_module(path)
    path2 = _copy(trained[1], tmp_path / "m2")
    _edit_manifest(path2, lambda m: m.update(kind="gan"))
    with pytest.raises(ModuleFileError, match="unknown module kind 'gan'"):
        load_module(path2)
    with pytest.raises(ModuleFileError, match="not found"):
        load_module(tmp_path / "absent")


def test_sample_errors(trained):
    with pytest.raises(FedFactoryError, match="does not cover class 3"):
        trained[0].sample(3, 1, seed=0)
    with pytest.raises(FedFactoryError, match="not trained"):
        tiny().sample(0, 1, seed=0)


def test_heun_sampler_converges_for_a_gaussian():
    # Data ~ N(0, s^2): the ideal denoiser is x s^2 / (s^2 + sigma^2) and the probability-flow ODE
    # maps x_T = 80 to exactly 80 s / sqrt(s^2 + 80^2); Heun's error must shrink with more steps.
    s = 0.5
    D = lambda x, sigma: x * s**2 / (s**2 + sigma**2)  # noqa: E731
    exact = 80 * s / (s**2 + 80**2) ** 0.5
    errors = [abs(heun_sampler(D, torch.ones(1, 1, 1, 1), steps=n).item() - exact) for n in (10, 18, 50, 200)]
    assert errors == sorted(errors, reverse=True)
    assert errors[2] < 0.01 and errors[3] < 0.001


def test_heun_sampler_stops_at_sigma_min_with_the_denoised_image():
    # Stopping at sigma_min returns the posterior mean D(x(sigma_min); sigma_min), which for
    # N(0, s^2) data is the exact ODE point x(sigma_min) = 80 sqrt(s^2 + sigma_min^2) / sqrt(s^2 + 80^2)
    # shrunk by s^2 / (s^2 + sigma_min^2); and no network call goes below sigma_min.
    s, sigma_min, calls = 0.5, 0.2, []

    def D(x, sigma):
        calls.append(float(sigma))
        return x * s**2 / (s**2 + sigma**2)

    out = heun_sampler(D, torch.ones(1, 1, 1, 1), steps=200, sigma_min=sigma_min).item()
    exact = 80 * s**2 / ((s**2 + sigma_min**2) ** 0.5 * (s**2 + 80**2) ** 0.5)
    assert abs(out - exact) < 1e-3
    assert len(calls) == 2 * 200 - 1 and min(calls) == pytest.approx(sigma_min) and max(calls) == pytest.approx(80)


@pytest.mark.parametrize("p_mean, p_std", [(-1.2, 1.2), (-0.4, 0.8)])
def test_training_noise_levels_follow_p_mean_and_p_std(p_mean, p_std):
    seen = []

    def net(x, c_noise, labels):  # c_noise = ln(sigma) / 4
        seen.append(4 * c_noise)
        return torch.zeros_like(x)

    edm_loss(net, torch.zeros(20_000, 1, 1, 1), torch.zeros(20_000, dtype=torch.long), torch.Generator().manual_seed(0),
             p_mean, p_std)
    log_sigma = torch.cat(seen)
    assert abs(log_sigma.mean() - p_mean) < 0.03 and abs(log_sigma.std() - p_std) < 0.03


def test_presets_sizes():
    def params(preset, res, ch):
        m = DiffusionModule(preset=preset, progress=False)
        m.classes, m.counts, m.image_shape = [0], [1], (res, res, ch)
        return sum(p.numel() for p in m.build_network().parameters())

    assert params("cpu", 28, 1) < 2_000_000
    assert 5_000_000 < params("gpu", 32, 3) < 15_000_000
    assert params("paper", 32, 3) > 30_000_000


def test_both_samplers_solve_the_ode_of_gaussian_data():
    """For data ~ N(0, s^2) the ideal denoiser is D(x; sigma) = x s^2 / (sigma^2 + s^2) and the ODE's
    solution is known: x(sigma) = x(sigma_max) sqrt((sigma^2 + s^2) / (sigma_max^2 + s^2)). Both
    samplers converge to it; at the same number of network calls DPM-Solver++(2M) is the closer."""
    from fedfactory.modules.diffusion import SIGMA_MAX, dpm_solver_2m, heun_sampler

    s, sigma_min = 0.5, 0.2
    z = torch.randn(1000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    D = lambda x, sigma: x * s**2 / (sigma**2 + s**2)  # noqa: E731
    x_min = z.double() * SIGMA_MAX * math.sqrt((sigma_min**2 + s**2) / (SIGMA_MAX**2 + s**2))
    exact = D(x_min, sigma_min).float()

    def err(x):
        return float((x - exact).abs().max() / exact.abs().max())

    assert err(heun_sampler(D, z, 200, sigma_min)) < 1e-3 and err(dpm_solver_2m(D, z, 100, sigma_min)) < 1e-3
    assert err(heun_sampler(D, z, 100, sigma_min)) < err(heun_sampler(D, z, 50, sigma_min)) / 3  # 2nd order
    assert err(dpm_solver_2m(D, z, 19, sigma_min)) < err(heun_sampler(D, z, 10, sigma_min))  # 19 calls each


def test_the_sampler_is_a_setting_of_the_module_and_checked_on_receipt(tmp_path, toy_images):
    from fedfactory.modules.limits import Limits

    x, y = toy_images
    m = DiffusionModule(TINY_ARCH, {**TINY_TRAIN, "sampler": "dpm2m", "sample_steps": 4}, progress=False).fit(x, y)
    heun = copy.deepcopy(m)
    heun.train_cfg["sampler"] = "heun"
    assert not np.array_equal(m.sample(0, 8, seed=1), heun.sample(0, 8, seed=1))
    m.save(tmp_path / "m")
    assert load_module(tmp_path / "m").train_cfg["sampler"] == "dpm2m"
    manifest = json.loads((tmp_path / "m/manifest.json").read_text())
    manifest["training"]["sampler"] = "../../etc"
    (tmp_path / "m/manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModuleFileError, match="sampler"):
        load_module(tmp_path / "m", limits=Limits())
