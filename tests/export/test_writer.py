"""spnet-export end to end: DeepSpeed checkpoints (ZeRO 0/1/2, 1 and 2 ranks) -> model.safetensors +
config.json -> load_model / timm / torchvision, and the bad-input errors (one line, nothing written)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file

from spnet_dist import checkpoint as C
from spnet_dist import export
from spnet_dist.config import save_config, to_dict
from spnet_dist.execution import execution_plan, set_execution
from spnet_dist.export import ExportError
from spnet_dist.export.inference import load_model

from ..conftest import tiny_overrides
from ..dist_helpers import make_cfg
from ..models.test_resnet import _randomize_bn
from .conftest import DEMO, error_line as _error_line, export_cli as _export_cli, export_in_process

TRAINING_ONLY = ("aux_heads.", "block_aligners.")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_round_trip_two_ranks_zero2_fresh_process_without_deepspeed(zero2_run, zero2_export):
    code = (
        "import sys, json, torch, timm, spnet_dist\n"
        "from safetensors.torch import load_file\n"
        f"ref = load_file({str(zero2_run / 'eval_logits.safetensors')!r})\n"
        f"model = spnet_dist.load_model({str(zero2_export)!r})\n"
        "with torch.no_grad():\n"
        "    a = (model(ref['images']).logits - ref['logits']).abs().max().item()\n"
        f"t = timm.create_model('spnet_cifar_resnet20', pretrained=True, pretrained_cfg_overlay=dict(file={str(zero2_export / 'model.safetensors')!r})).eval()\n"
        "with torch.no_grad():\n"
        "    b = (t(ref['images']).logits - ref['logits']).abs().max().item()\n"
        f"cap = spnet_dist.load_model({str(zero2_export)!r}, skip_strategy='capacity')  # the CUDA default\n"
        "with torch.no_grad():\n"
        "    c = (cap(ref['images']).logits - ref['logits']).abs().max().item()\n"
        "print(json.dumps({'load_model': a, 'timm': b, 'capacity': c, 'deepspeed': 'deepspeed' in sys.modules}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print("round trip max |logit diff|:", result)
    assert result["deepspeed"] is False
    assert result["load_model"] < 1e-5 and result["timm"] < 1e-5 and result["capacity"] < 1e-5


@pytest.mark.slow
@pytest.mark.multiprocess
def test_export_holds_no_teacher_heads_or_optimizer_state(zero2_run, zero2_export, tmp_path):
    weights = load_file(str(zero2_export / "model.safetensors"))
    assert not any(k.startswith(TRAINING_ONLY) for k in weights)
    assert any(".router." in k for k in weights) and "fc.weight" in weights
    assert all(v.dtype in (torch.float32, torch.int64) for v in weights.values())
    config = json.loads((zero2_export / "config.json").read_text())
    record = json.loads((zero2_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert config["measured"]["exec_rates"] == record["exec_rates"] and config["measured"]["step"] == 8
    # the capacity skip strategy sizes each block from these rates
    assert list(execution_plan(load_model(zero2_export)).capacity_rates) == record["exec_rates"]
    assert config["classes"] == [str(i) for i in range(10)]
    assert config["run_config"]["engine"]["zero_stage"] == 2 and config["versions"]["torch"]
    # The student's consolidated weights, not the teacher's: they differ after 8 EMA steps.
    teacher = load_file(str(zero2_run / "checkpoints" / "final" / "teacher.safetensors"))
    assert not torch.equal(weights["layer1.0.conv1.weight"], teacher["layer1.0.conv1.weight"])
    out = tmp_path / "teacher"
    assert _export_cli("--run", zero2_run, "--tag", "latest", "--weights", "teacher", "--out", out).returncode == 0
    exported_teacher = load_file(str(out / "model.safetensors"))
    assert exported_teacher.keys() == weights.keys()
    for key, value in exported_teacher.items():
        assert torch.equal(value, teacher[key]), key
    print(f"demo export: {(zero2_export / 'model.safetensors').stat().st_size / 1e6:.2f} MB")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_bad_checkpoints_are_one_line_errors_and_write_nothing(zero2_run, zero2_export, tmp_path, capsys):
    """Each broken checkpoint through ``cli()`` in this process; the last case runs the real
    ``python -m spnet_dist.export`` (a fresh process's stderr is that one line too)."""
    def broken_copy(name):
        run = tmp_path / name
        shutil.copytree(zero2_run, run, symlinks=True)
        return run, run / "checkpoints" / "step_00000008"

    def refused(run, pattern, *extra):
        out = tmp_path / f"out-{run.name}"
        line = _error_line(export_in_process(capsys, "--run", run, "--out", out, *extra))
        assert pattern in line, line
        assert not out.exists() and not list(tmp_path.glob(".out-*"))  # nothing half-written

    run, ckpt = broken_copy("no-tag")
    refused(run, "no such checkpoint", "--tag", "step_00000099")
    # Every file is checked against the checkpoint's marker before anything is read.
    run, ckpt = broken_copy("rank-missing")
    (ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    refused(run, "step_00000008: zero_pp_rank_1_mp_rank_00_optim_states.pt is missing")
    run, ckpt = broken_copy("truncated")
    model_states = ckpt / "mp_rank_00_model_states.pt"
    model_states.write_bytes(model_states.read_bytes()[:5000])
    refused(run, "step_00000008: mp_rank_00_model_states.pt has 5000 bytes")
    run, ckpt = broken_copy("no-model-states")
    (ckpt / "mp_rank_00_model_states.pt").unlink()
    refused(run, "step_00000008: mp_rank_00_model_states.pt is missing")
    run, ckpt = broken_copy("other-arch")
    config = (run / "config.yaml").read_text().replace("spnet_cifar_resnet20", "spnet_cifar_resnet32")
    (run / "config.yaml").write_text(config)
    refused(run, "step_00000008: weights do not fit GatedCifarResNet (missing 126")
    run, ckpt = broken_copy("bad-teacher")
    (ckpt / "teacher.safetensors").write_bytes(b"\x00" * 100)
    refused(run, "step_00000008: teacher.safetensors has 100 bytes", "--weights", "teacher")

    before = (zero2_export / "model.safetensors").read_bytes()
    line = _error_line(_export_cli("--run", zero2_run, "--out", zero2_export))
    assert "student/model.safetensors: --out already exists" in line
    assert (zero2_export / "model.safetensors").read_bytes() == before


# --------------------------------------------------------------------------------------------
# 1 rank: ZeRO 0 (no shards) through the Trainer; ZeRO 1 with a torchvision ResNet-50
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_zero0_checkpoint_round_trip(tiny_config, own_process_group, tmp_path):
    from spnet_dist.training import Trainer

    cfg = tiny_config("engine.zero_stage=0", "run.max_steps=3")
    trainer = Trainer(cfg)
    trainer.fit()  # ends with its `final` checkpoint, step_00000003
    run = Path(cfg.run.out_dir)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert not list((run / "checkpoints" / "step_00000003").glob("*optim_states.pt"))  # no ZeRO shards
    out = export.export(run, tmp_path / "zero0", tag="latest", onnx=True)
    assert (out / "model.masked.onnx").stat().st_size > 0
    images = torch.stack([trainer.val_loader.dataset[i][0] for i in range(40)])
    trainer.model.eval()
    set_execution(trainer.model, "skip")
    with torch.no_grad():
        expected = trainer.model(images).logits
        got = load_model(out)(images).logits
    assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.slow
def test_resnet50_static_export_loads_strictly_into_torchvision(own_process_group, tmp_path):
    from spnet_dist.engine import build_engine
    from spnet_dist.engine import deepspeed_config
    from spnet_dist.models import create_model, load_torchvision_weights

    torch.manual_seed(0)
    tv = torchvision.models.resnet50()
    _randomize_bn(tv)
    tv.eval()
    cfg = make_cfg(engine__zero_stage=1, engine__global_batch_size=8)
    cfg.model.name, cfg.model.num_classes = "spnet_resnet50", 1000
    cfg.data.format, cfg.data.image_size = "imagefolder", 64
    cfg.loss.evo_strategy = "stages"
    model = create_model("spnet_resnet50")
    load_torchvision_weights(model, tv.state_dict())
    engine, _, _ = build_engine(model, cfg.optim, cfg.schedule, deepspeed_config(cfg, 1), steps_per_epoch=1)
    run = tmp_path / "run"
    save_config(cfg, run / "config.yaml")
    snapshot = C.Snapshot(state=C.TrainState(), rank=C.RankState(rng=None, loader={}), teacher=None,
                          config=to_dict(cfg), world_size=1, steps_per_epoch=1)
    saved = C.save_snapshot(run / "checkpoints", engine, snapshot, rank=0, is_main=True, keep=1)
    C.point_alias(run / "checkpoints", "final", saved.name)

    static = export.export(run, tmp_path / "static", static=True)
    backbone = torchvision.models.resnet50()
    backbone.load_state_dict(load_file(str(static / "model.safetensors")), strict=True)
    backbone.eval()
    gated = load_model(export.export(run, tmp_path / "gated"))
    gated.set_gate_override(True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = tv(x)
        assert torch.equal(backbone(x), reference)
        # random weights give logits ~100: compare relative to their scale (channels_last rounding)
        assert (gated(x).logits - reference).abs().max().item() < 1e-5 * reference.abs().max().item()
    size = (tmp_path / "gated" / "model.safetensors").stat().st_size
    print(f"ResNet-50 SP-Net export: {size / 1e6:.1f} MB, static: {(static / 'model.safetensors').stat().st_size / 1e6:.1f} MB")
    assert 95e6 < size < 115e6  # fp32 ResNet-50 (~102 MB) + 16 routers; no optimizer state
    with pytest.raises(ExportError, match="--static: spnet_cifar_resnet20 has no torchvision equivalent"):
        cfg.model.name = "spnet_cifar_resnet20"
        export.static_state("spnet_cifar_resnet20", gated, 10)


@pytest.mark.slow
def test_a_swapped_deepspeed_file_is_refused_by_export_and_skipped_by_resume(two_checkpoints, digits_root,
                                                                            tmp_path, own_process_group, capfd):
    from spnet_dist import checkpoint as C
    from spnet_dist.config import load_config
    from spnet_dist.training import Trainer

    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run, symlinks=True)
    older, newest = run / "checkpoints" / "step_00000002", run / "checkpoints" / "step_00000004"
    assert C.resolve_checkpoint(run, "final") == newest
    # Another valid DeepSpeed file of the same run (a valid zip: its CRCs pass), wrong SHA-256.
    swapped = newest / C.MODEL_STATES
    swapped.write_bytes((older / C.MODEL_STATES).read_bytes())
    out = tmp_path / "out"
    line = _error_line(_export_cli("--run", run, "--out", out))
    assert f"step_00000004: {C.MODEL_STATES} fails its SHA-256 check" in line, line
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing written

    capfd.readouterr()
    cfg = load_config(DEMO, tiny_overrides(digits_root, run) + [
        "engine.zero_stage=1", "run.max_steps=6", "run.checkpoint_every=2", "run.tensorboard=false"])
    trainer = Trainer(cfg)
    try:
        printed = capfd.readouterr()
        assert "step_00000004" in printed.err and C.MODEL_STATES in printed.err  # named, skipped
        assert "resumed from step_00000002" in printed.out
        assert trainer.state.step == 2
    finally:
        trainer._undo_deterministic()


@pytest.mark.slow
def test_export_reads_metrics_by_the_run_directorys_rule(two_checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run, symlinks=True)
    metrics = run / "metrics.jsonl"
    record = json.loads(metrics.read_text().splitlines()[-1])
    metrics.write_text(metrics.read_text() + '{"epoch": 2, "ste')  # killed during an append
    with pytest.warns(UserWarning, match="metrics.jsonl:2: torn last line ignored"):
        out = export.export(run, tmp_path / "torn")
    assert json.loads((out / "config.json").read_text())["measured"]["step"] == record["step"]
    metrics.write_text('{"epo\n' + json.dumps(record) + "\n")  # a record lost in the middle
    line = _error_line(_export_cli("--run", run, "--out", tmp_path / "middle"))
    assert f"{metrics}:1: not a JSON record" in line, line
    assert not (tmp_path / "middle").exists()


def test_a_fashion_mnist_run_exports_its_classes_normalisation_and_calibrated_threshold(own_process_group, tmp_path):
    # Issue 20: a fashion_mnist run exports the idx files' class names and the recipe's own
    # normalisation (not the 0.5/0.5 that a fallback would give), and bakes the threshold calibrated
    # at the exported checkpoint: the plain rule of the export decides as the evaluation did.
    from spnet_dist.config import load_config
    from spnet_dist.data import build_test_loader
    from spnet_dist.data.fashion_mnist import CLASSES
    from spnet_dist.data.transforms import FASHION_MEAN, FASHION_STD
    from spnet_dist.evaluate import evaluate
    from spnet_dist.flops import profile_macs
    from spnet_dist.training import Trainer

    from ..data.helpers import make_fashion_mnist

    root = make_fashion_mnist(tmp_path / "fm", n_train=80, n_test=40)
    run = tmp_path / "run"
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "fashion" / "spnet.yaml", [
        f"data.root={root}", f"run.out_dir={run}", "data.image_size=8", "data.val_size=20", "data.train_subset=null",
        "data.eval_batch_size=20", "engine.global_batch_size=20", "schedule.epochs=1", "schedule.warmup_epochs=0",
        "run.max_steps=2", "run.progress=log", "run.path_probe_size=0", "loss.target_rate=0.5"])
    Trainer(cfg).fit()
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["gate_threshold"] != 0.0  # calibrated (a random network does not sit at 0.5 by chance)
    out = export.export(run, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["classes"] == list(CLASSES) and config["classes"][0] == "T-shirt/top"
    pre = config["preprocessing"]
    assert pre["recipe"] == "fashion_mnist" and pre["image_size"] == 8
    assert pre["mean"] == list(FASHION_MEAN) and pre["std"] == list(FASHION_STD)
    assert config["gate_threshold_baked"] == pytest.approx(record["gate_threshold"])
    assert config["measured"]["test_exec_rate"] == record["test_exec_rate"]
    model = load_model(out)
    assert model.gate_threshold == 0.0  # the threshold lives in the biases now
    test = evaluate(model, build_test_loader(cfg.data), profile_macs(model, (8, 8)), torch.device("cpu"))
    assert test["exec_rates"] == record["test_exec_rates"] and test["top1"] == record["test_top1"]
