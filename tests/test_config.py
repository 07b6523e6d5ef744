"""Config schema, YAML loading, overrides, validation messages, one list of choices per field, and the CLI."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from spnet_dist import config as C
from spnet_dist.config import (
    Config, ConfigError, load_config, micro_batch_size, parse_args, save_config, to_dict, validate,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    """A small valid config (digits needs no data directory)."""
    return write(tmp_path / "demo.yaml", "data: {format: digits, image_size: 16}\n"
                                         "model: {name: spnet_cifar_resnet20}\n"
                                         "engine: {global_batch_size: 64, zero_stage: 0}\n")


# --------------------------------------------------------------------------------------------------
# Shipped configs
# --------------------------------------------------------------------------------------------------

def test_config_tree_is_complete():
    names = {str(p.relative_to(REPO / "configs")) for p in CONFIGS}
    for ds in ("cifar10", "cifar100"):
        assert {f"{ds}/spnet_r110.yaml", f"{ds}/spnet_r32.yaml"} <= names
        assert {f"{ds}/table3/{row}.yaml" for row in ("baseline", "exp1", "exp2", "exp3")} <= names
        assert {f"{ds}/table4/m{m}.yaml" for m in (0.5, 0.6, 0.7, 0.8)} <= names
        assert len([n for n in names if n.startswith(f"{ds}/table5/")]) == 3
        assert {f"{ds}/fig3/{w}_t{t}.yaml" for w in ("spnet", "baseline")
                for t in (0.2, 0.4, 0.6, 0.8, 0.9)} <= names
    assert {"demo.yaml", "cifar10/spnet_r110_light.yaml", "imagenet/spnet_r50.yaml",
            "imagenet/spnet_r50_light.yaml", "imagenet/spnet_r101.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_config_loads(path: Path):
    cfg = load_config(path, check_paths=False, world_size=1)
    # Every paper config must also split its batch on common GPU counts.
    if "demo" not in path.name:
        for world in (1, 2, 4, 8):
            validate(cfg, world_size=world, check_paths=False)


def test_demo_loads_with_path_checks():
    cfg = load_config(REPO / "configs/demo.yaml", world_size=1)
    assert (cfg.data.format, cfg.model.name, cfg.engine.precision) == ("digits", "spnet_cifar_resnet20", "fp32")
    assert cfg.loss.cost_weight > 0 and cfg.loss.target_rate == 0.5


def test_paper_values_reach_the_leaves():
    c10 = load_config(REPO / "configs/cifar10/table4/m0.5.yaml", check_paths=False)
    assert c10.teacher.momentum == 0.5 and c10.model.num_classes == 10
    assert (c10.optim.lr, c10.optim.momentum, c10.optim.weight_decay) == (0.1, 0.9, 1e-4)
    assert (c10.schedule.epochs, c10.schedule.milestones, c10.engine.global_batch_size) == (320, [150, 250], 256)
    assert (c10.loss.alpha, c10.loss.beta, c10.loss.gamma) == (1.0, 0.5, 1e-4)
    c100 = load_config(REPO / "configs/cifar100/spnet_r110.yaml", check_paths=False)
    assert c100.teacher.momentum == 0.6 and c100.model.num_classes == 100
    inet = load_config(REPO / "configs/imagenet/spnet_r50.yaml", check_paths=False)
    assert (inet.schedule.epochs, inet.schedule.milestones, inet.engine.global_batch_size) == (120, [30, 60, 90], 128)
    assert inet.model.num_classes == 1000 and inet.data.image_size == 224


def test_table3_components():
    def flags(row):
        cfg = load_config(REPO / f"configs/cifar10/table3/{row}.yaml", check_paths=False)
        return cfg.teacher.enabled, cfg.loss.stage_heads, cfg.loss.evo_strategy != "none"

    assert flags("baseline") == (False, False, False)
    assert flags("exp1") == (True, False, False)
    assert flags("exp2") == (True, True, False)
    assert flags("exp3") == (True, True, True)


def test_registry_names_agree_with_models():
    from spnet_dist.models import MODEL_NAMES
    assert set(C.MODEL_NAMES) == set(MODEL_NAMES)


def test_each_field_has_one_list_of_choices_owned_by_the_module_that_reads_it():
    from spnet_dist import data, losses, models, teacher

    owned = {
        "teacher.forward_mode": teacher.FORWARD_MODES, "teacher.buffers": teacher.BUFFER_RULES,
        "loss.path_form": losses.PATH_FORMS, "loss.logits_form": losses.LOGITS_FORMS,
        "loss.cost_form": losses.COST_FORMS, "loss.cost_reduction": losses.COST_REDUCTIONS,
        "loss.cost_rate": losses.COST_RATES, "loss.cls_form": losses.CLS_FORMS,
        "data.format": data.DATA_FORMATS, "data.backend": data.BACKENDS, "data.on_corrupt": data.ON_CORRUPT,
        "engine.zero_stage": C.ZERO_STAGES,
    }
    for field, choices in owned.items():
        assert C.CHOICES[field] is choices, field  # the same tuple object, not a copy
    assert C.CHOICES["loss.evo_strategy"] == losses.EVO_STRATEGIES + ("none",)
    assert C.CHOICES["data.augment"] == ("auto",) + data.AUGMENTS
    assert C.MODEL_NAMES is models.MODEL_NAMES


@pytest.mark.parametrize("stage", [3, 4, -1])
def test_zero_stage_3_is_refused_in_one_place_with_its_reason(stage):
    with pytest.raises(ConfigError, match=rf"^engine\.zero_stage: {stage} is not supported") as err:
        C.check_zero_stage(stage)
    assert ("shards parameters" in str(err.value)) is (stage == 3)
    for ok in C.ZERO_STAGES:
        C.check_zero_stage(ok)


# --------------------------------------------------------------------------------------------------
# Overrides, round trip
# --------------------------------------------------------------------------------------------------

def test_overrides(demo: Path):
    cfg = load_config(demo, ["optim.lr=0.2", "loss.beta=0", "schedule.milestones=[10,20]",
                             "schedule.epochs=30", "loss.target_rate=null", "loss.gamma=1e-3",
                             "run.out_dir=2024", "model.torchvision_weights=null", "teacher.enabled=false"])
    assert cfg.optim.lr == 0.2
    assert cfg.loss.beta == 0.0 and isinstance(cfg.loss.beta, float)  # int -> float
    assert cfg.schedule.milestones == [10, 20]
    assert cfg.loss.target_rate is None
    assert cfg.loss.gamma == 1e-3      # YAML 1.1 reads "1e-3" as a string; float fields accept it
    assert cfg.run.out_dir == "2024"   # str fields keep the raw text
    assert cfg.teacher.enabled is False


def test_base_chain_and_empty_section(tmp_path: Path):
    write(tmp_path / "a/root.yaml", "optim: {lr: 0.3, momentum: 0.8}\ndata: {format: digits}\n")
    write(tmp_path / "a/mid.yaml", "base: root.yaml\noptim: {lr: 0.4}\nteacher:\n")
    leaf = write(tmp_path / "b/leaf.yaml", "base: ../a/mid.yaml\nrun: {seed: 3}\n")
    cfg = load_config(leaf)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.run.seed) == (0.4, 0.8, 3)


@pytest.mark.parametrize("path", [REPO / "configs/demo.yaml", REPO / "configs/imagenet/fig4/spnet_t0.4.yaml"])
def test_round_trip(tmp_path: Path, path: Path):
    cfg = load_config(path, ["run.max_steps=7", "engine.clip_grad=1"], check_paths=False)
    out = save_config(cfg, tmp_path / "run/config.yaml")
    again = load_config(out, check_paths=False)
    assert again == cfg
    assert C.config_from_dict(to_dict(cfg)) == cfg


def test_loading_creates_nothing(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg_file = write(tmp_path / "c.yaml", "data: {format: digits}\nrun: {out_dir: runs/x}\n")
    load_config(cfg_file)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


# --------------------------------------------------------------------------------------------------
# Batch sizes and DeepSpeed JSON
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("global_batch,accum,world", [(1, 1, 1), (128, 1, 128), (128, 2, 64), (8, 4, 2)])
def test_micro_batch_of_one_is_rejected_with_the_batches_that_work(global_batch, accum, world):
    # Finding 2: the router's BatchNorm1d cannot normalise one sample in training.
    cfg = Config()
    cfg.engine.global_batch_size, cfg.engine.grad_accum = global_batch, accum
    with pytest.raises(ConfigError) as err:
        validate(cfg, world, check_paths=False)
    message = str(err.value)
    assert message.startswith(f"engine.global_batch_size: {global_batch} gives a micro-batch of 1 per rank")
    assert f"multiple of 2 x {accum * world} = {2 * accum * world}" in message and "\n" not in message
    cfg.engine.global_batch_size = 2 * accum * world  # the smallest batch it names works
    validate(cfg, world, check_paths=False)


R50 = REPO / "configs" / "imagenet" / "spnet_r50.yaml"


@pytest.mark.parametrize("world, overrides, device, micro", [
    (32, [], "cuda", 4),  # the paper's 128 images on 4 nodes x 8 GPUs
    (16, [], "cuda", 8),  # requeued onto 2 nodes
    (8, ["engine.global_batch_size=512", "engine.grad_accum=4"], "cuda", 16),
    (32, ["engine.global_batch_size=512", "engine.grad_accum=4"], "cuda", 4),  # accumulation splits it again
    (8, [], "cuda", 16),
    (32, ["model.sync_bn=true"], "cuda", 4),
    (32, [], "cpu", 4),
])
def test_a_small_micro_batch_on_cuda_warns_naming_the_fields_and_the_fixes(world, overrides, device, micro):
    # Finding 4: without sync_bn every BatchNorm normalises over the micro-batch alone.
    cfg = load_config(R50, overrides, check_paths=False, world_size=world)
    assert micro_batch_size(cfg, world) == micro
    warnings = C.config_warnings(cfg, world, device)
    if micro >= C.BN_MIN_MICRO_BATCH or cfg.model.sync_bn or device == "cpu":
        assert warnings == []
        return
    [line] = warnings
    assert "\n" not in line and f"a micro-batch of {micro} images" in line
    for fix in ("model.sync_bn=true", "engine.global_batch_size", "optim.lr_scaling=linear", "fewer ranks"):
        assert fix in line, fix


def test_linear_lr_scaling_without_warm_up_warns():
    large = ["engine.global_batch_size=1024", "optim.lr_scaling=linear"]
    cfg = load_config(R50, large, check_paths=False, world_size=32)
    [line] = C.config_warnings(cfg, 32, "cuda")
    assert line.startswith("optim.lr_scaling: 'linear' at engine.global_batch_size 1024 starts at 4 x optim.lr")
    assert "schedule.warmup_epochs=5" in line
    assert C.config_warnings(load_config(R50, large + ["schedule.warmup_epochs=5"], check_paths=False,
                                         world_size=32), 32, "cuda") == []


def test_fp16_needs_zero_1_or_2():
    # Finding 7: with ZeRO 0, DeepSpeed's GradScaler skips overflow steps without the engine noticing.
    cfg = Config()
    cfg.engine.precision, cfg.engine.zero_stage = "fp16", 0
    with pytest.raises(ConfigError, match=r"^engine\.precision: 'fp16' needs engine\.zero_stage 1 or 2"):
        validate(cfg, 1, check_paths=False)
    cfg.engine.zero_stage = 1
    validate(cfg, 1, check_paths=False)


def test_world_size_from_environment(monkeypatch):
    cfg = Config()
    monkeypatch.setenv("WORLD_SIZE", "4")
    validate(cfg, check_paths=False)
    assert micro_batch_size(cfg) == 64
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"engine\.global_batch_size: 256 .* 1 x 3 = 3"):
        validate(cfg, check_paths=False)


# --------------------------------------------------------------------------------------------------
# Invalid inputs: one specific, one-line message each
# --------------------------------------------------------------------------------------------------

BAD_YAML = [
    ("optim: {lrr: 0.2}", ["bad.yaml: unknown key 'optim.lrr'", "did you mean 'optim.lr'"]),
    ("optim: {epochs: 5}", ["unknown key 'optim.epochs'", "did you mean 'schedule.epochs'"]),
    ("optimm: {lr: 0.2}", ["bad.yaml: unknown section 'optimm'", "did you mean 'optim'"]),
    ("optim: {lr: abc}", ["bad.yaml: optim.lr: expected float, got 'abc'"]),
    ("schedule: {epochs: 1.5}", ["schedule.epochs: expected int, got 1.5"]),
    ("teacher: {enabled: 1}", ["teacher.enabled: expected bool, got 1"]),
    ("schedule: {milestones: 30}", ["schedule.milestones: expected list[int]"]),
    ("engine: {zero_stage: 3}", ["engine.zero_stage: 3 is not supported (ZeRO stage 3 shards parameters",
                                 "use 0, 1 or 2"]),
    ("teacher: {forward_mode: foo}", ["teacher.forward_mode: 'foo' is not one of 'eval', 'train'"]),
    ("teacher: {momentum: 1.0}", ["teacher.momentum: 1.0 is invalid", "[0, 1)"]),
    ("schedule: {epochs: 200}", ["schedule.milestones: [150, 250]", "schedule.epochs = 200"]),
    ("schedule: {milestones: [60, 30]}", ["schedule.milestones: [60, 30] must be strictly increasing"]),
    ("loss: {cost_weight: 1.0}", ["loss.cost_weight: 1.0 > 0 needs loss.target_rate"]),
    ("loss: {target_rate: 1.5, cost_weight: 1}", ["loss.target_rate: 1.5 is invalid"]),
    ("model: {name: spnet_resnet18}", ["model.name: unknown model 'spnet_resnet18'", "spnet_cifar_resnet110"]),
    ("model: {router_dropout: 1.0}", ["model.router_dropout"]),
    ("model: {num_classes: 100}\ndata: {format: digits}", ["model.num_classes: the digits data set has 10"]),
    ("model: {torchvision_weights: w.pth}", ["model.torchvision_weights: torchvision weights only fit"]),
    ("optim: {lr: 0}", ["optim.lr: 0.0 is invalid; must be > 0"]),
    ("optim: {lr_scaling: sqrt}", ["optim.lr_scaling: 'sqrt' is not one of 'none', 'linear'"]),
    ("data: {image_size: 4}", ["data.image_size: 4 is invalid"]),
    ("engine: {grad_accum: 0}", ["engine.grad_accum: 0 is invalid"]),
    ("engine: {global_batch_size: 100, grad_accum: 8}", ["engine.global_batch_size: 100 is not divisible",
                                                         "grad_accum 8 does not even divide 100"]),
    ("data: {format: imagefolder}", ["data.root: required for data.format 'imagefolder'"]),
    ("optim: [1, 2]", ["section 'optim' must be a mapping"]),
    ("- 1\n- 2", ["bad.yaml: top level must be a mapping"]),
    ("optim:\n  lr: 0.1\n lr: [", ["bad.yaml:4: YAML syntax error"]),  # line 1 = default data line
    ("base: nope.yaml", ["bad.yaml: base file 'nope.yaml' not found"]),
    ("base: bad.yaml", ["'base' cycle"]),
]


@pytest.mark.parametrize("text,expected", BAD_YAML, ids=[t.replace("\n", "|") for t, _ in BAD_YAML])
def test_invalid_yaml(tmp_path: Path, text: str, expected: list[str]):
    # Defaults are a digits run so that only the line under test is wrong (imagefolder needs a root).
    default_data = "" if "data:" in text or text.startswith(("- ", "base")) else "data: {format: digits}\n"
    path = write(tmp_path / "bad.yaml", default_data + text + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, world_size=1)
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message


BAD_OVERRIDES = [
    (["optim.lrr=0.2"], ["override 'optim.lrr=0.2'", "unknown key 'optim.lrr'", "did you mean 'optim.lr'"]),
    (["optimm.lr=0.2"], ["unknown section 'optimm'"]),
    (["optim.lr"], ["override 'optim.lr': expected section.field=value"]),
    (["optim.lr=abc"], ["optim.lr: expected float, got 'abc'"]),
    (["engine.zero_stage=3"], ["override 'engine.zero_stage=3'", "engine.zero_stage: 3 is not supported"]),
    (["loss.target_rate=x"], ["loss.target_rate: expected float | None, got 'x'"]),
]


@pytest.mark.parametrize("overrides,expected", BAD_OVERRIDES, ids=[o[0] for o, _ in BAD_OVERRIDES])
def test_invalid_overrides(demo: Path, overrides: list[str], expected: list[str]):
    with pytest.raises(ConfigError) as info:
        load_config(demo, overrides, world_size=1)
    for part in expected:
        assert part in str(info.value)


def test_non_dividing_batch_by_argument(demo: Path):
    with pytest.raises(ConfigError) as info:
        load_config(demo, world_size=3)
    message = str(info.value)
    assert "engine.global_batch_size: 64 is not divisible by grad_accum x world size = 1 x 3 = 3" in message
    assert "63 or 66" in message and "1, 2, 4, 8" in message


def test_non_dividing_batch_by_environment(demo: Path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"engine\.global_batch_size"):
        load_config(demo)
    monkeypatch.setenv("WORLD_SIZE", "zero")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        load_config(demo)


def test_missing_config_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_data_root_checks(tmp_path: Path):
    root = tmp_path / "imagenet"
    (root / "train").mkdir(parents=True)
    cfg_file = write(tmp_path / "c.yaml", f"data: {{format: imagefolder, root: {root}}}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: data\.root: .* has no val/ folder"):
        load_config(cfg_file)
    load_config(cfg_file, check_paths=False)  # paper configs hold placeholder roots
    (root / "val").mkdir()
    load_config(cfg_file)

    with pytest.raises(ConfigError, match="data.root: directory not found"):
        load_config(cfg_file, [f"data.root={tmp_path / 'missing'}"])
    cifar = tmp_path / "cifar"
    cifar.mkdir()
    with pytest.raises(ConfigError, match="data.root: .* holds neither CIFAR-10"):
        load_config(cfg_file, ["data.format=cifar", f"data.root={cifar}"])
    for name in ("data_batch_1", "test_batch"):
        (cifar / name).write_bytes(b"")
    # The reader's rule: every file of both splits (CIFAR-10 has five training batches).
    with pytest.raises(ConfigError, match=r"data\.root: CIFAR file missing: .*data_batch_2"):
        load_config(cfg_file, ["data.format=cifar", f"data.root={cifar}"])
    for i in range(2, 6):
        (cifar / f"data_batch_{i}").write_bytes(b"")
    load_config(cfg_file, ["data.format=cifar", f"data.root={cifar}"])
    with pytest.raises(ConfigError, match="model.num_classes: .* is CIFAR-10 but num_classes is 100"):
        load_config(cfg_file, ["data.format=cifar", f"data.root={cifar}", "model.num_classes=100"])


def test_validate_checks_python_built_configs():
    cfg = Config()
    cfg.optim.lr = "abc"
    with pytest.raises(ConfigError, match="optim.lr: expected float, got 'abc'"):
        validate(cfg, world_size=1, check_paths=False)
    cfg = dataclasses.replace(Config(), engine=C.EngineConfig(zero_stage=3))
    with pytest.raises(ConfigError, match="engine.zero_stage: 3 is not supported"):
        validate(cfg, world_size=1, check_paths=False)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def test_parse_args(demo: Path):
    cfg = parse_args(["--config", str(demo), "optim.lr=0.3", "loss.beta=0"])
    assert cfg.optim.lr == 0.3 and cfg.loss.beta == 0.0


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--help"], description="train SP-Net")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "train SP-Net" in out and "--config FILE" in out
    for section, fields in C._FIELD_TYPES.items():
        for name in fields:
            assert f"{section}.{name} (" in out
    assert "optim.lr (float, 0.1): initial SGD learning rate" in out
    assert "loss.target_rate (float | None, null):" in out


def test_cli_error_exits_2_with_one_line(demo: Path, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--config", str(demo), "optim.lrr=0.2"])
    assert info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert "unknown key 'optim.lrr'" in errors[0] and "did you mean 'optim.lr'" in errors[0]


def test_cli_requires_config(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args([])
    assert info.value.code == 2
    assert "--config" in capsys.readouterr().err
