"""Grouped-query attention, gated MLPs and the traced path's edges: hand layouts checked in setup, query heads
pruned evenly per key/value group, ``round_to``, per-layer sizes and their loader, modules without ``forward``,
bounded tracing, a GPT whose output head is tied to its token embedding, and which query heads share a key/value
head (seen in the outputs)."""

from __future__ import annotations

import contextlib
import copy
import signal
import time

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

from pat_callbacks import StructuredPruning
from pat_callbacks.app.models import MLP, LanguageModel
from pat_callbacks.structured import StructuredPruner, channel_groups, head_groups, shrink
from pat_callbacks.structured.hf import LAYER_SIZES_KEY, from_pretrained_shrunk
from tests.conftest import make_trainer
from tests.zoo.models import CONTEXT, DECODERS, VOCAB_SIZE, hf_qwen2_moe, text_data

ATTENTION = "net.model.layers.{}.self_attn.{}"


def _llama() -> LanguageModel:
    pl.seed_everything(0, verbose=False)
    return DECODERS["hf_llama"].build()


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (2, CONTEXT), generator=torch.Generator().manual_seed(0))


def _layouts(**extra):
    roles = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "o_proj"}
    return [{key: ATTENTION.format(i, name) for key, name in roles.items()} | extra for i in range(2)]


def _alive_heads(weight: torch.Tensor, head_dim: int = 16) -> list[bool]:
    return (weight.detach().reshape(-1, head_dim * weight.shape[1]) != 0).any(1).tolist()


def test_a_wrong_hand_layout_is_refused_in_setup_with_the_layer_and_the_numbers(tmp_path):
    module = _llama()
    before = module.net.model.layers[0].self_attn.q_proj.weight.detach().clone()
    pruning = StructuredPruning(sparsity=0.5, attention=_layouts(num_heads=4), verbose=False)
    trainer = make_trainer(tmp_path, [pruning], max_steps=4, limit_val_batches=0)
    with pytest.raises(
        ValueError,
        match=r"'net.model.layers.0.self_attn.q_proj' with 4 heads, 4 key/value heads and "
        r"head_dim 16 .* k outputs 32 \(expected 64\); v outputs 32 \(expected 64\)",
    ):
        trainer.fit(module, datamodule=text_data())
    assert trainer.global_step == 0 and torch.equal(module.net.model.layers[0].self_attn.q_proj.weight, before)
    right = StructuredPruner(module, None, attention=_layouts(num_heads=4, num_kv_heads=2))
    found = StructuredPruner(module, None)
    assert [(g.root, g.n_channels) for g in right.groups] == [(g.root, g.n_channels) for g in found.groups]
    layouts = _layouts(num_heads=4, num_kv_heads=2)
    by_hand = StructuredPruner(module.eval(), None, attention=layouts, heads="query_heads")
    by_hand.prune_to(0.5)
    with torch.no_grad():
        expected = module(_tokens())
    shrink(module, None, by_hand.pruned_channels(), layouts)
    assert module.net.model.layers[1].self_attn.num_key_value_groups == 1
    with torch.no_grad():
        assert torch.allclose(module(_tokens()), expected, atol=1e-4)


def test_query_heads_leave_every_key_value_group_the_same_share_and_reload(tmp_path):
    module = _llama().eval()
    pruner = StructuredPruner(module, None, heads="query_heads")
    assert pruner.prune_to(0.5)
    for i in range(2):
        alive = _alive_heads(module.get_parameter(ATTENTION.format(i, "q_proj.weight")))
        assert alive[:2].count(True) == alive[2:].count(True) == 1  # one query head left per key/value head
        assert all(_alive_heads(module.get_parameter(ATTENTION.format(i, "k_proj.weight"))))
    with torch.no_grad():
        expected = module(_tokens())
    shrink(module, None, pruner.pruned_channels(), uniform_per_layer=True)
    attention = module.net.model.layers[0].self_attn
    assert (attention.q_proj.out_features, attention.k_proj.out_features, attention.num_key_value_groups) == (32, 32, 1)
    module.net.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(module(_tokens()), expected, atol=1e-4)
        assert torch.allclose(reloaded(_tokens()).logits, expected, atol=1e-4)


def test_round_to_keeps_multiples_of_neurons_and_is_validated():
    module = _llama()
    pruner = StructuredPruner(module, None, round_to=16)
    pruner.prune_to(0.7)  # 128 neurons: 90 would go, 38 stay; rounded up to 48
    channels = pruner.pruned_channels()
    assert {len(channels[f"net.model.layers.{i}.mlp.up_proj.weight"]) for i in range(2)} == {80}
    assert {len(channels[ATTENTION.format(i, "k_proj.weight")]) for i in range(2)} == {1}  # heads: not rounded
    mlp = MLP(64, (32, 32), 10)
    traced = StructuredPruner(mlp, torch.zeros(2, 64), round_to=8)
    traced.prune_to(0.7)  # 32 channels: 22 would go, 10 stay; rounded up to 16
    assert {root: len(c) for root, c in traced.pruned_channels().items()} == {
        "layers.0.weight": 16,
        "layers.2.weight": 16,
    }
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="`round_to`"):
            StructuredPruner(module, None, round_to=bad)
    with pytest.raises(ValueError, match="`round_to`"):
        StructuredPruning(sparsity=0.5, round_to=-8)
    with pytest.raises(ValueError, match="'auto', 'kv_groups', 'query_heads'"):
        StructuredPruning(sparsity=0.5, heads="kv")


def test_layers_of_different_sizes_are_refused_when_uniform_else_recorded_and_reloaded(tmp_path):
    module = _llama().eval()
    with pytest.raises(ValueError, match="uniform_per_layer=True, but `exclude` keeps"):
        StructuredPruner(module, None, ignore=["net.model.layers.1.mlp"], uniform_per_layer=True)
    pruner = StructuredPruner(module, None, ignore=["net.model.layers.1.mlp"])
    pruner.prune_to(0.5)
    with torch.no_grad():
        expected = module(_tokens())
    before = {name: value.clone() for name, value in module.state_dict().items()}
    with pytest.raises(ValueError, match="layers of 'net' differ"):
        shrink(module, None, pruner.pruned_channels(), uniform_per_layer=True)
    after = module.state_dict()  # the refused shrink cut nothing: the same model shrinks below
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    with pytest.warns(UserWarning, match="cannot hold every layer's .'intermediate_size'.*from_pretrained_shrunk"):
        shrink(module, None, pruner.pruned_channels())
    config = module.net.config
    assert config.intermediate_size == 128 and getattr(config, LAYER_SIZES_KEY) == {
        "model.layers.0.mlp": {"intermediate_size": 64}
    }
    module.net.save_pretrained(tmp_path)
    reloaded = from_pretrained_shrunk(tmp_path, LlamaForCausalLM)
    assert [layer.mlp.up_proj.out_features for layer in reloaded.model.layers] == [64, 128]
    with torch.no_grad():
        assert torch.allclose(reloaded(_tokens()).logits, expected, atol=1e-4)


def test_a_shared_expert_is_pruned_the_fused_experts_are_left_whole_and_it_reloads(tmp_path):
    model = hf_qwen2_moe()
    pruner = StructuredPruner(model, None)
    assert any("the experts of 2 mixture-of-experts blocks" in note for note in pruner.notes)
    assert {g.layout["module"] for g in pruner.groups if g.kind == "ffn"} == {
        f"model.layers.{i}.mlp.shared_expert" for i in range(2)
    }
    pruner.prune_to(0.5)
    with torch.no_grad():
        expected = model(_tokens()).logits
    with pytest.warns(UserWarning, match="ffn_size"):  # the config sizes shared experts by another name
        shrink(model, None, pruner.pruned_channels())
    model.save_pretrained(tmp_path)
    reloaded = from_pretrained_shrunk(tmp_path)
    assert reloaded.model.layers[0].mlp.shared_expert.up_proj.out_features == 32
    with torch.no_grad():
        assert torch.allclose(reloaded(_tokens()).logits, expected, atol=1e-4)


class NoForward(pl.LightningModule):
    """A LightningModule with a training_step but no forward (as in many scripts)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net


def test_a_module_without_forward_is_told_what_is_needed_unless_nothing_is_traced():
    with pytest.raises(ValueError, match="defines no `forward`: add one"):
        StructuredPruner(NoForward(MLP(64, (32,), 10)), torch.zeros(2, 64))
    pruner = StructuredPruner(NoForward(_llama().net), None)  # attention found by role: nothing to trace
    assert {g.kind for g in pruner.groups} == {"heads", "ffn"}


def test_tracing_is_bounded_with_the_way_out():
    """The tiny Llama traced by Torch-Pruning runs for minutes (issue #21): refused after ``trace_timeout``."""
    start = time.perf_counter()
    with pytest.raises(TimeoutError, match=r"took over 0.5 s: too large to trace.*`attention=.*`exclude=`"):
        channel_groups(_llama().eval(), _tokens(), ignore=["net.lm_head.weight"], time_limit=0.5)
    assert time.perf_counter() - start < 10
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0  # the timer is gone
    assert len(channel_groups(MLP(64, (32,), 10).eval(), torch.zeros(2, 64), time_limit=None)) == 2


def test_a_stopped_tracing_leaves_no_hook_and_the_modes_as_they_were():
    class Slow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.b(self.a(x))
            time.sleep(1.5)  # past the limit inside the tracer's forward (and its retry), after its hooks ran
            return out

    model = Slow().train()
    own = model.a.register_forward_hook(lambda *args: None)
    with pytest.raises(TimeoutError):
        channel_groups(model, torch.zeros(1, 4), time_limit=0.2)
    assert list(model.a._forward_hooks) == [own.id] and not model.b._forward_hooks  # only the user's own hook
    assert all(m.training for m in model.modules())


def test_a_swallowed_timeout_fires_again_and_nothing_fires_after_the_block():
    """Torch-Pruning's tracer calls the model under a bare ``except:`` and retries: under load the first
    TimeoutError landed there, was swallowed, and the tracing ran for minutes (seen in a full suite run)."""
    from pat_callbacks.structured.groups import _time_limit

    start = time.perf_counter()
    with pytest.raises(TimeoutError, match="too long"), _time_limit(0.2, lambda: "too long"):
        with contextlib.suppress(BaseException):  # swallowed, as the tracer's bare except does
            time.sleep(5)  # interrupted at 0.2 s
        while time.perf_counter() - start < 5:
            time.sleep(0.01)
    assert time.perf_counter() - start < 3
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0


class TiedGPT(nn.Module):
    """nanoGPT-style: fused q/k/v ``c_attn`` Linear (not found by role: traced), ``lm_head`` tied to ``wte``."""

    def __init__(self, dim: int = 32, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.wte, self.wpe = nn.Embedding(VOCAB_SIZE, dim), nn.Embedding(CONTEXT, dim)
        self.attn = nn.ModuleList(
            nn.ModuleDict({"c_attn": nn.Linear(dim, 3 * dim), "c_proj": nn.Linear(dim, dim)}) for _ in range(layers)
        )
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)) for _ in range(layers)
        )
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, VOCAB_SIZE, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
        batch, time, dim = x.shape
        for attn, mlp in zip(self.attn, self.mlp, strict=True):
            q, k, v = (t.view(batch, time, self.heads, -1).transpose(1, 2) for t in attn.c_attn(x).split(dim, 2))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, time, dim)
            x = x + attn.c_proj(y)
            x = x + mlp(x)
        return self.lm_head(self.ln_f(x))


def test_a_head_tied_to_the_embedding_is_named_once_and_masked_with_it(tmp_path):
    """Was ``KeyError: 'net.lm_head.weight'`` in setup: the traced groups named the tied head by its alias."""
    pl.seed_everything(0, verbose=False)
    module = LanguageModel(TiedGPT(), warmup_steps=2)
    with pytest.raises(ValueError, match=r"cannot follow this layer's reshapes.*exclude=\['net.attn.\d.c_attn'\]"):
        StructuredPruner(module, _tokens())
    pruning = StructuredPruning(
        sparsity=0.5, ignore=["*.c_attn"], example_inputs=_tokens(), start_step=0, end_step=4, update_every=2
    )
    make_trainer(tmp_path, [pruning], max_steps=6, limit_val_batches=0).fit(module, datamodule=text_data())
    net = module.net
    assert net.lm_head.weight is net.wte.weight and "net.lm_head.weight" not in pruning.pruner.params
    (stream,) = [g for g in pruning.groups if "net.wte.weight" in g.params()]  # the residual stream: 16 of 32 go
    gone = pruning.pruned_channels()[stream.root]
    assert len(gone) == 16 and (net.wte.weight[:, gone] == 0).all() and (net.wte.weight != 0).any(0).sum() == 16


def _tiny_llama(heads: int = 4, kv_heads: int = 2) -> LlamaForCausalLM:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=16,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _heads_of(group_slices, name: str, dim: int, head_dim: int = 16) -> set[int]:
    (index,) = [index for param, d, index in group_slices if param == name and d == dim]
    return set((index // head_dim).tolist())


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (8, 2)])
def test_a_key_value_group_holds_the_query_heads_that_read_its_key_value_head(heads, kv_heads):
    """Hugging Face shares key/value head g with query heads g * per ... (g + 1) * per - 1 (contiguous): zeroing
    value head g zeroes exactly those heads' attention outputs, and the group of g names exactly them (q rows, o
    columns). A grouping interleaved (g, g + kv_heads, ...) passed every other structured and zoo test."""
    model = _tiny_llama(heads, kv_heads)
    attention = model.model.layers[0].self_attn
    seen = []
    attention.o_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    tokens = _tokens()
    with torch.no_grad():
        model(tokens)
    dense = seen.pop().reshape(*tokens.shape, heads, 16)
    (group,) = [g for g in head_groups(model, "kv_groups") if g.root == "model.layers.0.self_attn.k_proj.weight"]
    assert group.n_channels == kv_heads
    for kv in range(kv_heads):
        original = attention.v_proj.weight.detach().clone()
        with torch.no_grad():
            attention.v_proj.weight[kv * 16 : (kv + 1) * 16] = 0.0
            model(tokens)
            attention.v_proj.weight.copy_(original)
        out = seen.pop().reshape(*tokens.shape, heads, 16)
        silenced = {h for h in range(heads) if not out[..., h, :].any()}
        assert silenced == set(range(kv * heads // kv_heads, (kv + 1) * heads // kv_heads))
        assert all(torch.equal(out[..., h, :], dense[..., h, :]) for h in set(range(heads)) - silenced)
        assert _heads_of(group.slices[kv], "model.layers.0.self_attn.q_proj.weight", 0) == silenced
        assert _heads_of(group.slices[kv], "model.layers.0.self_attn.o_proj.weight", 1) == silenced


def test_a_key_value_group_masked_computes_what_cutting_it_from_the_dense_model_does():
    """Masking a key/value group's slices and cutting the group out of the dense model remove the same query heads
    (cut from the dense model: cut from the masked one, zeroed weights of a wrong head would ride along unseen)."""
    model = _tiny_llama()
    dense = copy.deepcopy(model)
    groups = head_groups(model, "kv_groups")
    with torch.no_grad():
        for group in groups:
            for name, dim, index in group.slices[1]:
                model.get_parameter(name).index_fill_(dim, index, 0.0)
        expected = model(_tokens()).logits
    shrink(dense, None, {group.root: [1] for group in groups})
    assert dense.model.layers[0].self_attn.q_proj.out_features == 32 and dense.config.num_key_value_heads == 1
    with torch.no_grad():
        assert torch.allclose(dense(_tokens()).logits, expected, atol=1e-5)


def test_round_to_that_keeps_every_neuron_is_refused_at_setup_with_the_numbers():
    """``round_to=64`` on 32-neuron MLPs keeps every neuron: only heads go (0.333 of these weights for 0.5)."""
    with pytest.raises(
        ValueError, match=r"`round_to`=64 keeps every channel of .*'model.layers.0.mlp.up_proj.weight', 32"
    ):
        StructuredPruner(_tiny_llama(), None, round_to=64)
    with pytest.raises(ValueError, match=r"`round_to`=64 keeps every channel of .*'layers.0.weight', 32"):
        StructuredPruner(MLP(64, (32, 32), 10), torch.zeros(2, 64), round_to=64)
