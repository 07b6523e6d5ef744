import pytest
import torch

from spnet_dist.flops import paper_units, profile_macs
from spnet_dist.models import create_model


@pytest.mark.parametrize(
    "name, size, expected_gmacs, tolerance",
    [
        ("spnet_resnet50", 224, 4.09, 0.015),  # torchvision's published figure
        ("spnet_resnet101", 224, 7.80, 0.015),
        ("spnet_cifar_resnet110", 32, 0.253, 0.02),
        ("spnet_cifar_resnet32", 32, 0.069, 0.03),
    ],
)
def test_static_macs_match_published_figures(name, size, expected_gmacs, tolerance):
    profile = profile_macs(create_model(name), (size, size))
    gmacs = profile.static(include_routers=False) / 1e9
    assert abs(gmacs - expected_gmacs) / expected_gmacs < tolerance
    # routers are reported separately and are a small overhead (< 0.5 % for these models)
    assert 0 < profile.router_total < 0.005 * profile.static(include_routers=False)


def test_dynamic_macs_follow_executed_blocks():
    model = create_model("spnet_cifar_resnet20")
    profile = profile_macs(model, (32, 32))
    n = model.num_blocks
    decisions = torch.zeros(3, n)
    decisions[1] = 1.0
    decisions[2, 0] = 1.0
    macs = profile.dynamic(decisions)
    assert macs[0].item() == profile.fixed
    assert macs[1].item() == profile.static()
    assert macs[2].item() == profile.fixed + profile.residual[0]
    counts = decisions.sum(0).long()
    assert profile.mean_from_counts(counts, 3) == pytest.approx(macs.mean().item(), rel=1e-12)


def test_all_closed_costs_stem_shortcut_router_and_head_only():
    profile = profile_macs(create_model("spnet_resnet50"), (224, 224))
    assert sum(s > 0 for s in profile.shortcut) == 4  # one projection per stage, always counted
    closed = profile.dynamic(torch.zeros(1, len(profile.residual))).item()
    assert closed == profile.stem + sum(profile.shortcut) + sum(profile.router) + profile.head
    assert closed < 0.15 * profile.static()


def test_paper_units_are_twice_macs():
    assert paper_units(0.253e9) == pytest.approx(0.506)


def test_profiling_leaves_model_state_alone():
    model = create_model("spnet_cifar_resnet20").train()
    model.set_gate_override(False)
    profile_macs(model, (32, 32))
    assert model.training
    assert all(b.router.force is False for b in model.gated_blocks())


def test_per_image_macs_add_no_host_sync_and_no_tensor_from_python_values(monkeypatch):
    # Issue 19 finding 7: spnet-eval built a device tensor from the Python tuple of residual MACs
    # (a blocking copy on CUDA) and read the batch's MACs with .tolist() at every batch.
    from spnet_dist.device_audit import HostSyncCounter
    from spnet_dist.flops import PerImageMacs

    model = create_model("spnet_cifar_resnet20")
    profile = profile_macs(model, (32, 32))
    batches = [torch.randint(0, 2, (4, model.num_blocks)).float() for _ in range(3)]
    per_image = PerImageMacs(profile)
    per_image.add(batches[0])  # the first batch may build the residual tensor of its device
    built, real_tensor = [], torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: built.append(a) or real_tensor(*a, **k))
    with HostSyncCounter(patch_accelerator=False) as syncs:
        for decisions in batches[1:]:
            per_image.add(decisions)
    assert syncs.total == 0 and built == []
    monkeypatch.undo()
    expected = torch.cat([profile.fixed + d.double() @ torch.tensor(profile.residual, dtype=torch.float64)
                          for d in batches]).tolist()
    assert per_image.values() == expected  # integer MACs, exact in float64
