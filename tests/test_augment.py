import torch

from fedfactory.classify.augment import augment, random_blur


def _hf(x):  # mean absolute Laplacian: high-frequency energy
    return (4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]).abs().mean()


def test_blur_smooths_keeps_brightness_and_is_seeded():
    x = torch.rand(16, 3, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = random_blur(x, 1.5, torch.Generator().manual_seed(1))
    assert y.shape == x.shape
    assert _hf(y) < 0.6 * _hf(x)
    assert torch.allclose(y.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=0.02)
    assert torch.equal(y, random_blur(x, 1.5, torch.Generator().manual_seed(1)))
    # each image draws its own sigma: the images are not blurred alike
    per_image = torch.stack([_hf(y[i]) / _hf(x[i]) for i in range(16)])
    assert per_image.max() - per_image.min() > 0.1


def test_augment_without_blur_is_unchanged_by_the_option():
    x = torch.rand(8, 1, 28, 28)
    a = augment(x, "natural", torch.Generator().manual_seed(3))
    b = augment(x, "natural", torch.Generator().manual_seed(3), blur=0.0)
    assert torch.equal(a, b)
