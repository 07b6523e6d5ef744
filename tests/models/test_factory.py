import pytest
import timm
import torch

import spnet_dist  # noqa: F401  (registers the models with timm)
from spnet_dist.models import MODEL_NAMES, create_model


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if "cifar" in n])
def test_timm_create_model_cifar(name):
    model = timm.create_model(name, num_classes=100)
    assert model.fc.out_features == 100
    depth = int(name.rsplit("resnet", 1)[1])
    assert model.num_blocks == 3 * (depth - 2) // 6


def test_timm_create_model_imagenet():
    model = timm.create_model("spnet_resnet101")
    assert model.num_blocks == 33 and model.fc.out_features == 1000
    assert "spnet_resnet50" in timm.list_models("spnet_*")


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="spnet_resnet50.*spnet_cifar_resnet110"):
        create_model("spnet_resnet18")


def test_pretrained_hub_weights_are_refused():
    with pytest.raises(ValueError, match="torchvision_weights"):
        timm.create_model("spnet_resnet50", pretrained=True)


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
