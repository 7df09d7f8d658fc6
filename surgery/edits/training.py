"""Supervised training on (prompt, answer) rows with the HF Trainer: the loss covers the answer tokens only.

    rows = [{"input_ids": prompt + answer ids, "labels": -100 on the prompt, answer ids after}]
    trainer = answer_trainer(model, rows, TrainSpec(), lr=1e-3, out_dir=tmp, pad_id=pad)


Batches are LEFT-padded (`Collator`), so every answer sits at the end of its row and `answer_loss` computes
logits for the answer positions only. Used by LoRA recovery (`surgery.lora`) and by any other fine-tuning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from surgery.io.recipe import rules
from surgery.model.batching import position_ids


@dataclass
class TrainSpec:
    """Trainer settings. lrs: candidates, the best on the validation split wins (one candidate: no selection)."""

    lrs: list[float] = field(default_factory=lambda: [1e-3, 5e-4, 1e-4], metadata=rules(min=0, nonempty=True))
    epochs: float = field(default=4.0, metadata=rules(min=0))
    max_steps: int = field(default=-1, metadata=rules(min=-1))  # > 0 caps the optimiser steps (quick profiles)
    batch_size: int = field(default=16, metadata=rules(min=1))
    eval_batch_size: int = field(default=64, metadata=rules(min=1))
    warmup_ratio: float = field(default=0.05, metadata=rules(min=0, max=1))
    weight_decay: float = field(default=0.0, metadata=rules(min=0))
    seed: int = 0
    distill: float = field(default=0.0, metadata=rules(min=0))  # weight of KL(teacher || student); 0 = off
    temperature: float = field(default=1.0, metadata=rules(min=0.01))  # distillation temperature T
    # bf16 autocast of forward and backward (the trained weights and AdamW state stay fp32): HF `bf16=True`.
    # A recovery step 1.95x faster on a CPU with AVX512-BF16 (bench/train_step.py, docs/benchmarks/training.md);
    # standard on GPUs.
    bf16: bool = False


class Collator:
    """Left-pads a list of encoded rows (position_ids count real tokens only); labels -100 on padding.

    Left padding puts every answer at the end of its row, so the loss needs logits of the last few positions
    only (`AnswerTrainer`): the LM head, a fifth of a small model's compute, runs on ~5 of ~13 positions."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, width - n :], labels[i, width - n :] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"])
            mask[i, width - n :] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": position_ids(mask)}


def _answer_logits(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, K, V] of the positions that predict labelled tokens and their labels [B, K]) of a left-padded
    batch: only the last K + 1 positions are computed."""
    labels = batch["labels"]
    labelled = (labels != -100).any(0).nonzero()
    keep = labels.shape[1] - int(labelled[0]) + 1 if len(labelled) else 2
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=keep,
        use_cache=False,
    )
    return out.logits[:, -keep:-1].float(), labels[:, -keep + 1 :]


def answer_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean cross-entropy of the labelled (answer) tokens of a left-padded batch, computing logits only for the
    positions that predict them; equal to the HF causal-LM loss of the same batch."""
    logits, labels = _answer_logits(model, batch)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def distill_loss(
    model: nn.Module, teacher: nn.Module, batch: dict, weight: float, temperature: float = 1.0
) -> torch.Tensor:
    """Answer cross-entropy + weight * T^2 * KL(softmax(teacher / T) || softmax(student / T)), the KL averaged over
    the labelled (answer) positions: recovery that also matches the teacher's whole answer distribution."""
    logits, labels = _answer_logits(model, batch)
    ce = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    if weight == 0:
        return ce
    with torch.no_grad():
        t_logits, _ = _answer_logits(teacher, batch)
    on = labels != -100
    log_s = (logits[on] / temperature).log_softmax(-1)
    log_t = (t_logits[on] / temperature).log_softmax(-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    return ce + weight * temperature**2 * kl


def _trainer_class():
    """transformers.Trainer whose loss is `answer_loss` (imported lazily: transformers is slow to import)."""
    from transformers import Trainer

    class AnswerTrainer(Trainer):
        teacher: nn.Module | None = None  # set for distillation
        distill: float = 0.0
        temperature: float = 1.0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.teacher is not None and self.distill > 0:
                loss = distill_loss(model, self.teacher, inputs, self.distill, self.temperature)
            else:
                loss = answer_loss(model, inputs)
            return (loss, None) if return_outputs else loss

    return AnswerTrainer


def train_args(spec: TrainSpec, lr: float, out_dir: str, n_rows: int, device: str | None = None, save_steps: int = 0):
    """TrainingArguments for one run: no reporting; on the CPU unless `device` (the model's) is a GPU; no
    checkpoints unless `save_steps` > 0 (then the whole training state every save_steps steps, the newest kept,
    for `trainer.train(resume_from_checkpoint=True)`)."""
    from transformers import TrainingArguments

    steps_per_epoch = max(1, math.ceil(n_rows / spec.batch_size))
    total = spec.max_steps if spec.max_steps > 0 else math.ceil(spec.epochs * steps_per_epoch)
    return TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=spec.batch_size,
        learning_rate=lr,
        num_train_epochs=spec.epochs,
        max_steps=spec.max_steps,
        warmup_steps=int(spec.warmup_ratio * total),
        weight_decay=spec.weight_decay,
        lr_scheduler_type="linear",
        logging_steps=max(1, total // 10),
        save_strategy="steps" if save_steps > 0 else "no",
        save_steps=save_steps if save_steps > 0 else 500,
        save_total_limit=1 if save_steps > 0 else None,
        report_to=[],
        use_cpu=not _accelerated(device),
        seed=spec.seed,
        bf16=spec.bf16,
        data_seed=spec.seed,
        remove_unused_columns=False,
        disable_tqdm=False,
        dataloader_num_workers=0,
    )


def _accelerated(device: str | None) -> bool:
    """Whether training runs on an accelerator: the model's device decides, not whether one exists."""
    return device is not None and torch.device(device).type != "cpu"


def saved_step(folder: Path) -> int:
    """The step of the newest training state the Trainer saved in `folder` (0: none)."""
    steps = [int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return max(steps, default=0)


def answer_trainer(
    model: nn.Module,
    rows: list[dict],
    spec: TrainSpec,
    lr: float,
    out_dir: str,
    pad_id: int,
    teacher: nn.Module | None = None,
    **kwargs,
):
    """A transformers.Trainer over `rows` with the answer-only loss and `spec`'s settings; with a `teacher` and
    spec.distill > 0 the loss adds the distillation term (`distill_loss`)."""
    trainer = _trainer_class()(
        model=model,
        args=train_args(spec, lr, out_dir, len(rows), **kwargs),
        train_dataset=rows,
        data_collator=Collator(pad_id),
    )
    if teacher is not None and spec.distill > 0:
        trainer.teacher, trainer.distill, trainer.temperature = teacher.eval(), spec.distill, spec.temperature
    return trainer


def log_of(trainer) -> list[dict]:
    """The loss log of a finished Trainer (loss, step, epoch, train_loss entries)."""
    return [
        {k: v for k, v in e.items() if k in ("loss", "step", "epoch", "train_loss")} for e in trainer.state.log_history
    ]
