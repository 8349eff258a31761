"""Families beyond the ones every test runs on: what ccmem follows exactly, and what it refuses with a reason.

A family is either followed exactly (scores equal the model's own log-probabilities) or refused at load; never
silently different.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

import ccmem
from ccmem.loading import LoadedModel, UnsupportedModelError
from tests.conftest import COMMON, VOCAB, TinyTokenizer


def family(name: str, config) -> LoadedModel:
    torch.manual_seed(0)
    attn = "eager" if config.model_type in ("gemma2", "gpt_oss") else "sdpa"  # transformers has no sdpa for them
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).eval()
    return LoadedModel(model=model, tokenizer=TinyTokenizer(), name=f"tiny-{name}")


HEADS = dict(num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("cohere", lambda: T.CohereConfig(**COMMON, **HEADS, logit_scale=0.3)),  # logits = head(h) * logit_scale
        ("granite", lambda: T.GraniteConfig(**COMMON, **HEADS, logits_scaling=4.0)),  # logits = head(h) / scaling
        ("gemma2", lambda: T.Gemma2Config(**COMMON, **HEADS, head_dim=8, final_logit_softcapping=5.0)),
    ],
)
@pytest.mark.parametrize("method", ["full", "h2o"])
def test_scores_are_the_models_own_log_probabilities(name, config, method):
    """Answers are scored from hidden states through the LM head: a family that scales or soft-caps the head's
    output must get the same numbers as its own forward (Cohere and Granite were off by up to 3.3 nats)."""
    lm = family(name, config())
    session = ccmem.load(lm, method, system_prompt=None, **({"ratio": 1.0} if method == "h2o" else {}))
    context = list(range(10, 30))
    session.add_ids(context)
    ours = torch.tensor(session.score_ids([80, 81], [[t] for t in range(VOCAB)]))
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([[*context, 80, 81]])).logits[0, -1]
    assert torch.allclose(ours, torch.log_softmax(logits.float(), -1), atol=1e-4)


def test_a_family_whose_layers_drop_the_attention_keywords_is_refused():
    """transformers' StableLM layers do not pass a forward's keywords to their attention: ccmem's masks (local,
    sentinel) would silently not apply and its captures (H2O, SnapKV) came back empty as a KeyError."""
    lm = family("stablelm", T.StableLmConfig(**COMMON, **HEADS))
    for method, options in (("local", {}), ("h2o", {"ratio": 0.5})):
        session = ccmem.load(lm, method, system_prompt=None, **options)
        with pytest.raises(ValueError, match="do not pass a forward's keywords on to their attention"):
            session.add_ids(list(range(10, 30)))
    plain = ccmem.load(lm, "full", system_prompt=None)  # full reads plainly: it runs
    plain.add_ids(list(range(10, 30)))
    assert plain.memory.num_slots == 20


def test_keys_and_values_of_different_sizes_are_refused_at_load():
    """DeepSeek-V3's multi-head latent attention caches keys of 12 and values of 6 per head: every method crashed
    deep in torch; now ccmem.load says why."""
    config = T.DeepseekV3Config(
        **COMMON, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, first_k_dense_replace=1, n_group=1, topk_group=1,
    )  # fmt: skip
    lm = family("deepseek-v3", config)
    for method in ("full", "streaming-llm"):
        with pytest.raises(UnsupportedModelError, match="multi-head latent attention"):
            ccmem.load(lm, method, system_prompt=None)


def test_expected_attention_reads_each_layers_own_rope_on_gemma3():
    """Gemma 3 has a RoPE per layer type (local and global layers): expected-attention raised a TypeError from
    inside transformers; now each layer's queries are un-rotated with that layer's tables."""
    from ccmem.methods.expected_attention import rotary_tables
    from tests.conftest import tiny_model

    lm = tiny_model("gemma3")
    lm.model.config.layer_types = ["sliding_attention", "full_attention"]
    lm.model.config.rope_parameters["sliding_attention"]["rope_theta"] = 10.0  # local and global RoPE differ
    lm.model.base_model.rotary_emb = type(lm.model.base_model.rotary_emb)(lm.model.config)
    positions, like = torch.arange(5, 9)[None], torch.zeros(1, 1, 4, 8)
    local, full = rotary_tables(lm, positions, like, 0), rotary_tables(lm, positions, like, 1)
    assert not torch.allclose(local[0], full[0])
    session = ccmem.load(lm, "expected-attention", system_prompt=None, ratio=0.5)
    session.add_ids(list(range(10, 30)))
    assert session.memory.num_slots == 10


def test_expected_attention_does_not_rotate_the_queries_of_a_layer_without_rope():
    """SmolLM3 gives every fourth layer no RoPE (NoPE): expected-attention un-rotated that layer's queries and
    rotated their statistics to future positions anyway, so what it kept there depended on how far ahead it
    looked; a NoPE layer's future queries are its present ones."""
    config = T.SmolLM3Config(**COMMON, **HEADS, pad_token_id=0, no_rope_layers=[1, 0])
    lm = family("smollm3", config)
    kept = []
    for ahead in (1, 512):
        session = ccmem.load(
            lm, "expected-attention", system_prompt=None, ratio=0.5, n_sink=0, use_vnorm=False, n_future_positions=ahead
        )
        session.add_ids(list(range(10, 50)))
        kept.append([p[0].tolist() for p in session.memory.positions])
    assert kept[0][0] != kept[1][0]  # the RoPE layer: looking further ahead turns the statistics
    assert kept[0][1] == kept[1][1]  # the NoPE layer: nothing turns


def test_neighbour_paired_rope_is_refused_where_ccmem_would_rotate_keys():
    """Cohere pairs dimensions 2j and 2j+1 for RoPE; re-basing keys with LLaMA's pairing silently corrupted them
    (a chat or stream past the model's positions went on with wrong keys)."""
    from ccmem.api import ContextTooLongError, make_room
    from ccmem.rope import half_split_pairing

    lm = family("cohere", T.CohereConfig(**{**COMMON, "max_position_embeddings": 32}, **HEADS))
    assert not half_split_pairing(lm)
    session = ccmem.load(lm, "streaming-llm", system_prompt=None, ratio=0.5, n_sink=4)
    session.add_ids(list(range(3, 28)))
    # the refusal reaches chats and sessions too, so it does not speak of ccmem stream alone
    with pytest.raises(ContextTooLongError, match=r"cannot be re-based .*neighbouring dimensions.*a chat or session"):
        make_room(lm, session.memory, 20)
    with pytest.raises(ValueError, match="pairs neighbouring dimensions"):
        ccmem.load(lm, "expected-attention", system_prompt=None).add_ids(list(range(3, 20)))


def test_rope_pairing_of_a_model_file_without_rotate_half_is_read_or_refused():
    """A model file without rotate_half was taken as LLaMA's pairing: GPT-J's rotate_every_two pairs neighbours,
    and Llama 4 rotates neighbours through complex numbers, so ccmem would have turned their keys wrongly."""
    from ccmem.rope import RopeError, half_split_pairing

    gptj = T.GPTJConfig(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=1
    )
    assert not half_split_pairing(family("gptj", gptj))
    llama4 = T.Llama4TextConfig(**COMMON, **HEADS, head_dim=8, intermediate_size_mlp=64, num_local_experts=1)
    with pytest.raises(RopeError, match="llama4_text's model file has no rotate_half, so ccmem cannot tell"):
        half_split_pairing(family("llama4", llama4))


def test_expected_attention_refuses_a_partial_rotary_model_at_load():
    """GPT-NeoX rotates only part of each head (rotary_pct): expected-attention loaded and compressed short turns,
    then the first add that evicted failed after its forward."""
    from tests.conftest import tiny_model

    with pytest.raises(ValueError, match=r"rotary embedding over the whole head \(8 dims\), but this model rotates 2"):
        ccmem.load(tiny_model("gpt-neox"), "expected-attention", system_prompt=None, ratio=0.5)


def test_full_runs_untrained_on_a_model_its_lora_cannot_adapt():
    """`full` is the uncompressed reference: untrained it needs no LoRA, so it runs on GPT-2 (Conv1D projections),
    while the learned methods say why they cannot."""
    lm = family("gpt2", T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256))
    session = ccmem.load(lm, "full", system_prompt=None)
    context = list(range(10, 30))
    session.add_ids(context)
    ours = torch.tensor(session.score_ids([80, 81], [[t] for t in range(VOCAB)]))
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([[*context, 80, 81]])).logits[0, -1]
    assert torch.allclose(ours, torch.log_softmax(logits, -1), atol=1e-4)
    with pytest.raises(ValueError, match=r"no torch\.nn\.Linear layers in its blocks .*Conv1D"):
        ccmem.load(lm, "ccm-concat", system_prompt=None).add_ids(context)


def test_lora_targets_that_are_not_linear_layers_name_the_linear_ones():
    from ccmem.modules import LoRASet

    lm = family("gpt-neox", T.GPTNeoXConfig(**COMMON, num_attention_heads=4))
    with pytest.raises(ValueError, match=r"named \['rotary_emb'\] .* are GPTNeoXRotaryEmbedding, not torch"):
        LoRASet(lm.model.base_model, ["rotary_emb"])
    with pytest.raises(ValueError, match=r"linear layers: .*query_key_value"):
        LoRASet(lm.model.base_model, ["q_proj"])


def test_knorm_warns_once_on_a_model_that_normalises_its_keys(caplog):
    """Gemma 3 / Qwen3 apply k_norm: every key has (almost) the same norm, so knorm's ranking is noise."""
    from tests.conftest import tiny_model

    gemma = tiny_model("gemma3")
    with caplog.at_level("WARNING", logger="ccmem.methods.knorm"):
        session = ccmem.load(gemma, "knorm", ratio=0.5)
        session.add("some context to compress " * 3)
        ccmem.load(tiny_model(), "knorm", ratio=0.5).add("some context to compress")
    warned = [r.getMessage() for r in caplog.records if "normalises its keys" in r.getMessage()]
    assert len(warned) == 1 and "tiny-gemma3" in warned[0] and "snapkv" in warned[0]


@pytest.mark.parametrize(("method", "rows"), [("ccm-concat", "comp.weight"), ("sentinel", "sentinels")])
def test_new_token_embeddings_start_at_the_scale_the_model_reads_its_inputs_at(method, rows):
    """Gemma's embedding layer multiplies rows by sqrt(hidden_size): <COMP> and <CL>/<CR> embeddings, started from
    the stored rows, were sqrt(32) times smaller than every ordinary token the model read."""
    from ccmem.modules import CompEmbeddings
    from tests.conftest import tiny_model

    for name, scale in (("gemma3", 32**0.5), ("llama-gqa", 1.0)):
        lm = tiny_model(name)
        stored = lm.model.get_input_embeddings().weight.detach()
        reads = lm.model.get_input_embeddings()(torch.arange(4))
        torch.testing.assert_close(reads, stored[:4] * scale)  # what the family does
        built = ccmem.get_method(method).module_for(lm).state_dict()[rows]
        from_stored = CompEmbeddings(len(built), stored.shape[1], init_from=stored).weight  # the same draw
        torch.testing.assert_close(built, from_stored * scale)


def test_llama4_text_model_runs_its_decoder_stack():
    """Llama 4's text CausalLM names "language_model" as its base while it keeps its stack as `model`, so ccmem ran
    the whole CausalLM where it reads hidden states: every method failed on logits without last_hidden_state."""
    from ccmem.registry import get_method
    from tests.conftest import randomize_lora
    from tests.methods.test_ccm_equivalence import assert_parallel_equals_recurrent

    config = T.Llama4TextConfig(**COMMON, **HEADS, head_dim=8, intermediate_size_mlp=64, num_local_experts=1)
    lm = family("llama4", config)
    assert type(lm.model.base_model).__name__ == "Llama4TextModel"
    session = ccmem.load(lm, "h2o", system_prompt=None, ratio=0.5)
    context = list(range(10, 30))
    session.add_ids(context)
    assert session.memory.num_slots == 10
    method = get_method("ccm-merge", n_tok=2)
    randomize_lora(method, lm)
    assert_parallel_equals_recurrent(lm, method)
    # its RoPE turns neighbouring dimensions through complex numbers: refused by name, not run wrongly
    with pytest.raises(ValueError, match="llama4_text's model file has no rotate_half"):
        ccmem.load(lm, "expected-attention", system_prompt=None).add_ids(context)


def test_expected_attention_undoes_yarn_rope_with_its_attention_factor():
    """YaRN's tables carry its attention factor s (cos and sin times s): expected-attention undid the rotation with
    them as if they were a pure rotation, so the queries it took statistics of came out s² too large, which moved
    every score's temperature and so which entries it kept."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from ccmem.methods.expected_attention import rotary_tables, unrotate

    rope = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 64}
    lm = family("llama-yarn", T.LlamaConfig(**COMMON, **HEADS, rope_parameters=rope))
    assert lm.model.base_model.rotary_emb.attention_scaling > 1.1
    queries, positions = torch.randn(1, 4, 3, 8), torch.tensor([[5, 40, 90]])
    turned, _ = apply_rotary_pos_emb(queries, queries, *lm.model.base_model.rotary_emb(queries, positions))
    torch.testing.assert_close(unrotate(turned, *rotary_tables(lm, positions, turned)), queries, atol=1e-5, rtol=1e-4)


def test_gpt_oss_rope_is_read_as_llamas_pairing():
    """GPT-OSS has no rotate_half: its _apply_rotary_emb turns the two halves of each head (LLaMA's pairing) with
    tables of d/2 entries. Moving its keys and expected-attention were refused as an unknown pairing."""
    import sys

    from transformers import DynamicCache

    from ccmem.memory import Memory
    from ccmem.methods.expected_attention import rotary_tables, unrotate
    from ccmem.rope import compact_positions, half_split_pairing, layer_frequencies

    config = T.GptOssConfig(**COMMON, **HEADS, head_dim=8, num_local_experts=2, num_experts_per_tok=1)
    lm = family("gpt-oss", config)
    assert half_split_pairing(lm)

    def keys_at(position):  # one token reads only itself: its keys depend on its position alone
        cache = DynamicCache()
        with torch.no_grad():
            lm.model.base_model(input_ids=torch.tensor([[17]]), position_ids=torch.tensor([[position]]), cache=cache)
        return Memory.layers_of(cache)

    layers = keys_at(90)
    memory = Memory(layers=layers, positions=[torch.full((1, 2, 1), 90) for _ in layers], next_position=91)
    for (moved, _), (there, _) in zip(compact_positions(memory, layer_frequencies(lm)).layers, keys_at(0), strict=True):
        torch.testing.assert_close(moved, there, atol=2e-5, rtol=1e-4)
    # expected-attention undoes the model's own rotation of its queries
    queries, positions = torch.randn(1, 4, 3, 8), torch.tensor([[5, 40, 90]])
    turned, _ = sys.modules[type(lm.model).__module__].apply_rotary_pos_emb(
        queries, queries, *lm.model.base_model.rotary_emb(queries, positions)
    )
    torch.testing.assert_close(unrotate(turned, *rotary_tables(lm, positions, turned)), queries, atol=1e-5, rtol=1e-4)
    session = ccmem.load(lm, "expected-attention", system_prompt=None, ratio=0.5)
    session.add_ids(list(range(10, 30)))
    assert session.memory.num_slots == 10


def test_expected_attention_on_a_model_without_rope_says_it_has_none():
    """GPT-2 has learned absolute positions: expected-attention said its model file had no rotate_half, so ccmem
    could not tell which dimensions its RoPE rotated, as if it had a RoPE of an unknown kind."""
    lm = family("gpt2", T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256))
    with pytest.raises(ValueError, match="needs rotary position embeddings, which this gpt2 model does not expose"):
        ccmem.load(lm, "expected-attention", system_prompt=None)


def test_attention_read_by_eviction_methods_includes_gpt_oss_sinks():
    """GPT-OSS adds a learned sink logit per head to each softmax: the weights H2O, SnapKV and TOVA rank entries by
    were read without it, so each query's row summed to 1 where the layer's own summed to less, unevenly."""
    from ccmem.patching.attention import CAPTURE_KWARG, AttentionCapture, compression_attention

    config = T.GptOssConfig(**COMMON, **HEADS, head_dim=8, num_local_experts=2, num_experts_per_tok=1)
    lm = family("gpt-oss", config)
    with torch.no_grad():
        for layer in lm.model.base_model.layers:
            layer.self_attn.sinks.copy_(torch.tensor([2.0, -1.0, 0.5, 3.0]))
        ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
        capture = AttentionCapture(queries_wanted=3)
        with compression_attention(lm.model):
            lm.model(input_ids=ids, **{CAPTURE_KWARG: capture})
        attentions = lm.model(input_ids=ids, output_attentions=True).attentions
    for layer, weights in enumerate(attentions):
        torch.testing.assert_close(capture.weights[layer], weights[:, :, -3:].sum(dim=2), atol=1e-5, rtol=0)


def test_opt_parallel_forward_runs_the_compression_lora():
    """OPT's CausalLM calls its decoder past the module whose hook sets the <COMP> gate, so the parallel forward
    ran with the conditional LoRA off: silently other logits than compressing step by step."""
    from ccmem.data.samples import Sample
    from ccmem.methods.base import logits_for, positions
    from ccmem.registry import get_method
    from tests.conftest import randomize_lora
    from tests.methods.test_ccm_equivalence import CHUNKS, SINK, TAIL

    config = T.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, word_embed_proj_dim=32,
    )  # fmt: skip
    lm = family("opt", config)
    method = get_method("ccm-concat", n_tok=2)
    randomize_lora(method, lm)
    batch = method.make_batch([Sample(CHUNKS, TAIL, SINK)])
    with torch.no_grad(), method.attached(lm):
        parallel = method.parallel_forward(lm, batch).logits[0]
        memory = method.add_sink(lm, method.new_memory(lm), torch.tensor([SINK]))
        for chunk in CHUNKS:
            memory = method.add(lm, memory, torch.tensor([chunk]))
        tail = lm.model.base_model(
            input_ids=torch.tensor([TAIL]),
            cache=memory.to_cache(),
            position_ids=positions(memory.next_position, len(TAIL), lm.device),
        ).last_hidden_state
    start = batch.tail_start[0]
    torch.testing.assert_close(parallel[start : start + len(TAIL)], logits_for(lm, tail)[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["ccm-concat", "sentinel"])
def test_a_family_whose_attention_ccmem_cannot_switch_says_so_before_naming_lora_targets(method):
    """Falcon calls its attention itself: the LoRA error came first and told the user to pass lora_targets, which
    then failed on the attention. The real obstacle is named first, whatever the targets."""
    lm = family("falcon", T.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4))
    for options in ({}, {"lora_targets": ("query_key_value", "dense")}):
        with pytest.raises(ValueError, match="FalconForCausalLM does not route attention through") as err:
            ccmem.load(lm, method, system_prompt=None, **options).add_ids(list(range(10, 20)))
        assert "lora_targets" not in str(err.value)
