"""PEFT LoRA at chosen layers: attach, train with the HF Trainer (answer-only loss, optional distillation), merge,
and load an `--against` comparison model. Task-agnostic: callers pass encoded rows and a validation scorer (the
arithmetic ones live in evals/arithmetic.py; the sweep over layers, paper Fig. 2, is
surgery/commands/lora_sweep/job.py).

    peft_model = attach(model, [9], LoraSpec(rank=8))                 # attention projections of layer 9 only
    peft_model = attach(model, [9], LoraSpec(), ffn_layers=[20, 21])  # + the FFN projections of layers 20-21
    fit = fit_lora(model, tok, 9, LoraSpec(), TrainSpec(), rows, validate)  # lr chosen by validate(model)
    merged = merged_copy(fit.model)                                  # a plain model (ModelView sees it)

Rows are prompt + answer token ids with labels -100 on the prompt (the loss covers only the answer tokens).
Which projections are "attention" comes from the arch table (`Arch.lora_targets`); the layer-list name PEFT
needs (`layers_pattern`) is the last part of `Arch.layers` ("layers", "h").
"""

from __future__ import annotations

import copy
import json
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import set_seed

from surgery.edits.training import TrainSpec, answer_trainer, log_of, saved_step
from surgery.errors import UsageError
from surgery.io.loading import load_model
from surgery.io.recipe import rules
from surgery.model.arch import ModelView
from surgery.model.batching import device_of, pad_id
from surgery.model.slicing import padding


# ---- recipe parts (validated by surgery.recipe) ------------------------------------------------------------
@dataclass
class LoraSpec:
    """PEFT LoRA settings; the targets come from the arch table unless given."""

    rank: int = field(default=8, metadata=rules(min=1))
    alpha: int = field(default=16, metadata=rules(min=1))
    dropout: float = field(default=0.0, metadata=rules(min=0, max=1))
    targets: list[str] | None = None
    ffn: bool = False  # recovery LoRA also on the FFN projections of the pruned layers (the paper: attention only)


# ---- attaching --------------------------------------------------------------------------------------------
def peft_config(view: ModelView, layers: list[int], spec: LoraSpec, ffn_layers: Sequence[int] = ()):
    """A PEFT LoraConfig on the attention projections of `layers`, and on the FFN projections (keys and values)
    of `ffn_layers` when given (one regex over module names: PEFT's layers_to_transform takes one module list)."""
    for layer in [*layers, *ffn_layers]:
        view.check_layer(layer)
    common = dict(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, bias="none", task_type="CAUSAL_LM")
    attn = list(spec.targets or view.arch.lora_targets)
    if not ffn_layers:
        return LoraConfig(
            target_modules=attn,
            layers_to_transform=list(layers),
            layers_pattern=view.arch.layers.rpartition(".")[2],
            **common,
        )
    return LoraConfig(
        target_modules=f"{_modules_regex(view, layers, attn)}|"
        f"{_modules_regex(view, ffn_layers, [*view.arch.ffn_in, view.arch.ffn_out])}",
        **common,
    )


def _modules_regex(view: ModelView, layers: Sequence[int], suffixes: Sequence[str]) -> str:
    """Full module names `<layers>.<i>.<...>.<suffix>` for i in layers (PEFT fullmatches it against names)."""
    idx = "|".join(str(l) for l in layers)
    ends = "|".join(re.escape(s) for s in suffixes)
    return rf"(?:.*\.)?{re.escape(view.arch.layers)}\.(?:{idx})\.(?:.*\.)?(?:{ends})"


def attach(
    model: nn.Module, layers: list[int], spec: LoraSpec, copy_model: bool = True, ffn_layers: Sequence[int] = ()
):
    """A PeftModel with fresh LoRA adapters at `layers`' attention (and `ffn_layers`' FFN), on a deep copy of
    `model` unless copy_model=False."""
    base = copy.deepcopy(model) if copy_model else model
    pm = get_peft_model(base, peft_config(ModelView(model), layers, spec, ffn_layers))
    freeze_padding(pm, ffn_layers)
    return pm


@torch.no_grad()
def freeze_padding(pm, ffn_layers: Sequence[int]) -> None:
    """Keep width rounding's zero padding neurons (surgery.slicing) exactly zero under an FFN LoRA: the LoRA rows
    that would write their key rows (lora_B rows of the key projections) and the LoRA columns that would write
    their value columns (lora_A columns of the value projection) start at zero and their gradients are zeroed,
    so AdamW (0 gradient, decoupled decay of 0) never moves them and the merged weights stay exactly 0."""
    model = pm.get_base_model()
    view, pad = ModelView(model), padding(model)
    for layer in ffn_layers:
        p = pad.get(layer, 0)
        if p <= 0:
            continue
        w = view.ffn_width(layer)
        idx = torch.arange(w - p, w)
        rows = torch.cat([idx, idx + w]) if view.arch.ffn_kind == "fused" else idx
        for mod in view.ffn_in(layer):
            for lin in getattr(mod, "lora_B", {}).values():
                _freeze(lin.weight, rows, 0)
        for lin in getattr(view.ffn_out(layer), "lora_A", {}).values():
            _freeze(lin.weight, idx, 1)


def _freeze(weight: nn.Parameter, idx: torch.Tensor, axis: int) -> None:
    idx = idx.to(weight.device)
    weight.index_fill_(axis, idx, 0.0)
    weight.register_hook(lambda g: g.index_fill(axis, idx, 0.0))


def merged_copy(peft_model) -> nn.Module:
    """A plain model with the adapters merged, leaving `peft_model` untouched."""
    return copy.deepcopy(peft_model).merge_and_unload().eval()


def load_against(path: str | Path, loaded, trust_remote_code: bool = False) -> nn.Module:
    """The comparison model of `--against`: a PEFT adapter folder (merged into a copy of the loaded base; its
    recorded base must be that model) or a full checkpoint with the same FFN widths and vocabulary (CNA
    compares the same neurons). One definition for every command that takes --against."""
    p = Path(path)
    folder = next((f for f in (p, p / "adapter") if (f / "adapter_config.json").exists()), None)
    if folder is not None:
        base_id = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path", "")
        if base_id and base_id not in (loaded.source, loaded.name, loaded.model.config.name_or_path):
            raise UsageError(f"adapter {path} was trained on {base_id!r}, not {loaded.name!r}; use its base model")
        try:
            merged = PeftModel.from_pretrained(copy.deepcopy(loaded.model), str(folder)).merge_and_unload()
        except (RuntimeError, ValueError, KeyError) as e:
            raise UsageError(f"adapter {path} does not fit {loaded.name} ({str(e).splitlines()[0][:120]})") from e
        return merged.eval()
    other = load_model(str(path), trust_remote_code=trust_remote_code).model
    a, b = ModelView(other), ModelView(loaded.model)
    if a.ffn_widths() != b.ffn_widths() or other.config.vocab_size != loaded.model.config.vocab_size:
        raise UsageError(
            f"--against {path} has other FFN widths or vocabulary than {loaded.name}; "
            "CNA compares the same neurons, so use a model of the same base"
        )
    return other


# ---- training ---------------------------------------------------------------------------------------------
def train_lora(
    model: nn.Module,
    tokenizer,
    rows: list[dict],
    layer: int,
    lora: LoraSpec,
    spec: TrainSpec,
    lr: float,
    teacher: nn.Module | None = None,
    ffn_layers: Sequence[int] = (),
    state_dir: Path | None = None,
    save_steps: int = 0,
):
    """Fresh LoRA at `layer` on a copy of `model`, trained with transformers.Trainer (distilled from `teacher`
    when spec.distill > 0); returns (peft_model, log). With `state_dir` and `save_steps` > 0 the Trainer saves its
    whole state there every save_steps steps (adapter, AdamW, scheduler, RNG, data position; the newest kept) and
    a killed training resumes from it: the same batches in the same order as an uninterrupted one."""

    if not rows:
        raise UsageError("no training problems; raise data.per_op or lower data.test_size")
    set_seed(spec.seed)
    pm = attach(model, [layer], lora, ffn_layers=ffn_layers)
    keep = state_dir is not None and save_steps > 0
    extra = {"save_steps": save_steps} if keep else {}
    with tempfile.TemporaryDirectory(prefix="surgery-lora-") as tmp:
        out = str(state_dir) if keep else tmp
        trainer = answer_trainer(
            pm, rows, spec, lr, out, pad_id(tokenizer), teacher, device=str(device_of(model)), **extra
        )
        trainer.train(resume_from_checkpoint=True if keep and saved_step(Path(out)) else None)
    return pm.eval(), log_of(trainer)


@dataclass
class Fit:
    """A trained adapter and how it was chosen."""

    model: object  # PeftModel
    lr: float
    val_acc: dict[float, float | None]
    log: list[dict]
    seconds: float


def fit_lora(
    model: nn.Module,
    tokenizer,
    layer: int,
    lora: LoraSpec,
    spec: TrainSpec,
    rows: list[dict],
    validate: Callable[[nn.Module], float] | None = None,
    lrs: list[float] | None = None,
    teacher: nn.Module | None = None,
    ffn_layers: Sequence[int] = (),
    state_dir: Path | None = None,
    save_steps: int = 0,
) -> Fit:
    """Train one LoRA per candidate lr on encoded `rows`, keep the best by `validate(model)` (higher is better;
    the paper picks lr from 1e-3, 5e-4, 1e-4 on a validation split). One candidate or no `validate`: the first
    lr, no validation pass. `state_dir`/`save_steps`: each lr's training saves and resumes under state_dir/lr-<lr>
    (`train_lora`)."""
    start, lrs = time.time(), list(lrs or spec.lrs)
    best, scores = None, {}
    for lr in lrs:
        at = state_dir / f"lr-{lr:g}" if state_dir is not None else None
        pm, log = train_lora(model, tokenizer, rows, layer, lora, spec, lr, teacher, ffn_layers, at, save_steps)
        acc = validate(pm) if len(lrs) > 1 and validate is not None else None
        scores[lr] = acc
        if best is None or (acc is not None and acc > best[2]):
            best = (pm, lr, -1.0 if acc is None else acc, log)
    return Fit(best[0], best[1], scores, best[3], time.time() - start)
