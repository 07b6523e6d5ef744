"""Typed configuration: dataclass schema, YAML loading, dotted overrides, validation.

One config file describes one run. Files may inherit with a top-level ``base: other.yaml`` key
(resolved relative to the file, recursively, deep-merged) so a paper-table config is a few lines.
Command-line overrides use dotted keys, e.g. ``optim.lr=0.2 schedule.milestones=[30,60]``; each
value is parsed with ``yaml.safe_load``.

Every invalid input raises :class:`ConfigError` with one line naming the field and the file (or
override) it came from. Each field with a fixed set of values has ONE list of choices: the
module that implements the field owns it (``spnet_dist.losses``, ``spnet_dist.teacher``,
``spnet_dist.data``, ``spnet_dist.models``) and :data:`CHOICES` imports it; fields only the
trainer or the engine read are listed here. The DeepSpeed JSON is derived from a config next to
the engine (``spnet_dist.engine.deepspeed_config``).

This module is pure: importing it or loading a config creates no file and no process group (only
:func:`save_config` writes), so it is safe to call before ``torch.distributed`` is initialised.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import yaml

from .data import AUGMENTS, BACKENDS, DALI_DEVICES, DATA_FORMATS, ON_CORRUPT
from .evaluate import GATE_CALIBRATIONS
from .losses import (CLS_FORMS, COST_FORMS, COST_RATES, COST_REDUCTIONS, EVO_STRATEGIES, LOGITS_FORMS,
                     PATH_FORMS)
from .models import MODEL_NAMES
from .teacher import BUFFER_RULES, FORWARD_MODES

__all__ = [
    "MODEL_NAMES", "IMAGENET_MODELS", "ZERO_STAGES", "CHOICES", "ConfigError",
    "ModelConfig", "TeacherConfig", "LossConfig", "DataConfig", "OptimConfig", "ScheduleConfig",
    "EngineConfig", "RunConfig", "SlurmConfig", "Config",
    "LR_BASE_BATCH", "BN_MIN_MICRO_BATCH",
    "load_config", "config_from_dict", "validate", "config_warnings", "check_zero_stage", "micro_batch_size",
    "to_dict", "save_config", "add_config_arguments", "config_from_args", "parse_args",
]

# The models with a torchvision counterpart (model.torchvision_weights, spnet-export --static).
IMAGENET_MODELS = ("spnet_resnet50", "spnet_resnet101")
# ZeRO stage 3 partitions the parameters themselves; the trainer needs whole ones (check_zero_stage).
ZERO_STAGES = (0, 1, 2)
# optim.lr_scaling=linear: optim.lr is the learning rate of this many images per optimizer step
# (Goyal et al. 2017: 0.1 per 256 images for ResNet-50); applied by spnet_dist.engine.learning_rate.
LR_BASE_BATCH = 256
# Images per BatchNorm (the micro-batch, without model.sync_bn) below which config_warnings warns on
# CUDA. Wu & He 2018 (Group Normalization, Table 2: ResNet-50 on ImageNet, BN statistics per GPU)
# measured top-1 error 23.6 / 23.7 / 24.8 / 27.3 / 34.7 % at 32 / 16 / 8 / 4 / 2 images per GPU:
# flat down to 16, +1.2 points at 8, +3.7 at 4. The routers' BatchNorm1d has one value per image
# (no spatial positions to average over), so it is the noisier of the two.
BN_MIN_MICRO_BATCH = 16


class ConfigError(ValueError):
    """An invalid configuration. ``str(err)`` is one line naming the field (and file when known).

    Args:
        message: the one-line description.
        field: dotted name of the offending field (``"optim.lr"``) when the error concerns one;
            ``load_config`` uses it to prefix the file or override that set the value.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(" ".join(str(message).split()))  # always one line
        self.field = field


def _help(text: str, **kwargs: Any) -> Any:
    """A dataclass field carrying the help text that ``--help`` prints."""
    return field(metadata={"help": text}, **kwargs)


# --------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    name: str = _help("registry name: " + ", ".join(MODEL_NAMES), default="spnet_cifar_resnet110")
    num_classes: int = _help("number of classes (10 CIFAR-10 / digits, 100 CIFAR-100, 1000 ImageNet)",
                             default=10)
    router_hidden: int = _help("hidden width of each block's router MLP (paper: 128)", default=128)
    router_dropout: float = _help("dropout inside the router MLP, in [0, 1) (paper: 0.4)", default=0.4)
    router_bias: list[float] = _help(
        "init bias of the router's last layer (skip, execute); (0.1, 2.0) opens blocks at p~0.87",
        default_factory=lambda: [0.1, 2.0])
    gumbel_tau: float = _help("Gumbel-softmax temperature during training (paper: 1.0)", default=1.0)
    gumbel_noise: bool = _help(
        "sample Gumbel noise in training; false = hard argmax + straight-through softmax (tests)",
        default=True)
    sync_bn: bool = _help("convert BatchNorm to SyncBatchNorm (small per-rank batches)", default=False)
    torchvision_weights: str | None = _help(
        "path to a torchvision ResNet state dict (.pth or .safetensors) to initialise the backbone; "
        "ImageNet models only", default=None)
    gate_calibration: str = _help(
        "evaluation rule of the routers: 'target' (execute iff logit1 - logit0 > d, one offset d shared "
        "by all blocks, searched on the validation split at every evaluation so that the evaluated "
        "execution rate equals loss.target_rate; only with a cost loss; training is unchanged and an "
        "export bakes d into the router biases) | 'none' (the paper's rule logit1 > logit0)",
        default="target")


@dataclass
class TeacherConfig:
    enabled: bool = _help("use the EMA dynamic auxiliary module (paper component A)", default=True)
    momentum: float = _help(
        "m in theta_t <- m*theta_t + (1-m)*theta_d, in [0, 1); paper 0.7 CIFAR-10, 0.6 CIFAR-100, "
        "official code 0.9 ImageNet", default=0.7)
    forward_mode: str = _help(
        "'train' (official code: batch-stat BN, Gumbel noise; default, chosen from the evidence in "
        "docs/sweeps/README.md) | 'eval' (deterministic: running BN stats, no Gumbel noise; its BN "
        "statistics start at their initial values, see docs/paper_fidelity.md)", default="train")
    buffers: str = _help("BN buffers of the teacher: 'copy' from the student | 'ema' like parameters",
                         default="copy")
    execution: str = _help(
        "how the eval-mode teacher runs closed blocks: 'masked' (every block on the whole batch, x0/1: "
        "fixed shapes, no host sync) | 'skip' (closed blocks really skipped: fewer MACs, one nonzero() "
        "host sync per block and varying shapes) | 'auto' (masked on CUDA, skip on CPU)", default="auto")


@dataclass
class LossConfig:
    stage_heads: bool = _help("CE on all K stage classifiers (paper component B); false = last only",
                              default=True)
    alpha: float = _help("weight of L_path (paper: 1); ignored without the teacher", default=1.0)
    beta: float = _help("weight of L_logits (paper: 0.5); ignored without the teacher", default=0.5)
    gamma: float = _help("weight of L_evo (paper: 1e-4)", default=1e-4)
    path_form: str = _help(
        "'paper' (sum of squared execution-probability differences) | 'code' (0.1 * MSE of gate logits)",
        default="paper")
    logits_form: str = _help(
        "'paper' (sum of KL per head) | 'code' (0.1 x weighted MSE of every head to the teacher's "
        "final logits, the official term: use loss.beta=1 to reproduce it)",
        default="paper")
    evo_strategy: str = _help(
        "L_evo strategy (component C): 'stages' (Table 5 EXP-3) | 'blocks' (EXP-1) | "
        "'blocks_within_stage' (EXP-2) | 'to_final' (official ImageNet code: f_K - f_k pairs) | "
        "'code_cifar' (official CIFAR code: first/middle/last block per stage) | 'none'", default="stages")
    cost_weight: float = _help("weight of L_cost; 0 disables it (needs loss.target_rate when > 0)",
                               default=0.0)
    target_rate: float | None = _help("target execution rate t of L_cost, in [0, 1]", default=None)
    cost_form: str = _help(
        "'two_sided' (paper: (v - t)^2) | 'hinge' (official ImageNet code: only rates above t)",
        default="two_sided")
    cost_reduction: str = _help(
        "L_cost over blocks: 'sum' (paper section 4.3) | 'mean' (official code; N times weaker, "
        "times its lossfact = loss.cost_weight)", default="sum")
    cost_rate: str = _help(
        "block rates of L_cost averaged from 'probs' (paper: relaxed decisions, no noise) | "
        "'decisions' (official code: hard straight-through Gumbel samples)", default="probs")
    cls_form: str = _help(
        "L_cls: 'paper' (sum of CE over heads) | 'code' (official weights 1, 0.2, 0.1, 0.01 from "
        "the final head backwards)", default="paper")
    grad_clamp: float | None = _help(
        "clamp every gradient element to [-c, c] before the optimizer step (official CIFAR code: "
        "0.5); null disables it. Needs engine.zero_stage 0 (ZeRO 1/2 partition the gradients)",
        default=None)


@dataclass
class DataConfig:
    format: str = _help(
        "'imagefolder' (train/ and val/ class folders of JPEGs) | 'cifar' (python-pickle CIFAR-10/100 "
        "directory) | 'digits' (scikit-learn digits converted to JPEGs on first use) | 'fashion_mnist' "
        "(the four official idx .gz files; validation carved from the training set, official test set "
        "apart)", default="imagefolder")
    root: str = _help(
        "dataset directory; for 'digits' the cache directory (empty = ~/.cache/spnet_dist/digits); for "
        "'fashion_mnist' empty = /usr/share/datasets/fashion-mnist (apt-get install dataset-fashion-mnist)",
        default="")
    image_size: int = _help("training / evaluation input resolution (>= 8)", default=224)
    augment: str = _help("'auto' (by format) | 'imagenet' | 'cifar' | 'digits' | 'fashion_mnist' | 'none'",
                         default="auto")
    val_size: int = _help(
        "fashion_mnist: training images held out as the validation split (model selection), stratified "
        "by class with data.split_seed; reported numbers come from the official 10,000-image test set",
        default=5000)
    train_subset: int | None = _help(
        "fashion_mnist: train on this many images of the rest (stratified, data.split_seed; a smaller "
        "subset is part of a larger one); null = all", default=None)
    split_seed: int = _help(
        "fashion_mnist: seed of the validation split and the training subset, independent of run.seed "
        "(every method and seed selects on the same images)", default=0)
    num_workers: int = _help("data-loading worker processes per rank", default=4)
    eval_batch_size: int = _help("evaluation batch size per rank", default=64)
    backend: str = _help(
        "'auto' (DALI for imagefolder when installed, else torchvision) | 'torchvision' | 'dali' "
        "(JPEG folders only; cifar and fashion_mnist stay on torchvision); both apply the same augmentation",
        default="auto")
    dali_device: str = _help(
        "DALI decoding: 'auto' (GPU 'mixed' decode when the rank has a GPU, else CPU) | 'gpu' | 'cpu'",
        default="auto")
    on_corrupt: str = _help(
        "an undecodable/truncated image: 'error' (stop, naming the file) | 'skip' (report, count, "
        "replace it by another image of the rank's share so batches stay full)", default="error")
    dali_dont_use_mmap: bool = _help(
        "DALI file reader: plain reads instead of mmap. true suits a cluster's network filesystem (DALI's "
        "docs: mmap is slow on most of them; a mapped file is read when the decoder touches it, outside "
        "the reader's prefetch); false saves a copy per file on a local disk", default=True)
    dali_prefetch_queue_depth: int = _help(
        "DALI file reader: batches of encoded files read ahead of decoding (fn.readers.file "
        "prefetch_queue_depth, DALI's default 1); absorbs latency spikes of a network filesystem at "
        "a few tens of MB of host memory per batch of ImageNet JPEGs", default=4)


@dataclass
class OptimConfig:
    lr: float = _help("initial SGD learning rate (paper: 0.1)", default=0.1)
    momentum: float = _help("SGD momentum, in [0, 1) (paper: 0.9)", default=0.9)
    weight_decay: float = _help("SGD weight decay (paper: 1e-4)", default=1e-4)
    nesterov: bool = _help("Nesterov momentum (needs optim.momentum > 0)", default=False)
    lr_scaling: str = _help(
        "'none' (the rate is optim.lr) | 'linear' (Goyal et al. 2017: optim.lr x engine.global_batch_size / "
        "256, optim.lr being the rate of a 256-image step; pair it with schedule.warmup_epochs, e.g. 5, for "
        "global batches of 1,024 and more)", default="none")


@dataclass
class ScheduleConfig:
    kind: str = _help("'multistep' (paper) | 'cosine'", default="multistep")
    epochs: int = _help("training epochs (paper: 320 CIFAR, 120 ImageNet)", default=320)
    milestones: list[int] = _help(
        "multistep only: epochs at which lr is multiplied by schedule.decay (converted to optimizer "
        "steps by the engine)", default_factory=lambda: [150, 250])
    decay: float = _help("multistep lr factor at each milestone, in (0, 1] (paper: 0.1)", default=0.1)
    warmup_epochs: float = _help("linear lr warm-up length in epochs (fractions allowed)", default=0.0)


@dataclass
class EngineConfig:
    global_batch_size: int = _help(
        "the paper's batch size; micro batch per rank = global / (grad_accum x world size)", default=256)
    grad_accum: int = _help("gradient accumulation steps per optimizer step", default=1)
    zero_stage: int = _help("DeepSpeed ZeRO stage: 0, 1 or 2 (sharded optimizer state); 3 is rejected",
                            default=1)
    precision: str = _help("'bf16' | 'fp16' | 'fp32', through DeepSpeed's torch_autocast section",
                           default="bf16")
    clip_grad: float | None = _help("gradient-norm clipping threshold; null disables it", default=None)
    grad_reduce: str = _help(
        "'fp32' (gradients all-reduced in fp32, as DDP does) | 'autocast' (DeepSpeed's default under "
        "torch_autocast: Conv/Linear gradients reduced in the autocast dtype, half the traffic)", default="fp32")
    backend: str = _help("'auto' (nccl with CUDA, else gloo) | 'nccl' | 'gloo'", default="auto")
    bucket_size: int | None = _help(
        "elements per ZeRO-1/2 gradient-reduce and parameter-allgather bucket; null = sized from the model "
        "(its trainable parameter count, capped at DeepSpeed's 5e8 default, which alone allocates ~2 GB of "
        "fp32 staging)", default=None)
    channels_last: bool | None = _help(
        "channels_last memory format for model and batches (faster convolutions on tensor cores); "
        "null = on for CUDA, off on CPU", default=None)
    compile: bool = _help("torch.compile the student's forward (masked execution path; the first steps "
                          "compile)", default=False)
    timeout_min: float = _help(
        "process-group timeout in minutes: a collective waiting longer (a rank died or hangs) "
        "fails and the job exits instead of hanging", default=30.0)


@dataclass
class RunConfig:
    out_dir: str = _help("run directory (config.yaml, metrics.jsonl, checkpoints/)", default="runs/default")
    seed: int = _help("base random seed", default=0)
    eval_every: int = _help("evaluate every N epochs", default=1)
    log_every: int = _help("log training metrics every N optimizer steps", default=50)
    max_steps: int | None = _help("stop after this many optimizer steps (smoke tests, benchmarks)",
                                  default=None)
    progress: str = _help("'auto' (bar on a TTY, periodic lines otherwise) | 'bar' | 'log' | 'none'",
                          default="auto")
    tensorboard: bool = _help("write TensorBoard event files into run.out_dir", default=True)
    resume: str = _help(
        "'auto' (continue from the newest valid checkpoint in run.out_dir, if any) | 'never' (refuse "
        "a directory that holds a run) | path of one checkpoint directory inside run.out_dir/checkpoints",
        default="auto")
    checkpoint_every: int = _help(
        "save a checkpoint every N optimizer steps (0: only at epoch ends, the end and on a signal)",
        default=1000)
    keep_checkpoints: int = _help("keep the newest N step checkpoints (plus best and final)", default=3)
    deterministic: bool = _help(
        "deterministic kernels (torch.use_deterministic_algorithms): CPU fp32 training and its "
        "resumes are bitwise reproducible", default=False)
    max_bad_steps: int = _help(
        "stop (exit 3) once more than N optimizer steps had a non-finite loss; the last good "
        "checkpoint is kept", default=10)
    stop_check_every: int = _help(
        "optimizer steps between the checks where ranks agree on a stop signal and count non-finite "
        "losses (one all-reduce of two integers and one host sync per check)", default=10)
    path_probe_size: int = _help(
        "path stability: the first N validation images whose execution paths (eval mode, paper's rule) "
        "are snapshot into run.out_dir/paths.jsonl; 0 (default) disables the snapshots (configs/fashion "
        "sets 1000)", default=0)
    path_snapshot_every: int | None = _help(
        "optimizer steps between path snapshots; null = 4 per epoch", default=None)


@dataclass
class SlurmConfig:
    """The SLURM job that ``launch/submit.py`` submits; ``spnet-train`` ignores this section."""

    cluster: str = _help(
        "'slurm' (sbatch through submitit) | 'local' (submitit's local executor: one node, "
        "tasks_per_node processes on this machine; laptops and tests)", default="slurm")
    nodes: int = _help("number of nodes", default=1)
    gpus_per_node: int = _help("GPUs per node; one task (rank) per GPU. 0: a CPU job", default=0)
    tasks_per_node: int | None = _help(
        "ranks per node; null = gpus_per_node (or 1 on a CPU job). With GPUs it must equal "
        "gpus_per_node", default=None)
    cpus_per_task: int = _help("CPU cores per task (data-loading workers + 1 or 2)", default=8)
    mem_gb: float | None = _help("memory per node in GB; null = the partition's default, 0 = all", default=None)
    partition: str | None = _help("partition (sbatch --partition)", default=None)
    account: str | None = _help("account to charge (sbatch --account)", default=None)
    qos: str | None = _help("quality of service (sbatch --qos)", default=None)
    constraint: str | None = _help("node features, e.g. 'a100&ib' (sbatch --constraint)", default=None)
    timeout_min: int = _help("time limit of one attempt in minutes (sbatch --time); the job "
                             "requeues itself when it is reached", default=1440)
    signal_delay_s: int = _help(
        "SIGUSR2 is sent this many seconds before the time limit (sbatch --signal=USR2@N); it must cover "
        "the time to the next stop check (run.stop_check_every training steps, or the rest of an "
        "evaluation that is running), a checkpoint write and a few seconds for the requeue. SLURM sends "
        "it 0-30 s earlier than asked, never later", default=120)
    max_timeouts: int = _help("requeues after a time limit before the job gives up (preemptions do "
                              "not count)", default=30)
    job_name: str = _help("job name (sbatch --job-name)", default="spnet")
    log_dir: str = _help("submitit folder (scripts, pickles, logs); empty = <run.out_dir>/submitit",
                         default="")
    setup: list[str] = _help("shell lines run before srun, e.g. ['module load cuda/12.4']",
                             default_factory=list)
    sbatch_args: list[str] = _help(
        "extra sbatch options, e.g. ['--exclusive', '--mail-type=END']; the options this section "
        "sets (nodes, time, signal, ...) are refused here", default_factory=list)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    run: RunConfig = field(default_factory=RunConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


# Section name -> section dataclass, in schema order.
_SECTIONS: dict[str, type] = typing.get_type_hints(Config)
# Section -> {field name: resolved annotation} (annotations are strings under `from __future__`).
_FIELD_TYPES: dict[str, dict[str, Any]] = {s: typing.get_type_hints(cls) for s, cls in _SECTIONS.items()}
_ALL_KEYS = [f"{s}.{k}" for s, fields in _FIELD_TYPES.items() for k in fields]

# One list of choices per field: the implementing module's own tuple where it has one.
CHOICES: dict[str, tuple[Any, ...]] = {
    "model.gate_calibration": GATE_CALIBRATIONS,
    "teacher.forward_mode": FORWARD_MODES,
    "teacher.buffers": BUFFER_RULES,
    "teacher.execution": ("auto", "masked", "skip"),  # resolved by the trainer (training.step)
    "loss.path_form": PATH_FORMS,
    "loss.logits_form": LOGITS_FORMS,
    "loss.evo_strategy": EVO_STRATEGIES + ("none",),
    "loss.cost_form": COST_FORMS,
    "loss.cost_reduction": COST_REDUCTIONS,
    "loss.cost_rate": COST_RATES,
    "loss.cls_form": CLS_FORMS,
    "data.format": DATA_FORMATS,
    "data.augment": ("auto",) + AUGMENTS,
    "data.backend": BACKENDS,
    "data.dali_device": DALI_DEVICES,
    "data.on_corrupt": ON_CORRUPT,
    "optim.lr_scaling": ("none", "linear"),  # applied by spnet_dist.engine.learning_rate
    "schedule.kind": ("multistep", "cosine"),
    "engine.zero_stage": ZERO_STAGES,
    "engine.precision": ("bf16", "fp16", "fp32"),
    "engine.grad_reduce": ("fp32", "autocast"),
    "engine.backend": ("auto", "nccl", "gloo"),
    "run.progress": ("auto", "bar", "log", "none"),
    "slurm.cluster": ("slurm", "local"),
}


# --------------------------------------------------------------------------------------------------
# Type conversion
# --------------------------------------------------------------------------------------------------

# PyYAML follows YAML 1.1, where "1e-4" (no dot) is a string, not a float: accept such numerals for
# float fields so `gamma: 1e-4` and `loss.gamma=1e-4` mean what they say.
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return "None" if tp is type(None) else tp.__name__


def _convert(value: Any, tp: Any, name: str) -> Any:
    """Check ``value`` against annotation ``tp``; int->float is the only implicit conversion.

    Args:
        value: the parsed YAML value.
        tp: a resolved annotation (str, int, float, bool, list[X], X | None).
        name: dotted field name for the error message.
    """
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        try:
            return _convert(value, inner[0], name)
        except ConfigError:
            raise ConfigError(f"{name}: expected {_type_name(tp)}, got {value!r}", name) from None
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected {_type_name(tp)}, got {value!r}", name)
        return [_convert(v, typing.get_args(tp)[0], f"{name}[{i}]") for i, v in enumerate(value)]
    # bool is a subclass of int: keep booleans and numbers strictly apart.
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{name}: expected {_type_name(tp)}, got {value!r}", name.split("[")[0])


def _suggest(key: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _unknown_key(section: str, key: str) -> ConfigError:
    dotted = f"{section}.{key}"
    elsewhere = [f"{s}.{key}" for s, fields in _FIELD_TYPES.items() if key in fields]
    hint = f" (did you mean '{elsewhere[0]}'?)" if elsewhere else _suggest(dotted, _ALL_KEYS)
    return ConfigError(f"unknown key '{dotted}'{hint}", dotted)


def _unknown_section(section: str) -> ConfigError:
    return ConfigError(f"unknown section '{section}'{_suggest(section, list(_SECTIONS))}; "
                       f"sections are {', '.join(_SECTIONS)}")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

def _read_yaml(path: Path, shown: str) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {shown}") from None
    except OSError as err:
        raise ConfigError(f"{shown}: cannot read config file ({err.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{shown}:{mark.line + 1}" if mark is not None else shown
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{shown}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _load_tree(path: Path, shown: str, tree: dict, sources: dict, chain: tuple = ()) -> None:
    """Merge ``path`` (after its ``base:`` chain) into ``tree``; ``sources`` maps key -> file."""
    resolved = path.resolve()
    if resolved in chain:
        raise ConfigError(f"{shown}: 'base' cycle through {shown}")
    data = _read_yaml(path, shown)
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{shown}: 'base' must be a file path, got {base!r}")
        base_path = path.parent / base
        base_shown = os.path.normpath(os.path.join(os.path.dirname(shown), base))
        if not base_path.is_file():
            raise ConfigError(f"{shown}: base file '{base}' not found (looked for {base_shown})")
        _load_tree(base_path, base_shown, tree, sources, chain + (resolved,))
    for section, values in data.items():
        if section not in _SECTIONS:
            raise ConfigError(f"{shown}: {_unknown_section(str(section))}")
        if values is None:  # an empty `teacher:` section
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{shown}: section '{section}' must be a mapping of fields, got {values!r}")
        for key, value in values.items():
            if key not in _FIELD_TYPES[section]:
                raise ConfigError(f"{shown}: {_unknown_key(section, str(key))}", f"{section}.{key}")
            tree.setdefault(section, {})[key] = value
            sources[f"{section}.{key}"] = shown


def _apply_override(text: str, tree: dict, sources: dict, where: str) -> None:
    key, sep, raw = text.partition("=")
    key = key.strip()
    section, dot, name = key.partition(".")
    if not sep or not dot or not name:
        raise ConfigError(f"override '{text}': expected section.field=value, e.g. optim.lr=0.2")
    label = f"{where} (override '{text}')"
    if section not in _SECTIONS:
        raise ConfigError(f"{label}: {_unknown_section(section)}")
    if name not in _FIELD_TYPES[section]:
        raise ConfigError(f"{label}: {_unknown_key(section, name)}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"{label}: cannot parse value {raw!r} ({getattr(err, 'problem', err)})") from None
    # A shell cannot easily quote for YAML: `run.out_dir=2024` or `data.root=on` mean the text.
    tp = _FIELD_TYPES[section][name]
    if tp in (str, str | None) and value is not None and not isinstance(value, str):
        value = raw
    tree.setdefault(section, {})[name] = value
    sources[key] = label


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> Config:
    """Build a :class:`Config` from ``{section: {field: value}}`` (e.g. a checkpoint's stored config).

    Missing fields take their defaults; types are checked but :func:`validate` is not run.

    Args:
        data: nested mapping as produced by :func:`to_dict`.
        source: name used as prefix in error messages.
    """
    sections = {}
    for section, values in data.items():
        if section not in _SECTIONS:
            raise ConfigError(f"{source}: {_unknown_section(str(section))}")
        kwargs = {}
        for key, value in (values or {}).items():
            if key not in _FIELD_TYPES[section]:
                raise ConfigError(f"{source}: {_unknown_key(section, str(key))}")
            try:
                kwargs[key] = _convert(value, _FIELD_TYPES[section][key], f"{section}.{key}")
            except ConfigError as err:
                raise ConfigError(f"{source}: {err}", err.field) from None
        sections[section] = _SECTIONS[section](**kwargs)
    return Config(**sections)


def load_config(path: str | Path, overrides: Sequence[str] = (), check_paths: bool = True,
                world_size: int | None = None) -> Config:
    """Load a YAML config (following ``base:``), apply dotted overrides, check types, validate.

    Args:
        path: the config file.
        overrides: ``section.field=value`` strings; values are parsed with ``yaml.safe_load``.
        check_paths: check that data.root / model.torchvision_weights exist. Paper configs hold
            placeholder dataset paths, so tests load them with ``check_paths=False``.
        world_size: for the batch divisibility check; None reads ``WORLD_SIZE`` (default 1).

    Raises:
        ConfigError: one line naming the field and the file or override that set it.
    """
    shown = str(path)
    tree: dict[str, dict[str, Any]] = {}
    sources: dict[str, str] = {}
    _load_tree(Path(path), shown, tree, sources)
    for text in overrides:
        _apply_override(text, tree, sources, shown)

    def where(err: ConfigError) -> str:
        return sources.get(err.field or "", shown)

    sections = {}
    for section, cls in _SECTIONS.items():
        kwargs = {}
        for key, value in tree.get(section, {}).items():
            try:
                kwargs[key] = _convert(value, _FIELD_TYPES[section][key], f"{section}.{key}")
            except ConfigError as err:
                raise ConfigError(f"{where(err)}: {err}", err.field) from None
        sections[section] = cls(**kwargs)
    cfg = Config(**sections)
    try:
        validate(cfg, world_size, check_paths=check_paths)
    except ConfigError as err:
        raise ConfigError(f"{where(err)}: {err}", err.field) from None
    return cfg


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------

def _world_size_from_env() -> int:
    # Read before any process group exists (launchers export WORLD_SIZE; torchrun, SLURM via submitit).
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(raw)
    except ValueError:
        world = 0
    if world < 1:
        raise ConfigError(f"WORLD_SIZE: expected a positive integer, got {raw!r}")
    return world


def micro_batch_size(cfg: Config, world_size: int | None = None) -> int:
    """Per-rank batch of one forward/backward: global / (grad_accum x world size).

    Args:
        cfg: the run config.
        world_size: number of data-parallel ranks; None reads ``WORLD_SIZE`` (default 1).

    Raises:
        ConfigError: when the global batch does not split evenly.
    """
    world = _world_size_from_env() if world_size is None else int(world_size)
    if world < 1:
        raise ConfigError(f"world size must be >= 1, got {world}")
    eng = cfg.engine
    per_step = eng.grad_accum * world
    if eng.global_batch_size % per_step:
        g = eng.global_batch_size
        lower, upper = (g // per_step) * per_step, (g // per_step + 1) * per_step
        nearest = f"{lower} or {upper}" if lower else f"{upper}"
        if g % eng.grad_accum == 0:
            worlds = [w for w in range(1, g // eng.grad_accum + 1) if (g // eng.grad_accum) % w == 0]
            fits = (f"; world sizes that divide it with grad_accum {eng.grad_accum}: "
                    + ", ".join(map(str, worlds[:12])) + (", ..." if len(worlds) > 12 else ""))
        else:
            fits = f"; grad_accum {eng.grad_accum} does not even divide {g}"
        raise ConfigError(
            f"engine.global_batch_size: {g} is not divisible by grad_accum x world size = "
            f"{eng.grad_accum} x {world} = {per_step}; use a global batch of {nearest}{fits}",
            "engine.global_batch_size")
    return eng.global_batch_size // per_step


def check_zero_stage(stage: Any) -> None:
    """Refuse a ZeRO stage the trainer cannot run: the one place stage 3 is refused.

    ZeRO stage 3 partitions the parameters themselves: the EMA teacher reads the full student
    parameters every step, BN buffers are averaged on whole modules, per-block MACs and export
    need whole tensors. Stages 0-2 keep full parameters on every rank. Called by :func:`validate`
    and by ``spnet_dist.engine.check_ds_config`` for every DeepSpeed dict.

    Raises:
        ConfigError: one line naming ``engine.zero_stage``.
    """
    if stage in ZERO_STAGES and not isinstance(stage, bool):
        return
    reason = ("ZeRO stage 3 shards parameters, which breaks the EMA teacher, BN-buffer averaging, "
              "per-block MACs and export" if stage == 3 else "not a DeepSpeed ZeRO stage")
    raise ConfigError(f"engine.zero_stage: {stage!r} is not supported ({reason}); use 0, 1 or 2", "engine.zero_stage")


def _check_types(cfg: Config) -> None:
    # Configs built in Python skip load_config's conversion: check them against the annotations too.
    for section in _SECTIONS:
        sub = getattr(cfg, section)
        if not isinstance(sub, _SECTIONS[section]):
            raise ConfigError(f"{section}: expected {_SECTIONS[section].__name__}, got {sub!r}", section)
        for key, tp in _FIELD_TYPES[section].items():
            _convert(getattr(sub, key), tp, f"{section}.{key}")


def validate(cfg: Config, world_size: int | None = None, check_paths: bool = True) -> None:
    """Check ranges, choices and cross-field rules; raise the first problem as a ConfigError.

    Args:
        cfg: the config to check.
        world_size: data-parallel ranks for the batch divisibility check; None reads the
            ``WORLD_SIZE`` environment variable (default 1). No process group is needed.
        check_paths: also check that data.root and model.torchvision_weights exist.
    """
    _check_types(cfg)

    def fail(name: str, message: str) -> None:
        raise ConfigError(f"{name}: {message}", name)

    def need(ok: bool, name: str, rule: str) -> None:
        if not ok:
            section, key = name.split(".")
            fail(name, f"{getattr(getattr(cfg, section), key)!r} is invalid; {rule}")

    m, t, lo, d, o, s, e, r = (cfg.model, cfg.teacher, cfg.loss, cfg.data, cfg.optim, cfg.schedule,
                               cfg.engine, cfg.run)

    check_zero_stage(e.zero_stage)  # before the generic choice check: it gives stage 3's reason
    for name, allowed in CHOICES.items():
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            fail(name, f"{value!r} is not one of {', '.join(repr(a) for a in allowed)}")

    # model
    if m.name not in MODEL_NAMES:
        fail("model.name", f"unknown model {m.name!r}{_suggest(m.name, MODEL_NAMES)}; "
                           f"registered models are {', '.join(MODEL_NAMES)}")
    need(m.num_classes >= 2, "model.num_classes", "must be >= 2")
    need(m.router_hidden >= 1, "model.router_hidden", "must be >= 1")
    need(0.0 <= m.router_dropout < 1.0, "model.router_dropout", "must be in [0, 1)")
    need(len(m.router_bias) == 2, "model.router_bias", "must be two numbers (skip, execute)")
    need(m.gumbel_tau > 0, "model.gumbel_tau", "must be > 0")
    if m.torchvision_weights is not None:
        if m.name not in IMAGENET_MODELS:
            fail("model.torchvision_weights", f"torchvision weights only fit the ImageNet models "
                                              f"({', '.join(IMAGENET_MODELS)}), not {m.name!r}")
        if not m.torchvision_weights.endswith((".pth", ".pt", ".safetensors")):
            fail("model.torchvision_weights", f"{m.torchvision_weights!r} is not a .pth/.pt/.safetensors file")
        if check_paths and not Path(m.torchvision_weights).expanduser().is_file():
            fail("model.torchvision_weights", f"file not found: {m.torchvision_weights}")

    # teacher
    need(0.0 <= t.momentum < 1.0, "teacher.momentum",
         "must be in [0, 1) (m = 1 would freeze the teacher at its initialisation)")

    # loss
    for key in ("alpha", "beta", "gamma", "cost_weight"):
        need(getattr(lo, key) >= 0, f"loss.{key}", "must be >= 0")
    if lo.target_rate is not None:
        need(0.0 <= lo.target_rate <= 1.0, "loss.target_rate", "must be in [0, 1]")
    if lo.cost_weight > 0 and lo.target_rate is None:
        fail("loss.cost_weight", f"{lo.cost_weight} > 0 needs loss.target_rate (the target "
                                 "execution rate t of L_cost), e.g. loss.target_rate=0.5")
    if lo.grad_clamp is not None:
        need(lo.grad_clamp > 0, "loss.grad_clamp", "must be > 0 (use null to disable the clamp)")
        need(e.zero_stage == 0, "loss.grad_clamp",
             f"needs engine.zero_stage=0 (stage {e.zero_stage} keeps reduced gradients in partitioned buffers)")

    # data
    need(d.image_size >= 8, "data.image_size", "must be >= 8")
    need(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    need(d.eval_batch_size >= 1, "data.eval_batch_size", "must be >= 1")
    need(d.dali_prefetch_queue_depth >= 1, "data.dali_prefetch_queue_depth", "must be >= 1")
    if d.backend == "dali" and d.format in ("cifar", "fashion_mnist"):
        fail("data.backend", f"'dali' reads JPEG folders (imagefolder, digits); data.format {d.format!r} is "
                             "held in memory as uint8 arrays (no JPEG to decode): use 'torchvision' (or 'auto')")
    if d.format in ("digits", "fashion_mnist") and m.num_classes != 10:
        fail("model.num_classes", f"the {d.format} data set has 10 classes, got {m.num_classes}")
    need(d.val_size >= 1, "data.val_size", "must be >= 1")
    need(d.split_seed >= 0, "data.split_seed", "must be >= 0")
    if d.train_subset is not None:
        need(d.train_subset >= 1, "data.train_subset", "must be >= 1 (or null: all)")
        need(d.format == "fashion_mnist", "data.train_subset", "only data.format 'fashion_mnist' has it")
    if check_paths:
        _check_data_root(cfg)

    # optim
    need(o.lr > 0, "optim.lr", "must be > 0")
    need(0.0 <= o.momentum < 1.0, "optim.momentum", "must be in [0, 1)")
    need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    if o.nesterov and o.momentum == 0:
        fail("optim.nesterov", "Nesterov momentum needs optim.momentum > 0")

    # schedule
    need(s.epochs >= 1, "schedule.epochs", "must be >= 1")
    need(0.0 < s.decay <= 1.0, "schedule.decay", "must be in (0, 1]")
    need(0.0 <= s.warmup_epochs < s.epochs, "schedule.warmup_epochs",
         f"must be >= 0 and < schedule.epochs ({s.epochs})")
    if s.kind == "multistep":  # cosine ignores milestones, so a cosine config may keep the defaults
        ms = s.milestones
        if any(b <= a for a, b in zip(ms, ms[1:])):
            fail("schedule.milestones", f"{ms} must be strictly increasing")
        if ms and not (0 < ms[0] and ms[-1] < s.epochs):
            fail("schedule.milestones", f"{ms} must lie in (0, schedule.epochs = {s.epochs})")

    # engine
    need(e.global_batch_size >= 1, "engine.global_batch_size", "must be >= 1")
    need(e.grad_accum >= 1, "engine.grad_accum", "must be >= 1")
    if e.clip_grad is not None:
        need(e.clip_grad > 0, "engine.clip_grad", "must be > 0 (use null to disable clipping)")
    micro = micro_batch_size(cfg, world_size)
    if micro < 2:
        # The router's BatchNorm1d (and every BatchNorm2d) needs two samples per rank to
        # normalise with batch statistics in training; torch raises at the first step otherwise.
        per_step = e.grad_accum * (e.global_batch_size // (micro * e.grad_accum))
        fail("engine.global_batch_size",
             f"{e.global_batch_size} gives a micro-batch of 1 per rank (grad_accum {e.grad_accum} x world size "
             f"{per_step // e.grad_accum}); BatchNorm in training needs >= 2 samples per rank: use a multiple "
             f"of 2 x {per_step} = {2 * per_step} (e.g. {2 * per_step}, {4 * per_step}), or fewer ranks / a "
             "smaller engine.grad_accum")
    if e.precision == "fp16" and e.zero_stage == 0:
        fail("engine.precision", "'fp16' needs engine.zero_stage 1 or 2: with ZeRO 0 DeepSpeed's GradScaler "
                                 "skips overflow steps without telling the engine (the LR schedule and the "
                                 "teacher would count them); use bf16, or zero_stage 1/2")
    if e.bucket_size is not None:
        need(e.bucket_size >= 1, "engine.bucket_size", "must be >= 1 element (or null: sized from the model)")

    # run
    need(bool(r.out_dir.strip()), "run.out_dir", "must not be empty")
    need(0 <= r.seed < 2**32, "run.seed", "must be in [0, 2**32)")
    need(r.eval_every >= 1, "run.eval_every", "must be >= 1")
    need(r.log_every >= 1, "run.log_every", "must be >= 1")
    if r.max_steps is not None:
        need(r.max_steps >= 1, "run.max_steps", "must be >= 1 (or null)")
    need(bool(r.resume.strip()), "run.resume", "must be 'auto', 'never' or a checkpoint path")
    need(r.checkpoint_every >= 0, "run.checkpoint_every", "must be >= 0 (0: epoch ends only)")
    need(r.keep_checkpoints >= 1, "run.keep_checkpoints", "must be >= 1")
    need(r.max_bad_steps >= 0, "run.max_bad_steps", "must be >= 0")
    need(r.stop_check_every >= 1, "run.stop_check_every", "must be >= 1")
    need(r.path_probe_size >= 0, "run.path_probe_size", "must be >= 0 (0: no path snapshots)")
    if r.path_snapshot_every is not None:
        need(r.path_snapshot_every >= 1, "run.path_snapshot_every", "must be >= 1 (or null: 4 per epoch)")
    need(e.timeout_min > 0, "engine.timeout_min", "must be > 0")


def config_warnings(cfg: Config, world_size: int | None = None, device_type: str = "cuda") -> list[str]:
    """Valid settings that are probably not what the run wants: one line each, naming the fields
    and the fixes. Not errors (the config runs as written); the trainer prints them on rank 0 once
    it knows its device and world size.

    * CUDA, no ``model.sync_bn`` and a micro-batch below :data:`BN_MIN_MICRO_BATCH`: every
      BatchNorm normalises over the micro-batch alone (the paper's 128 images on 32 GPUs: 4).
      Not on CPU, where SyncBatchNorm is unavailable and runs are small on purpose.
    * ``optim.lr_scaling=linear`` raising the rate (global batch above 256) with no warm-up:
      Goyal et al. 2017 needed a gradual warm-up (5 epochs) for large batches.

    Args:
        cfg: a validated config.
        world_size: data-parallel ranks; None reads ``WORLD_SIZE`` (default 1).
        device_type: the ranks' device type (``"cuda"`` or ``"cpu"``).
    """
    e, out = cfg.engine, []
    micro = micro_batch_size(cfg, world_size)
    world = e.global_batch_size // (micro * e.grad_accum)
    if device_type == "cuda" and not cfg.model.sync_bn and micro < BN_MIN_MICRO_BATCH:
        accum = f" x engine.grad_accum {e.grad_accum}" if e.grad_accum > 1 else ""
        out.append(
            f"engine.global_batch_size: {e.global_batch_size} on {world} ranks{accum} is a micro-batch of {micro} "
            f"images, and with model.sync_bn=false every BatchNorm (the routers' BatchNorm1d too) normalises over "
            f"those {micro} alone; below {BN_MIN_MICRO_BATCH} BatchNorm's ImageNet error grows (Wu & He 2018: "
            f"+1.2 points at 8, +3.7 at 4 images per GPU). Set model.sync_bn=true, or raise "
            f"engine.global_batch_size to {BN_MIN_MICRO_BATCH * world * e.grad_accum} or more with "
            f"optim.lr_scaling=linear, or run on fewer ranks (docs/training.md, 'The paper recipe on N GPUs')")
    if cfg.optim.lr_scaling == "linear" and e.global_batch_size > LR_BASE_BATCH and cfg.schedule.warmup_epochs == 0:
        out.append(
            f"optim.lr_scaling: 'linear' at engine.global_batch_size {e.global_batch_size} starts at "
            f"{e.global_batch_size / LR_BASE_BATCH:g} x optim.lr with schedule.warmup_epochs=0; Goyal et al. 2017 "
            "warm up gradually over 5 epochs at such batches (schedule.warmup_epochs=5)")
    return out


def _check_data_root(cfg: Config) -> None:
    # The readers' own layout rules (spnet_dist.data.check_data_root), so a root that passes here is
    # one they open; the CIFAR variant found there must match model.num_classes.
    from .data import check_data_root

    try:
        classes = check_data_root(cfg.data)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err), "data.root") from None
    if classes is not None and cfg.model.num_classes != classes:
        raise ConfigError(f"model.num_classes: {cfg.data.root} is CIFAR-{classes} but num_classes is "
                          f"{cfg.model.num_classes}", "model.num_classes")


# --------------------------------------------------------------------------------------------------
# Serialisation
# --------------------------------------------------------------------------------------------------

def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """``{section: {field: value}}`` with plain Python values (YAML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically); ``load_config`` reads it back equal.

    Args:
        cfg: the config to save.
        path: destination file; parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# Resolved spnet-dist config (base files and overrides applied).\n"
    text += yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers never see a half-written file
    return path


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def _yaml_scalar(value: Any) -> str:
    """``value`` as it would be written in YAML or an override (``null``, ``true``, ``[150, 250]``)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _fields_epilog() -> str:
    lines = ["configuration fields (override with section.field=value):"]
    for section, cls in _SECTIONS.items():
        lines.append(f"\n  {section}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            tp = _type_name(_FIELD_TYPES[section][f.name])
            lines.append(f"    {section}.{f.name} ({tp}, {_yaml_scalar(default)}): {f.metadata['help']}")
    return "\n".join(lines)


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--config FILE`` and positional ``section.field=value`` overrides to ``parser``.

    Also sets an epilog listing every field (type, default, help) for ``--help``.

    Args:
        parser: the CLI's parser; its formatter becomes RawDescriptionHelpFormatter.
    """
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ((parser.epilog + "\n\n") if parser.epilog else "") + _fields_epilog()
    parser.add_argument("--config", required=True, metavar="FILE", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="dotted overrides, e.g. optim.lr=0.2 schedule.milestones=[30,60]")
    # The `deepspeed` launcher appends --local_rank=<i> to every rank's command line; the rank
    # itself is read from the LOCAL_RANK environment variable it also exports.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                     check_paths: bool = True) -> Config:
    """Load the config named by parsed arguments; on error print ``error: ...`` and exit 2.

    Args:
        parser: the parser that produced ``args`` (for ``parser.error``).
        args: namespace with ``config`` and ``overrides`` from :func:`add_config_arguments`.
        check_paths: forwarded to :func:`load_config`.
    """
    try:
        return load_config(args.config, args.overrides, check_paths=check_paths)
    except ConfigError as err:
        parser.error(str(err))


def parse_args(argv: Sequence[str] | None = None, description: str = "",
               check_paths: bool = True) -> Config:
    """Parse ``--config FILE [section.field=value ...]`` into a validated Config.

    Args:
        argv: arguments without the program name; None uses ``sys.argv[1:]``.
        description: text shown at the top of ``--help``.
        check_paths: forwarded to :func:`load_config`.
    """
    parser = argparse.ArgumentParser(description=description)
    add_config_arguments(parser)
    # intermixed: launchers may put their own flags (--local_rank) between the overrides
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else list(argv))
    return config_from_args(parser, args, check_paths=check_paths)
