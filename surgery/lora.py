"""PEFT LoRA at chosen layers, trained with the HF Trainer on arithmetic text (the sweep over layers, paper
Fig. 2, is the `surgery lora-sweep` command in surgery/lora_sweep.py).

    peft_model = attach(model, [9], LoraSpec(rank=8))            # attention projections of layer 9 only
    fit = fit_lora(model, tok, 9, LoraSpec(), TrainSpec(), data)  # lr chosen on the validation split
    merged = merged_copy(fit.model)                             # a plain model (ModelView sees it)

Training text is prompt + answer ("Calculate: 12+34=46"); the loss covers only the answer tokens (labels -100
on the prompt and on padding). Which projections are "attention" comes from the arch table (`Arch.lora_targets`);
the layer-list name PEFT needs (`layers_pattern`) is the last part of `Arch.layers` ("layers", "h").
Accuracy is teacher-forced: one forward per problem scores every answer token (`problem_predictions`), which
equals greedy decoding of the whole answer when every token is right.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .arch import ModelView
from .errors import UsageError
from .recipe import rules
from .training import TrainSpec, answer_trainer, log_of


# ---- recipe parts (validated by surgery.recipe) ------------------------------------------------------------
@dataclass
class LoraSpec:
    """PEFT LoRA settings; the targets come from the arch table unless given."""

    rank: int = field(default=8, metadata=rules(min=1))
    alpha: int = field(default=16, metadata=rules(min=1))
    dropout: float = field(default=0.0, metadata=rules(min=0, max=1))
    targets: list[str] | None = None


@dataclass
class DataSpec:
    """The 2-digit training/validation/test problems (paper: 18,000 train / 2,000 test) and the 1-digit sets."""

    digits: int = field(default=2, metadata=rules(choices=(1, 2, 3)))
    per_op: int = field(default=5000, metadata=rules(min=1))
    test_size: int = field(default=2000, metadata=rules(min=1))
    validation_size: int = field(default=400, metadata=rules(min=0))
    train_limit: int | None = field(default=None, metadata=rules(min=1))  # cap training problems (quick profiles)
    negative: bool = False  # SmolLM2's tokenizer merges "=-" into one token: negative answers break the cases
    division: str = "inverse"
    template: str = "calculate"
    one_digit_division: str = "exact"  # the 1-digit eval/CNA set: the measured baseline's problems
    one_digit_limit: int | None = field(default=None, metadata=rules(min=1))  # cap 1-digit eval problems (quick profiles)
    seed: int = 0


@dataclass
class Splits:
    """Problems (datasets.Dataset rows) for each use."""

    train: object
    validation: object
    test: object
    one_digit: object


def build_splits(spec: DataSpec) -> Splits:
    """The paper's data: 2-digit problems split by problem into train / validation / test, plus 1-digit problems."""
    from surgery.evals import arithmetic

    common = dict(digits=(spec.digits,), templates=(spec.template,), seed=spec.seed, negative=spec.negative,
                  division=spec.division, per_op=spec.per_op, test_size=spec.test_size,
                  validation_size=spec.validation_size or None)
    train = arithmetic.build(split="train", limit=spec.train_limit, **common)
    val = arithmetic.build(split="validation", **common) if spec.validation_size else train.select([])
    test = arithmetic.build(split="test", **common)
    one = arithmetic.build(digits=(1,), templates=(spec.template,), division=spec.one_digit_division,
                           limit=spec.one_digit_limit, seed=spec.seed)
    return Splits(train, val, test, one)


# ---- attaching --------------------------------------------------------------------------------------------
def peft_config(view: ModelView, layers: list[int], spec: LoraSpec):
    """A PEFT LoraConfig on the attention projections of `layers` only."""
    from peft import LoraConfig

    for layer in layers:
        view.check_layer(layer)
    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, bias="none",
                      target_modules=list(spec.targets or view.arch.lora_targets), layers_to_transform=list(layers),
                      layers_pattern=view.arch.layers.rpartition(".")[2], task_type="CAUSAL_LM")


def attach(model: nn.Module, layers: list[int], spec: LoraSpec, copy_model: bool = True):
    """A PeftModel with fresh LoRA adapters at `layers` (on a deep copy of `model` unless copy_model=False)."""
    from peft import get_peft_model

    base = copy.deepcopy(model) if copy_model else model
    return get_peft_model(base, peft_config(ModelView(model), layers, spec))


def merged_copy(peft_model) -> nn.Module:
    """A plain model with the adapters merged, leaving `peft_model` untouched."""
    return copy.deepcopy(peft_model).merge_and_unload().eval()


def load_reference(path: str, base: nn.Module) -> nn.Module:
    """A reference model for CNA: a PEFT adapter folder (merged into a copy of `base`) or a full checkpoint."""
    from .models import load_model

    p = Path(path)
    if (p / "adapter_config.json").exists() or (p / "adapter" / "adapter_config.json").exists():
        from peft import PeftModel

        folder = p if (p / "adapter_config.json").exists() else p / "adapter"
        return PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).merge_and_unload().eval()
    ref = load_model(str(path)).model
    if ModelView(ref).ffn_widths() != ModelView(base).ffn_widths():
        raise UsageError(f"--against {path} has other FFN widths than the model; give an unsliced checkpoint")
    return ref


# ---- data -------------------------------------------------------------------------------------------------
def encode(problems, tokenizer) -> list[dict]:
    """Token ids of prompt+answer with labels -100 on the prompt: the loss covers the answer only."""
    from surgery.evals import arithmetic

    rows = []
    for p in problems:
        full, start = arithmetic.answer_tokens(tokenizer, p["prompt"], p["answer"])
        rows.append({"input_ids": full, "labels": [-100] * start + full[start:]})
    return rows


# ---- training ---------------------------------------------------------------------------------------------
def train_lora(model: nn.Module, tokenizer, rows: list[dict], layer: int, lora: LoraSpec, spec: TrainSpec,
               lr: float):
    """Fresh LoRA at `layer` on a copy of `model`, trained with transformers.Trainer; returns (peft_model, log)."""
    import tempfile

    from transformers import set_seed

    from .batching import device_of, pad_id

    if not rows:
        raise UsageError("no training problems; raise data.per_op or lower data.test_size")
    set_seed(spec.seed)
    pm = attach(model, [layer], lora)
    with tempfile.TemporaryDirectory(prefix="surgery-lora-") as tmp:
        trainer = answer_trainer(pm, rows, spec, lr, tmp, pad_id(tokenizer), device=str(device_of(model)))
        trainer.train()
    return pm.eval(), log_of(trainer)


@dataclass
class Fit:
    """A trained adapter and how it was chosen."""

    model: object  # PeftModel
    lr: float
    val_acc: dict[float, float | None]
    log: list[dict]
    seconds: float


def fit_lora(model: nn.Module, tokenizer, layer: int, lora: LoraSpec, spec: TrainSpec, splits: Splits,
             lrs: list[float] | None = None) -> Fit:
    """Train one LoRA per candidate lr, keep the best by validation full-answer accuracy (paper: lr from
    1e-3, 5e-4, 1e-4 on a validation split). One candidate: trained, no validation pass."""
    start, lrs = time.time(), list(lrs or spec.lrs)
    rows = encode(splits.train, tokenizer)
    best, scores = None, {}
    for lr in lrs:
        pm, log = train_lora(model, tokenizer, rows, layer, lora, spec, lr)
        acc = None
        if len(lrs) > 1 and len(splits.validation):
            acc = accuracy(pm, tokenizer, splits.validation, spec.eval_batch_size)["overall"]["full_answer_acc"]
        scores[lr] = acc
        if best is None or (acc is not None and acc > best[2]):
            best = (pm, lr, -1.0 if acc is None else acc, log)
    return Fit(best[0], best[1], scores, best[3], time.time() - start)


# ---- evaluation -------------------------------------------------------------------------------------------
def problem_predictions(model: nn.Module, tokenizer, cases, batch_size: int = 64) -> torch.Tensor:
    """Greedy-correct flag per case, teacher forced, with ONE forward per problem (cases of a problem are
    consecutive prefixes of the same sequence, as `arithmetic.cases` builds them)."""
    from .batching import batches, forward_logits, left_pad, pad_id

    groups = _problem_groups(cases)
    ids_col, tgt = list(cases["input_ids"]), list(cases["target"])
    correct = torch.zeros(len(ids_col), dtype=torch.bool)
    for idx in batches(len(groups), batch_size):
        rows = [groups[i] for i in idx]
        seqs = [ids_col[g[-1]] + [tgt[g[-1]]] for g in rows]
        keep = max(len(s) - len(ids_col[g[0]]) for s, g in zip(seqs, rows))
        pred = forward_logits(model, *left_pad(seqs, pad_id(tokenizer)), keep + 1).argmax(-1).cpu()
        for j, (s, g) in enumerate(zip(seqs, rows)):
            for c in g:
                correct[c] = int(pred[j, keep + 1 - (len(s) - len(ids_col[c])) - 1]) == tgt[c]
    return correct


def _problem_groups(cases) -> list[list[int]]:
    """Case indices grouped by (problem, template), in order."""
    groups: dict[str, list[int]] = {}
    for i, (pid, t) in enumerate(zip(cases["problem_id"], cases["template"])):
        groups.setdefault(f"{pid}|{t}", []).append(i)
    return list(groups.values())


def accuracy(model: nn.Module, tokenizer, problems, batch_size: int = 64) -> dict:
    """`arithmetic.score` of a model on problems: per-token and full-answer accuracy with 95% Wilson CIs."""
    from surgery.evals import arithmetic

    model.eval()
    cases = arithmetic.cases(problems, tokenizer)
    return arithmetic.score(cases, problem_predictions(model, tokenizer, cases, batch_size))
