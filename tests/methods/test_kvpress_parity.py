"""ccmem's training-free methods keep the same entries as NVIDIA kvpress's presses of the same name.

``tests/fixtures/kvpress/`` was recorded by ``scripts/kvpress_reference.sh`` (kvpress 0.5.5 in its own virtual
environment, since it pins transformers < 5.3): three inputs on SmolLM2-135M, four compression ratios, the kept
positions of every layer and key/value head, and kvpress's scores. Here the same token ids go through ccmem in one
``add`` (no system prompt, so the whole input is context, as in kvpress's prefill) at ``ratio = 1 - r``; the kept
positions must match, except where kvpress's scores tie at the cut (torch.topk breaks those ties arbitrarily).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ccmem
from ccmem.api import CompressedLM

pytestmark = pytest.mark.real_model

FIXTURES = Path(__file__).parent.parent / "fixtures" / "kvpress"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
# kvpress press -> the ccmem method that implements it
PRESSES = {
    "streaming_llm": "streaming-llm",
    "observed_attention": "h2o",
    "snapkv": "snapkv",
    "tova": "tova",
    "knorm": "knorm",
    "expected_attention": "expected-attention",
}
INPUTS = {item["name"]: item["input_ids"] for item in MANIFEST["inputs"]}


@pytest.fixture(scope="module")
def smollm():
    return ccmem.load_model("smollm2-135m")


def _tie_tolerant_mismatches(ours: torch.Tensor, theirs: torch.Tensor, scores: torch.Tensor | None) -> list[str]:
    """Rows (layer, head) whose kept sets differ by more than entries tied with kvpress's cut-off score.

    Tied means within 1e-4 of the cut-off score, relatively (Expected Attention's scores are tiny, so an
    absolute tolerance would excuse almost everything); without recorded scores, sets must be equal.
    """
    bad = []
    n_kept = theirs.shape[-1]
    for layer in range(theirs.shape[0]):
        for head in range(theirs.shape[1]):
            a, b = set(ours[layer, head].tolist()), set(theirs[layer, head].tolist())
            if a == b:
                continue
            if scores is None:
                bad.append(f"layer {layer} head {head}: kept sets differ")
                continue
            row = scores[layer, head].double()
            cut = row.sort(descending=True).values[n_kept - 1]
            tied = {int(j) for j in torch.nonzero((row - cut).abs() <= 1e-4 * abs(float(cut)) + 1e-12).flatten()}
            if not (a ^ b) <= tied:
                only_ours, only_theirs = sorted(a - b)[:5], sorted(b - a)[:5]
                bad.append(f"layer {layer} head {head}: {only_ours} kept only by ccmem, {only_theirs} only by kvpress")
    return bad


@pytest.mark.parametrize("press", list(PRESSES))
@pytest.mark.parametrize("name", list(INPUTS))
def test_ccmem_keeps_the_positions_kvpress_keeps(smollm, press, name):
    recorded = load_file(FIXTURES / f"{press}__{name}.safetensors")
    ids = INPUTS[name]
    for r in MANIFEST["ratios"]:
        session = CompressedLM(smollm, ccmem.get_method(PRESSES[press], ratio=1 - r), system_prompt=None)
        session.add_ids(ids)
        ours = torch.stack([p[0].sort(dim=-1).values for p in session.memory.positions])  # [layers, heads, kept]
        theirs = recorded[f"kept_{r}"].long()
        assert ours.shape == theirs.shape, (r, ours.shape, theirs.shape)
        mismatches = _tie_tolerant_mismatches(ours, theirs, recorded.get("scores"))
        assert not mismatches, f"{press} on {name} at ratio {r}: " + "; ".join(mismatches[:3])


@pytest.mark.parametrize(
    ("options", "message"),
    [({"epsilon": -1.0}, "epsilon must be >= 0"), ({"n_future_positions": 0}, "n_future_positions must be at least 1")],
)
def test_expected_attention_refuses_options_that_break_its_score(options, message):
    with pytest.raises(ValueError, match=message):
        ccmem.get_method("expected-attention", **options)
