"""Pruning: keep specs, input validation (nothing written on error), selectors at equal budgets, sliced == masked."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import ARCHS, VOCAB, make_tiny, tiny_inputs

from surgery.edits import pruning as prune
from surgery.errors import UsageError
from surgery.find import selectors
from surgery.io.context import Run
from surgery.model.arch import ModelView
from surgery.model.slicing import dense_equivalent

TOK = SimpleNamespace(pad_token_id=0, eos_token_id=2)


def test_parse_keep():
    assert prune.parse_keep("top500") == ("top", 500)
    assert prune.parse_keep("5%") == ("pct", 5.0)
    assert prune.parse_keep("2.5%") == ("pct", 2.5)
    for bad in ("500", "top", "five%", "-5%"):
        with pytest.raises(UsageError):
            prune.parse_keep(bad)


def recipe(**kw) -> prune.PruneRecipe:
    r = prune.PruneRecipe()
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def test_plan_depth_relative_defaults():
    model = make_tiny("llama")  # 3 layers, 48 neurons each
    plan = prune.make_plan(recipe(keep="top5", layers="deep"), model)
    assert plan.layers == [1, 2] and plan.lora_layer == 1 and plan.selectors[0] == "cna"
    assert plan.selectors == ["cna", "random", "magnitude", "activation", "taylor"]


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(keep="top0"), "top0"),
        (dict(keep="top97"), "1..96"),
        (dict(keep="0%"), "percentage"),
        (dict(keep="101%"), "percentage"),
        (dict(layers=""), "empty"),
        (dict(layers="5-7"), "outside"),
        (dict(lora_layer=3), "outside"),
        (dict(lora_layer=-1), "outside"),
        (dict(selector="best"), "selector"),
    ],
)
def test_plan_rejects_bad_input(kw, msg):
    with pytest.raises(UsageError, match=msg):
        prune.make_plan(recipe(**{"keep": "top5", **kw}), make_tiny("llama"))


def test_recipe_loads_quick_and_rejects_unknown_keys():
    r = prune.load_recipe("arithmetic-prune", ["lora.rank=4"], True, keep="3%", layers=None)
    assert r.keep == "3%" and r.layers == "deep" and r.lora.rank == 4 and r.train.max_steps > 0
    with pytest.raises(UsageError, match="lora.rnak"):
        prune.load_recipe("arithmetic-prune", ["lora.rnak=4"])


def test_existing_out_needs_force(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(UsageError, match="--force"):
        Run("prune", tmp_path / "x", False, "d")
    assert Run("prune", tmp_path / "x", True, "d").out == tmp_path / "x"


@pytest.mark.parametrize(
    "argv",
    [
        ["--keep", "top0"],
        ["--keep", "top99999999"],
        ["--keep", "0%"],
        ["--layers", "40-50"],
        ["--lora-layer", "99"],
    ],
)
@pytest.mark.real
def test_cli_bad_input_exit_2_nothing_written(argv, tmp_path, capfd, smol):
    from surgery.cli import main

    out = tmp_path / "ckpt"
    assert main(["prune", "--quick", "--out", str(out), *argv]) == 2
    err = capfd.readouterr().err.strip().splitlines()  # unfiltered: no step log, nothing from transformers
    assert len(err) == 1 and err[0].startswith("surgery: error:"), err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_existing_out_exit_2(tmp_path, capsys):
    from surgery.cli import main

    (tmp_path / "ckpt").mkdir()
    assert main(["prune", "--quick", "--out", str(tmp_path / "ckpt")]) == 2
    assert "--force" in capsys.readouterr().err
    assert list((tmp_path / "ckpt").iterdir()) == []


# ---- selectors --------------------------------------------------------------------------------------------
def baseline_keep(name: str, model, t, budget: dict[int, int], seed: int) -> dict[int, list[int]]:
    inp = selectors.Inputs(ModelView(model), sorted(budget), 0, t.seqs, t.targets, seed=seed)
    return selectors.by_budget(selectors.score("task", name, inp), budget)


def cna_keep(
    orig, ref, t, kind: str, value: float, score: str = "delta", aggregate: str = "sum"
) -> dict[int, list[int]]:
    r = prune.PruneRecipe(cna=prune.CnaSpec(batch_size=2, score=score, aggregate=aggregate, exact_top=200))
    sel = prune.select(orig, ref, TOK, t, [1, 2], ["cna"], r, int(value) if kind == "top" else 0)
    return prune.keeps_for(sel, kind, value)["cna"]


def task() -> prune.TaskCases:
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (4, 6, 5, 7)]
    return prune.TaskCases(seqs, torch.randint(3, VOCAB, (4,), generator=g).tolist())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
@pytest.mark.parametrize("name", ["random", "magnitude", "activation", "taylor"])
def test_baselines_match_budget(arch, name):
    model = make_tiny(arch)
    budget = {1: 5, 2: 11}
    keep = baseline_keep(name, model, task(), budget, seed=0)
    assert {l: len(set(v)) for l, v in keep.items()} == budget
    assert all(0 <= i < 48 for v in keep.values() for i in v)


def test_random_is_seeded():
    m = make_tiny("llama")
    a = baseline_keep("random", m, task(), {1: 5}, seed=1)
    assert a == baseline_keep("random", m, task(), {1: 5}, seed=1)
    assert a != baseline_keep("random", m, task(), {1: 5}, seed=2)


def test_taylor_equals_finite_difference_first_order():
    """|m_k dL/dm_k| is the first-order loss change of removing neuron k: check one neuron numerically."""
    from surgery.model.hooks import Hooks

    model, t = make_tiny("llama"), task()
    t = prune.TaskCases(t.seqs[:1], t.targets[:1])
    s = selectors.taylor(selectors.Inputs(ModelView(model), [1], 0, t.seqs, t.targets))[1]
    k = int(s.argmax())

    def loss(scale: float) -> float:
        sc = torch.ones(48)
        sc[k] = scale
        with Hooks(model) as h, torch.no_grad():
            h.scale_neurons(1, sc)
            logits = model(input_ids=torch.tensor(t.seqs)).logits[:, -1]
        return float(torch.nn.functional.cross_entropy(logits, torch.tensor(t.targets)))

    eps = 1e-3  # d L / d scale at 1 = m_k dL/dm_k
    fd = (loss(1 + eps) - loss(1 - eps)) / (2 * eps)
    assert abs(abs(fd) - float(s[k])) < 1e-3 * max(1.0, float(s[k]))


def test_global_budget_and_by_budget():
    scores = {3: torch.tensor([0.1, 5.0, 0.2]), 4: torch.tensor([4.0, 0.0, 3.0, 0.3])}
    assert prune.global_budget(scores, 100 * 3 / 7) == {3: [1], 4: [0, 2]}
    assert selectors.by_budget(scores, {3: 2, 4: 1}) == {3: [1, 2], 4: [0]}


@pytest.mark.parametrize("arch", ARCHS)
def test_sliced_copy_equals_dense_with_rest_zeroed(arch):
    model = make_tiny(arch)
    keep = {1: [0, 3, 7, 20, 47], 2: list(range(0, 48, 5))}
    sliced = prune.sliced_copy(model, keep)
    assert ModelView(sliced).ffn_widths() == [48, 8, 16]  # 5 and 10 kept, rounded up to multiples of 8
    dense = make_tiny(arch)
    dense_equivalent(dense, keep)
    x = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(sliced(**x).logits, dense(**x).logits, atol=1e-5, rtol=1e-5)
    assert ModelView(model).ffn_widths() == [48, 48, 48]  # original untouched


def test_cna_keep_topn_and_pct_on_tiny():
    """CNA keep sets: topN = per-case union (each case contributes at most N); P% = exact global count."""
    orig = make_tiny("llama")
    ref = make_tiny("llama", seed=1)
    t = task()
    keep = cna_keep(orig, ref, t, "top", 4)
    n = sum(len(v) for v in keep.values())
    assert 4 <= n <= 4 * len(t.seqs) and set(keep) == {1, 2}
    keep = cna_keep(orig, ref, t, "pct", 10)
    assert sum(len(v) for v in keep.values()) == round(0.1 * 96)


@pytest.mark.parametrize("score", ["delta", "reference"])
def test_cna_keep_topn_is_the_union_of_exhaustive_per_case_tops(score):
    """topN == the union of each case's exhaustive top-N: of the delta (reference - original), or of the
    importance in the reference alone (cna.score=reference)."""
    from surgery.find.cna import compare
    from surgery.model.batching import left_pad

    orig, ref, t = make_tiny("llama"), make_tiny("llama", seed=1), task()
    keep = cna_keep(orig, ref, t, "top", 3, score)
    want = {1: set(), 2: set()}
    for seq, tgt in zip(t.seqs, t.targets):
        c = compare(
            ModelView(ref),
            left_pad([seq], 0),
            [1, 2],
            3,
            target=torch.tensor([tgt]),
            exhaustive=True,
            view_b=ModelView(orig) if score == "delta" else None,
        )
        for l, i in zip(c.top.layer[0].tolist(), c.top.index[0].tolist()):
            want[l].add(i)
    assert {l: set(v) for l, v in keep.items()} == want
    with pytest.raises(UsageError, match="cna.score"):
        cna_keep(orig, ref, t, "top", 3, "abs")


@pytest.mark.parametrize("aggregate", ["sum", "abs"])
def test_cna_keep_pct_ranks_by_the_summed_exhaustive_delta(aggregate):
    """P% == the top neurons by the delta summed over cases (the paper), or by its summed magnitude
    (cna.aggregate=abs); every neuron exact here (exact_top covers all 192), so the sums equal the exhaustive."""
    from surgery.find.cna import compare
    from surgery.model.batching import left_pad

    orig, ref, t = make_tiny("llama"), make_tiny("llama", seed=1), task()
    keep = cna_keep(orig, ref, t, "pct", 25, aggregate=aggregate)
    total = {1: 0.0, 2: 0.0}
    for seq, tgt in zip(t.seqs, t.targets):
        c = compare(
            ModelView(ref),
            left_pad([seq], 0),
            [1, 2],
            3,
            target=torch.tensor([tgt]),
            exhaustive=True,
            view_b=ModelView(orig),
        )
        for l in (1, 2):
            d = c.delta[l][0]
            total[l] = total[l] + (d.abs() if aggregate == "abs" else d)
    flat = torch.cat([total[1], total[2]])
    n1 = len(total[1])
    want = {1: set(), 2: set()}
    for i in flat.topk(round(0.25 * len(flat))).indices.tolist():
        want[1 if i < n1 else 2].add(i if i < n1 else i - n1)
    assert {l: set(v) for l, v in keep.items()} == want
    other = cna_keep(orig, ref, t, "pct", 25, aggregate="abs" if aggregate == "sum" else "sum")
    assert {l: set(v) for l, v in other.items()} != want, "signed and magnitude sums must pick different sets here"


@pytest.mark.parametrize("main", ["cna", "random", "magnitude", "activation", "taylor"])
@pytest.mark.parametrize("keep", [("top", 3), ("pct", 20)])
def test_every_selector_gets_the_main_selectors_per_layer_budget(main, keep):
    """Whichever selector is main, the baselines keep exactly its per-layer counts, and the cut is real: topN is
    CNA's per-case union (not N x cases spread over the layers, which kept every layer whole), P% is P% of the
    chosen layers."""
    orig, ref, t = make_tiny("llama"), make_tiny("llama", seed=1), task()
    r = prune.PruneRecipe(cna=prune.CnaSpec(batch_size=2))
    others = ["random", "magnitude", "activation", "taylor", "wanda", "flap", "total-effect", "cna"]
    order = [main] + [o for o in others if o != main]
    keeps = prune.keeps_for(prune.select(orig, ref, TOK, t, [1, 2], order, r, 3 if keep[0] == "top" else 0), *keep)
    cna_kept = cna_keep(orig, ref, t, *keep)
    budget = {l: len(v) for l, v in keeps[main].items()}
    if keep[0] == "top":
        assert budget == {l: len(v) for l, v in cna_kept.items()}  # CNA's rule sets the topN budget
    else:
        assert sum(budget.values()) == round(0.2 * 96)
    assert sum(budget.values()) < 96  # something is pruned
    for other in order:
        assert {l: len(v) for l, v in keeps[other].items()} == budget, other


def test_a_registered_selector_is_usable_everywhere(tmp_path, capfd):
    """A new selector is one decorated function: the recipe, prune's baselines and the CLI accept it."""
    from surgery.cli import build_parser

    @selectors.register("task", "first-index")
    def first_index(inp):
        return {l: -torch.arange(inp.view.ffn_width(l), dtype=torch.float32) for l in inp.layers}

    try:
        r = prune.load_recipe("arithmetic-prune", ["baselines=[random,first-index]"], selector="first-index")
        assert r.selector == "first-index" and "first-index" in r.baselines
        keep = baseline_keep("first-index", make_tiny("llama"), task(), {1: 3, 2: 2}, seed=0)
        assert keep == {1: [0, 1, 2], 2: [0, 1]}
        assert build_parser().parse_args(["prune", "--selector", "first-index"]).selector == "first-index"
        with pytest.raises(SystemExit):
            build_parser().parse_args(["prune", "--selector", "nope"])
        assert "unknown selector 'nope'" in capfd.readouterr().err
    finally:
        del selectors.REGISTRY["task"]["first-index"]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_wanda_flap_and_total_effect_equal_their_definitions(arch):
    """Each score from one direct computation: coefficients of every real token by a plain forward with a hook,
    and the total effect as a finite difference of the answer log-prob (scaling m_k by 1 - eps)."""
    from surgery.model.hooks import Hooks

    model, t = make_tiny(arch), task()
    view = ModelView(model)
    inp = selectors.Inputs(view, [1, 2], 0, t.seqs, t.targets)
    ms = {1: [], 2: []}
    for s in t.seqs:  # one sequence at a time: no padding at all
        with Hooks(view) as h, torch.no_grad():
            h.capture("m", layers=[1, 2], positions=None)
            model(input_ids=torch.tensor([s]))
        for l in (1, 2):
            ms[l].append(h.store["m", l][0].double())
    for l in (1, 2):
        m = torch.cat(ms[l])  # [all tokens, N]
        vnorm = view.values(l).double().norm(dim=1)
        torch.testing.assert_close(selectors.wanda(inp)[l].double(), vnorm * m.norm(dim=0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(selectors.flap(inp)[l].double(), m.var(0) * vnorm**2, rtol=1e-4, atol=1e-6)
    te = selectors.total_effect(selectors.Inputs(view, [1], 0, t.seqs[:1], t.targets[:1]))[1]
    k = int(te.abs().argmax())

    def logp(scale: float) -> float:
        sc = torch.ones(48, dtype=torch.float32)
        sc[k] = scale
        with Hooks(model) as h, torch.no_grad():
            h.scale_neurons(1, sc)
            out = model(input_ids=torch.tensor([t.seqs[0]])).logits[0, -1].double()
        return float(out.log_softmax(-1)[t.targets[0]])

    eps = 1e-3  # removing a fraction eps of m_k changes log p by -eps * total effect, to first order
    assert abs((logp(1.0) - logp(1.0 - eps)) / eps - float(te[k])) < 1e-2 * max(1.0, abs(float(te[k])))


def test_compensation_with_a_native_layout_is_refused_before_any_work():
    r = prune.load_recipe("arithmetic-prune", ["compensate=true"], keep="10%", layout="padded")
    with pytest.raises(UsageError, match="use --layout sliced"):
        prune.make_plan(r, make_tiny("qwen2"))
    assert prune.make_plan(r, make_tiny("llama")).keep_kind == "pct"  # Llama: mlp_bias carries it natively


def test_compensated_sliced_copy_uses_the_token_means():
    orig, t = make_tiny("mistral"), task()
    means = prune.token_means(orig, TOK, t, [1, 2])
    m = prune.sliced_copy(orig, {1: [0, 1, 2], 2: [5]}, means)
    v = ModelView(orig)
    gone = [i for i in range(48) if i not in (0, 1, 2)]
    torch.testing.assert_close(
        ModelView(m).ffn_out_bias(1), means[1][gone] @ v.values(1)[gone].detach(), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compensation_means_at_the_last_position_or_every_token(arch):
    """compensate_at=last: the mean of m_k at each case's last position (one plain forward per case here);
    tokens: the mean over every token of every case (FLAP's calibration)."""
    from surgery.model.hooks import Hooks

    orig, t = make_tiny(arch), task()
    view, last, every = ModelView(orig), {1: [], 2: []}, {1: [], 2: []}
    for s in t.seqs:
        with torch.no_grad(), Hooks(view) as h:
            h.capture("m", layers=[1, 2], positions=None)
            orig(input_ids=torch.tensor([s]))
        for l in (1, 2):
            last[l].append(h.store["m", l][0, -1])
            every[l].append(h.store["m", l][0])
    got_last = prune.token_means(orig, TOK, t, [1, 2], "last")
    got_all = prune.token_means(orig, TOK, t, [1, 2], "tokens")
    for l in (1, 2):
        torch.testing.assert_close(got_last[l], torch.stack(last[l]).mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_all[l], torch.cat(every[l]).mean(0), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got_last[l], got_all[l])


def test_the_report_closes_with_what_the_run_showed():
    """The last lines of `surgery prune` (what `make demo` ends with): the pruned model against the original and
    against each control selector, with a plain verdict from the 95% intervals, and where the checkpoint is."""
    from surgery.commands.prune.job import shown

    def row(name, acc, lo, hi):
        return {"name": name, "test2": {"full_answer_acc": acc, "full_answer_ci95": [lo, hi], "n_problems": 400}}

    rows = [
        row("original", 0.048, 0.031, 0.073),
        row("cna-pruned + LoRA", 0.135, 0.105, 0.172),
        row("random-pruned + LoRA", 0.12, 0.09, 0.15),
    ]
    text = shown(rows, "cna", "test2", "2-digit test", "checkpoints/demo", "sliced")
    assert "13.5% [10.5, 17.2]" in text and "4.8% [3.1, 7.3]" in text
    assert "The pruned model is higher, 95% intervals apart." in text
    assert "random-pruned + LoRA at the same budget (control): 12.0% [9.0, 15.0]; cna is not distinguishable" in text
    assert text.splitlines()[-1].startswith("- The pruned checkpoint is `checkpoints/demo` (sliced layout)")


# ---- --uniform: every layer at one width (a stock checkpoint) -------------------------------------------------
def test_uniform_keeps_the_same_share_of_every_layer_each_by_its_own_ranking():
    orig, ref, t = make_tiny("llama"), make_tiny("llama", seed=1), task()
    model = make_tiny("llama")
    plan = prune.make_plan(recipe(keep="25%", uniform=True), model)
    assert plan.layers == [0, 1, 2] and plan.uniform  # 'deep' (the recipe default) becomes every layer
    r = prune.PruneRecipe(cna=prune.CnaSpec(batch_size=2))
    sel = prune.select(orig, ref, TOK, t, plan.layers, ["cna", "random", "magnitude"], r, 0)
    keeps = prune.keeps_for(sel, "pct", 25, uniform=True)
    for name, keep in keeps.items():
        assert {l: len(v) for l, v in keep.items()} == {0: 12, 1: 12, 2: 12}, name
        for l, kept in keep.items():  # each layer's own 12 best
            assert set(kept) == set(sel.scores[name][l].topk(12).indices.tolist()), (name, l)
    pooled = prune.keeps_for(sel, "pct", 25)["cna"]  # the global budget spreads unevenly: not one width
    assert sum(len(v) for v in pooled.values()) == 36


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(keep="top5"), "give --keep as a percentage"),
        (dict(keep="25%", layers="1-2"), "drop --layers"),
        (dict(keep="25%", compensate=True), "no place for compensate"),
    ],
)
def test_uniform_refuses_what_cannot_be_one_width(kw, msg):
    with pytest.raises(UsageError, match=msg):
        prune.make_plan(recipe(uniform=True, **kw), make_tiny("llama"))


# ---- --multiple: sliced widths padded for GGUF blocks -------------------------------------------------------
def test_multiple_pads_sliced_widths_with_zero_neurons_and_records_the_padding():
    """--multiple 32: each sliced layer's width is its kept count rounded up to 32 with zero neurons (the output
    unchanged), recorded as padding; 1 = exact widths; the default is the GEMM-friendly 8."""
    orig = make_tiny("llama")  # 3 layers of 48 neurons
    keep = {1: list(range(0, 20, 2)), 2: list(range(7))}  # 10 and 7 neurons
    exact, by32 = prune.sliced_copy(orig, keep, multiple=1), prune.sliced_copy(orig, keep, multiple=32)
    assert ModelView(exact).ffn_widths() == [48, 10, 7] and ModelView(by32).ffn_widths() == [48, 32, 32]
    assert by32.config.ffn_padding[1:] == [22, 25]
    x = tiny_inputs()
    with torch.no_grad():
        assert torch.allclose(exact(**x).logits, by32(**x).logits, atol=1e-5)
    assert ModelView(prune.sliced_copy(orig, keep)).ffn_widths() == [48, 16, 8]  # the default multiple, 8
    assert prune.PruneRecipe().multiple == 8
    with pytest.raises(UsageError, match="multiple"):
        prune.load_recipe("arithmetic-prune", ["multiple=0"])
    r = prune.load_recipe("arithmetic-prune", keep="25%", multiple=32)
    assert prune.make_plan(r, make_tiny("llama")).multiple == 32
