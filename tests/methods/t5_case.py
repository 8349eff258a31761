"""The tiny-T5 case shared by the encoder-decoder tests (CCM and gist on T5): one sink, three chunks, a query and
an answer, and a method whose LoRA and <COMP> embeddings are random so that a wrong gate, mask or bias shows."""

from __future__ import annotations

import torch

from ccmem.methods import ccm_seq2seq
from ccmem.registry import get_method
from tests.conftest import randomize_lora

SINK = [5, 6, 7]
CHUNKS = [[10, 11, 12, 13], [20, 21, 22], [30, 31, 32, 33, 34]]
QUERY = [40, 41, 42]
ANSWER = [50, 51, 52, 1]
TOL = 1e-5


def trained_looking(name: str, lm, n_tok: int = 2, **options):
    """``name`` with random LoRA weights and <COMP> embeddings (an untrained adapter is a no-op and would hide
    a wrong gate)."""
    method = get_method(name, n_tok=n_tok, **options)
    randomize_lora(method, lm, scale=0.5)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        comp = method.module_for(lm).comp.weight
        comp.copy_(torch.randn(comp.shape, generator=generator))
    return method


def memory_after(lm, method, chunks=CHUNKS, sink=SINK):
    """The memory after the sink and then ``chunks``, one ``add`` each."""
    memory = method.new_memory(lm)
    if sink:
        memory = method.add_sink(lm, memory, torch.tensor([sink]))
    for chunk in chunks:
        memory = method.add(lm, memory, torch.tensor([chunk]))
    return memory


def step_by_step(lm, method, chunks=CHUNKS, sink=SINK, query=QUERY, answer=ANSWER):
    """Compress chunk by chunk, read the query with the memory; the memory and the decoder's answer logits."""
    with torch.no_grad(), method.attached(lm):
        memory = memory_after(lm, method, chunks, sink)
        hidden = method.encoder_states(lm, memory, torch.tensor([query]))
        logits = ccm_seq2seq.decoder_logits(lm, hidden, torch.tensor([answer]))
    return memory, logits[0]
