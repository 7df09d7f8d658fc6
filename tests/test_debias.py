"""surgery debias: selection methods, hook zeroing == weight edits, prefix-shared scoring, bad input, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as T
from conftest import make_tiny, tiny_config

from surgery.cli import main as cli_main
from surgery.commands.debias import job as D
from surgery.commands.debias import run as debias_run
from surgery.errors import UsageError
from surgery.evals import gender_bias as gb
from surgery.evals import stereoset
from surgery.find import selectors
from surgery.find.cna import Scorer, collect
from surgery.find.neurons import mean_coefficients, random_scores
from surgery.model.arch import ModelView
from surgery.model.batching import left_pad

SMOL = Path("checkpoints/base/smollm2-135m")
needs_tok = pytest.mark.skipif(not (SMOL / "tokenizer.json").exists(), reason="needs the SmolLM2 tokenizer files")


@pytest.fixture(scope="module")
def tok():
    if not (SMOL / "tokenizer.json").exists():
        pytest.skip("needs the SmolLM2 tokenizer files")
    from surgery.io.loading import prepare_tokenizer

    t = T.AutoTokenizer.from_pretrained(str(SMOL))
    prepare_tokenizer(t)
    return t


def tiny_words(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A tiny random model of `arch` with the SmolLM2 vocabulary (real words through the real tokenizer)."""
    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    cfg.vocab_size = 49152
    cfg._attn_implementation = "eager"
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok):
    """A saved tiny llama + SmolLM2 tokenizer: a --model folder that loads in a second."""
    d = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    tiny_words().save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


# ---- pure helpers ----------------------------------------------------------------------------------------------
def test_top_n_across_layers_and_by_layer():
    scores = {3: torch.tensor([0.1, 5.0, -1.0]), 7: torch.tensor([4.0, 0.2])}
    assert D.top_n(scores, 3) == [(3, 1), (7, 0), (7, 1)]
    assert D.by_layer([(7, 1), (3, 1), (7, 0)]) == {3: [1], 7: [0, 1]}


def test_random_is_seeded_and_nested():
    view = ModelView(make_tiny("llama"))
    a = random_scores(view, [0, 1, 2], seed=3)
    b = random_scores(view, [0, 1, 2], seed=3)
    assert all(torch.equal(a[l], b[l]) for l in a)
    assert set(D.top_n(a, 5)) <= set(D.top_n(a, 20))
    assert D.top_n(a, 5) != D.top_n(random_scores(view, [0, 1, 2], seed=4), 5)


# ---- edits: hook zeroing (the sweep) == weight zeroing == slicing (the export) ------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3", "gemma3", "gpt_neox"])
def test_hook_zeroing_equals_weight_edits(arch):
    model = make_tiny(arch)
    neurons = [(0, 3), (2, 7), (2, 40), (1, 0)]
    ids = torch.randint(3, 96, (2, 7))
    with D.zeroed(model, neurons):
        hooked = model(input_ids=ids).logits
    for edit in ("zero", "remove"):
        edited = D.edit_weights(model, neurons, edit)
        torch.testing.assert_close(edited(input_ids=ids).logits, hooked, atol=1e-5, rtol=1e-5)
    widths = ModelView(D.edit_weights(model, neurons, "remove")).ffn_widths()
    assert widths == [47, 47, 46]
    assert not torch.equal(model(input_ids=ids).logits, hooked)  # the original model is untouched by both


def test_zeroed_with_no_neurons_is_a_no_op():
    model = make_tiny("llama")
    ids = torch.randint(3, 96, (1, 5))
    with D.zeroed(model, []):
        a = model(input_ids=ids).logits
    assert torch.equal(a, model(input_ids=ids).logits)


# ---- selection ----------------------------------------------------------------------------------------------------
def test_activation_means_weight_duplicates():
    model = make_tiny("llama")
    view = ModelView(model)
    seqs = [[5, 6, 7], [5, 6, 7], [9, 10]]
    means = mean_coefficients(view, seqs, [1, 2], pad=0)
    from surgery.model.hooks import Hooks

    rows = []
    for s in seqs:
        with Hooks(view) as h:
            h.capture("m", [1], positions=-1)
            model(input_ids=torch.tensor([s]))
        rows.append(h.store["m", 1][0])
    torch.testing.assert_close(means[1], torch.stack(rows).mean(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_exact_same_matches_per_case_exact(arch):
    model = make_tiny(arch)
    view = ModelView(model)
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10, 11]], 0)
    st = collect(view, ids, mask, [1])
    sc = Scorer(view, st, view.final_sigma(st.hfin), torch.tensor([4, 17]))
    idx = torch.tensor([0, 5, 9, 47])
    with torch.no_grad():
        got = sc.exact_same(1, idx, chunk=3)
    torch.testing.assert_close(got, sc.exact(1, idx.expand(2, -1)), atol=1e-5, rtol=1e-5)


def test_select_cna_sums_exact_deltas_of_its_candidates():
    model = make_tiny("llama")
    view = ModelView(model)
    cases = D.Cases(
        [[5, 6, 7], [8, 9, 10, 11], [12, 13]],
        [[5, 14, 7], [8, 15, 10, 11], [16, 13]],
        [20, 21, 22],
        ["x"] * 3,
        ["t"] * 3,
    )
    inp = selectors.Inputs(view, [0, 1, 2], 0, cases.seqs_a, cases.targets, cases.seqs_b, batch_size=2, candidates=10)
    total, info = selectors.score("contrast", "cna", inp), inp.info
    ref = {l: torch.zeros(48) for l in range(3)}
    for s in range(3):  # exhaustive exact delta, one case at a time, each prompt with its own sigma
        sa = collect(view, *left_pad([cases.seqs_a[s]], 0), [0, 1, 2])
        sb = collect(view, *left_pad([cases.seqs_b[s]], 0), [0, 1, 2])
        w = torch.tensor([cases.targets[s]])
        a, b = Scorer(view, sa, view.final_sigma(sa.hfin), w), Scorer(view, sb, view.final_sigma(sb.hfin), w)
        for l in range(3):
            ref[l] += (a.exhaustive(l) - b.exhaustive(l))[0]
    top = D.top_n(total, 10)
    for l, i in top:
        assert abs(float(total[l][i]) - float(ref[l][i])) < 1e-4
    assert info["rescored_exactly"] == 10 and info["cases"] == 3
    assert D.top_n(total, 3) == D.top_n(ref, 3)  # the screen found the true top 3 here


@needs_tok
def test_selection_cases_orientation_and_targets(tok):
    c = D.selection_cases(tok, ["The {g} worked as a"], ["nurse", "driver"], "first")
    assert tok.decode(c.seqs_a[0]).endswith("The woman worked as a")  # woman-biased: woman is A
    assert tok.decode(c.seqs_a[1]).endswith("The man worked as a")  # man-biased: man is A
    assert tok.decode([c.targets[0]]) == " nurse"
    many = D.selection_cases(tok, ["The {g} worked as a"], ["police officer"], "all")
    assert len(many.targets) == len(tok(" police officer", add_special_tokens=False).input_ids)
    assert many.seqs_a[1][:-1] == many.seqs_a[0] and many.seqs_a[1][-1] == many.targets[0]


@needs_tok
def test_measured_orientation_puts_the_favoured_gender_in_a(tok):
    model = tiny_words()
    t, profs = ["The {g} worked as a"], ["nurse", "driver", "miner"]
    fav = D.favoured_genders(model, tok, t, profs)
    ds = gb.build(t, profs)
    diffs = gb.pair_diffs(ds, gb.continuation_logprobs(model, tok, ds["prompt"], ds["continuation"]))
    assert fav == {pid: "woman" if d > 0 else "man" for pid, d in diffs.items()}
    c = D.selection_cases(tok, t, profs, "first", fav)
    for seq, p in zip(c.seqs_a, profs):
        assert tok.decode(seq).endswith(f"The {fav[t[0] + '|' + p]} worked as a")


@needs_tok
def test_prefix_logprobs_equal_plain_scoring(tok):
    model = tiny_words()
    ds = gb.build("eval", ["nurse", "police officer", "domestic helper", "driver"])
    ref = gb.continuation_logprobs(model, tok, ds["prompt"], ds["continuation"], 8)
    got = D.prefix_logprobs(model, tok, ds["prompt"], ds["continuation"], batch_size=5)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)


# ---- bad input: one line, exit 2, nothing written -----------------------------------------------------------------
def _bad(tmp_path, capsys, *args) -> str:
    out = tmp_path / "never"
    assert cli_main(["debias", "--out", str(out), *args]) == 2
    assert not out.exists()
    return capsys.readouterr().err


def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    assert "--neurons must be >= 1" in _bad(tmp_path, capsys, "--neurons", "0")
    assert "profession list is empty" in _bad(tmp_path, capsys, "--set", "professions=[]")
    assert "unknown profession" in _bad(tmp_path, capsys, "--set", "professions=[astronaut]")
    assert "overlap" in _bad(tmp_path, capsys, "--set", "selection_templates=eval")
    assert "sweep.methods" in _bad(tmp_path, capsys, "--set", "sweep.methods=[magic]")
    assert "orientation" in _bad(tmp_path, capsys, "--set", "orientation=sideways")


def test_too_many_neurons_and_existing_out(tmp_path, capsys, tiny_dir):
    err = _bad(tmp_path, capsys, "--model", str(tiny_dir), "--neurons", str(3 * 48 + 1))
    assert "hold only 144" in err
    (tmp_path / "exists").mkdir()
    with pytest.raises(UsageError, match="already exists"):
        debias_run(model=str(tiny_dir), out=str(tmp_path / "exists"))


# ---- end to end on a tiny model --------------------------------------------------------------------------------------
TINY = [
    "layers=1-2",
    "professions=[nurse, secretary, driver, miner]",
    'selection_templates=["The {g} worked as a"]',
    "sweep.ns=[1, 3]",
    "collateral.perplexity_docs=1",
    "collateral.perplexity_tokens=24",
    "collateral.arithmetic_limit=4",
    "collateral.wino_limit=4",
    "candidates=8",
    "heldout.stereoset_limit=6",
]


@pytest.mark.parametrize("edit", ["zero", "remove"])
def test_run_end_to_end_on_tiny(tmp_path, tiny_dir, edit):
    from surgery.io import checkpoint as export

    out = tmp_path / f"debiased-{edit}"
    rep = debias_run(model=str(tiny_dir), out=str(out), overrides=TINY, neurons=3, edit=edit)
    res = rep.data["results"]
    for f in ("report.json", "report.md", "bias_vs_n.png", "collateral_vs_n.png", "surgery.json", "config.json"):
        assert (out / f).exists(), f
    assert set(res["sweep"]) == {"cna", "random", "activation-diff"}
    assert [r["n"] for r in res["sweep"]["cna"]] == [1, 3]
    assert [r["group"] for r in res["bias_table"]] == ["total", "woman-biased", "man-biased"]
    assert len(res["neurons"]) == 3 and all(len(r["top_tokens"]) == 10 for r in res["neurons"])
    assert res["edit_check"] < 1e-5 and res["wino"]["base"]["n"] == 4
    held = res["heldout"]["stereoset"]["gender"]
    assert held["before"]["n"] == held["after"]["n"] == 6 and 0 <= held["after"]["ss"] <= 100
    fresh = T.AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()  # "before" is the unedited model
    tok = T.AutoTokenizer.from_pretrained(str(tiny_dir))
    assert held["before"] == stereoset.evaluate(fresh, tok, "gender", 32, 6)
    assert held["after"]["mean_score"] != held["before"]["mean_score"]
    assert "## Held out: StereoSet intrasentence" in (out / "report.md").read_text()
    assert not set(res["selection"]["templates"]) & set(res["eval_templates"])
    manifest = json.loads((out / "surgery.json").read_text())
    assert manifest["layout"] == ("zeroed" if edit == "zero" else "sliced")
    assert sum(len(v.get("edited", v.get("removed", []))) for v in manifest["layers"].values()) == 3
    loaded = export.load(out)  # zeroed: plain from_pretrained; sliced: its generated modeling file
    model = T.AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
    neurons = [(r["layer"], r["index"]) for r in res["neurons"]]
    ids = torch.randint(3, 1000, (2, 6))
    with D.zeroed(model, neurons):
        ref = model(input_ids=ids).logits
    torch.testing.assert_close(loaded(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)
    if edit == "zero":
        native = T.AutoModelForCausalLM.from_pretrained(str(out)).eval()
        torch.testing.assert_close(native(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)


# ---- the real model, quick recipe ----------------------------------------------------------------------------------
@pytest.mark.real
@pytest.mark.slow
def test_real_quick_recipe_debiases_smollm2(tmp_path):
    """The quick recipe on SmolLM2 (selection cut to layers 20-29 and 12 professions to stay a few minutes)."""
    out = tmp_path / "debias-quick"
    profs = (
        "[nurse, secretary, receptionist, maid, hairdresser, librarian, driver, miner, roofer, guard, builder, porter]"
    )
    rep = debias_run(out=str(out), quick=True, overrides=["layers=20-29", f"professions={profs}"])
    res = rep.data["results"]
    t = {r["group"]: r for r in res["bias_table"]}
    assert t["total"]["after"] < t["total"]["before"]
    assert res["at_n"]["cna"]["bias_total"] < res["at_n"]["random"]["bias_total"]
    assert abs(res["collateral"]["after"]["perplexity"] / res["collateral"]["before"]["perplexity"] - 1) < 0.5
    assert res["edit_check"] == 0.0
    native = T.AutoModelForCausalLM.from_pretrained(str(out))
    assert native.config.model_type == "llama"
