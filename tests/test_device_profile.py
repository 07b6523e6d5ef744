"""The device profile: one resolution of every device-dependent setting, the CUDA answers emulated
on a CPU, one-line refusals of settings a device cannot run, and no other reader of the raw fields."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from spnet_dist.config import _FIELD_TYPES, ConfigError, load_config
from spnet_dist.device_profile import PROFILE_ENV, DeviceProfile, resolve_device_profile

from .conftest import REPO_ROOT

DEMO = REPO_ROOT / "configs" / "demo.yaml"
NATIVE: dict[str, str] = {}
EMULATED = {PROFILE_ENV: "cuda"}


def cfg(*overrides: str):
    return load_config(DEMO, list(overrides), check_paths=False, world_size=1)


def test_cpu_and_cuda_answers():
    cpu = resolve_device_profile(cfg(), "cpu", NATIVE)
    assert (cpu.target, cpu.compute, cpu.emulated) == ("cpu", "cpu", False)
    assert (cpu.channels_last, cpu.memory_format) == (False, torch.contiguous_format)
    assert (cpu.teacher_execution, cpu.eval_skip_strategy, cpu.backend, cpu.dali_device) == ("skip", "gather", "gloo", "cpu")
    assert not (cpu.pin_memory or cpu.cudnn_benchmark or cpu.compile) and cpu.compile_backend is None
    assert cpu.autocast_dtype is None  # the demo trains in fp32

    cuda = resolve_device_profile(cfg("engine.precision=bf16", "engine.compile=true"), torch.device("cuda", 3), NATIVE)
    assert (cuda.target, cuda.compute, cuda.emulated) == ("cuda", "cuda", False)
    assert cuda.channels_last and cuda.memory_format == torch.channels_last
    assert (cuda.teacher_execution, cuda.eval_skip_strategy, cuda.backend, cuda.dali_device) == ("masked", "capacity", "nccl", "gpu")
    assert cuda.pin_memory and cuda.pin_memory_now and cuda.cudnn_benchmark and cuda.cudnn_benchmark_now
    assert (cuda.backend_now, cuda.dali_device_now) == ("nccl", "gpu")
    assert cuda.autocast_dtype == torch.bfloat16 and (cuda.compile, cuda.compile_backend) == (True, "inductor")
    # deterministic kernels switch the autotuner off
    assert not resolve_device_profile(cfg("run.deterministic=true"), "cuda", NATIVE).cudnn_benchmark


def test_the_cuda_profile_on_a_cpu_answers_as_cuda_and_applies_what_a_cpu_can():
    profile = resolve_device_profile(cfg("engine.compile=true"), "cpu", EMULATED)
    native = resolve_device_profile(cfg("engine.compile=true"), "cuda", NATIVE)
    answers = ("target", "backend", "channels_last", "teacher_execution", "eval_skip_strategy", "pin_memory",
               "dali_device", "cudnn_benchmark", "autocast_dtype", "compile")
    assert {k: getattr(profile, k) for k in answers} == {k: getattr(native, k) for k in answers}
    assert profile.compute == "cpu" and profile.emulated
    # no CPU realisation: page-locked memory, NCCL, DALI `mixed` decoding, cuDNN
    assert (profile.pin_memory_now, profile.backend_now, profile.dali_device_now, profile.cudnn_benchmark_now) == (
        False, "gloo", "cpu", False)
    assert profile.compile_backend == "aot_eager"  # CPU-capable; inductor would build C++ for minutes
    eager = resolve_device_profile(cfg("engine.compile=true"), "cpu", {PROFILE_ENV: "cuda:eager"})
    assert eager.compile_backend == "eager"
    assert resolve_device_profile(cfg(), "cpu", {PROFILE_ENV: "cuda:eager"}).compile_backend is None
    sync = resolve_device_profile(cfg("model.sync_bn=true"), "cpu", EMULATED)
    assert sync.sync_bn and not sync.sync_bn_now  # SyncBatchNorm has CUDA kernels only
    assert "emulated on cpu" in profile.describe()


def test_explicit_choices_win_over_the_device():
    profile = resolve_device_profile(cfg("engine.channels_last=true", "teacher.execution=masked"), "cpu", NATIVE)
    assert profile.channels_last and profile.teacher_execution == "masked"
    profile = resolve_device_profile(cfg("engine.channels_last=false", "teacher.execution=skip",
                                         "data.dali_device=cpu", "engine.backend=gloo"), "cuda", NATIVE)
    assert not profile.channels_last and profile.teacher_execution == "skip"
    assert (profile.dali_device, profile.backend) == ("cpu", "gloo")


@pytest.mark.parametrize("override, field", [("model.sync_bn=true", "model.sync_bn"),
                                             ("engine.backend=nccl", "engine.backend")])
def test_a_setting_the_cpu_cannot_run_is_one_line_naming_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        resolve_device_profile(cfg(override), "cpu", NATIVE)
    assert err.value.field == field and str(err.value).startswith(f"{field}: ") and "\n" not in str(err.value)


def test_dali_gpu_is_refused_on_a_cpu_only_when_dali_reads_the_data(tmp_path):
    imagefolder = ("data.format=imagefolder", "data.dali_device=gpu", "model.num_classes=10")
    with pytest.raises(ConfigError, match=r"^data\.dali_device: 'gpu' needs a CUDA device"):
        resolve_device_profile(cfg(*imagefolder, "data.backend=dali"), "cpu", NATIVE)
    # torchvision reads the data: the DALI choice is irrelevant and not refused
    assert resolve_device_profile(cfg(*imagefolder, "data.backend=torchvision"), "cpu", NATIVE).dali_device_now == "cpu"
    assert resolve_device_profile(cfg(*imagefolder, "data.backend=dali"), "cpu", EMULATED).dali_device == "gpu"


def test_a_bad_emulation_value_names_the_variable():
    with pytest.raises(ConfigError, match=PROFILE_ENV):
        resolve_device_profile(cfg(), "cpu", {PROFILE_ENV: "tpu"})


def test_the_profile_is_frozen():
    profile = resolve_device_profile(cfg(), "cpu", NATIVE)
    with pytest.raises(AttributeError):
        profile.channels_last = True  # type: ignore[misc]
    assert isinstance(profile, DeviceProfile)


# --------------------------------------------------------------------------------------------
# Nobody else reads the raw fields
# --------------------------------------------------------------------------------------------

# The config fields whose meaning depends on the device: only the resolver reads them.
RAW_FIELDS = {("engine", "channels_last"), ("engine", "compile"), ("engine", "backend"),
              ("teacher", "execution"), ("data", "dali_device"), ("model", "sync_bn")}
# Where they may appear: the schema and its validation, and the resolver.
READERS = {"spnet_dist/config.py", "spnet_dist/device_profile.py"}
# Field names that more than one section has (data.backend and engine.backend).
SHARED_NAMES = {name for name in {f for _, f in RAW_FIELDS}
                if sum(name in fields for fields in _FIELD_TYPES.values()) > 1}
# Parameters that hold one config section by this package's naming.
SECTION_PARAMETERS = {"data_cfg": "data", "engine_cfg": "engine", "teacher_cfg": "teacher", "model_cfg": "model"}


def raw_reads(source: str) -> list[str]:
    """``cfg.engine.channels_last``-like reads in ``source``: through a section attribute, a local
    alias of one (``e = cfg.engine``), a ``*_cfg`` parameter, or ``getattr(..., "<field>")``."""
    tree = ast.parse(source)
    fields = {field for _, field in RAW_FIELDS}
    aliases = dict(SECTION_PARAMETERS)
    for node in ast.walk(tree):  # x = <...>.engine
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Attribute):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    aliases[target.id] = node.value.attr
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple):
            for target in node.targets:  # m, t, e = (cfg.model, cfg.teacher, cfg.engine)
                if isinstance(target, ast.Tuple):
                    for name, value in zip(target.elts, node.value.elts):
                        if isinstance(name, ast.Name) and isinstance(value, ast.Attribute):
                            aliases[name.id] = value.attr

    def section_of(node: ast.AST) -> str | None:
        if isinstance(node, ast.Attribute):
            return node.attr
        if isinstance(node, ast.Name):
            return aliases.get(node.id)
        return None

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and (section_of(node.value), node.attr) in RAW_FIELDS:
            found.append(f"line {node.lineno}: .{section_of(node.value)}.{node.attr}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value in fields):
            section, field = section_of(node.args[0]), node.args[1].value
            # a section known from the expression decides; else only a name no other section has
            if (section, field) in RAW_FIELDS or (section is None and field not in SHARED_NAMES):
                found.append(f"line {node.lineno}: getattr(..., {field!r})")
    return found


def test_the_detector_finds_each_way_of_reading_a_raw_field():
    planted = '''
def a(cfg): return cfg.engine.channels_last
def b(cfg):
    e = cfg.engine
    return e.compile
def c(data_cfg): return getattr(data_cfg, "dali_device", "auto"), getattr(data_cfg, "backend", "auto")
def d(self): return self.cfg.teacher.execution
def f(cfg):
    m, t = (cfg.model, cfg.teacher)
    return m.sync_bn
def ok(engine, loader, x): return engine.compile(backend="eager"), loader.channels_last, getattr(x, "backend")
'''
    assert sorted(line.split(":")[0] for line in raw_reads(planted)) == ["line 10", "line 2", "line 5", "line 6", "line 7"]


def test_no_module_but_the_resolver_reads_the_device_dependent_fields():
    offenders = {}
    for path in sorted((REPO_ROOT / "spnet_dist").rglob("*.py")):
        rel = path.relative_to(REPO_ROOT).as_posix()
        if rel not in READERS:
            found = raw_reads(path.read_text())
            if found:
                offenders[rel] = found
    assert offenders == {}, f"read spnet_dist.device_profile.DeviceProfile instead: {offenders}"
