"""DP-SGD module training (privacy/dp.py, GenerativeModule.fit with `dp`): per-sample clipping,
noise, accounting, the manifest's claim, and repeatability. Tiny networks at 12 x 12 px."""

import json
import math

import numpy as np
import pytest
import torch

from fedfactory.errors import FedFactoryError
from fedfactory.modules import ModuleFileError, load_module
from fedfactory.modules.cvae import CVAEModule
from fedfactory.modules.diffusion import DiffusionModule
from fedfactory.privacy.dp import DP_FIELDS, conv_grad_sample, make_private, per_image_grads, plan, spent_epsilon

# Opacus's backward hooks warn that the network's inputs need no gradient (dp.py silences it
# outside pytest, which resets warning filters per test); its RDP analysis warns on its alpha range.
pytestmark = [pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
              pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning")]

# Attention at 6 px (one head of 16 channels): its output projection is the convolution whose
# input is a transposed view, the case Opacus's unfold got wrong.
ARCH = {"channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [6]}
CVAE_ARCH = {"channels": 8, "latent": 4}
DP = {"epsilon": 0.0, "noise_multiplier": 1.0, "delta": 0.0, "max_grad_norm": 1.0, "accountant": "rdp",
      "noise_multiplicity": 1}


def data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 12, 12, 1), dtype=np.uint8), np.arange(n) % 3


def dp_module(kind="diffusion", seed=0, train=None, **dp):
    cls, arch = (DiffusionModule, ARCH) if kind == "diffusion" else (CVAEModule, CVAE_ARCH)
    return cls(arch, {"budget_images": 48, "batch_size": 8, "sample_steps": 3, **(train or {})}, client_id="site-a",
               seed=seed, bf16="off", progress=False, dp={**DP, **dp})


def private_net(kind="diffusion", clip=1.0, sigma=1.0, noise_seed=0, batch=8):
    """A module's network with random weights everywhere (no zero-initialised layer hides a
    gradient), wrapped for DP-SGD: per-sample hooks and a DPOptimizer."""
    m = dp_module(kind)
    m.classes, m.image_shape = [0, 1, 2], (12, 12, 1)
    torch.manual_seed(0)
    net = m.build_network()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    hooks, dpopt = make_private(net, opt, {"noise_multiplier": sigma, "max_grad_norm": clip, "batch": batch},
                                torch.Generator().manual_seed(noise_seed))
    return m, net, hooks, dpopt


def backward(m, net, dpopt, x, y, k=1):
    """One batch's per-image gradients (the loss's random draws fixed by a seed)."""
    dpopt.zero_grad(set_to_none=True)
    if k > 1:
        x, y = x.repeat_interleave(k, 0), y.repeat_interleave(k, 0)
    m.loss(net, x, y, torch.Generator().manual_seed(1)).backward()


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 1, 12, 12), generator=g) * 2 - 1, torch.arange(n) % 3


@pytest.mark.parametrize("kind", ["diffusion", "cvae"])
def test_per_sample_gradients_are_each_images_own(kind):
    m, net, _, dpopt = private_net(kind)
    x, y = batch()
    backward(m, net, dpopt, x, y)
    per_image = flat(p.grad_sample.reshape(len(x), -1).T for p in dpopt.params).reshape(-1, len(x))
    # the loss is a batch mean: the mean of the per-image gradients is the ordinary gradient ...
    assert torch.allclose(per_image.mean(1), flat(p.grad for p in dpopt.params), rtol=1e-4, atol=1e-6)
    # ... and image 0's gradient does not move when another image changes (same random draws)
    x2 = x.clone()
    x2[5] = -x2[5]
    backward(m, net, dpopt, x2, y)
    other = flat(p.grad_sample.reshape(len(x), -1).T for p in dpopt.params).reshape(-1, len(x))
    assert torch.allclose(per_image[:, 0], other[:, 0], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(per_image[:, 5], other[:, 5], rtol=1e-2)


@pytest.mark.parametrize("stride,padding,transposed", [(1, 1, False), (2, 1, False), (1, 0, True)])
def test_grouped_conv_per_image_gradients_match_the_definition(stride, padding, transposed):
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    layer = torch.nn.Conv2d(3, 4, 3, stride, padding)
    x = torch.randn(5, 3, 9, 9)
    if transposed:  # a view that is not contiguous, as the attention's output projection gets
        x = torch.randn(5, 3, 9, 9).transpose(2, 3)
    out = layer(x)
    g = torch.randn_like(out)
    ours = conv_grad_sample(layer, [x], g)

    def one(params, xi, gi):  # image i's own gradient, by definition
        return (functional_call(layer, params, (xi[None],)) * gi[None]).sum()

    ref = vmap(grad(one), in_dims=(None, 0, 0))(dict(layer.named_parameters()), x, g)
    assert torch.allclose(ours[layer.weight], ref["weight"], atol=1e-5)
    assert torch.allclose(ours[layer.bias], ref["bias"], atol=1e-5)


def test_clipping_bounds_one_images_influence():
    clip = 0.01
    m, net, _, dpopt = private_net(clip=clip)
    x, y = batch()

    def summed(x):  # the clipped per-image gradients' sum, before noise; and the plain gradient
        backward(m, net, dpopt, x, y)
        plain = flat(p.grad for p in dpopt.params).clone()
        per_image_grads(dpopt.params, len(x), 1)
        dpopt.clip_and_accumulate()
        return flat(p.summed_grad for p in dpopt.params).clone(), plain

    a, plain_a = summed(x)
    wild = x.clone()
    wild[0] = wild[0] * 1000.0  # one image's pixels, far out of range
    b, plain_b = summed(wild)
    assert (plain_a - plain_b).norm() > 100 * clip     # unclipped, that image moves the gradient a lot
    assert (a - b).norm() <= 2 * clip * (1 + 1e-4)     # clipped, by at most 2 C
    assert a.norm() <= len(x) * clip * (1 + 1e-4)


def test_noise_is_added_and_seeded():
    sigma, clip, b = 50.0, 1.0, 8
    grads = []
    for noise_seed in (0, 0, 1):
        m, net, _, dpopt = private_net(clip=clip, sigma=sigma, noise_seed=noise_seed, batch=b)
        backward(m, net, dpopt, *batch())
        per_image_grads(dpopt.params, 8, 1)
        dpopt.pre_step()  # clip, add N(0, (sigma C)^2), divide by the expected batch
        grads.append(flat(p.grad for p in dpopt.params) * b)
    d = grads[0].numel()
    assert torch.equal(grads[0], grads[1]) and not torch.allclose(grads[0], grads[2])
    # the noise dominates the clipped sum (norm <= 8 C): the norm is about sigma C sqrt(d)
    assert abs(grads[0].norm().item() / (sigma * clip * math.sqrt(d)) - 1) < 0.05


def test_noise_multiplicity_averages_each_images_rows():
    m, net, _, dpopt = private_net()
    x, y = batch(4)
    backward(m, net, dpopt, x, y, k=3)
    rows = [p.grad_sample.clone() for p in dpopt.params]
    per_image_grads(dpopt.params, 4, 3)
    for p, r in zip(dpopt.params, rows):
        assert p.grad_sample.shape == (4, *p.shape)  # one gradient per image: that is what is clipped
        assert torch.allclose(p.grad_sample, r.reshape(4, 3, *p.shape).mean(1))


@pytest.mark.parametrize("accountant,target", [("rdp", 10.0), ("rdp", 1.0), ("prv", 1.0)])
def test_accountant_meets_the_target(accountant, target):
    n = 5400
    p = plan({**DP, "epsilon": target, "noise_multiplier": 0.0, "accountant": accountant}, n, 64, 36_000)
    assert p["steps"] == math.ceil(36_000 / 64) and p["sample_rate"] == 64 / n
    assert p["delta"] == 1 / (10 * n) < 1 / n
    assert 0.9 * target < p["epsilon"] <= target
    assert p["epsilon"] == spent_epsilon(p["noise_multiplier"], p["sample_rate"], p["steps"], p["delta"], accountant)
    # more noise spends less; a set noise multiplier that overspends a target is refused
    assert spent_epsilon(2 * p["noise_multiplier"], p["sample_rate"], p["steps"], p["delta"], accountant) < target
    with pytest.raises(FedFactoryError, match="more than privacy.epsilon"):
        plan({**DP, "epsilon": target, "noise_multiplier": p["noise_multiplier"] / 2, "accountant": accountant},
             n, 64, 36_000)


def test_plan_refuses_what_it_cannot_claim():
    for bad in ({"epsilon": 0.0, "noise_multiplier": 0.0}, {"accountant": "gdp"}, {"noise_multiplicity": 0},
                {"max_grad_norm": 0.0}, {"delta": 1.0}):
        with pytest.raises(FedFactoryError):
            plan({**DP, **bad}, 100, 8, 80)
    p = plan(DP, 5, 8, 80)  # a batch larger than the site: every image, every step
    assert p["sample_rate"] == 1.0 and p["batch"] == 5 and p["steps"] == 16


@pytest.mark.parametrize("kind", ["diffusion", "cvae"])
def test_dp_module_round_trips_with_its_claim(tmp_path, kind):
    x, y = data()
    m = dp_module(kind, epsilon=10.0, noise_multiplier=0.0).fit(x, y)
    claim = m.privacy["dp"]
    assert set(DP_FIELDS) | {"noise_multiplicity", "covers"} <= set(claim)
    assert 0 < claim["epsilon"] <= 10.0 and claim["delta"] == 1 / 400 and claim["sample_rate"] == 8 / 40
    assert claim["steps"] == 6 and claim["accountant"] == "rdp" and "training images" in claim["covers"]
    m.save(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["privacy"]["dp"] == claim
    loaded = load_module(tmp_path / "m", bf16="off")
    assert loaded.privacy == {"dp": claim}
    assert np.array_equal(m.sample(1, 5, seed=3), loaded.sample(1, 5, seed=3))


@pytest.mark.parametrize("change", [{"drop": k} for k in DP_FIELDS] + [
    {"epsilon": -1.0}, {"epsilon": 0}, {"epsilon": 1e400}, {"delta": 1.5}, {"delta": 0}, {"sample_rate": 0},
    {"sample_rate": 2.0}, {"steps": 2.5}, {"steps": 0}, {"steps": True}, {"noise_multiplier": -1.0},
    {"max_grad_norm": "1"}, {"accountant": "gdp"}, {"noise_multiplicity": 0}])
def test_load_refuses_a_dp_claim_that_is_incomplete_or_false(tmp_path, change):
    x, y = data()
    dp_module().fit(x, y).save(tmp_path / "m")
    path = tmp_path / "m" / "manifest.json"
    manifest = json.loads(path.read_text())
    if "drop" in change:
        del manifest["privacy"]["dp"][change["drop"]]
    else:
        manifest["privacy"]["dp"].update(change)
    path.write_text(json.dumps(manifest))  # the weights' hash is not the manifest's: nothing else to redo
    with pytest.raises(ModuleFileError, match="privacy block"):
        load_module(tmp_path / "m")


@pytest.mark.parametrize("k", [1, 2])
def test_dp_noise_is_secret_and_repeatable_only_with_its_secret(k):
    # batch 1 of 40 images: q = 1/40, so about a third of the Poisson batches are empty
    x, y = data()
    train = {"batch_size": 1, "budget_images": 16}
    runs = [dp_module(train=train, noise_multiplicity=k, secret_seed=s).fit(x, y) for s in (5, 5, 6)]
    a, b, c = ([v.numpy().tobytes() for v in r.net.state_dict().values()] for r in runs)
    assert a == b and a != c
    # without a secret seed, the run seed in the manifest does not fix the noise: two runs differ
    d, e = (dp_module(train=train, noise_multiplicity=k).fit(x, y) for _ in range(2))
    assert [v.numpy().tobytes() for v in d.net.state_dict().values()] != [v.numpy().tobytes() for v in e.net.state_dict().values()]
    assert runs[0].privacy == runs[1].privacy and runs[0].privacy["dp"]["noise_multiplicity"] == k
    assert math.isfinite(runs[0].stats["final_loss"])


def test_without_dp_no_claim():
    x, y = data()
    m = DiffusionModule(ARCH, {"budget_images": 16, "batch_size": 8}, client_id="site-a", progress=False).fit(x, y)
    assert "dp" not in m.privacy and "privacy" not in m.manifest()


def test_resume_reuses_a_dp_module_only_under_the_same_privacy_settings(tmp_path):
    from fedfactory.config import load_config
    from fedfactory.runners.embedded import _reusable
    from fedfactory.site import new_module

    x, y = data()
    base = ["privacy.holdout=0", "runtime.progress=false", "module.channels=8", "module.channel_mult=[1]",
            "module.num_blocks=1", "module.budget_images=32", "module.batch_size=8", "privacy.accountant='rdp'"]
    cfg = load_config("configs/fashion-silos.toml", base + ["privacy.epsilon=10"])
    new_module(cfg, "client-0").fit(x, y).save(tmp_path / "m")
    assert _reusable(tmp_path / "m", cfg, y, "client-0") is not None
    for change in ("privacy.epsilon=1", "privacy.max_grad_norm=0.5", "privacy.noise_multiplicity=2", "privacy.epsilon=0"):
        other = load_config("configs/fashion-silos.toml", base + ["privacy.epsilon=10", change])
        assert _reusable(tmp_path / "m", other, y, "client-0") is None, change


def test_dp_takes_the_presets_dp_recipe_unless_the_config_sets_a_key():
    from fedfactory.config import load_config
    from fedfactory.site import new_module

    dp_train = DiffusionModule.presets["cpu"]["dp_train"]
    plain = new_module(load_config("configs/fashion-silos.toml", []), "client-0").train_cfg
    private = new_module(load_config("configs/fashion-silos.toml", ["privacy.epsilon=10"]), "client-0").train_cfg
    assert all(plain[k] != v for k, v in dp_train.items())  # the recipe is DP's alone
    assert {k: private[k] for k in dp_train} == dp_train
    assert {k: v for k, v in private.items() if k not in dp_train} == {k: v for k, v in plain.items() if k not in dp_train}
    mine = new_module(load_config("configs/fashion-silos.toml", ["privacy.epsilon=10", "module.batch_size=32"]),
                      "client-0").train_cfg
    assert mine["batch_size"] == 32 and mine["lr"] == dp_train["lr"]


def test_dp_is_a_trainer_handed_to_fit():
    """The DP-SGD trainer passed to fit gives the same bits and claim as a module built with `dp` settings
    and fitted without one (which asks the trainer privacy/ registers)."""
    from fedfactory.modules import Trainer
    from fedfactory.privacy import DPTrainer

    x, y = data()
    implicit = dp_module(secret_seed=7).fit(x, y)
    explicit = dp_module(secret_seed=7).fit(x, y, trainer=DPTrainer({**DP, "secret_seed": 7}))
    assert all(torch.equal(a, b) for a, b in zip(implicit.net.state_dict().values(), explicit.net.state_dict().values()))
    assert explicit.privacy["dp"] == implicit.privacy["dp"]
    assert "dp" not in explicit.fit(x, y, trainer=Trainer()).privacy  # a later plain fit drops the claim
