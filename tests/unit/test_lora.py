"""The conditional LoRA changes <COMP> positions only, and survives gradient checkpointing."""

from __future__ import annotations

import torch
from torch import nn

from ccmem.methods.ccm import Sample
from ccmem.modules import GatedLoRALinear, LoRAGate
from ccmem.registry import get_method
from tests.conftest import randomize_lora, tiny_model


def test_gated_lora_only_changes_gated_positions():
    torch.manual_seed(0)
    gate = LoRAGate()
    layer = GatedLoRALinear(nn.Linear(8, 6), gate, rank=2)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(1, 5, 8)
    mask = torch.tensor([[False, True, False, False, True]])
    gate.set(mask)
    gated = layer(x)
    base = layer.base(x)
    assert torch.allclose(gated[~mask], base[~mask])
    assert not torch.allclose(gated[mask], base[mask])
    gate.set(None)
    assert torch.allclose(layer(x), base)


def test_gate_is_read_from_the_forward_keyword_and_off_without_it():
    lm = tiny_model()
    method = get_method("ccm-concat", n_tok=2)
    method.prepare(lm)
    ids = torch.tensor([[4, 5, 6]])
    with torch.no_grad():
        before = lm.model(input_ids=ids).logits
        randomize_lora(method, 0.5)
        after_without_gate = lm.model(input_ids=ids).logits
    torch.testing.assert_close(before, after_without_gate)


def _grads(lm, method, checkpointing):
    if checkpointing:
        lm.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    lm.model.train()
    batch = method.make_batch([Sample([[10, 11, 12], [13, 14]], [20, 21, 22])])
    out = method.parallel_forward(lm, batch)
    out.logits[0, batch.tail_start[0] :].logsumexp(-1).sum().backward()
    return [p.grad.clone() for p in method.trainable_parameters()]


def test_gradients_equal_with_gradient_checkpointing():
    grads = []
    for checkpointing in (False, True):
        lm = tiny_model()
        method = get_method("ccm-merge", n_tok=2)
        method.prepare(lm)
        randomize_lora(method)
        grads.append(_grads(lm, method, checkpointing))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    assert any(g.abs().sum() > 0 for g in grads[1][1:])  # LoRA weights really receive gradient


def test_release_restores_the_plain_model():
    lm = tiny_model()
    ids = torch.tensor([[4, 5, 6]])
    with torch.no_grad():
        before = lm.model(input_ids=ids).logits
    method = get_method("ccm-concat")
    method.prepare(lm)
    method.release(lm)
    assert not any(isinstance(m, GatedLoRALinear) for m in lm.model.modules())
    assert lm.model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(lm.model(input_ids=ids).logits, before)
    get_method("ccm-merge").prepare(lm)  # a released model takes another adapter
