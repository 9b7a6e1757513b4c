"""Distillation core: the KD loss against a hand computation, hidden-state matching, the frozen teacher."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pat_callbacks.recovery.distillation import Distiller, hidden_mse, kd_loss, logits_of, make_teacher


def _hand_kd(student: list[list[float]], teacher: list[list[float]], temperature: float, alpha: float) -> float:
    """alpha * T^2 * mean over rows of sum_c p_t(c) * (log p_t(c) - log p_s(c)), with explicit loops."""

    def softmax(row: list[float]) -> list[float]:
        exps = [math.exp(v / temperature) for v in row]
        return [e / sum(exps) for e in exps]

    total = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        p_s, p_t = softmax(s_row), softmax(t_row)
        total += sum(t * (math.log(t) - math.log(s)) for s, t in zip(p_s, p_t, strict=True))
    return alpha * temperature**2 * total / len(student)


def test_kd_loss_matches_a_hand_computation() -> None:
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    teacher = [[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]]
    got = kd_loss(torch.tensor(student), torch.tensor(teacher), temperature=2.0, alpha=0.5)
    assert float(got) == pytest.approx(_hand_kd(student, teacher, 2.0, 0.5), rel=1e-6)


def test_kd_loss_averages_over_every_position_of_language_model_logits() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    got = kd_loss(student, teacher, temperature=3.0, alpha=1.0)
    hand = _hand_kd(student.reshape(6, 5).tolist(), teacher.reshape(6, 5).tolist(), 3.0, 1.0)
    assert float(got) == pytest.approx(hand, rel=1e-5)


def test_kd_loss_is_float32_under_half_precision_logits_and_zero_for_equal_logits() -> None:
    logits = torch.randn(4, 7).to(torch.bfloat16)
    loss = kd_loss(logits, logits.clone(), temperature=2.0)
    assert loss.dtype == torch.float32 and float(loss) == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_refuses_different_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_logits_of_reads_hf_outputs_tuples_and_tensors() -> None:
    from transformers.modeling_outputs import CausalLMOutput

    t = torch.ones(1, 2)
    assert logits_of(CausalLMOutput(logits=t)) is t
    assert logits_of((t, None)) is t and logits_of({"logits": t}) is t and logits_of(t) is t
    with pytest.raises(TypeError, match="Cannot find logits"):
        logits_of("text")


def _tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))


def test_distiller_on_gpt2_adds_hidden_mse_and_keeps_the_teacher_frozen() -> None:
    model = _tiny_gpt2()
    distiller = Distiller.from_model(model, temperature=2.0, alpha=1.0, hidden_layers=["transformer.h.0"])
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(0.5)  # the student drifts from the teacher
    tokens = torch.randint(0, 64, (2, 16))
    with distiller.watch(model) as call:
        out = model(tokens)
    loss = distiller.loss(call)
    teacher_out, teacher_hidden = distiller.teacher_forward(tokens)
    expected = kd_loss(out.logits, teacher_out.logits, 2.0) + hidden_mse(
        call.hidden["transformer.h.0"], teacher_hidden["transformer.h.0"]
    )
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6) and float(loss.detach()) > 0
    loss.backward()
    assert model.transformer.h[0].mlp.c_fc.weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in distiller.teacher.parameters())
    assert not model._forward_hooks and not model.transformer.h[0]._forward_hooks  # removed after watch


def test_teacher_in_bf16_halves_its_bytes_and_takes_float_inputs_in_its_dtype() -> None:
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    fp32 = Distiller.from_model(net).teacher_bytes()
    distiller = Distiller.from_model(net, dtype=torch.bfloat16)
    assert distiller.teacher_bytes() * 2 == fp32
    with distiller.watch(net) as call:
        net(torch.randn(3, 8))
    assert float(distiller.loss(call)) >= 0


def test_make_teacher_does_not_copy_the_training_loop() -> None:
    class WithLoop(nn.Linear):
        pass

    module = WithLoop(2, 2)
    loop = object()
    module._trainer = loop
    teacher = make_teacher(module)
    assert teacher._trainer is None and module._trainer is loop
    assert torch.equal(teacher.weight, module.weight) and teacher.weight is not module.weight


def test_loss_without_a_watched_forward_says_why() -> None:
    net = nn.Linear(2, 2)
    distiller = Distiller.from_model(net)
    with distiller.watch(net) as call:
        pass
    with pytest.raises(RuntimeError, match="not called inside"):
        distiller.loss(call)


def test_unknown_hidden_layer_is_refused_up_front() -> None:
    with pytest.raises(ValueError, match="not submodules of the teacher"):
        Distiller(nn.Linear(2, 2), hidden_layers=["blocks.0"])


def test_the_recovery_package_never_imports_lightning() -> None:
    import subprocess
    import sys

    code = (
        "import sys, pat_callbacks.recovery, pat_callbacks.recovery.lora, pat_callbacks.export.quantized; "
        "print(any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
