import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from spnet_dist.data.transforms import (
    AUGMENTS, CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, build_transform, resolve_augment,
)


@pytest.mark.parametrize("augment", AUGMENTS)
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_every_recipe_gives_square_3_channel_float(augment, train, mode):
    image = Image.new(mode, (20, 24))  # non-square on purpose
    out = build_transform(augment, 16, train)(image)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32


@pytest.mark.parametrize("augment,mean,std", [
    ("imagenet", IMAGENET_MEAN, IMAGENET_STD),
    ("cifar", CIFAR_MEAN, CIFAR_STD),
    ("digits", (0.5,) * 3, (0.5,) * 3),
    ("none", (0.5,) * 3, (0.5,) * 3),
])
def test_normalisation_constants(augment, mean, std):
    # A constant image survives any crop/resize unchanged, so the output is exactly
    # (value - mean) / std per channel. Eval mode: no padding or affine fill at the borders.
    rgb = (51, 102, 204)
    out = build_transform(augment, 8, train=False)(Image.new("RGB", (12, 12), rgb))
    expected = torch.tensor([(v / 255 - m) / s for v, m, s in zip(rgb, mean, std)])
    torch.testing.assert_close(out.mean(dim=(1, 2)), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=(1, 2)), torch.zeros(3), atol=1e-5, rtol=0)


def test_imagenet_eval_is_resize_then_center_crop_at_0875():
    ops = build_transform("imagenet", 224, train=False).transforms
    resize = next(t for t in ops if isinstance(t, T.Resize))
    crop = next(t for t in ops if isinstance(t, T.CenterCrop))
    assert resize.size == 256 and tuple(crop.size) == (224, 224)


def test_cifar_train_pads_by_an_eighth_and_flips():
    ops = build_transform("cifar", 32, train=True).transforms
    crop = next(t for t in ops if isinstance(t, T.RandomCrop))
    assert crop.padding == 4
    assert any(isinstance(t, T.RandomHorizontalFlip) for t in ops)


def test_digits_are_never_flipped():
    for train in (True, False):
        ops = build_transform("digits", 16, train).transforms
        assert not any(isinstance(t, (T.RandomHorizontalFlip, T.RandomVerticalFlip)) for t in ops)
    assert any(isinstance(t, T.RandomAffine) for t in build_transform("digits", 16, True).transforms)


def test_train_is_random_eval_is_deterministic():
    image = Image.effect_noise((20, 24), 60).convert("RGB")
    train, evaluate = build_transform("imagenet", 16, True), build_transform("imagenet", 16, False)
    torch.manual_seed(0)
    assert not torch.equal(train(image), train(image))
    assert torch.equal(evaluate(image), evaluate(image))


def test_resolve_augment():
    assert resolve_augment("auto", "imagefolder") == "imagenet"
    assert resolve_augment("auto", "cifar") == "cifar"
    assert resolve_augment("auto", "digits") == "digits"
    assert resolve_augment("none", "cifar") == "none"


def test_bad_augment_names_the_config_field():
    with pytest.raises(ValueError, match=r"data\.augment.*'fancy'"):
        resolve_augment("fancy", "imagefolder")
    with pytest.raises(ValueError, match=r"data\.augment"):
        build_transform("fancy", 32, True)
    with pytest.raises(ValueError, match=r"data\.augment"):
        build_transform("auto", 32, True)  # must be resolved first
    with pytest.raises(ValueError, match=r"data\.format"):
        resolve_augment("auto", "lmdb")
