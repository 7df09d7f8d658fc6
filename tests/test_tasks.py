"""User tasks (surgery.tasks) and `surgery edit`: every file format and the column mapping, teacher-forced
multi-token scoring against a per-token computation, pairs CNA against single-pair CNA, edit zero against the
dense model with the neurons zeroed, and every bad input (exit 2, one stderr line, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as T
from datasets import Dataset, DatasetDict

from surgery.cli import main
from surgery.errors import UsageError
from surgery.evals import tasks
from surgery.find import cna
from surgery.model.arch import ModelView

ROWS = [
    {"question": "The capital of France is", "answer": " Paris", "region": "Europe"},
    {"question": "The capital of Japan is", "answer": " Tokyo", "region": "Asia"},
    {"question": "The colour of the sky on a clear day is", "answer": " light blue", "region": "misc"},
]
MAP = "prompt=question,target=answer,group=region"
PAIRS = [
    {"prompt_a": "A woman works as a", "prompt_b": "A man works as a", "target": " nurse", "group": "w"},
    {"prompt_a": "The queen said that", "prompt_b": "The king said that", "target": " she", "group": "p"},
    {"prompt_a": "My mother is a", "prompt_b": "My father is a", "target": " teacher", "group": "w"},
    {"prompt_a": "The girl wants to be a", "prompt_b": "The boy wants to be a", "target": " doctor", "group": "p"},
]


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def write(path: Path, rows: list[dict]) -> Path:
    """rows in the format of path's suffix (a folder without one: Dataset.save_to_disk)."""
    ds = Dataset.from_list(rows)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        ds.to_csv(str(path), index=False)
    elif path.suffix == ".parquet":
        ds.to_parquet(str(path))
    else:
        ds.save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def tiny_loaded(tiny_smol_dir):
    tok = T.AutoTokenizer.from_pretrained(tiny_smol_dir)
    model = T.AutoModelForCausalLM.from_pretrained(tiny_smol_dir, dtype=torch.float32).eval()
    return model, tok


# ---- formats and the column mapping ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cases.jsonl", "cases.csv", "cases.parquet", "cases_folder"])
def test_every_format_reads_the_same_cases_through_the_mapping(tmp_path, name):
    ds = tasks.load_cases(write(tmp_path / name, ROWS), MAP)
    assert ds["prompt"] == [r["question"] for r in ROWS]
    assert ds["target"] == [r["answer"] for r in ROWS]  # the leading space survives every format
    assert ds["group"] == [r["region"] for r in ROWS] and ds["split"] == [""] * 3


def test_datasetdict_folder_gives_its_parts_as_splits_and_unmapped_groups_default(tmp_path):
    rows = [{"prompt": r["question"], "target": r["answer"]} for r in ROWS]
    DatasetDict({"train": Dataset.from_list(rows[:2]), "test": Dataset.from_list(rows[2:])}).save_to_disk(
        str(tmp_path / "dd")
    )
    ds = tasks.load_cases(tmp_path / "dd")
    assert ds["split"] == ["train", "train", "test"] and set(ds["group"]) == {"all"}
    parts = tasks.split(ds)
    assert parts["test"]["prompt"] == [ROWS[2]["question"]] and len(parts["validation"]) == 0


def test_seeded_row_split_is_deterministic_and_disjoint():
    ds = Dataset.from_dict(
        {"prompt": [f"p{i}" for i in range(50)], "target": [" x"] * 50, "group": ["g"] * 50, "split": [""] * 50}
    )
    a, b = (
        tasks.split(ds, seed=3, test_size=0.2, validation_size=0.1),
        tasks.split(ds, seed=3, test_size=0.2, validation_size=0.1),
    )
    assert [len(a[s]) for s in ("train", "validation", "test")] == [35, 5, 10]
    assert a["test"]["prompt"] == b["test"]["prompt"] != tasks.split(ds, seed=4)["test"]["prompt"][:10]
    assert not set(a["train"]["prompt"]) & set(a["test"]["prompt"])


def test_builtin_tasks_are_reachable_through_the_protocol():
    ar = tasks.load_cases("arithmetic")
    assert len(ar) == 287 and ar[0]["prompt"].startswith("Calculate: ") and "1D+" in set(ar["group"])
    g = tasks.load_pairs("gender-bias")
    assert len(g) == 32 * (4 + 8) and set(g["split"]) == {"train", "test"}


# ---- scoring ---------------------------------------------------------------------------------------------------
def test_multi_token_target_teacher_forced_equals_per_token_computation(tiny_loaded):
    model, tok = tiny_loaded
    ds = Dataset.from_dict(
        {
            "prompt": [r["question"] for r in ROWS],
            "target": [r["answer"] for r in ROWS],
            "group": [r["region"] for r in ROWS],
            "split": [""] * 3,
        }
    )
    per = tasks.score_rows(model, tok, ds, batch_size=2)
    assert per["tokens"][2] >= 2  # " light blue" is a multi-token target
    for i, (p, t) in enumerate(zip(ds["prompt"], ds["target"])):
        full, k = tasks.encode_row(tok, p, t)
        lps, oks = [], []
        for j in range(len(full) - k, len(full)):  # one forward per token, the context alone (no padding)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([full[:j]])).logits[0, -1].float()
            lps.append(float(logits.log_softmax(-1)[full[j]]))
            oks.append(int(logits.argmax()) == full[j])
        assert per["logprob"][i] == pytest.approx(sum(lps), abs=1e-4)
        assert per["token_correct"][i] == sum(oks) and per["correct"][i] == all(oks)
    t = tasks.table(ds, per)
    assert t["overall"]["n"] == 3 and set(t["groups"]) == {"Europe", "Asia", "misc"}


def test_eval_data_cli_writes_the_per_group_table(tiny_smol_dir, tmp_path):
    f = write(tmp_path / "c.csv", ROWS)
    assert (
        _run(["eval", "--model", str(tiny_smol_dir), "--data", str(f), "--columns", MAP, "--out", str(tmp_path / "o")])
        == 0
    )
    res = json.loads((tmp_path / "o" / "report.json").read_text())["results"]["data"]
    assert res["overall"]["n"] == 3 and set(res["groups"]) == {"Europe", "Asia", "misc"}


# ---- pairs ---------------------------------------------------------------------------------------------------
def test_cna_pairs_equals_single_pair_cna_between_a_and_b(tiny_smol_dir, tmp_path, tiny_loaded):
    f = write(tmp_path / "p.jsonl", PAIRS)
    assert (
        _run(
            [
                "cna",
                "--model",
                str(tiny_smol_dir),
                "--pairs",
                str(f),
                "--top",
                "5",
                "--batch-size",
                "3",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 0
    )
    doc = json.loads((tmp_path / "o" / "cna.json").read_text())
    got = doc["results"]
    assert doc["config"]["pairs"] == str(f) and doc["config"]["data"] is None  # inputs, not the results again
    model, tok = tiny_loaded
    view = ModelView(model)
    layers = list(range(view.n_layers))
    total = {l: torch.zeros(view.ffn_width(l)) for l in layers}
    for i, p in enumerate(PAIRS):  # the manual CNA: one pair at a time, exhaustive exact scores
        (fa, ka), (fb, kb) = (tasks.encode_row(tok, p[s], p["target"]) for s in ("prompt_a", "prompt_b"))
        a, b = torch.tensor([fa[:-ka]]), torch.tensor([fb[:-kb]])
        res = cna.compare(
            view,
            (a, torch.ones_like(a)),
            layers,
            5,
            batch_b=(b, torch.ones_like(b)),
            target=torch.tensor([fa[-ka]]),
            exhaustive=True,
        )
        want = [cna.neuron_name(int(l), int(j)) for l, j in zip(res.top.layer[0], res.top.index[0])]
        assert got["per_case_top"][i] == want
        assert got["targets"][i] == fa[-ka]
        for l in layers:
            total[l] += res.delta[l][0]
    best = got["neurons"][0]  # the aggregated top neuron carries the exhaustive summed delta
    flat = torch.cat([total[l] for l in layers])
    assert best["score_sum"] == pytest.approx(float(flat.max()), abs=1e-4)


def test_unequal_token_lengths_refused_where_a_method_needs_them(tiny_loaded):
    _, tok = tiny_loaded
    ds = tasks._normalise(Dataset.from_list(PAIRS), tasks.PAIR_COLUMNS, ("target", "group", "split"), {}, "pairs")
    tasks.pair_ids(tok, ds)  # CNA compares last positions: any lengths
    with pytest.raises(UsageError, match="equal token lengths"):
        tasks.pair_ids(tok, ds.select([2]).map(lambda r: {"prompt_b": "My old grandfather is a"}), equal_lengths=True)


def test_duplicate_prompts_across_train_and_test_warn_with_the_count(capfd):
    tr = Dataset.from_dict({"prompt": ["a", "b", "c"]})
    te = Dataset.from_dict({"prompt": ["b", "c", "d"]})
    assert tasks.warn_duplicates(tr, te) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "2 test prompt(s)" in err


# ---- edit ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("edit", ["zero", "scale"])
def test_edit_equals_the_dense_model_with_the_neurons_edited(tiny_smol_dir, tmp_path, tiny_loaded, edit):
    f = write(tmp_path / "p.csv", [dict(p, split=s) for p, s in zip(PAIRS, ["train", "test", "train", "test"])])
    keep = write(tmp_path / "k.jsonl", [{"prompt": r["question"], "target": r["answer"]} for r in ROWS])
    out = tmp_path / "edited"
    extra = ["--scale", "0.5"] if edit == "scale" else []
    further = write(tmp_path / "further.csv", [dict(p) for p in PAIRS])
    assert (
        _run(
            [
                "edit",
                "--model",
                str(tiny_smol_dir),
                "--pairs",
                str(f),
                "--neurons",
                "4",
                "--edit",
                edit,
                *extra,
                "--keep-data",
                str(keep),
                "--eval-data",
                str(further),
                "--ppl-docs",
                "0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    man = json.loads((out / "surgery.json").read_text())
    res = json.loads((out / "report.json").read_text())["results"]
    assert man["operation"] == "edit" and len(man["neurons"]) == 4 and res["edit_check"] < 1e-5
    e = res["eval_data"]  # the further held-out pairs: measured on the unedited model, then with the edit
    assert e["pairs"] == len(PAIRS) and set(e["after"]) >= {"cna"} and "reduction" in e["after"]["cna"]
    assert e["before"]["gap"]["overall"]["n"] == len(PAIRS)
    assert "--eval-data: 4 further held-out pairs" in (out / "report.md").read_text()
    assert e["shared_with_selection"] == 2  # the file repeats the two selection pairs: counted, not hidden
    model, tok = tiny_loaded
    dense = T.AutoModelForCausalLM.from_pretrained(tiny_smol_dir, dtype=torch.float32).eval()
    view = ModelView(dense)
    for name in man["neurons"]:
        l, i = map(int, name.split("_"))
        if edit == "zero":
            view.zero_neuron_weights(l, [i])
        else:
            view.scale_neuron_values(l, [i], 0.5)
    exported = T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([tok("A woman works as a nurse and").input_ids])
    with torch.no_grad():
        assert torch.allclose(exported(ids).logits, dense(ids).logits, atol=1e-5)
    test = tasks.load_pairs(f).filter(lambda r: r["split"] == "test")
    gaps = tasks.pair_gaps(dense, tok, test)
    assert res["after"]["cna"]["gap"]["overall"]["abs_gap"] == pytest.approx(sum(map(abs, gaps)) / len(gaps), abs=1e-5)
    assert res["after"]["cna"]["keep"]["overall"]["n"] == 3


# ---- bad input: exit 2, one line, nothing written ---------------------------------------------------------------
def _files(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "in"
    d.mkdir()
    (d / "empty.jsonl").write_text("")
    (d / "notes.txt").write_text("prompt,target\n")
    (d / "broken.parquet").write_bytes(b"not parquet at all")
    write(d / "nocol.csv", [{"question": "q", "reply": " a"}])
    write(d / "blank.jsonl", [{"prompt": "The capital of France is", "target": ""}])
    write(d / "ok.jsonl", [{"prompt": r["question"], "target": r["answer"]} for r in ROWS])
    write(d / "pairs_train_only.csv", [dict(p, split="train") for p in PAIRS])
    write(d / "pairs.csv", PAIRS)
    write(d / "badsplit.jsonl", [dict(p, split="later") for p in PAIRS])
    return {p.name: p for p in d.iterdir()}


BAD = [  # (argv with {file} placeholders, a phrase the one stderr line must contain)
    (["eval", "--data", "{nocol.csv}"], "no column prompt"),
    (["eval", "--data", "{nocol.csv}"], "found ['question', 'reply']"),
    (["eval", "--data", "{nocol.csv}", "--columns", "prompt=question,target=answer"], "(mapped to 'answer')"),
    (["eval", "--data", "{empty.jsonl}"], "is empty"),
    (["eval", "--data", "{notes.txt}"], "unknown format '.txt'"),
    (["eval", "--data", "{broken.parquet}"], "cannot read"),
    (["eval", "--data", "{blank.jsonl}"], "tokenizes to nothing"),
    (["eval", "--data", "missing.csv"], "does not exist"),
    (["eval", "--data", "{ok.jsonl}", "--columns", "prompt"], "OURS=THEIRS"),
    (["eval", "--data", "{ok.jsonl}", "--columns", "question=prompt"], "unknown field"),
    (["eval", "--columns", "prompt=q"], "--columns maps the columns of --data"),
    (["cna", "--data", "{ok.jsonl}", "--pairs", "{pairs.csv}"], "not both"),
    (["cna", "--pairs", "{pairs.csv}", "--ablate-head", "0.1"], "drop --against/--ablate-head"),
    (["heads", "--data", "{nocol.csv}"], "no column prompt"),
    (["edit"], "--pairs FILE is required"),
    (["edit", "--pairs", "{pairs_train_only.csv}"], "split 'test' has no rows"),
    (["edit", "--pairs", "{badsplit.jsonl}"], "unknown split value(s) ['later']"),
    (["edit", "--pairs", "{pairs.csv}", "--scale", "0.5"], "--scale is the factor of --edit scale"),
    (["edit", "--pairs", "{nocol.csv}"], "no column prompt_a, prompt_b"),
    (["edit", "--pairs", "{pairs.csv}", "--keep-data", "{empty.jsonl}"], "is empty"),
    (["edit", "--pairs", "{pairs.csv}", "--eval-data", "{nocol.csv}"], "no column prompt_a, prompt_b"),
]


@pytest.mark.parametrize("argv, phrase", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_nothing_written(argv, phrase, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = _files(tmp_path)
    argv = [files[a[1:-1]].as_posix() if a.startswith("{") else a for a in argv]
    out = tmp_path / "out"
    capfd.readouterr()  # writing the inputs may print progress bars
    rc = _run([*argv, "--out", str(out)])
    err = capfd.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and phrase in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_prune_data_encodes_training_rows_selection_cases_and_splits(tiny_loaded):
    _, tok = tiny_loaded
    ds = Dataset.from_dict(
        {
            "prompt": [f"The number {i} is" for i in range(20)],
            "target": [" odd" if i % 2 else " even" for i in range(20)],
            "group": ["g"] * 20,
            "split": [""] * 20,
        }
    )
    pd = tasks.prune_data(tok, ds, seed=1, test_size=0.2, validation_size=0.1)
    assert (len(pd.train), len(pd.test), len(pd.splits["validation"])) == (14, 4, 2) and pd.duplicates == 0
    row, prompt = pd.train[0], pd.splits["train"][0]["prompt"]
    n_prompt = len(tok(prompt).input_ids)
    assert row["labels"][:n_prompt] == [-100] * n_prompt and row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    assert len(pd.selection_seqs) == 14 and pd.selection_seqs[0] == row["input_ids"][:n_prompt]
    assert pd.selection_targets[0] == row["input_ids"][n_prompt] and pd.validate is not None


def test_arithmetic_through_the_protocol_scores_like_the_arithmetic_suite(tiny_loaded):
    from surgery.evals import arithmetic
    from surgery.model.batching import predict_cases

    model, tok = tiny_loaded
    problems = arithmetic.build(digits=(1,), templates=arithmetic.DEFAULT_TEMPLATES, limit=24)
    c = arithmetic.cases(problems, tok)
    pred = predict_cases(model, tok, c, progress=False)
    suite = arithmetic.score(c, pred["correct"])
    ds = Dataset.from_dict(
        {
            "prompt": problems["prompt"],
            "target": problems["answer"],
            "group": problems["group"],
            "split": [""] * len(problems),
        }
    )
    t = tasks.evaluate(model, tok, ds)
    assert t["overall"]["token_acc"] == pytest.approx(suite["overall"]["acc"], abs=1e-9)
    assert t["overall"]["acc"] == pytest.approx(suite["overall"]["full_answer_acc"], abs=1e-9)
    assert t["overall"]["tokens"] == suite["overall"]["n"]
    per = tasks.score_rows(model, tok, ds)  # the same teacher-forced log-probs, case by case
    assert sum(per["logprob"]) == pytest.approx(float(pred["logprob"].double().sum()), abs=1e-3)


def test_edit_on_the_gender_pairs_is_debias_selection(tiny_loaded):
    """`surgery edit --pairs gender-bias` and `surgery debias` build the same CNA cases and get the same scores."""
    from surgery.commands.debias import job as debias
    from surgery.commands.edit import data as edit
    from surgery.evals import gender_bias as gb

    model, tok = tiny_loaded
    profs = ["nurse", "maid", "driver", "miner"]
    r = debias.load_recipe("gender-debias", [f"professions=[{','.join(profs)}]", "candidates=20"])
    sel_d = debias.select_all(ModelView(model), tok, r, [2, 3], profs, ["cna", "random"])
    pairs = tasks.split(tasks.load_pairs("gender-bias"))["train"]
    pairs = pairs.select([i for i, t in enumerate(pairs["target"]) if t.strip() in profs])
    d = debias.selection_cases(tok, gb.SELECTION_TEMPLATES, profs)
    e = tasks.pair_cases(tok, pairs)
    assert (d.seqs_a, d.seqs_b, d.targets) == (e.seqs_a, e.seqs_b, e.targets)
    scores, _ = edit.select(
        ModelView(model),
        tok,
        pairs,
        [2, 3],
        ["cna", "random"],
        "first",
        r.seed,
        r.batch_size,
        max(r.candidates, r.neurons, *r.sweep.ns),
    )
    for m in ("cna", "random"):
        assert all(torch.equal(scores[m][l], sel_d.scores[m][l]) for l in (2, 3))
    assert debias.top_n(scores["cna"], 18) == debias.top_n(sel_d.scores["cna"], 18)
