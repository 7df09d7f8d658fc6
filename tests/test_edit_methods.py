"""Edit methods of `surgery edit` beyond zeroing (issue: edits that hold): LEACE, direction projection, steering,
validated scaling and the specific CNA selection; their exported checkpoints against the in-memory edit, `surgery
diff` on them, `--compare` resuming cell by cell, and the bad inputs.

The representation edits are checked on every architecture: the weights folded into W_out (and its bias) give the
logits of the hooked edit; LEACE leaves equal class means of the fit outputs; projection removes its direction."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers as T
from conftest import ARCHS, VOCAB, make_tiny, tiny_inputs

from surgery.cli import main
from surgery.commands.diff.job import diff
from surgery.commands.edit import cells, compare
from surgery.edits import directions
from surgery.errors import UsageError
from surgery.find import selectors
from surgery.io.report import mcnemar
from surgery.model.arch import ModelView
from surgery.model.batching import left_pad

NAMES = ["Anna", "Maria", "Sofia", "Emma", "Laura", "Julia", "Clara", "Eva", "Nora", "Lena", "Ida", "Mia"]
MEN = ["Peter", "Mark", "Paul", "John", "David", "Tom", "Luke", "Adam", "Noah", "Ben", "Sam", "Max"]
JOBS = [" nurse", " doctor", " teacher", " driver"]


def pairs_rows() -> list[dict]:
    rows = []
    for i, (w, m) in enumerate(zip(NAMES, MEN)):
        for j, t in enumerate(JOBS[:2]):
            split = "test" if i % 4 == 3 else "train"
            rows.append(
                {
                    "prompt_a": f"{w} works as a",
                    "prompt_b": f"{m} works as a",
                    "target": t,
                    "group": t.strip(),
                    "split": split,
                }
            )
    return rows  # 24 pairs: 18 selection, 6 held out


KEEP = [
    {"prompt": f"The capital of {c} is", "target": f" {t}", "group": g}
    for c, t, g in [
        ("France", "Paris", "Europe"),
        ("Japan", "Tokyo", "Asia"),
        ("Spain", "Madrid", "Europe"),
        ("Italy", "Rome", "Europe"),
        ("China", "Beijing", "Asia"),
        ("Kenya", "Nairobi", "Africa"),
        ("Peru", "Lima", "Americas"),
        ("Chile", "Santiago", "Americas"),
    ]
]


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- the math, every architecture -------------------------------------------------------------------------------
def _outputs(view: ModelView, n: int = 12):
    g = torch.Generator().manual_seed(0)
    a = [torch.randint(3, VOCAB, (6,), generator=g).tolist() for _ in range(n)]
    b = [[*s[:-1], 5] for s in a]  # B differs from A in its last token
    layers = list(range(view.n_layers))
    return directions.ffn_outputs(view, a, layers, 0, 4), directions.ffn_outputs(view, b, layers, 0, 4)


@pytest.mark.parametrize("arch", ARCHS)
def test_folded_weights_equal_the_hooked_edit_on_every_architecture(arch):
    model = make_tiny(arch)
    view = ModelView(model)
    ya, yb = _outputs(view)
    layers = directions.choose_layers(ya, yb, 2)
    for method in directions.METHODS:
        if method == "steer" and not view.native_ffn_bias():
            with pytest.raises(UsageError, match="FFN output bias"):
                directions.fit(view, method, ya, yb, layers)
            continue
        edits = directions.fit(view, method, ya, yb, layers)
        with torch.no_grad():
            base = model(**tiny_inputs()).logits
            with directions.hooked(view, edits):
                hooked = model(**tiny_inputs()).logits
            folded = copy.deepcopy(model)
            directions.fold(folded, edits)
            out = folded(**tiny_inputs()).logits
        assert float((hooked - base).abs().max()) > 1e-6, method  # the edit changes something
        assert torch.allclose(out, hooked, atol=1e-5), (method, float((out - hooked).abs().max()))


def test_leace_equalises_class_means_and_project_removes_its_direction():
    view = ModelView(make_tiny("llama"))
    ya, yb = _outputs(view)
    layer = directions.choose_layers(ya, yb, 1)
    (e,) = directions.fit(view, "leace", ya, yb, layer)
    l = layer[0]
    ea, eb = e(ya[l]), e(yb[l])
    assert float((ea.mean(0) - eb.mean(0)).norm()) < 1e-3 * float((ya[l].mean(0) - yb[l].mean(0)).norm())
    assert torch.allclose(
        torch.cat([ea, eb]).mean(0), torch.cat([ya[l], yb[l]]).mean(0), atol=1e-4
    )  # affine: mean kept
    (p,) = directions.fit(view, "project", ya, yb, layer)
    u = p.right[0]
    assert float((p(ya[l]) @ u).abs().max()) < 1e-5 and float(u.norm()) == pytest.approx(1.0, abs=1e-5)


def test_leace_without_a_bias_slot_drops_only_the_constant():
    """Qwen2 has no FFN output bias: the constant L R mu is dropped; the class means still agree."""
    view = ModelView(make_tiny("qwen2"))
    ya, yb = _outputs(view)
    layer = directions.choose_layers(ya, yb, 1)
    (e,) = directions.fit(view, "leace", ya, yb, layer)
    assert float(e.shift.abs().max()) == 0.0
    l = layer[0]
    assert float((e(ya[l]).mean(0) - e(yb[l]).mean(0)).norm()) < 1e-3 * float((ya[l].mean(0) - yb[l].mean(0)).norm())


def test_leace_with_too_few_pairs_says_how_many():
    view = ModelView(make_tiny("llama"))
    ya, yb = _outputs(view, n=5)
    with pytest.raises(UsageError, match=f"at least {directions.MIN_PAIRS} selection pairs"):
        directions.fit(view, "leace", ya, yb, [0])


def test_specific_selection_penalises_neurons_the_keep_cases_need():
    """cna-specific = mean pair delta - mean keep |imp|, exact on the candidates; with lambda = 0 it is the plain
    CNA ranking divided by the number of pairs."""
    model = make_tiny("llama")
    view = ModelView(model)
    g = torch.Generator().manual_seed(3)
    a = [torch.randint(3, VOCAB, (5,), generator=g).tolist() for _ in range(6)]
    b = [[7, *s[1:]] for s in a]
    targets = [11] * 6
    keep = [torch.randint(3, VOCAB, (5,), generator=g).tolist() for _ in range(5)]
    keep_t = [13] * 5
    layers = [0, 1, 2]

    def inputs(w: float):
        return selectors.Inputs(
            view, layers, 0, a, targets, b, candidates=300, keep_seqs=keep, keep_targets=keep_t, keep_weight=w
        )

    plain = selectors.score("contrast", "cna", inputs(0.0))
    zero = selectors.score("contrast", "cna-specific", inputs(0.0))
    one = selectors.score("contrast", "cna-specific", inputs(1.0))
    for l in layers:
        assert torch.allclose(zero[l], plain[l] / 6, atol=1e-6)
    # the keep term, by hand: |exact imp| of every neuron for the keep target, through the same scorer
    from surgery.find.cna import Scorer, Workspace, collect

    st = collect(view, *left_pad(keep, 0), layers)
    sc = Scorer(view, st, view.final_sigma(st.hfin), torch.tensor(keep_t), work=Workspace())
    for l in layers:
        want = plain[l] / 6 - sc.exact_same(l, torch.arange(view.ffn_width(l))).abs().sum(0) / 5
        assert torch.allclose(one[l], want, atol=1e-5)


def test_mcnemar_counts_discordant_items():
    r = mcnemar([True] * 10 + [False] * 10, [False] * 6 + [True] * 4 + [False] * 10)
    assert (r["lost"], r["gained"], r["n"]) == (6, 0, 20) and r["change"] == pytest.approx(-0.3)
    assert r["p_value"] == pytest.approx(2 / 64)  # two-sided exact: 2 * 0.5^6
    assert mcnemar([True, False], [True, False])["p_value"] == 1.0


# ---- the command: exported checkpoints against the in-memory edit ------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("edit-methods")
    return {"pairs": _write(d / "pairs.jsonl", pairs_rows()), "keep": _write(d / "keep.jsonl", KEEP), "dir": d}


def _edit(model_dir, files, out: Path, *extra: str) -> dict:
    argv = ["edit", "--model", str(model_dir), "--pairs", str(files["pairs"]), "--ppl-docs", "0", "--stereoset", "none"]
    assert _run([*argv, *extra, "--out", str(out)]) == 0
    return json.loads((out / "report.json").read_text())["results"]


@pytest.mark.parametrize("edit", ["leace", "project", "steer"])
def test_representation_edit_checkpoint_loads_natively_and_equals_the_hooked_edit(tiny_smol_dir, files, tmp_path, edit):
    out = tmp_path / edit
    res = _edit(tiny_smol_dir, files, out, "--edit", edit, "--edit-layers", "2", "--baselines", "random")
    assert res["edit_check"] < 1e-5 and set(res["after"]) == {edit, "random-project"}
    chosen = res["chosen"][edit]
    layers = [x["layer"] for x in chosen["layers"]]
    assert len(layers) == 2 and res["neurons"] == []
    man = json.loads((out / "surgery.json").read_text())
    assert man["edit"] == edit and sorted(map(int, man["layers"])) == layers
    # the in-memory edit, rebuilt from the fit data: the same affine maps on the unedited model
    base = T.AutoModelForCausalLM.from_pretrained(tiny_smol_dir, dtype=torch.float32).eval()
    tok = T.AutoTokenizer.from_pretrained(tiny_smol_dir)
    view = ModelView(base)
    sel = [r for r in pairs_rows() if r["split"] == "train"]
    ya = directions.ffn_outputs(view, [tok(r["prompt_a"]).input_ids for r in sel], layers, 2, 32)
    yb = directions.ffn_outputs(view, [tok(r["prompt_b"]).input_ids for r in sel], layers, 2, 32)
    edits = directions.fit(view, edit, ya, yb, layers, alpha=chosen.get("alpha", 1.0))
    exported = T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # plain transformers
    ids = torch.tensor([tok("Emma works as a nurse and").input_ids])
    with torch.no_grad(), directions.hooked(view, edits):
        want = base(ids).logits
    with torch.no_grad():
        got = exported(ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    d = diff(str(tiny_smol_dir), str(out)).data
    assert d["changed_components"]["mlps"] == layers and d["changed_components"]["heads"] == []


def test_scale_auto_is_chosen_on_the_validation_pairs_and_exported(tiny_smol_dir, files, tmp_path):
    out = tmp_path / "scale"
    res = _edit(tiny_smol_dir, files, out, "--edit", "scale", "--scale", "auto", "--neurons", "3")
    ch = res["chosen"]["cna"]
    assert ch["scale"] in cells.SCALE_GRID and set(map(float, ch["validation"])) == set(cells.SCALE_GRID)
    table = ch["validation"]  # {scale: {gap, guard_ppl_change}}: the smallest gap within the perplexity guard
    ok = {k: v for k, v in table.items() if v["guard_ppl_change"] <= cells.GUARD_PPL}
    if ok:
        assert table[str(ch["scale"])]["gap"] == pytest.approx(min(v["gap"] for v in ok.values()), abs=1e-6)
    else:
        assert table[str(ch["scale"])]["guard_ppl_change"] == min(v["guard_ppl_change"] for v in table.values())
    assert res["selection"]["validation"] == "selection pairs" and res["edit_check"] < 1e-5
    man = json.loads((out / "surgery.json").read_text())
    assert all(v["scale"] == ch["scale"] for v in man["layers"].values())


def test_specific_selection_holds_out_part_of_the_keep_data(tiny_smol_dir, files, tmp_path):
    out = tmp_path / "specific"
    res = _edit(
        tiny_smol_dir,
        files,
        out,
        "--method",
        "cna-specific",
        "--baselines",
        "cna",
        "--neurons",
        "3",
        "--keep-data",
        str(files["keep"]),
        "--keep-test-size",
        "0.5",
    )
    assert res["selection"]["keep_fit_cases"] == 4 and res["before"]["keep"]["overall"]["n"] == 4
    assert set(res["after"]) == {"cna-specific", "cna"}
    k = res["after"]["cna-specific"]["changes"]["keep"]
    assert k["n"] == 4 and 0 <= k["p_value"] <= 1


# ---- --compare: resumable cell by cell ---------------------------------------------------------------------------
def test_compare_resumes_cell_by_cell_and_writes_the_pareto_report(tiny_smol_dir, files, tmp_path, monkeypatch, capfd):
    out = tmp_path / "cmp"
    argv = [
        "edit",
        "--model",
        str(tiny_smol_dir),
        "--pairs",
        str(files["pairs"]),
        "--ppl-docs",
        "2",
        "--ppl-tokens",
        "16",
        "--stereoset",
        "none",
        "--keep-data",
        str(files["keep"]),
        "--compare",
        "--budgets",
        "2,4",
        "--layer-budgets",
        "1",
        "--out",
        str(out),
    ]
    real = cells.measure
    calls = {"n": 0}

    def dies_after_three(*a, **k):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(cells, "measure", dies_after_three)
    assert _run(argv) not in (0, 2)  # the CLI reports the interrupt
    assert not out.exists()  # nothing half-written in the output folder
    lines = (tmp_path / "cmp.partial" / "cells.jsonl").read_text().splitlines()
    assert len(lines) == 3  # base and two cells
    monkeypatch.setattr(cells, "measure", real)
    capfd.readouterr()
    assert _run(argv) == 0
    assert "2 already done (resumed)" in capfd.readouterr().err
    data = json.loads((out / "report.json").read_text())["results"]
    plan = compare.grid([2, 4], [1], True, True, 4)
    assert [r["cell"] for r in data["cells"]] == [c.name for c in plan]
    assert {r["cell"] for r in data["cells"] if r["control"]} == {"random-zero@2", "random-zero@4", "random-project@1L"}
    assert data["pareto"] and all("perplexity_change" in r and "keep" in r for r in data["cells"])
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "cmp.partial").exists()
    assert any(g.startswith("Pairs goal") for g in data["goals"])


# ---- bad input: one line, exit 2, nothing written ----------------------------------------------------------------
BAD = [
    (["--edit", "leace", "--test-size", "20"], "LEACE needs at least 8 selection pairs"),
    (["--scale", "abc", "--edit", "scale"], "--scale must be a number or auto"),
    (["--stereoset", "colour"], "unknown --stereoset type(s) ['colour']"),
    (["--compare", "--budgets", "6,x"], "--budgets must be comma-separated integers"),
    (["--compare", "--export", "gguf"], "--compare writes a comparison"),
    (["--method", "cna-specific"], "needs --keep-data FILE"),
    (["--layers", "40"], "layer"),
    (["--keep-test-size", "1.5"], "--keep-test-size must be a fraction"),
]


@pytest.mark.parametrize("extra,phrase", BAD)
def test_bad_input_one_line_exit_2_nothing_written(tiny_smol_dir, files, tmp_path, capsys, extra, phrase):
    pairs = files["pairs"]
    if "--test-size" in extra:  # no split column: 24 rows, 20 held out leave 4 selection pairs
        pairs = _write(tmp_path / "nosplit.jsonl", [{k: v for k, v in r.items() if k != "split"} for r in pairs_rows()])
    out = tmp_path / "never"
    argv = ["edit", "--model", str(tiny_smol_dir), "--pairs", str(pairs), "--ppl-docs", "0", "--stereoset", "none"]
    assert _run([*argv, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert phrase in err[-1] and not out.exists() and not (tmp_path / "never.partial").exists()


def test_steer_refused_where_the_ffn_has_no_output_bias(tmp_path, files, capsys):
    model = make_tiny("qwen2")
    d = tmp_path / "qwen2"
    model.save_pretrained(d)
    from conftest import SMOL_DIR

    if not (Path(SMOL_DIR) / "tokenizer.json").exists():
        pytest.skip("needs the converted SmolLM2 tokenizer (make setup)")
    T.AutoTokenizer.from_pretrained(SMOL_DIR).save_pretrained(d)
    argv = ["edit", "--model", str(d), "--pairs", str(files["pairs"]), "--edit", "steer", "--ppl-docs", "0"]
    assert _run([*argv, "--stereoset", "none", "--out", str(tmp_path / "o")]) == 2
    assert "use --edit project or leace" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("edit", ["leace", "steer"])
def test_representation_edit_exports_to_gguf_and_runs_in_llama_cpp(tiny_smol_dir, files, tmp_path, edit):
    """The folded edit (Llama: the FFN biases switched on by mlp_bias) written as GGUF: llama.cpp's logits equal
    the exported checkpoint's in transformers."""
    import numpy as np

    from surgery.io import llamacpp

    if not llamacpp.available():
        pytest.skip("llama-cpp-python is not installed (the dev extra installs it)")
    out = tmp_path / edit
    _edit(tiny_smol_dir, files, out, "--edit", edit, "--edit-layers", "2", "--export", "gguf")
    model = T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.mlp_bias  # the constant lives in the FFN output bias
    tok = T.AutoTokenizer.from_pretrained(out)
    ids = tok("Emma works as a nurse and").input_ids
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    (gguf,) = out.glob("*.gguf")
    llm = llamacpp.open_gguf(str(gguf))
    got = np.asarray(llamacpp.logits(llm, ids))
    assert float(np.abs(got - want[-got.shape[0] :]).max()) < 1e-4
