"""Distillation core: the KD loss against a hand computation, hidden-state matching, the frozen teacher, losses and
outputs chosen by name (an encoder's embeddings distilled with no labels and no logits), fit-start checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pat_callbacks.recovery.distillation import (
    LOSSES,
    Distiller,
    check_hidden_layers,
    check_teacher,
    cosine_loss,
    distillation_loss,
    hidden_mse,
    kd_loss,
    logits_of,
    make_teacher,
    mean_pooled,
    output_of,
)


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


def _tiny_bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # no dropout: the student's loss falls step by step
    return BertModel(config)


def _batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, 5:] = 0  # a padded sentence: its padding must not count in the mean
    return {"input_ids": torch.randint(0, 64, (3, 8)), "attention_mask": mask}


def _drift(model: nn.Module) -> None:
    """Prune half of every encoder Linear weight at random: the student drifts from its dense teacher."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in model.encoder.modules():
            if isinstance(module, nn.Linear):
                module.weight.mul_(torch.rand(module.weight.shape, generator=generator) > 0.5)


def test_hidden_state_matching_only_never_looks_for_logits_on_a_bert_model() -> None:
    model = _tiny_bert()
    distiller = Distiller.from_model(model, alpha=0.0, hidden_layers=["encoder.layer.1"])
    _drift(model)
    batch = _batch()
    with distiller.watch(model) as call:
        model(**batch)
    loss = distiller.loss(call)  # BertModel's output has no logits: alpha=0 must not ask for them
    _, teacher_hidden = distiller.teacher_forward(**batch)
    expected = hidden_mse(call.hidden["encoder.layer.1"], teacher_hidden["encoder.layer.1"])
    assert float(loss) == pytest.approx(float(expected), rel=1e-6) and float(loss) > 0
    loss.backward()
    assert model.encoder.layer[1].intermediate.dense.weight.grad is not None


def _hand_mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    rows = []
    for b in range(hidden.shape[0]):
        kept = [hidden[b, t] for t in range(hidden.shape[1]) if mask[b, t]]
        rows.append(sum(kept) / len(kept))
    return torch.stack(rows)


def test_embeddings_distilled_with_cosine_and_no_labels_match_a_hand_computation() -> None:
    student, teacher = _tiny_bert(), make_teacher(_tiny_bert(seed=1))  # another encoder: a clear distance
    batch = _batch()
    s_out, t_out = student(**batch), teacher(**batch)
    loss = distillation_loss(s_out, t_out, loss="cosine", output=mean_pooled, inputs=batch)
    s_emb = _hand_mean_pool(s_out.last_hidden_state, batch["attention_mask"])
    t_emb = _hand_mean_pool(t_out.last_hidden_state, batch["attention_mask"])
    hand = sum(1 - float(a @ b / (a.norm() * b.norm())) for a, b in zip(s_emb, t_emb, strict=True)) / 3
    assert float(loss) == pytest.approx(hand, rel=1e-5) and float(loss) > 0
    assert float(distillation_loss(t_out, t_out, loss="cosine", output=mean_pooled, inputs=batch)) == pytest.approx(
        0.0, abs=1e-6
    )


def test_outputs_chosen_by_field_index_or_logits_and_losses_by_name() -> None:
    model = _tiny_bert()
    out = model(**_batch())
    assert output_of(out, "last_hidden_state") is out.last_hidden_state
    assert output_of(out, "pooler_output") is out.pooler_output and output_of(out, 0) is out.last_hidden_state
    mse = distillation_loss(
        out, {"last_hidden_state": out.last_hidden_state * 2}, loss="mse", output="last_hidden_state"
    )
    assert float(mse) == pytest.approx(float(out.last_hidden_state.pow(2).mean()), rel=1e-6)
    logits = torch.randn(4, 5)
    kl = distillation_loss(logits, logits.flip(0), temperature=2.0, alpha=0.5)
    assert float(kl) == pytest.approx(float(kd_loss(logits, logits.flip(0), 2.0, 0.5)), rel=1e-6)
    assert sorted(LOSSES) == ["cosine", "kl", "mse"]
    with pytest.raises(TypeError, match=r"Cannot find logits .* output='last_hidden_state'"):
        distillation_loss(out, out)  # kl on logits of an encoder: said, with what there is
    with pytest.raises(
        TypeError, match=r"'sentence_embedding' .* its fields: \['last_hidden_state', 'pooler_output'\]"
    ):
        output_of(out, "sentence_embedding")
    with pytest.raises(ValueError, match="Unknown `loss` 'l2'; expected one of: 'cosine', 'kl', 'mse'"):
        Distiller(nn.Linear(2, 2), loss="l2")


def test_cosine_loss_ignores_scale_and_the_pure_loss_refuses_nothing_to_distil() -> None:
    x = torch.randn(4, 6)
    assert float(cosine_loss(x, 3 * x)) == pytest.approx(0.0, abs=1e-6)
    assert float(cosine_loss(x, -x)) == pytest.approx(2.0, rel=1e-6)
    with pytest.raises(ValueError, match="Nothing to distil"):
        distillation_loss(x, x, alpha=0.0)
    assert float(Distiller(nn.Linear(2, 2), alpha=0.0).loss_from(x, x)) == 0.0  # the callback adds nothing


def test_a_plain_loop_distils_an_encoders_embeddings_without_labels() -> None:
    student = _tiny_bert()
    distiller = Distiller(_tiny_bert(seed=1), loss="cosine", output=mean_pooled, hidden_layers=["encoder.layer.0"])
    distiller.check(student)
    batch = _batch()
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        with distiller.watch(student) as call:
            student(**batch)
        loss = distiller.loss(call)  # the whole training loss: no task loss, no labels
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_a_teacher_that_is_or_shares_the_student_is_refused() -> None:
    model = _tiny_bert()
    wrapper = nn.ModuleDict({"net": model})
    with pytest.raises(ValueError, match="The teacher is the student itself"):
        check_teacher(model, model)
    with pytest.raises(ValueError, match=r"shares parameters with the student \(student's 'net.embeddings"):
        check_teacher(model, wrapper)  # teacher=model.net inside the LightningModule
    view = nn.Linear(16, 16, bias=False)
    view.weight = nn.Parameter(model.encoder.layer[0].attention.self.query.weight.data)  # same storage
    with pytest.raises(ValueError, match=r"query\.weight"):
        check_teacher(view, model)
    check_teacher(make_teacher(model), wrapper)  # a copy is fine
    with pytest.raises(ValueError, match="teacher is the student"):
        Distiller(model, student=model)  # refused before the teacher is frozen ...
    assert all(p.requires_grad for p in model.parameters())  # ... so the student still trains
    with pytest.raises(ValueError, match="shares parameters"):
        Distiller(model, student=wrapper)


def test_hidden_layer_typos_are_found_up_front_with_the_valid_names() -> None:
    student, teacher = _tiny_bert(), _tiny_bert()
    assert check_hidden_layers(student, teacher, {"encoder.layer.0": "encoder.layer.1"}) == {
        "encoder.layer.0": "encoder.layer.1"
    }
    with pytest.raises(
        ValueError, match=r"\['encoder.layers.0'\], which are not submodules of the student .*'encoder.layer.0'"
    ):
        check_hidden_layers(student, teacher, ["encoder.layers.0"])
    with pytest.raises(ValueError, match="not submodules of the teacher"):
        check_hidden_layers(student, nn.Linear(2, 2), ["encoder"])
    distiller = Distiller(teacher, hidden_layers=["encoder.layer.0"])
    with pytest.raises(ValueError, match="not submodules of the student"):
        distiller.check(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not submodules of the student"):
        Distiller(make_teacher(teacher), hidden_layers=["encoder.layer.0"], student=nn.Linear(2, 2))
