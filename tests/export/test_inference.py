"""spnet_dist.export.inference: load_model / timm loading of an export, without DeepSpeed, never unpickling; timm registration."""
import json
import subprocess
import sys

import pytest
import timm
import torch

import spnet_dist
from spnet_dist.config import Config
from spnet_dist.device_audit import HostSyncCounter
from spnet_dist.execution import SkippingBlock, execution_plan, set_execution
from spnet_dist.export import export_module
from spnet_dist.export.inference import ExportError, load_model
from spnet_dist.models import MODEL_NAMES, create_model

from ..models.test_resnet import _mixed_routers


def _cfg(name="spnet_cifar_resnet20", size=32):
    cfg = Config()
    cfg.model.name, cfg.model.num_classes = name, 10
    cfg.data.format, cfg.data.image_size = "cifar", size
    return cfg


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A CIFAR ResNet-20 with routers that open for part of the batch, exported; plus inputs."""
    torch.manual_seed(0)
    model = create_model("spnet_cifar_resnet20", block_align=True)
    x = torch.randn(12, 3, 32, 32)
    _mixed_routers(model, x)
    out = export_module(model, _cfg(), tmp_path_factory.mktemp("exp") / "export")
    set_execution(model, "masked")
    with torch.no_grad():
        reference = model(x)
    return out, x, reference


def test_load_model_gives_the_masked_logits_by_skipping(exported):
    out, x, reference = exported
    decisions = reference.gate_decisions
    assert (decisions.sum(0) % decisions.shape[0] != 0).any(), "some block must be open for only part of the batch"
    model = load_model(out)
    assert not model.training and model.aux_heads is None and model.block_aligners is None
    assert execution_plan(model).mode == "skip" and all(isinstance(b, SkippingBlock) for b in model.gated_blocks())
    with torch.no_grad():
        got = model(x)
    assert torch.equal(got.gate_decisions, decisions)
    assert (got.logits - reference.logits).abs().max().item() < 1e-5
    as_trained = load_model(out, execution="masked", channels_last=False, optimize=False)
    with torch.no_grad():
        assert torch.equal(as_trained(x).logits, reference.logits)


def test_timm_pretrained_file_gives_the_same_model(exported):
    out, x, reference = exported
    model = timm.create_model("spnet_cifar_resnet20", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))).eval()
    with torch.no_grad():
        got = model(x)
    assert execution_plan(model).mode == "skip" and all(isinstance(b, SkippingBlock) for b in model.gated_blocks())
    assert (got.logits - reference.logits).abs().max().item() < 1e-5
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    with pytest.raises(ExportError, match="spnet_cifar_resnet20"):
        timm.create_model("spnet_cifar_resnet32", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")))


def test_fresh_process_never_imports_deepspeed(exported):
    out, x, reference = exported
    code = (
        "import sys, torch, spnet_dist\n"
        f"m = spnet_dist.load_model({str(out)!r})\n"
        "m(torch.zeros(2, 3, 32, 32))\n"
        "assert 'deepspeed' not in sys.modules, 'deepspeed was imported'\n"
        "print('NO-DEEPSPEED')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "NO-DEEPSPEED" in done.stdout


def test_corrupted_or_missing_files_are_one_line_errors(exported, tmp_path):
    out, _, _ = exported
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((out / "config.json").read_text())
    data = (out / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match=r"broken/model.safetensors: corrupted") as err:
        load_model(broken)
    assert "\n" not in str(err.value)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ExportError, match=r"broken/model.safetensors: not found"):
        load_model(broken)
    (broken / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ExportError, match=r"broken/config.json: not an spnet-dist export"):
        load_model(broken)
    with pytest.raises(ExportError, match=r"nowhere/config.json: not found"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="execution"):
        load_model(out, execution="dense")


def test_weights_of_another_architecture_are_refused(exported, tmp_path):
    out, _, _ = exported
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((out / "config.json").read_text())
    config["architecture"]["name"] = "spnet_cifar_resnet32"
    (other / "config.json").write_text(json.dumps(config))
    (other / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    with pytest.raises(ExportError, match=r"other/model.safetensors: weights do not fit .*missing 126 .*layer1.3"):
        load_model(other)


def test_export_module_never_overwrites(exported):
    out, _, _ = exported
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(ExportError, match="already exists"):
        export_module(create_model("spnet_cifar_resnet20"), _cfg(), out)
    assert (out / "model.safetensors").read_bytes() == before
    assert not list(out.parent.glob(".*tmp*"))


def test_load_model_is_exported_from_the_package():
    assert spnet_dist.load_model is load_model


def _with_measured_rates(out, tmp_path, rates):
    """A copy of the export whose config.json carries ``measured.exec_rates`` (as spnet-export writes them)."""
    copy = tmp_path / "measured"
    copy.mkdir()
    config = json.loads((out / "config.json").read_text())
    config["measured"] = {"exec_rates": rates, "source": "test"}
    (copy / "config.json").write_text(json.dumps(config))
    (copy / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    return copy


def test_load_model_sets_capacities_from_the_measured_rates(exported, tmp_path):
    out, x, reference = exported
    plain = load_model(out)
    assert execution_plan(plain).skip_strategy == "auto"  # gather on CPU, capacity on CUDA
    assert plain.skip_capacities(32, "cuda") == [32] * plain.num_blocks  # no measurement: rate 1, C = B
    rates = (reference.gate_decisions.mean(0) * 0.5 + 0.25).tolist()  # 9 rates, not the batch's own
    measured = _with_measured_rates(out, tmp_path, rates)
    for model, strategy in ((load_model(measured, skip_strategy="capacity"), "capacity"),
                            (timm.create_model("spnet_cifar_resnet20", pretrained=True,
                                               pretrained_cfg_overlay=dict(file=str(measured / "model.safetensors"))),
                             "auto")):
        assert list(execution_plan(model).capacity_rates) == rates
        assert execution_plan(model).skip_strategy == strategy
    # the trainer's models skip by gathering
    assert execution_plan(set_execution(create_model("spnet_cifar_resnet20"), "skip")).skip_strategy == "gather"
    model = load_model(measured, skip_strategy="capacity")
    model.set_skip_capacity(rates=reference.gate_decisions.mean(0).tolist(), margin=0.5, multiple=1)
    with torch.no_grad(), HostSyncCounter(patch_accelerator=False) as syncs:
        got = model(x)
    assert dict(syncs.counts) == {"bool": 1}  # capacity forward, no overflow
    assert torch.equal(got.gate_decisions, reference.gate_decisions)
    assert (got.logits - reference.logits).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="skip_strategy"):
        load_model(out, skip_strategy="bucketed")
    (measured / "config.json").write_text(
        json.dumps({**json.loads((measured / "config.json").read_text()), "measured": {"exec_rates": rates[:-1]}}))
    with pytest.raises(ExportError, match=r"measured/config.json: measured.exec_rates must be 9 execution rates"):
        load_model(measured)


def test_exported_models_run_large_early_stages_per_image_on_the_cpu(exported):
    out, x, reference = exported
    timm_model = timm.create_model("spnet_cifar_resnet20", pretrained=True,
                                   pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")))
    for model in (load_model(out), timm_model):
        assert execution_plan(model).per_image_stages == "auto"
    # the trainer's models keep whole batches
    assert execution_plan(set_execution(create_model("spnet_cifar_resnet20"), "skip")).per_image_stages == "off"
    model = load_model(out, per_image_stages="off")
    assert execution_plan(model).per_image_stages == "off"
    model = load_model(out)
    model.set_per_image_stages("auto", min_bytes=0)  # 32 px CIFAR images are far below 1 MiB: force it
    with torch.no_grad():
        got = model(x)
    assert torch.equal(got.gate_decisions, reference.gate_decisions)
    assert (got.logits - reference.logits).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="per_image_stages"):
        load_model(out / "nonexistent", per_image_stages="always")  # checked before any file is read


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


def test_pretrained_hub_weights_are_refused():
    with pytest.raises(ValueError, match="torchvision_weights"):
        timm.create_model("spnet_resnet50", pretrained=True)
