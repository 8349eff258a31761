"""The conditional LoRA changes <COMP> positions only, survives gradient checkpointing, and leaves no trace."""

from __future__ import annotations

import torch
from torch import nn

from ccmem.data.samples import Sample
from ccmem.modules import GATE_KWARG, LoRAGate, LoRASet
from ccmem.registry import get_method
from tests.conftest import lora_pairs, randomize_lora, tiny_model


class _Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("C", (), {"get_text_config": lambda self: type("T", (), {"model_type": "toy"})()})()
        self.proj = nn.Linear(8, 6)


def test_gated_lora_only_changes_gated_positions_and_detaches_cleanly():
    torch.manual_seed(0)
    holder = _Holder()
    lora = LoRASet(holder, ["proj"], rank=2)
    nn.init.normal_(lora.pair("proj").B)
    gate = LoRAGate()
    x = torch.randn(1, 5, 8)
    base = holder.proj(x)
    handles = lora.attach(holder, gate)
    mask = torch.tensor([[False, True, False, False, True]])
    gate.set(mask)
    gated = holder.proj(x)
    assert torch.equal(gated[~mask], base[~mask])
    assert not torch.allclose(gated[mask], base[mask])
    gate.set(None)
    assert torch.equal(holder.proj(x), base)
    for handle in handles:
        handle.remove()
    gate.set(mask)
    assert torch.equal(holder.proj(x), base)  # detached: the layer is the plain one again


def test_hooked_lora_equals_its_pair_scaled_and_gated_also_with_dropout():
    """The fused hook computes ``W x + g * scale * B A x``; with dropout (training), the dropout reads only the
    LoRA branch, and a forward with the gate off is the plain layer."""
    torch.manual_seed(0)
    holder = _Holder()
    lora = LoRASet(holder, ["proj"], rank=2, alpha=6.0, dropout=0.5)
    pair = lora.pair("proj")
    nn.init.normal_(pair.B)
    gate = LoRAGate()
    x = torch.randn(2, 4, 8)
    base = holder.proj(x)
    lora.attach(holder, gate)
    mask = torch.tensor([[True, False, False, True], [False, False, True, False]])
    lora.eval()  # dropout off: exact
    gate.set(mask)
    torch.testing.assert_close(holder.proj(x), base + pair(x) * mask[..., None])
    lora.train()
    gate.set(None)
    assert torch.equal(holder.proj(x), base)
    gate.set(mask)
    trained = holder.proj(x)
    assert torch.equal(trained[~mask], base[~mask]) and not torch.allclose(trained[mask], (base + pair(x))[mask])


def test_always_on_lora_changes_every_token():
    torch.manual_seed(0)
    holder = _Holder()
    lora = LoRASet(holder, ["proj"], rank=2)
    nn.init.normal_(lora.pair("proj").B)
    x = torch.randn(1, 3, 8)
    base = holder.proj(x)
    lora.attach(holder, gate=None)
    assert not torch.isclose(holder.proj(x), base).all(-1).any()


def test_gate_is_read_from_the_forward_keyword_and_off_without_it():
    lm = tiny_model()
    method = get_method("ccm-concat", n_tok=2)
    ids = torch.tensor([[4, 5, 6]])
    with torch.no_grad():
        before = lm.model(input_ids=ids).logits
        randomize_lora(method, lm, 0.5)
        with method.attached(lm):
            without_gate = lm.model(input_ids=ids).logits
            with_gate = lm.model(input_ids=ids, **{GATE_KWARG: torch.ones(1, 3, dtype=torch.bool)}).logits
    torch.testing.assert_close(before, without_gate)
    assert (with_gate - before).abs().max() > 1e-3


def _grads(lm, method, checkpointing):
    if checkpointing:
        lm.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    lm.model.train()
    params = list(method.module_for(lm).parameters())
    for p in params:
        p.requires_grad_(True)
    batch = method.make_batch([Sample([[10, 11, 12], [13, 14]], [20, 21, 22])])
    with method.attached(lm):  # backward recomputes checkpointed layers: the hooks must still be there
        out = method.parallel_forward(lm, batch)
        out.logits[0, batch.tail_start[0] :].logsumexp(-1).sum().backward()
    return [p.grad.clone() for p in params]


def test_gradients_equal_with_gradient_checkpointing():
    grads = []
    for checkpointing in (False, True):
        lm = tiny_model()
        method = get_method("ccm-merge", n_tok=2)
        randomize_lora(method, lm)
        grads.append(_grads(lm, method, checkpointing))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    assert any(g.abs().sum() > 0 for g in grads[1][1:])  # LoRA weights really receive gradient


def test_detaching_restores_the_plain_model_and_another_method_can_attach():
    lm = tiny_model()
    ids = torch.tensor([[4, 5, 6]])
    with torch.no_grad():
        before = lm.model(input_ids=ids).logits
    method = get_method("ccm-concat")
    randomize_lora(method, lm, 0.5)
    with method.attached(lm):
        assert lm.model.config._attn_implementation == "ccm_sdpa"
    assert lm.model.config._attn_implementation == "sdpa"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=ids).logits, before)
    with get_method("ccm-merge").attached(lm):  # a detached model takes another method
        pass
    assert lora_pairs(method, lm)  # the trained state stays with the method, not the model
