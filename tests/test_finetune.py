"""surgery finetune: the exported precise checkpoint diffs as exactly its trained components; bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny

from surgery.commands.diff.job import diff
from surgery.edits.precise import Precise, select
from surgery.edits.training import TrainSpec, answer_trainer
from surgery.errors import UsageError
from surgery.find.components import Components
from surgery.io.checkpoint import save


class _Tok:
    """The minimum export.save needs from a tokenizer."""

    def save_pretrained(self, folder):
        pass


def _train(model, comps, tmp):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (8, 6), generator=g)
    rows = [{"input_ids": i.tolist(), "labels": [-100] * 3 + i.tolist()[3:]} for i in ids]
    with Precise(model, select(model, comps)):
        answer_trainer(model, rows, TrainSpec(max_steps=3, batch_size=4, warmup_ratio=0.0), 1e-2, str(tmp), 0).train()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3", "gpt_neox"])
def test_diff_reports_exactly_the_trained_components(arch, tmp_path):
    base = make_tiny(arch)
    save(base, _Tok(), tmp_path / "base", layout="zeroed")
    model = make_tiny(arch)
    comps = Components([(0, 1), (2, 3)], [1])
    _train(model, comps, tmp_path / "t")
    save(model, _Tok(), tmp_path / "ft", layout="zeroed", provenance={"finetune": comps.to_dict()})
    d = diff(str(tmp_path / "base"), str(tmp_path / "ft")).data
    got = d["changed_components"]
    assert got["heads"] == ["0.1", "2.3"] and got["mlps"] == [1]
    n_kv = getattr(base.config, "num_key_value_heads", None) or base.config.num_attention_heads
    group = base.config.num_attention_heads // n_kv
    assert got["kv_heads"] == [f"0.{1 // group}", f"2.{3 // group}"]
    from surgery.model.arch import ModelView

    a = ModelView(base).arch
    qkv = {f"{a.layers}.{l}.{p}.{w}" for l in (0, 2) for p in a.attn_qkv for w in ("weight", "bias")}
    qkv.add(f"{a.layers}.1.{a.ffn_out}.bias")
    assert {o["tensor"] for o in d["other_tensors"]} <= qkv  # nothing outside the components changed
    assert not any(r.get("qkv_outside_heads") for r in d["layers"])
    m = json.loads((tmp_path / "ft" / "surgery.json").read_text())
    assert m["finetune"]["heads"] == ["0.1", "2.3"]


def test_finetune_bad_inputs_write_nothing(tmp_path):
    from surgery.commands.finetune import run

    out = tmp_path / "o"
    for kw, msg in [
        (dict(components="99.0"), "outside"),
        (dict(components=""), "empty"),
        (dict(components="1.1,2.2", top_heads=3), "at most 2"),
        (dict(components="mlp.40"), "outside"),
        (dict(components="mlp.3"), "no heads"),
        (dict(overrides=["train.weight_decay=0.1"]), "weight_decay"),
    ]:
        with pytest.raises(UsageError, match=msg):
            run(out=str(out), quick=True, **kw)
    assert not out.exists() and not (tmp_path / "o.partial").exists()


def test_plan_rows_same_k_random_control_disjoint_and_sweep():
    from surgery.commands.finetune.job import FinetuneRecipe, plan_rows

    r = FinetuneRecipe(sweep=[1, 2, 3, 9])
    comps = Components([(2, 3), (0, 1), (1, 0)], [])
    rows = plan_rows(r, comps, [1], (3, 4), 2)
    names = [x.name for x in rows]
    assert names[0] == "base" and "full fine-tuning" in names and any(n.startswith("LoRA") for n in names)
    main = next(x for x in rows if x.name == "precise, 2 heads")
    rnd = next(x for x in rows if "random" in x.name)
    assert main.comps.heads == [(2, 3), (0, 1)] and len(rnd.comps.heads) == 2
    assert not set(rnd.comps.heads) & set(main.comps.heads)
    mlp = next(x for x in rows if "MLPs" in x.name)
    assert mlp.comps.heads == main.comps.heads and mlp.comps.mlps == [1]
    sweep = [
        len(x.comps.heads)
        for x in rows
        if x.name.startswith("precise, ") and "random" not in x.name and "MLPs" not in x.name
    ]
    assert sweep == [2, 1, 3]  # K=9 dropped: only 3 heads ranked


def test_contrasts_chosen_vs_random_and_full_vs_precise():
    """Paired contrasts on the same items: chosen heads right on items every random draw misses -> apart; one
    draw as good as the chosen heads -> not apart; full fine-tuning losing MMLU items precise keeps -> apart."""
    from surgery.commands.finetune import job

    n = 200
    chosen = [1] * 120 + [0] * 80
    weak = [1] * 60 + [0] * 140

    def row(name, kind, source, items, heads=8):
        comps = (
            None
            if kind in ("base", "full")
            else {"heads": [f"0.{i}" for i in range(heads)], "mlps": [], "source": source}
        )
        return {"name": name, "kind": kind, "components": comps, "items": items}

    general = [1] * 100 + [0] * 100
    forgot = [1] * 70 + [0] * 130
    results = [
        row("base", "base", None, {"arith": weak, "mmlu": general}),
        row("full fine-tuning", "full", None, {"arith": chosen, "mmlu": forgot}),
        row("precise, 8 heads", "precise", "path-patch", {"arith": chosen, "mmlu": general}),
        *[row(f"random {d}", "precise", "random", {"arith": weak, "mmlu": general}) for d in range(3)],
        row("precise, 4 heads", "precise", "path-patch", {"arith": weak, "mmlu": general}, heads=4),
    ]
    c = job.contrasts(results)
    cr = c["chosen_vs_random"]
    assert cr["chosen"] == "precise, 8 heads" and len(cr["random"]) == 3
    assert cr["arith"]["apart"] and abs(cr["arith"]["pooled"]["mean"] - 60 / n) < 1e-9
    assert c["full_vs_precise"]["mmlu"]["apart"] and c["full_vs_precise"]["mmlu"]["mean"] < 0
    md = job.contrasts_md(c)
    assert "chosen better, apart" in md and "full loses more, apart" in md

    results[4]["items"]["arith"] = chosen  # one draw as good as the chosen heads: no longer apart
    c = job.contrasts(results)
    assert not c["chosen_vs_random"]["arith"]["apart"]
    assert "not apart" in job.contrasts_md(c)
