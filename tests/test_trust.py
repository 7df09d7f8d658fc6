"""Trust and checkpoints: remote code only when proven ours, inspect covers every file and the manifest itself,
one manifest writer for every checkpoint kind, one-line errors for corrupt inputs, atomic writes that recover."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny
from test_export import KEEP, edit_in_place, tiny_tokenizer

from surgery.cli import main as cli_main
from surgery.commands.diff.job import diff as diff_checkpoints
from surgery.commands.inspect.job import inspect as inspect_checkpoint
from surgery.edits.lora import Fit, LoraSpec, attach, merged_copy
from surgery.edits.pruning import Plan, PruneRecipe, export_checkpoint
from surgery.errors import UsageError
from surgery.io import checkpoint as export
from surgery.io import report, trust
from surgery.io.loading import load_model
from surgery.model.slicing import slice_ffn

HERE = Path(__file__).parent
ROOT = HERE.parent


def cli(*args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process (its own logging and warnings), stderr unfiltered."""
    e = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY",)}
    e.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "surgery", *args], capture_output=True, text=True, cwd=ROOT, env=e, timeout=timeout
    )


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr[-3000:])
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def plain_folder(path: Path, arch: str = "llama") -> Path:
    """A tiny model folder as any Hugging Face user would have it (weights, config, tokenizer)."""
    make_tiny(arch).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


EVIL = """from pathlib import Path
Path({marker!r}).write_text("ran")
from transformers import LlamaForCausalLM as _Base


class LlamaForCausalLM(_Base):
    pass
"""


@pytest.fixture
def evil(tmp_path) -> tuple[Path, Path]:
    """A folder with surgery.json `{}`, a modeling_surgery.py that writes a marker file on import, an auto_map."""
    folder, marker = plain_folder(tmp_path / "evil"), tmp_path / "marker"
    (folder / "surgery.json").write_text("{}")
    (folder / "modeling_surgery.py").write_text(EVIL.format(marker=str(marker)))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_surgery.LlamaForCausalLM"}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, marker


# ---- 1. remote code only when proven ours ----------------------------------------------------------------------
def test_foreign_code_refused_by_eval(evil):
    folder, marker = evil
    r = cli("eval", "--model", str(folder), "--task", "arithmetic", "--limit", "4")
    one_line_error(r, "--trust-remote-code")
    assert not marker.exists()


def test_foreign_code_refused_as_cna_against(evil, tmp_path):
    folder, marker = evil
    base = plain_folder(tmp_path / "base")
    r = cli("cna", "--model", str(base), "--against", str(folder), "--limit", "4")
    one_line_error(r, "--trust-remote-code")
    assert not marker.exists()


def test_foreign_code_runs_only_with_the_flag(evil):
    folder, marker = evil
    with pytest.raises(UsageError, match="--trust-remote-code"):
        export.load(folder)
    assert not marker.exists()
    loaded = load_model(str(folder), trust_remote_code=True)
    assert marker.read_text() == "ran" and type(loaded.model).__module__.endswith("modeling_surgery")


def test_cli_has_the_flag_for_every_model_command():
    from surgery import commands
    from surgery.cli import build_parser

    parser = build_parser()
    for name in commands.names():
        options = commands.get(name).options
        if any("--model" in o.flags for o in options):
            required = [x for o in options if o.required for x in (o.flags[0], "x")]
            assert parser.parse_args([name, *required, "--trust-remote-code"]).trust_remote_code is True


@pytest.fixture
def sliced(tmp_path) -> Path:
    model = make_tiny("qwen2")
    slice_ffn(model, KEEP)
    export.save(model, tiny_tokenizer(), tmp_path / "sliced", layout="sliced")
    return tmp_path / "sliced"


def test_own_sliced_export_loads_without_flag(sliced):
    m = json.loads((sliced / "surgery.json").read_text())
    assert m["modeling_sha256"] == trust.modeling_sha256("Qwen2ForCausalLM")
    loaded = load_model(str(sliced))
    assert loaded.model.config.ffn_widths == [16, 48, 8]
    assert [w for w in export.load(sliced).config.ffn_widths] == [16, 48, 8]
    assert "loads without" in inspect_checkpoint(str(sliced)).data["remote_code"]


@pytest.mark.parametrize("change", ["modeling", "auto_map", "layout"])
def test_sliced_export_with_altered_code_is_refused(sliced, change):
    if change == "modeling":  # one extra byte: no longer the template
        f = sliced / "modeling_surgery.py"
        f.write_text(f.read_text() + "\n")
    elif change == "auto_map":
        cfg = json.loads((sliced / "config.json").read_text())
        cfg["auto_map"]["AutoTokenizer"] = "modeling_surgery.Tok"
        (sliced / "config.json").write_text(json.dumps(cfg))
    else:
        m = json.loads((sliced / "surgery.json").read_text())
        m["layout"] = "padded"
        (sliced / "surgery.json").write_text(json.dumps(m))
    with pytest.raises(UsageError, match="--trust-remote-code"):
        load_model(str(sliced))
    with pytest.raises(UsageError, match="--trust-remote-code"):
        export.load(sliced)


# ---- 2, 6. inspect covers every file and the manifest; exit codes ----------------------------------------------
@pytest.mark.parametrize("extra", ["adapter/x.safetensors", "pytorch_model.bin", "notes.txt", "sub/dir/evil.py"])
def test_inspect_flags_unlisted_files_anywhere(sliced, extra):
    assert inspect_checkpoint(str(sliced)).exit_code == 0
    (sliced / extra).parent.mkdir(parents=True, exist_ok=True)
    (sliced / extra).write_bytes(b"\0" * 64)
    r = inspect_checkpoint(str(sliced))
    assert r.exit_code == 1 and any(p.startswith(extra) and "not listed" in p for p in r.data["problems"])


def test_inspect_checks_listed_files_in_subfolders(tmp_path):
    out = _prune_like(tmp_path)
    adapter = next(p for p in (out / "adapter").iterdir() if p.suffix == ".safetensors")
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 0xFF
    adapter.write_bytes(bytes(data))
    r = inspect_checkpoint(str(out))
    assert r.exit_code == 1 and any(p.startswith("adapter/") and "sha256" in p for p in r.data["problems"])


def test_inspect_detects_an_edited_manifest(sliced):
    f = sliced / "surgery.json"
    m = json.loads(f.read_text())
    m["seed"] = 1234
    f.write_text(json.dumps(m, indent=2))
    r = inspect_checkpoint(str(sliced))
    assert r.exit_code == 1 and any("manifest_sha256 mismatch" in p for p in r.data["problems"])
    del m["manifest_sha256"]
    f.write_text(json.dumps(m, indent=2))
    r = inspect_checkpoint(str(sliced))
    assert r.exit_code == 1 and any("no manifest_sha256" in p for p in r.data["problems"])


def _malformed(folder: Path, case: str) -> Path:
    if case == "missing":
        return folder / "nowhere"
    if case == "no-manifest":
        (folder / "surgery.json").unlink()
        return folder
    m = json.loads((folder / "surgery.json").read_text())
    text = {
        "invalid-json": '{"files": ',
        "list": "[]",
        "entry-without-bytes": json.dumps({**m, "files": {"config.json": {"sha256": "00"}}}),
        "files-as-list": json.dumps({**m, "files": list(m["files"])}),
        "bytes-as-text": json.dumps({**m, "files": {"config.json": {"sha256": "00", "bytes": "9"}}}),
        "layers-not-numbers": json.dumps({**m, "layers": {"x": {}}}),
    }[case]
    (folder / "surgery.json").write_text(text)
    return folder


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "no-manifest",
        "invalid-json",
        "list",
        "entry-without-bytes",
        "files-as-list",
        "bytes-as-text",
        "layers-not-numbers",
    ],
)
def test_inspect_unreadable_checkpoint_is_one_line_exit_2(sliced, case, capfd):
    path = _malformed(sliced, case)
    capfd.readouterr()
    assert cli_main(["inspect", str(path)]) == 2
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("surgery: error:"), err
    if case == "missing":
        assert "does not exist" in err[0]


# ---- 3. one manifest writer: every kind inspects and diffs ------------------------------------------------------
def _prune_like(tmp_path: Path) -> Path:
    """A checkpoint written by prune's own export step (LoRA merged, adapter/ saved, sliced) on a tiny model."""
    base = plain_folder(tmp_path / "base")
    model = make_tiny("llama")
    slice_ffn(model, KEEP)
    keep = {l: v for l, v in model.surgery_kept.items()}
    fit = Fit(model=attach(model, [1], LoraSpec(rank=2)), lr=1e-3, val_acc={}, log=[], seconds=0.0)
    with torch.no_grad():
        for n, p in fit.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # a LoRA that changes something
    merged = merged_copy(fit.model)
    plan = Plan(layers=[1, 2], keep_kind="top", keep_value=3, lora_layer=1, selectors=["cna"])
    check = export_checkpoint(
        fit,
        merged,
        tiny_tokenizer(),
        tmp_path / "pruned",
        False,
        PruneRecipe(),
        plan,
        keep,
        str(base),
        {"report.json": "{}\n"},
    )
    assert check["widths_match"] and check["max_logit_diff"] < 1e-4
    return tmp_path / "pruned"


def _kind(kind: str, tmp_path: Path) -> Path:
    if kind == "prune":
        return _prune_like(tmp_path)
    base = plain_folder(tmp_path / "base")
    out = tmp_path / kind
    model = make_tiny("llama")
    if kind in ("zeroed", "debias"):
        prov = edit_in_place(model)
        if kind == "debias":  # what debias passes: a base dict in the provenance plus base= its source
            prov.update({"operation": "debias", "base": {"id": "base", "source": str(base)}})
        export.save(model, tiny_tokenizer(), out, layout="zeroed", provenance=prov, base=str(base))
        return out
    slice_ffn(model, KEEP)
    export.save(model, tiny_tokenizer(), out, layout=kind, base=str(base))
    return out


@pytest.mark.parametrize("kind", ["sliced", "padded", "zeroed", "prune", "debias"])
def test_every_kind_inspects_and_diffs(kind, tmp_path, capsys):
    out = _kind(kind, tmp_path)
    m = json.loads((out / "surgery.json").read_text())
    assert isinstance(m["base"], dict) and m["base"]["id"] == "base" and len(m["base"]["sha256"]) == 64
    assert m["manifest_sha256"] == export.manifest_digest(m)
    r = inspect_checkpoint(str(out))
    assert r.exit_code == 0, r.data["problems"]
    assert cli_main(["inspect", str(out)]) == 0 and "All hashes match" in capsys.readouterr().out
    d = diff_checkpoints(str(tmp_path / "base"), str(out))
    widths = d.data["summary"]["widths"]
    assert widths == ([48, 48, 48] if kind in ("padded", "zeroed", "debias") else [16, 48, 8])


def test_legacy_prune_manifest_with_string_base_does_not_crash(sliced):
    """Checkpoints written before the one writer had `base` as a string: inspect reads them (exit 1: the
    manifest has no hash of its own), never an AttributeError."""
    f = sliced / "surgery.json"
    m = json.loads(f.read_text())
    m["base"] = "smollm2-135m"
    del m["manifest_sha256"]
    f.write_text(json.dumps(m))
    r = inspect_checkpoint(str(sliced))
    assert r.exit_code == 1 and r.data["base"]["id"] == "smollm2-135m" and "base: smollm2-135m" in r.markdown


# ---- 4. corrupt weights and configs: one line, exit 2 ----------------------------------------------------------
def _corrupt(folder: Path, what: str) -> None:
    if what == "truncated-weights":
        f = folder / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-4000])
    elif what == "garbage-weights":
        (folder / "model.safetensors").write_bytes(b"\x07" * 5000)
    elif what == "bad-config":
        (folder / "config.json").write_text('{"model_type": "llama",')
    elif what == "config-list":
        (folder / "config.json").write_text("[]")


def test_corrupt_model_is_one_line_for_eval(tmp_path):
    folder = plain_folder(tmp_path / "m")
    _corrupt(folder, "truncated-weights")
    one_line_error(cli("eval", "--model", str(folder), "--task", "arithmetic", "--limit", "4"), str(folder))


@pytest.mark.parametrize("what", ["garbage-weights", "bad-config", "config-list"])
def test_corrupt_model_is_one_line_for_eval_in_process(tmp_path, what, capfd):
    folder = plain_folder(tmp_path / "m")
    _corrupt(folder, what)
    capfd.readouterr()
    assert cli_main(["eval", "--model", str(folder), "--task", "arithmetic", "--limit", "4"]) == 2
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("surgery: error:") and str(folder) in err[0], err


@pytest.mark.parametrize("what", ["truncated-weights", "garbage-weights", "bad-config", "config-list"])
def test_corrupt_model_is_usage_error_for_load_model(tmp_path, what):
    folder = plain_folder(tmp_path / "m")
    _corrupt(folder, what)
    with pytest.raises(UsageError):
        load_model(str(folder))


@pytest.mark.parametrize("what", ["truncated-weights", "garbage-weights", "bad-config", "config-list"])
@pytest.mark.parametrize("side", ["other", "base"])
def test_corrupt_checkpoint_is_one_line_for_diff(tmp_path, what, side, capfd):
    base, other = plain_folder(tmp_path / "base"), plain_folder(tmp_path / "other")
    _corrupt(base if side == "base" else other, what)
    capfd.readouterr()
    assert cli_main(["diff", str(base), str(other)]) == 2
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("surgery: error:"), err


def test_unknown_hub_id_offline_is_one_line():
    one_line_error(cli("eval", "--model", "nobody-here/no-such-model", "--limit", "4"), "offline")


def test_unknown_hub_id_without_network_is_one_line():
    """No offline flag, but the hub cannot be reached (a closed local port stands in for no network)."""
    r = cli(
        "eval",
        "--model",
        "nobody-here/no-such-model",
        "--limit",
        "4",
        env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},
        timeout=60,
    )
    one_line_error(r, "cannot be reached")


# ---- 5. atomic writes: stale temp folders, --force never leaves the name empty, report permissions ---------------
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_of_dead_writer_is_removed(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    stale = tmp_path / f".ck.tmp.{dead}.abc"
    live = tmp_path / f".ck.tmp.{alive}.abc"
    other = tmp_path / f".other.tmp.{dead}.abc"
    for d in (stale, live, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")
    with report.atomic_dir(tmp_path / "ck") as tmp:
        (tmp / "a").write_text("new")
    assert not stale.exists() and live.exists() and other.exists()
    assert (tmp_path / "ck" / "a").read_text() == "new"


def test_killed_export_temp_is_removed_by_next_run(tmp_path):
    from test_export import KILLER

    target = tmp_path / "ck"
    p = subprocess.Popen([sys.executable, "-c", KILLER, str(target), str(HERE)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "WROTE"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert [d.name.startswith(f".ck.tmp.{p.pid}.") for d in tmp_path.iterdir()] == [True]
    export.save(make_tiny("llama"), None, target, layout="zeroed")
    assert sorted(d.name for d in tmp_path.iterdir()) == ["ck"]


FORCE_KILLER = r"""
import os, signal, sys
from pathlib import Path
from surgery.io import report
mode, target = sys.argv[1], Path(sys.argv[2])
real_rename, real_exchange = os.rename, report._exchange
def rename_then_die(a, b):
    real_rename(a, b)
    if Path(b).name.startswith(f".{target.name}.old."):
        os.kill(os.getpid(), signal.SIGKILL)  # between the two renames of the fallback
def exchange_then_die(a, b):
    assert real_exchange(a, b)
    os.kill(os.getpid(), signal.SIGKILL)  # after the swap, before the old folder is removed
if mode == "fallback":
    report._exchange = lambda a, b: False
    os.rename = rename_then_die
else:
    report._exchange = exchange_then_die
with report.atomic_dir(target, force=True) as tmp:
    (tmp / "v").write_text("new")
"""


@pytest.mark.parametrize("mode", ["fallback", "exchange"])
def test_force_replacement_killed_never_leaves_the_name_empty(tmp_path, mode):
    target = tmp_path / "ck"
    target.mkdir()
    (target / "v").write_text("old")
    p = subprocess.run(
        [sys.executable, "-c", FORCE_KILLER, mode, str(target)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert p.returncode == -signal.SIGKILL
    if mode == "fallback":  # killed between the renames: the old folder is aside, the next run puts it back
        assert not target.exists() and any(d.name.startswith(".ck.old.") for d in tmp_path.iterdir())
        report.recover_stale(target)
        assert (target / "v").read_text() == "old"
    else:  # the swap is one step: the name holds the new folder at once
        assert (target / "v").read_text() == "new"
    with report.atomic_dir(target, force=True) as tmp:
        (tmp / "v").write_text("newer")
    assert (target / "v").read_text() == "newer" and sorted(d.name for d in tmp_path.iterdir()) == ["ck"]


def test_reports_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = report.write_json(tmp_path / "cna.json", {"a": 1})
        md = report.write_text_atomic(tmp_path / "heads.md", "x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644 and md.stat().st_mode & 0o777 == 0o644


def test_checkpoint_missing_tensors_is_refused_not_random_filled(tmp_path):
    """transformers would random-initialise absent tensors (its warning is silenced on our load path): refuse."""
    from safetensors.torch import load_file, save_file

    folder = plain_folder(tmp_path / "m")
    tensors = load_file(str(folder / "model.safetensors"))
    victim = next(k for k in tensors if "mlp.down_proj" in k)
    save_file(
        {k: v for k, v in tensors.items() if k != victim}, str(folder / "model.safetensors"), metadata={"format": "pt"}
    )
    with pytest.raises(UsageError, match="lacks 1 weight"):
        load_model(str(folder))
