"""Every bad input found by trying the CLI as a new user: exit 2, exactly ONE stderr line (unfiltered: nothing
from transformers, no step log before it), nothing written. Model-free cases fail before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from surgery.cli import main

SMOL = Path("checkpoints/base/smollm2-135m")


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse errors
        return int(e.code)


@pytest.fixture
def tiny_dir(tiny_smol_dir):
    return tiny_smol_dir


@pytest.fixture
def bad_profile(tmp_path):
    p = tmp_path / "recipe.yaml"
    p.write_text("name: x\nprofiles:\n  quick: 3\n")
    return p


CASES = [  # (argv, a phrase the one line must contain)
    (["finetune", "--dtype", "float16", "--quick"], "--dtype float16 cannot train on the CPU"),
    (["prune", "--dtype", "fp16", "--quick"], "--dtype float16 cannot train on the CPU"),
    (["lora-sweep", "--dtype", "float16", "--quick"], "--dtype float16 cannot train on the CPU"),
    (["prune", "--set", "train.lrs=[]"], "'train.lrs' must not be empty"),
    (["prune", "--set", "train.batch_size=0"], "'train.batch_size' must be >= 1"),
    (["prune", "--set", "lora.rank=true"], "'lora.rank' must be a number"),
    (["prune", "--set", "cna.batch_size=0"], "'cna.batch_size' must be >= 1"),
    (["prune", "--set", "baselines=[cna,bogus]"], "'bogus' is not one of"),
    (["prune", "--set", "train.warmup_ratio=2"], "'train.warmup_ratio' must be <= 1"),
    (["lora-sweep", "--set", "train.lrs=[]"], "'train.lrs' must not be empty"),
    (["debias", "--set", "batch_size=0"], "'batch_size' must be >= 1"),
    (["debias", "--set", "candidates=0"], "'candidates' must be >= 1"),
    (["debias", "--neurons", "0"], "--neurons must be >= 1"),
    (["debias", "--set", "sweep.ns=[]"], "'sweep.ns' must not be empty"),
    (["cna", "--prompt", ""], "--prompt: must not be empty"),
    (["cna", "--prompt", "x", "--prompt-b", " "], "--prompt-b: must not be empty"),
    (["cna", "--prompt", "x", "--target", ""], "--target: must not be empty"),
    (["cna", "--prompt", "x", "--ablate-head", ""], "--ablate-head"),
    (["cna", "--logits-mb", "0"], "--logits-mb must be > 0"),
    (["heads", "--heads", ""], "--heads"),
    (["eval", "--ops", ""], "--ops"),
    (["eval", "--digits", ","], "--digits"),
    (["prune", "--sweep", "50%,25%", "--keep", "5%"], "--sweep and --keep both given"),
    (["prune", "--sweep", "50%,50%"], "lists 50% twice"),
    (["prune", "--sweep", "50.0%,50%"], "lists 50% twice"),
    (["prune", "--sweep", ""], "--sweep is empty"),
    (["prune", "--sweep", "50%,,5%"], "has an empty budget"),
    (["prune", "--sweep", "50%,half"], "budget 'half' is not topN or P%"),
    (["prune", "--sweep", "0%"], "percentage in (0, 100]"),
    (["prune", "--sweep", "top0"], "use top1 or more"),
    (["prune", "--keep", "auto", "--max-drop", "-1"], "--max-drop -1 is negative"),
    (["prune", "--keep", "5%", "--max-drop", "2"], "--max-drop applies to --keep auto"),
    (["prune", "--keep", "auto", "--quick"], "needs a validation split"),
    (["prune", "--keep", "5%", "--against", "original"], "--against original applies to --keep auto"),
    (["prune", "--data", "nope.csv"], "nope.csv does not exist"),
    (["prune", "--columns", "prompt=q"], "--columns maps the columns of --data or --pairs"),
    (["circuit", "--operands", "9-3"], "range is empty"),
    (["circuit", "--operands", "5-5", "--ops", "+"], "fewer than the 8 a mean needs"),
    (["circuit", "--operands", "0-1", "--ops", "*"], "fewer than the 8 a mean needs"),
    (["circuit", "--ops", "%"], "cannot be expressed by the arithmetic templates"),
    (["circuit", "--templates", "words"], "cannot name the operand positions"),
    (["circuit", "--faithfulness", "0"], "outside (0, 1]"),
    (["circuit", "--faithfulness", "1.01"], "outside (0, 1]"),
    (["circuit", "--limit", "1"], "at least 2 per operator"),
    (["circuit", "--mean-sample", "3"], "--mean-sample 3 is fewer than the 8"),
    (["circuit", "--score", "last"], "unknown --score 'last'"),
    (["prune", "--export", "onnx"], "unknown --export format 'onnx'"),
    (["prune", "--sweep", "50%", "--export", "gguf"], "a --sweep exports no checkpoint"),
    (["debias", "--export", "gguf:q3_k"], "unknown GGUF type 'q3_k'"),
    (["edit", "--pairs", "gender-bias", "--export", "tar"], "unknown --export format 'tar'"),
    (["finetune", "--export", "gguf,gguf:f32"], "--export lists gguf:f32 twice"),
]


@pytest.mark.parametrize("argv, phrase", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_model_free_bad_input(argv, phrase, tmp_path, capfd):
    out = tmp_path / "out"
    rc = _run([*argv, "--out", str(out)])
    err = capfd.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and phrase in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_profile_that_is_not_a_mapping(bad_profile, tmp_path, capfd):
    assert _run(["prune", "--recipe", str(bad_profile), "--quick", "--out", str(tmp_path / "o")]) == 2
    err = capfd.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "profile 'quick' must be a mapping" in err, err


@pytest.mark.parametrize(
    "argv, phrase",
    [
        (
            ["cna", "--prompt", "Calculate: 3+5=", "--layers", "3-1"],
            "layer range 3-1 is empty; write the lower layer first: 1-3",
        ),
        (["cna", "--prompt", "Calculate: 3+5=", "--layers", "9"], "outside the model"),
        (["cna", "--prompt", "Calculate: 3+5=", "--target", " nursery rhymes"], "is 2 tokens"),
        (["lora-sweep", "--quick", "--layers", "7"], "outside the model"),  # no step log line before the error
        (["prune", "--quick", "--keep", "top5", "--lora-layer", "9"], "--lora-layer 9 is outside the model"),
        (["prune", "--quick", "--keep", "top5", "--export", "gguf:q8_0"], "prune with --multiple 32"),
    ],
)
def test_bad_input_after_loading_is_still_one_line(tiny_dir, argv, phrase, tmp_path, capfd):
    out = tmp_path / "out"
    assert _run([*argv, "--model", str(tiny_dir), "--out", str(out)]) == 2
    err = capfd.readouterr().err
    assert len(err.strip().splitlines()) == 1 and phrase in err, err
    assert not out.exists()


def _circuit_folder(path: Path, model: dict) -> Path:
    import json

    path.mkdir()
    config = {"ops": ["+"], "operands": [0, 9], "template": "calculate", "seed": 0}
    results = {"per_op": {"+": {"neurons": {"2": [0, 1]}}}}
    (path / "circuit.json").write_text(json.dumps({"model": model, "config": config, "results": results}))
    return path


def test_circuit_folder_from_another_model(tiny_dir, tmp_path, capfd):
    """`surgery heuristics` refuses a circuit made for another model: by name before loading, by shape after."""
    named = _circuit_folder(
        tmp_path / "named", {"name": "smollm2-135m", "source": str(SMOL), "n_layers": 30, "n_heads": 9}
    )
    out = tmp_path / "out"
    assert _run(["heuristics", "--circuit", str(named), "--model", str(tiny_dir), "--out", str(out)]) == 2
    err = capfd.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "was made with model smollm2-135m" in err, err
    shaped = _circuit_folder(
        tmp_path / "shaped", {"name": "tiny", "source": str(tiny_dir), "n_layers": 30, "n_heads": 9}
    )
    assert _run(["heuristics", "--circuit", str(shaped), "--out", str(out)]) == 2
    err = capfd.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "was made for 30 x 9" in err, err
    assert not out.exists()
    assert _run(["heuristics", "--circuit", str(named), "--grid-sample", "2", "--out", str(out)]) == 2
    assert "--grid-sample 2 is fewer than" in capfd.readouterr().err


def test_circuit_resume_into_another_models_folder(tmp_path, capfd):
    """An unfinished `surgery circuit` folder of another model (or any other option) is not continued."""
    import json

    from surgery.commands.circuit.job import RUN_FILE

    out = tmp_path / "c"
    out.mkdir()
    (out / RUN_FILE).write_text(json.dumps({"model": "other-model"}))
    assert _run(["circuit", "--model", "no-such-model", "--out", str(out)]) == 2
    err = capfd.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "model: 'other-model' there, 'no-such-model' now" in err, err
    assert sorted(p.name for p in out.iterdir()) == [RUN_FILE]


# ---- state files read back from earlier runs (surgery/io/state.py): one line, exit 2, nothing written --------
def _one_line(capfd, phrase: str) -> str:
    err = capfd.readouterr().err
    assert len(err.strip().splitlines()) == 1 and phrase in err and err.startswith("surgery: error: "), err
    return err


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


BAD_JSON = [  # (file content, a phrase of the one line)
    (b"{bad", "is not valid JSON"),
    (b"\xff\xfe\x00\x01binary", "is not UTF-8 text"),
    (b"[1, 2]", "holds a list, not an object"),
]


@pytest.mark.parametrize(
    "content, phrase",
    [*BAD_JSON, (b'{"fingerprint": []}', "fingerprint is a list, not an object"), (b"{}", "lacks fingerprint")],
)
def test_prune_sweep_folder_with_a_bad_sweep_json(content, phrase, tmp_path, capfd):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep.json").write_bytes(content)
    before = _tree(tmp_path)
    assert _run(["prune", "--sweep", "50%", "--out", str(out)]) == 2
    err = _one_line(capfd, phrase)
    assert "sweep.json" in err and "--force" in err
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("content, phrase", BAD_JSON)
def test_circuit_folder_with_a_corrupt_run_file(content, phrase, tmp_path, capfd):
    from surgery.commands.circuit.job import RUN_FILE

    out = tmp_path / "c"
    out.mkdir()
    (out / RUN_FILE).write_bytes(content)
    before = _tree(tmp_path)
    assert _run(["circuit", "--model", "no-such-model", "--out", str(out)]) == 2
    err = _one_line(capfd, phrase)
    assert RUN_FILE in err and "--force" in err
    assert _tree(tmp_path) == before


def _full_circuit(tiny_dir: Path, **changes) -> dict:
    data = {
        "model": {"name": "tiny-llama", "source": str(tiny_dir), "n_layers": 4, "n_heads": 4},
        "config": {"ops": ["+"], "operands": [0, 9], "template": "calculate", "seed": 0},
        "results": {"per_op": {"+": {"neurons": {"2": [0, 1]}}}},
        "circuit": {"heads": ["1.2"], "mlps": [0, 1, 2, 3]},
    }
    for where, value in changes.items():
        *parents, key = where.split("__")
        d = data
        for k in parents:
            d = d[k]
        d[key] = value
    return data


HEURISTICS_BAD = [  # (circuit.json content, a phrase of the one line)
    *BAD_JSON,
    (b"{}", "lacks model"),
    ({"circuit__mlps": ["x"]}, "circuit.mlps[0] is a string, not an integer"),
    ({"circuit__heads": ["head one"]}, "not LAYER.HEAD"),
    ({"model__n_layers": "4"}, "model.n_layers is a string, not an integer"),
    ({"config__operands": [0]}, "config.operands has 1 entries, not 2"),
    ({"results": {}}, "lacks results.per_op"),
    ({"results__per_op": {"-": {}}}, "lacks results.per_op.+"),
    ({"results__per_op__+__neurons": {"2": "0,1"}}, "results.per_op.+.neurons.2 is a string, not a list"),
]


@pytest.mark.parametrize("content, phrase", HEURISTICS_BAD, ids=[p for _, p in HEURISTICS_BAD])
def test_heuristics_circuit_json_of_the_wrong_shape(content, phrase, tiny_dir, tmp_path, capfd):
    import json

    folder = tmp_path / "circ"
    folder.mkdir()
    raw = content if isinstance(content, bytes) else json.dumps(_full_circuit(tiny_dir, **content)).encode()
    (folder / "circuit.json").write_bytes(raw)
    before = _tree(tmp_path)
    assert _run(["heuristics", "--circuit", str(folder), "--out", str(tmp_path / "out")]) == 2
    err = _one_line(capfd, phrase)
    assert "circuit.json" in err and "surgery circuit --out" in err
    assert _tree(tmp_path) == before


def _heads_json(**row) -> dict:
    return {
        "model": {"name": "tiny-llama", "arch": "llama"},
        "config": {"ablation": "zero"},
        "results": {"shape": {"layers": 4, "heads": 4}, "heads": [row]},
    }


COMPONENTS_BAD = [  # (file name, content, a phrase of the one line)
    ("list.json", b"[1, 2]", "holds a list, not an object"),
    ("binary.bin", b"\x00\xff\xfe binary", "is not UTF-8 text"),
    ("broken.json", b'{"results": ', "is not valid JSON"),
    ("heads.json", _heads_json(layer=1, drop={"overall": 0.1}), "lacks results.heads[0].head"),
    ("heads.json", _heads_json(layer=1, head=2), "lacks results.heads[0].drop"),
    ("heads.json", _heads_json(layer=1, head=2, drop={"overall": "big"}), "drop.overall is a string, not a number"),
    ("heads.json", dict(_heads_json(layer=1, head=2), config={"method": "path-patch"}), "results.heads[0].effect"),
    ("circuit.json", {"circuit": {"heads": ["1.2"], "mlps": ["x"]}}, "circuit.mlps[0] is a string"),
    ("other.json", {"results": {}}, "neither a heads.json"),
]


@pytest.mark.parametrize("name, content, phrase", COMPONENTS_BAD, ids=[p for _, _, p in COMPONENTS_BAD])
def test_finetune_components_file_of_the_wrong_shape(name, content, phrase, tiny_dir, tmp_path, capfd):
    import json

    f = tmp_path / name
    f.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    out = tmp_path / "out"
    assert _run(["finetune", "--model", str(tiny_dir), "--components", str(f), "--quick", "--out", str(out)]) == 2
    err = _one_line(capfd, phrase)
    assert name in err and "surgery heads" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_prune_data_too_small_to_split_fails_before_the_model_loads(tiny_dir, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "one.csv").write_text("prompt,target\nThe capital of France is, Paris\n")
    argv = ["prune", "--recipe", "custom-prune", "--data", "one.csv", "--keep", "50%", "--model", str(tiny_dir)]
    assert _run([*argv, "--out", "out"]) == 2
    err = _one_line(capfd, "leave the seeded split no test rows")
    assert "[prune]" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.csv"]


@pytest.mark.parametrize("verb", ["edit", "cna"])
def test_pairs_csv_with_uneven_rows_is_one_line(verb, tiny_dir, tmp_path, capfd):
    f = tmp_path / "pairs.csv"
    f.write_text("prompt_a,prompt_b,target\nHe works as a,She works as a, doctor\nx,y,z,w,v\n")
    assert _run([verb, "--pairs", str(f), "--model", str(tiny_dir), "--out", str(tmp_path / "out")]) == 2
    _one_line(capfd, "pairs.csv line 3 has 5 fields but the header 3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.csv"]


def test_eval_refuses_an_existing_out_without_force(tiny_dir, tmp_path, capfd):
    data = tmp_path / "cases.csv"
    data.write_text("prompt,target\nThe capital of France is, Paris\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("an earlier report\n")
    argv = ["eval", "--model", str(tiny_dir), "--data", str(data), "--out", str(out)]
    assert _run(argv) == 2
    _one_line(capfd, "already exists; pass --force")
    assert _tree(out) == {"report.json": b"an earlier report\n"}
    assert _run([*argv, "--force"]) == 0
    assert b'"command": "eval --data' in (out / "report.json").read_bytes() and (out / "report.md").is_file()
