"""PEFT LoRA at chosen layers, trained with the HF Trainer on arithmetic text; the per-layer sweep (paper Fig. 2).

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
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .arch import ModelView
from .errors import UsageError
from .training import TrainSpec, answer_trainer, log_of


# ---- recipe parts (validated by surgery.recipe) ------------------------------------------------------------
@dataclass
class LoraSpec:
    """PEFT LoRA settings; the targets come from the arch table unless given."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: list[str] | None = None


@dataclass
class DataSpec:
    """The 2-digit training/validation/test problems (paper: 18,000 train / 2,000 test) and the 1-digit sets."""

    digits: int = 2
    per_op: int = 5000
    test_size: int = 2000
    validation_size: int = 400
    train_limit: int | None = None  # cap training problems (quick profiles)
    negative: bool = False  # SmolLM2's tokenizer merges "=-" into one token: negative answers break the cases
    division: str = "inverse"
    template: str = "calculate"
    one_digit_division: str = "exact"  # the 1-digit eval/CNA set: the measured baseline's problems
    one_digit_limit: int | None = None  # cap 1-digit eval problems (quick profiles)
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


def load_reference(path: str, base: nn.Module, trust_remote_code: bool = False) -> nn.Module:
    """A reference model for CNA: a PEFT adapter folder (merged into a copy of `base`) or a full checkpoint."""
    from .models import load_model

    p = Path(path)
    if (p / "adapter_config.json").exists() or (p / "adapter" / "adapter_config.json").exists():
        from peft import PeftModel

        folder = p if (p / "adapter_config.json").exists() else p / "adapter"
        return PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).merge_and_unload().eval()
    ref = load_model(str(path), trust_remote_code=trust_remote_code).model
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


# ---- coefficient amplification (paper Tables 9-10) ---------------------------------------------------------
def amplification(orig: nn.Module, tuned: nn.Module, tokenizer, seqs: list[list[int]], top: dict[int, list[int]],
                  groups: list[tuple[int, int]]) -> list[dict]:
    """Mean |coefficient| of the CNA top neurons in the tuned vs the original model, per layer group."""
    from .batching import pad_id
    from .selection import mean_coefficients

    layers = sorted(top)
    a = mean_coefficients(ModelView(orig), seqs, layers, pad_id(tokenizer), absolute=True)
    b = mean_coefficients(ModelView(tuned), seqs, layers, pad_id(tokenizer), absolute=True)
    out = []
    for lo, hi in groups:
        ls = [l for l in layers if lo <= l <= hi and top[l]]
        ca = sum(float(a[l][top[l]].sum()) for l in ls)
        cb = sum(float(b[l][top[l]].sum()) for l in ls)
        n = sum(len(top[l]) for l in ls)
        out.append({"layers": f"{lo}-{hi}", "neurons": n, "orig": ca / max(n, 1), "lora": cb / max(n, 1),
                    "ratio": cb / ca if ca else None})
    return out


# ---- the sweep (paper Figure 2, Tables 9-10) ----------------------------------------------------------------
def sweep(model: str = "smollm2-135m", dtype: str = "float32", device: str = "cpu", out: str | None = None,
          force: bool = False, quick: bool = False, overrides: list[str] | None = None,
          recipe: str = "arithmetic-prune", layers: str | None = None, profile: str | None = None,
          trust_remote_code: bool = False):
    """Train one LoRA per layer on 2-digit arithmetic, report test accuracy per layer (paper Figure 2, PNG) and
    the coefficient amplification of each LoRA model's CNA top neurons per layer group vs the original
    (paper Tables 9-10)."""
    from .cna import parse_layers
    from .models import load_model
    from .prune import Steps, check_out, load_recipe, task_cases

    start, steps = time.time(), Steps()
    r = load_recipe(recipe, quick, overrides, profile)
    outp = check_out(out, force, f"lora-sweep-{Path(model).name}")
    with steps("load"):
        loaded = load_model(model, dtype, device, trust_remote_code=trust_remote_code)
    spec = layers if layers is not None else r.sweep.layers
    if spec is not None and not str(spec).strip():
        raise UsageError("empty --layers; use A-B or a list like 3,5,7")
    which = parse_layers(spec, ModelView(loaded.model).n_layers)
    with steps("data"):
        splits = build_splits(r.data)
        task = task_cases(splits, loaded.tokenizer, r.cna.limit)
    rows = [_sweep_layer(loaded, l, r, splits, task, steps) for l in which]
    return _sweep_report(loaded, r, rows, steps, outp, force, start)


def _layer_groups(n_layers: int, groups: int) -> list[tuple[int, int]]:
    size = math.ceil(n_layers / max(1, groups))
    return [(lo, min(lo + size, n_layers) - 1) for lo in range(0, n_layers, size)]


def _sweep_layer(loaded, layer: int, r, splits: Splits, task, steps) -> dict:
    """Train a LoRA at `layer`, evaluate it, and measure the amplification of its CNA top neurons."""
    from .cna import scan
    from .batching import pad_id

    orig, tok = loaded.model, loaded.tokenizer
    with steps(f"LoRA layer {layer}"):
        fit = fit_lora(orig, tok, layer, r.lora, r.train, splits)
        tuned = merged_copy(fit.model)
        acc = accuracy(tuned, tok, splits.test, r.train.eval_batch_size)["overall"]
    with steps(f"CNA layer {layer}"):
        n = ModelView(orig).n_layers
        sc = scan(ModelView(tuned), task.seqs, list(range(n)), r.sweep.top, pad_id(tok), view_b=ModelView(orig),
                  targets=task.targets, batch_size=r.cna.batch_size)
        top = {l: sorted(s) for l, s in sc.per_case_sets().items()}
        amp = amplification(orig, tuned, tok, task.seqs, top, _layer_groups(n, r.sweep.groups))
    return {"layer": layer, "lr": fit.lr, "test2": acc, "amplification": amp,
            "top_per_group": [a["neurons"] for a in amp]}


def _sweep_report(loaded, r, rows: list[dict], steps, out: Path, force: bool, start: float):
    """report.json / report.md / sweep.png in `out`, written atomically."""
    from .recipe import to_dict
    from .report import Report, atomic_dir, make, md_table, save

    table = md_table(["LoRA layer", "2-digit test acc %", "95% CI", "n", "lr"],
                     [[x["layer"], f"{100 * x['test2']['full_answer_acc']:.1f}",
                       "[{:.1f}, {:.1f}]".format(*[100 * c for c in x["test2"]["full_answer_ci95"]]),
                       x["test2"]["n_problems"], x["lr"]] for x in rows])
    groups = [a["layers"] for a in rows[0]["amplification"]] if rows else []
    amp = md_table(["LoRA layer"] + [f"{g} (lora/orig)" for g in groups],
                   [[x["layer"]] + [("-" if a["ratio"] is None else f"{a['ratio']:.2f}x") + f" ({a['neurons']})"
                                    for a in x["amplification"]] for x in rows])
    md = "\n\n".join([f"# lora-sweep: {loaded.name}, recipe {r.name}",
                      "## 2-digit test accuracy per LoRA layer (paper Figure 2)", table,
                      f"## Coefficient amplification of the CNA top-{r.sweep.top} neurons (mean |m|, LoRA / "
                      "original, per layer group; neuron count in brackets; paper Tables 9-10)", amp,
                      "## Timing", md_table(["step", "seconds"], list(steps.seconds.items()))])
    data = make("lora-sweep", loaded.describe(), to_dict(r), {"layers": rows, "steps_seconds": steps.seconds},
                time.time() - start)
    rep = Report(data, md)
    with atomic_dir(out, force) as tmp:
        save(rep, tmp)
        (tmp / "sweep.png").write_bytes(_sweep_png(rows))
    rep.files = [out / "report.json", out / "report.md", out / "sweep.png"]
    return rep


def _sweep_png(rows: list[dict]) -> bytes:
    """Accuracy per LoRA layer with 95% CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import png_bytes

    fig, ax = plt.subplots(figsize=(8, 3.5))
    xs = [x["layer"] for x in rows]
    acc = [100 * x["test2"]["full_answer_acc"] for x in rows]
    ci = [[a - 100 * x["test2"]["full_answer_ci95"][0] for a, x in zip(acc, rows)],
          [100 * x["test2"]["full_answer_ci95"][1] - a for a, x in zip(acc, rows)]]
    ax.errorbar(xs, acc, yerr=ci, marker="o", capsize=3)
    ax.set_xlabel("LoRA layer")
    ax.set_ylabel("2-digit test accuracy %")
    return png_bytes(fig, dpi=100)
