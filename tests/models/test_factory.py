"""Model names and create_model (models/factory.py); the timm entrypoints are tested in tests/test_inference.py."""
import pytest
import timm
import torch

from spnet_dist.models import GatedCifarResNet, GatedImageNetResNet, create_model


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="spnet_resnet50.*spnet_cifar_resnet110"):
        create_model("spnet_resnet18")


@pytest.mark.parametrize("kwargs, field", [({"num_classes": 0}, "model.num_classes"), ({"router_dropout": 1.0}, "model.router_dropout")])
def test_bad_model_options(kwargs, field):
    with pytest.raises(ValueError, match=field):
        create_model("spnet_cifar_resnet20", **kwargs)


def test_forward_features_and_head_like_timm():
    model = create_model("spnet_cifar_resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 64, 8, 8)
    torch.testing.assert_close(model.forward_head(feats), model(x).logits)


def test_create_model_needs_no_timm_registry(monkeypatch):
    monkeypatch.setattr(timm.models._registry, "_model_entrypoints", {})  # nothing registered with timm
    assert not timm.is_model("spnet_resnet50")
    cifar = create_model("spnet_cifar_resnet56", aux_heads=False)
    assert type(cifar) is GatedCifarResNet and cifar.fc.out_features == 10  # the CIFAR default
    imagenet = create_model("spnet_resnet101")
    assert type(imagenet) is GatedImageNetResNet and imagenet.fc.out_features == 1000 and imagenet.num_blocks == 33
