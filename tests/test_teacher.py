"""Tests for spnet_dist.teacher.EMATeacher: exact EMA math, buffer rules, modes, precision, state.

Uses a small generic module (Linear → BatchNorm1d → ReLU → Dropout → Linear), no SP-Net model.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from spnet_dist.teacher import EMATeacher

TIGHT64 = dict(rtol=1e-12, atol=1e-12)
TIGHT32 = dict(rtol=1e-6, atol=1e-7)


def make_student(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)
    ).to(dtype)


def perturb(module: nn.Module, seed: int = 1) -> None:
    """Move every parameter and floating buffer of the module somewhere else."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g).to(t.dtype))
            else:
                t.add_(7)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# EMA math
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [0.0, 0.5, 0.99])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, TIGHT64), (torch.float32, TIGHT32)])
def test_update_matches_hand_ema(m, dtype, tol):
    student = make_student(dtype)
    teacher = EMATeacher(student, momentum=m)
    perturb(student)
    before = {k: p.detach().clone() for k, p in teacher.module.named_parameters()}
    teacher.update(student)
    for name, p_s in student.named_parameters():
        expected = m * before[name] + (1 - m) * p_s.detach()  # eq. 5
        got = teacher.module.get_parameter(name)
        assert got.dtype == dtype
        torch.testing.assert_close(got, expected, **tol)
        if m == 0.0:
            assert torch.equal(got, p_s)  # m = 0: the teacher is a copy of the student
    assert teacher.num_updates == 1


def test_two_updates_compose():
    m = 0.7
    student = make_student()
    teacher = EMATeacher(student, momentum=m)
    w0 = teacher.module[0].weight.clone()
    perturb(student, seed=1)
    w1 = student[0].weight.detach().clone()
    teacher.update(student)
    perturb(student, seed=2)
    w2 = student[0].weight.detach().clone()
    teacher.update(student)
    expected = m * m * w0 + m * (1 - m) * w1 + (1 - m) * w2
    torch.testing.assert_close(teacher.module[0].weight, expected, **TIGHT64)
    assert teacher.num_updates == 2


def test_update_after_real_sgd_step_moves_teacher_by_exact_fraction():
    m = 0.6
    student = make_student()
    teacher = EMATeacher(student, momentum=m)
    perturb(teacher.module, seed=3)  # teacher ≠ student, as after some training
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    nn.functional.cross_entropy(student(x), y).backward()
    opt.step()

    before = {k: p.detach().clone() for k, p in teacher.module.named_parameters()}
    teacher.update(student)
    for name, p_s in student.named_parameters():
        delta = teacher.module.get_parameter(name) - before[name]
        torch.testing.assert_close(delta, (1 - m) * (p_s.detach() - before[name]), **TIGHT64)


def test_teacher_is_an_independent_copy():
    student = make_student()
    teacher = EMATeacher(student, momentum=0.5)
    before = snapshot(teacher.module)
    perturb(student)  # no update yet: the teacher must not see this
    for k, v in teacher.module.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.requires_grad for p in student.parameters())  # the student is untouched


# ---------------------------------------------------------------------------------------------
# No gradients, ever
# ---------------------------------------------------------------------------------------------
def test_teacher_params_never_require_grad():
    student = make_student()
    x = torch.randn(4, 6, dtype=torch.float64)
    student(x).sum().backward()  # the student carries .grad when the teacher is built
    teacher = EMATeacher(student, momentum=0.9)

    def check():
        assert all(not p.requires_grad and p.grad is None for p in teacher.module.parameters())

    check()
    assert not teacher(x).requires_grad
    teacher.update(student)
    check()
    fresh = EMATeacher(make_student(seed=5), momentum=0.5)
    fresh.load_state_dict(teacher.state_dict())
    assert all(not p.requires_grad for p in fresh.module.parameters())


# ---------------------------------------------------------------------------------------------
# Buffer rules
# ---------------------------------------------------------------------------------------------
def test_buffers_copy_rule():
    student = make_student()
    teacher = EMATeacher(student, momentum=0.9, buffers="copy")
    perturb(student)
    teacher.update(student)
    for name, b_s in student.named_buffers():
        assert torch.equal(teacher.module.get_buffer(name), b_s)
    assert teacher.module[1].num_batches_tracked.item() == 7


def test_buffers_ema_rule():
    m = 0.9
    student = make_student()
    teacher = EMATeacher(student, momentum=m, buffers="ema")
    perturb(student)
    before = snapshot(teacher.module)
    teacher.update(student)
    bn_t, bn_s = teacher.module[1], student[1]
    for name in ("running_mean", "running_var"):
        expected = m * before[f"1.{name}"] + (1 - m) * getattr(bn_s, name)
        torch.testing.assert_close(getattr(bn_t, name), expected, **TIGHT64)
    # Integer buffers cannot be averaged; they are copied.
    assert torch.equal(bn_t.num_batches_tracked, bn_s.num_batches_tracked)


def test_teacher_buffers_are_the_floating_buffers_in_place():
    teacher = EMATeacher(make_student(), momentum=0.5)
    bufs = teacher.teacher_buffers()
    bn = teacher.module[1]
    assert len(bufs) == 2 and bufs[0] is bn.running_mean and bufs[1] is bn.running_var
    bufs[0].fill_(3.0)  # an all-reduce writes in place
    assert torch.equal(bn.running_mean, torch.full_like(bn.running_mean, 3.0))


# ---------------------------------------------------------------------------------------------
# Forward mode
# ---------------------------------------------------------------------------------------------
def test_eval_mode_is_deterministic_and_does_not_leak():
    student = make_student()
    student.train()
    teacher = EMATeacher(student, momentum=0.5)  # forward_mode="eval" by default
    student_state = snapshot(student)
    x = torch.randn(8, 6, dtype=torch.float64)

    torch.manual_seed(1)
    y1 = teacher(x)
    teacher.module.train()  # e.g. someone toggled the copy; the next call must still be eval
    torch.manual_seed(2)
    y2 = teacher(x)
    assert torch.equal(y1, y2)  # Dropout and batch-stat BN would make these differ
    assert not teacher.module.training
    assert student.training  # the student's mode is not the teacher's business
    with torch.no_grad():
        torch.testing.assert_close(y1, copy.deepcopy(teacher.module).eval()(x), **TIGHT64)
    for k, v in student.state_dict().items():
        assert torch.equal(v, student_state[k])


def test_train_mode_uses_batch_stats_and_dropout_on_its_own_copy():
    student = make_student()
    student.eval()
    teacher = EMATeacher(student, momentum=0.5, forward_mode="train")
    student_state = snapshot(student)
    teacher_mean = teacher.module[1].running_mean.clone()
    x = torch.randn(8, 6, dtype=torch.float64)

    teacher.module.eval()
    torch.manual_seed(1)
    y1 = teacher(x)
    torch.manual_seed(2)
    y2 = teacher(x)
    assert teacher.module.training
    assert not torch.equal(y1, y2)  # Dropout active
    assert not torch.equal(teacher.module[1].running_mean, teacher_mean)  # batch-stat BN
    assert not student.training
    for k, v in student.state_dict().items():  # the student's BN statistics did not move
        assert torch.equal(v, student_state[k])


# ---------------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------------
def test_bf16_student_gives_fp32_teacher_that_keeps_small_updates():
    m = 0.9999
    student = make_student(torch.bfloat16)
    teacher = EMATeacher(student, momentum=m)
    assert all(p.dtype == torch.float32 for p in teacher.module.parameters())
    assert all(b.dtype == torch.float32 for b in teacher.teacher_buffers())
    for p_t, p_s in zip(teacher.module.parameters(), student.parameters()):
        assert torch.equal(p_t, p_s.float())

    perturb(student)
    before = teacher.module[0].weight.clone()
    teacher.update(student)
    s = student[0].weight.detach().float()
    after = teacher.module[0].weight
    torch.testing.assert_close(after, m * before + (1 - m) * s, **TIGHT32)
    # The update is 1e-4 of the gap: it survives in fp32 for every element ...
    assert (after != before).all()
    # ... while the same EMA held in bf16 would round most of it away.
    in_bf16 = before.bfloat16().lerp(s.bfloat16(), 1 - m)
    assert (in_bf16 == before.bfloat16()).float().mean() > 0.5


def test_fp16_student_to_fp32_teacher():
    teacher = EMATeacher(make_student(torch.float16), momentum=0.5)
    assert {p.dtype for p in teacher.module.parameters()} == {torch.float32}


def test_fp64_student_is_not_downcast():
    teacher = EMATeacher(make_student(torch.float64), momentum=0.5)
    assert {p.dtype for p in teacher.module.parameters()} == {torch.float64}


# ---------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------
def test_state_dict_round_trip():
    student = make_student()
    teacher = EMATeacher(student, momentum=0.7)
    for seed in (1, 2, 3):
        perturb(student, seed)
        teacher.update(student)
    state = teacher.state_dict()
    assert state["momentum"] == 0.7 and state["num_updates"] == 3

    restored = EMATeacher(make_student(seed=9), momentum=0.2)
    restored.load_state_dict(state)
    assert restored.momentum == 0.7 and restored.num_updates == 3
    for k, v in teacher.module.state_dict().items():
        assert torch.equal(restored.module.state_dict()[k], v)
    # It keeps tracking exactly like the original.
    perturb(student, 4)
    teacher.update(student)
    restored.update(student)
    for a, b in zip(teacher.module.parameters(), restored.module.parameters()):
        assert torch.equal(a, b)


def test_load_state_dict_is_strict():
    teacher = EMATeacher(make_student(), momentum=0.5)
    state = teacher.state_dict()
    with pytest.raises(ValueError, match="num_updates"):
        teacher.load_state_dict({"module": state["module"], "momentum": 0.5})
    state["module"].pop("0.weight")
    with pytest.raises(RuntimeError, match="0.weight"):
        teacher.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"momentum": 1.0}, "teacher.momentum"),
        ({"momentum": -0.1}, "teacher.momentum"),
        ({"momentum": "0.9"}, "teacher.momentum"),
        ({"momentum": 0.5, "forward_mode": "inference"}, "teacher.forward_mode"),
        ({"momentum": 0.5, "buffers": "mean"}, "teacher.buffers"),
    ],
)
def test_bad_options_raise(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")) as err:
        EMATeacher(make_student(), **kwargs)
    assert "\n" not in str(err.value)


def test_update_from_a_different_module_raises():
    teacher = EMATeacher(make_student(), momentum=0.5)
    wrapped = nn.Sequential()
    wrapped.add_module("module", make_student())  # names gain a "module." prefix, like DDP
    with pytest.raises(ValueError, match="plain module") as err:
        teacher.update(wrapped)
    assert "student parameters" in str(err.value) and "'0.weight'" in str(err.value)  # names what differs
    assert teacher.num_updates == 0


def test_keyword_arguments_reach_the_teachers_module():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x, scale=1.0):
            return self.lin(x) * scale

    teacher = EMATeacher(Scaled(), momentum=0.5)
    x = torch.randn(2, 3)
    torch.testing.assert_close(teacher(x, scale=3.0), 3.0 * teacher(x))


# ---------------------------------------------------------------------------------------------
# Hooks and the cached update (issue 6)
# ---------------------------------------------------------------------------------------------
def test_teacher_copies_no_hooks_of_the_student():
    # Finding 3: DeepSpeed hooks its module; copy.deepcopy carried the hooks into the teacher.
    student = make_student()
    calls = []
    student.register_forward_pre_hook(lambda m, args, kwargs: calls.append("pre"), with_kwargs=True)
    student.register_forward_hook(lambda m, args, out: calls.append("post"))
    student[0].register_forward_hook(lambda m, args, out: calls.append("inner"))
    student[4].register_full_backward_hook(lambda m, gi, go: None)
    teacher = EMATeacher(student, 0.5)
    teacher(torch.randn(4, 6, dtype=torch.float64))
    assert calls == []
    student(torch.randn(4, 6, dtype=torch.float64))
    assert calls == ["pre", "inner", "post"]  # the student keeps its own hooks


def test_cached_update_follows_in_place_changes_and_rebinds_to_another_student():
    student = make_student()
    teacher = EMATeacher(student, 0.5)
    perturb(student, seed=3)
    expected = {k: 0.5 * v + 0.5 * s for (k, v), s in zip(snapshot(teacher.module).items(),
                                                          snapshot(student).values())}
    teacher.update(student)  # binds and caches the tensor lists
    with torch.no_grad():  # replace a parameter's storage, as ZeRO does with flat buffers
        student[0].weight.data = student[0].weight.data.clone() + 1.0
    before = teacher.module[0].weight.clone()
    teacher.update(student)
    torch.testing.assert_close(teacher.module[0].weight, 0.5 * before + 0.5 * student[0].weight, **TIGHT64)
    assert torch.equal(teacher.module[1].running_mean, student[1].running_mean)  # copy rule
    other = make_student(seed=5)
    teacher.update(other)  # another module of the same architecture: rebinds
    torch.testing.assert_close(teacher.module[4].bias,
                               0.5 * (0.5 * expected["4.bias"] + 0.5 * student[4].bias) + 0.5 * other[4].bias,
                               **TIGHT64)
