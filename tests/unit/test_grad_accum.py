"""Gradient accumulation through the trainer equals one padded batch (token- and sentence-level averaging)."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments

import ccmem
from ccmem.data.samples import Sample
from ccmem.train.trainer import CompressionTrainer, SampleDataset, TrainingModule
from tests.conftest import tiny_model

# Samples of very different lengths: a mean of per-batch means would weigh the short ones too much.
SAMPLES = [
    Sample([[5, 6, 7, 8, 9, 10, 11, 12]], [20, 21, 22, 23, 24, 25, 26, 27, 28], [3]),
    Sample([[13, 14, 15]], [30, 31]),
    Sample([[40, 41, 42, 43, 44, 45]], [50, 51, 52, 53, 54]),
    Sample([[60, 61, 62, 63]], [70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81]),
]

CASES = [
    ("icformer", {"num_query_tokens": 2, "num_hidden_layers": 1, "avg_level": "token", "objective": "finetune"}),
    ("icformer", {"num_query_tokens": 2, "num_hidden_layers": 1, "avg_level": "sentence", "objective": "finetune"}),
    ("ccm-concat", {"n_tok": 2}),
    ("local", {"compression_ratio": 0.5, "lora_dropout": 0.0}),  # (dropout would draw differently)
]


def one_step(name: str, options: dict, batch_size: int, grad_accum: int, tmp_path, *, counted: bool = True) -> dict:
    """The trainable tensors after one SGD step (lr 1: the update is the gradient)."""
    lm = tiny_model()
    method = ccmem.get_method(name, **options)
    state = method.module_for(lm)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in state.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    state.requires_grad_(True)
    if not counted:
        method.loss_count = lambda batch: None  # type: ignore[method-assign]
    args = TrainingArguments(
        output_dir=str(tmp_path / f"{batch_size}x{grad_accum}"),
        max_steps=1,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=1.0,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = CompressionTrainer(
        method=method,
        model=TrainingModule(lm, method, state),
        args=args,
        train_dataset=SampleDataset(SAMPLES),
        data_collator=lambda items: {"batch": method.make_batch([i["sample"] for i in items], 0)},
    )
    with method.attached(lm):
        trainer.train()
    return {n: p.detach().clone() for n, p in state.named_parameters()}


@pytest.mark.parametrize(("name", "options"), CASES, ids=[f"{n}-{o.get('avg_level', '')}" for n, o in CASES])
def test_four_accumulated_single_samples_step_like_one_batch_of_four(name, options, tmp_path):
    batched = one_step(name, options, 4, 1, tmp_path)
    accumulated = one_step(name, options, 1, 4, tmp_path)
    for key in batched:
        torch.testing.assert_close(accumulated[key], batched[key], atol=2e-6, rtol=1e-5)
    if options.get("avg_level") != "sentence":  # (single samples: a mean of batch means is the sentence mean)
        naive = one_step(name, options, 1, 4, tmp_path, counted=False)  # the Trainer's own mean of batch means
        assert any(not torch.allclose(naive[k], batched[k], atol=1e-5) for k in batched)
