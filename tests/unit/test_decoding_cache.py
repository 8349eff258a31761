"""The cache a decoding loop works in (``Memory.to_cache(room)``): each step's entry is written in place, with the
keys and values a plain ``DynamicCache`` would hold."""

from __future__ import annotations

import torch

import ccmem
from ccmem.generation import decode
from ccmem.memory import Memory, RoomyLayer, drop_entries
from tests.conftest import tiny_model


def _kv(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, n, 4, generator=g), torch.randn(2, 3, n, 4, generator=g)


def test_a_roomy_layer_appends_in_place_until_its_room_runs_out_and_holds_what_concatenation_holds():
    layer, plain = RoomyLayer(room=3), Memory(layers=[_kv(5, 0)]).to_cache().layers[0]
    layer.update(*_kv(5, 0))
    storage = layer.keys.untyped_storage().data_ptr()
    for step in range(1, 5):
        new = _kv(1, step)
        keys, values = layer.update(*new)
        want_k, want_v = plain.update(*new)
        assert torch.equal(keys, want_k) and torch.equal(values, want_v) and layer.get_seq_length() == 5 + step
        grew = layer.keys.untyped_storage().data_ptr() != storage
        assert grew == (step == 4)  # three entries of room, the fourth one copies into a larger buffer


def test_entries_handed_out_keep_their_values_when_entries_are_dropped_or_the_contents_replaced():
    layer = RoomyLayer(room=8)
    layer.update(*_kv(6, 0))
    held_k, held_v = layer.keys, layer.values
    before_k, before_v = held_k.clone(), held_v.clone()
    drop_entries(layer, 2, 4)  # as streaming-llm evicts, and ccm-reason drops a compressed step's tokens
    assert torch.equal(layer.keys, torch.cat([before_k[:, :, :2], before_k[:, :, 4:]], dim=2))
    assert torch.equal(layer.values, torch.cat([before_v[:, :, :2], before_v[:, :, 4:]], dim=2))
    layer.update(*_kv(3, 1))
    layer.keys, layer.values = layer.keys[[1]], layer.values[[1]]  # a batch row leaving (DecodeRows.compact)
    layer.update(*(t[[1]] for t in _kv(2, 2)))
    assert layer.get_seq_length() == 9 and layer.keys.shape == (1, 3, 9, 4)
    assert torch.equal(held_k, before_k) and torch.equal(held_v, before_v)


def test_drop_entries_on_a_plain_layer_drops_the_same_entries():
    roomy, plain = RoomyLayer(room=2), Memory(layers=[_kv(7, 0)]).to_cache().layers[0]
    roomy.update(*_kv(7, 0))
    for layer in (roomy, plain):
        drop_entries(layer, 1, 3)
    assert torch.equal(roomy.keys, plain.keys) and torch.equal(roomy.values, plain.values)


def test_decoding_from_a_memory_writes_each_token_in_place_and_gives_the_tokens_of_a_plain_cache():
    lm = tiny_model()
    ids = torch.tensor([[3, 5, 7, 9, 11, 2]])
    with torch.no_grad():
        out = lm.model.base_model(input_ids=ids, use_cache=True)
    layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
    memory = Memory(layers=layers, positions=torch.arange(6), next_position=6)
    query = torch.tensor([[4, 6]])
    tokens = list(decode(lm, ccmem.load(lm, method="full").method, memory, query, 8))

    cache, position, plain = memory.to_cache(), 6, []  # the same greedy loop over a plain DynamicCache
    x = query
    for _ in range(8):
        with torch.no_grad():
            hidden = lm.model.base_model(
                input_ids=x, cache=cache, position_ids=torch.arange(position, position + x.shape[1])[None]
            ).last_hidden_state
        position += x.shape[1]
        plain.append(int(lm.model.get_output_embeddings()(hidden[0, -1]).argmax()))
        x = torch.tensor([[plain[-1]]])
    assert tokens == plain

    roomy, storages = memory.to_cache(room=10), set()
    for x in [query, *(torch.tensor([[t]]) for t in plain[:-1])]:  # the query, then each token as decode feeds it
        with torch.no_grad():
            lm.model.base_model(input_ids=x, cache=roomy)
        storages.add(roomy.layers[0].keys.untyped_storage().data_ptr())
    assert len(storages) == 1 and roomy.get_seq_length() == 6 + 2 + 7  # ten entries of room: the cache never copied


def test_a_padded_batch_is_laid_out_once_with_room_and_zeros_where_a_shorter_memory_has_none():
    """pad_rows filled zeroed tensors and the cache then copied them again; the padding must stay finite (masked
    out, but a weight of 0 times NaN is NaN)."""
    from ccmem.methods.base import pad_rows

    lm = tiny_model()
    session = ccmem.load(lm, method="full")
    session.remember("w1 w2 w3 w4", "w5")
    short = ccmem.load(lm, method="full").memory
    padded = pad_rows(lm, [session.memory, short], [torch.tensor([[4, 6]]), torch.tensor([[5]])], room=3)
    layer = padded.cache.layers[0]
    n = session.memory.num_slots
    assert isinstance(layer, RoomyLayer) and layer.keys.shape[2] == n and padded.slots == [n, short.num_slots]
    assert torch.equal(layer.keys[0], session.memory.layers[0][0][0])
    assert not layer.keys[1, :, : n - short.num_slots].any() and not layer.values[1, :, : n - short.num_slots].any()
    storage = layer.keys.untyped_storage().data_ptr()
    layer.update(*(torch.zeros(2, *layer.keys.shape[1:2], 3, layer.keys.shape[3]) for _ in range(2)))
    assert layer.keys.untyped_storage().data_ptr() == storage and layer.get_seq_length() == n + 3
