"""Export layouts load back with plain transformers in a clean environment; provenance, kill, tamper, diff."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import venv
from importlib import metadata
from pathlib import Path

import pytest
import torch
from conftest import ARCHS, N, make_tiny, tiny_inputs

from surgery.cli import main as cli_main
from surgery.commands.diff.job import diff as diff_checkpoints
from surgery.commands.inspect.job import inspect as inspect_checkpoint
from surgery.errors import UsageError
from surgery.io import checkpoint as export
from surgery.model.arch import ModelView
from surgery.model.slicing import slice_ffn

ATOL = 1e-5
HERE = Path(__file__).parent
PROMPT = "abcd="
KEEP = {0: list(range(0, N, 3)), 2: [1, 2, 3, 40]}
UNIFORM = {l: list(range(l, N, 3)) for l in range(3)}  # `prune --uniform`: every layer at one width (16)
CASES = (*export.LAYOUTS, "uniform")  # uniform: the sliced layout of a model cut to one width: a stock config


# ---- helpers ---------------------------------------------------------------------------------------------------
def tiny_tokenizer():
    """A character-level fast tokenizer over the tiny models' 96-token vocabulary (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(32 + i): i + 3 for i in range(93)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _requirements(dist: metadata.Distribution) -> list[str]:
    from packaging.requirements import Requirement

    out = []
    for r in dist.requires or []:
        req = Requirement(r)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.append(req.name)
    return out


def _closure(names: list[str]) -> list[metadata.Distribution]:
    seen, todo, dists = set(), list(names), []
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        dists.append(dist)
        todo += _requirements(dist)
    return dists


@pytest.fixture(scope="session")
def clean_python(tmp_path_factory) -> str:
    """A virtual environment holding only torch, transformers, safetensors and what they require (symlinked from
    the project's environment, so no downloads): surgery, peft and accelerate are NOT importable there."""
    root = tmp_path_factory.mktemp("cleanenv")
    venv.create(root, with_pip=False, symlinks=True)
    site = next(root.glob("lib/python*/site-packages"))
    for dist in _closure(["torch", "transformers", "safetensors"]):
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            src = Path(dist.locate_file(top))
            if src.exists() and not (site / top).exists() and not top.endswith(".pth"):
                (site / top).symlink_to(src)
    python = str(root / "bin" / "python")
    probe = subprocess.run(
        [
            python,
            "-c",
            "import torch, transformers, safetensors\n"
            "for m in ('surgery', 'peft', 'accelerate'):\n"
            "    try:\n        __import__(m)\n        print('IMPORTABLE', m)\n"
            "    except ImportError:\n        pass",
        ],
        capture_output=True,
        text=True,
        cwd=root,
        env=_clean_env(),
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert "IMPORTABLE" not in probe.stdout, probe.stdout
    return python


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


LOADER = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, pipeline
jobs = json.load(open(sys.argv[1]))
res = {}
for j in jobs:
    kw = dict(trust_remote_code=j["remote"], dtype=torch.float32)
    attn = j.get("attn", "eager")
    m = AutoModelForCausalLM.from_pretrained(j["path"], attn_implementation=attn, **kw).eval()
    ids = torch.load(j["ids"])
    with torch.no_grad():
        torch.save(m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, j["logits"])
    p = pipeline("text-generation", model=j["path"], model_kwargs={"attn_implementation": attn}, **kw)
    out = p(j["prompt"], max_new_tokens=8, do_sample=False, return_full_text=False)
    res[j["path"]] = {"text": out[0]["generated_text"], "module": type(m).__module__}
assert "surgery" not in sys.modules and "peft" not in sys.modules
json.dump(res, open(sys.argv[2], "w"))
"""


def load_in_clean_env(python: str, jobs: list[dict], work: Path) -> dict:
    """Load checkpoints with plain transformers in another process (never importing surgery)."""
    (work / "jobs.json").write_text(json.dumps(jobs))
    (work / "loader.py").write_text(LOADER)
    r = subprocess.run(
        [python, str(work / "loader.py"), str(work / "jobs.json"), str(work / "res.json")],
        capture_output=True,
        text=True,
        cwd=work,
        env=_clean_env(),
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads((work / "res.json").read_text())


def greedy_text(model, tok, prompt: str = PROMPT, n: int = 8) -> str:
    from transformers import pipeline

    p = pipeline("text-generation", model=model, tokenizer=tok)
    return p(prompt, max_new_tokens=n, do_sample=False, return_full_text=False)[0]["generated_text"]


def edit_in_place(model) -> dict:
    """A debias-like edit: zero some neurons, scale others (one amplified), zero one head."""
    v = ModelView(model)
    v.zero_neuron_weights(1, [3, 7, 9])
    v.scale_neuron_values(2, [4], 2.5)
    v.scale_neuron_values(2, [5], 0.5)
    v.zero_head_weights(0, 1)
    return {"layers": {"1": {"edited": [3, 7, 9], "edit": "zero"}, "2": {"edited": [4, 5], "edit": "scale"}}}


def make_case(arch: str, layout: str):
    model = make_tiny(arch)
    if layout == "zeroed":
        prov = edit_in_place(model)
    elif layout == "uniform":
        slice_ffn(model, UNIFORM)
        prov = {"seed": 0}
    else:
        slice_ffn(model, KEEP)
        prov = {"seed": 0}
    return model, prov


# ---- round trips in a clean environment ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def round_trips(tmp_path_factory, clean_python):
    """Export every (arch, layout); load all of them back in ONE clean-env process."""
    work = tmp_path_factory.mktemp("roundtrip")
    tok, ids = tiny_tokenizer(), tiny_inputs()["input_ids"]
    torch.save(ids, work / "ids.pt")
    cases, jobs = {}, []
    for arch in ARCHS:
        for layout in CASES:
            model, prov = make_case(arch, layout)
            path = work / f"{arch}-{layout}"
            written = "sliced" if layout == "uniform" else layout
            export.save(model, tok, path, layout=written, provenance=prov, max_shard_size="40KB")
            with torch.no_grad():
                ref = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            cases[arch, layout] = (path, ref, greedy_text(model, tok))
            jobs.append(
                {
                    "path": str(path),
                    "remote": layout == "sliced",
                    "ids": str(work / "ids.pt"),
                    "logits": str(path) + ".logits.pt",
                    "prompt": PROMPT,
                }
            )
    return cases, load_in_clean_env(clean_python, jobs, work)


@pytest.mark.parametrize("layout", CASES)
@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_in_clean_env(round_trips, arch, layout):
    cases, res = round_trips
    path, ref, text = cases[arch, layout]
    got = torch.load(str(path) + ".logits.pt")
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    assert res[str(path)]["text"] == text
    generated = res[str(path)]["module"].endswith("modeling_surgery")
    assert generated == (layout == "sliced")


def test_checkpoint_folder_is_self_describing(round_trips):
    cases, _ = round_trips
    path = cases["llama", "sliced"][0]
    names = {p.name for p in path.iterdir()}
    assert {
        "config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "generation_config.json",
        "surgery.json",
        "modeling_surgery.py",
    } <= names
    assert len([n for n in names if n.endswith(".safetensors")]) > 1  # sharded over the threshold
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["ffn_widths"] == [16, N, 8]  # 4 kept, rounded up to 8
    assert cfg["ffn_padding"] == [0, 0, 4]
    assert cfg["per_layer_config"] == {"0": {"intermediate_size": 16}, "2": {"intermediate_size": 8}}
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_surgery.LlamaForCausalLM"
    src = (path / "modeling_surgery.py").read_text()
    assert "surgery" not in "".join(l for l in src.splitlines() if l.startswith(("import", "from")))
    m = json.loads((path / "surgery.json").read_text())
    assert m["layout"] == "sliced" and m["ffn"]["widths"] == [16, N, 8] and m["tool"]["version"]
    assert m["ffn"]["padding"] == [0, 0, 4] and m["layers"]["2"]["kept"] == KEEP[2]
    assert m["layers"]["0"]["kept"] == KEEP[0] and m["seed"] == 0 and m["created"]
    assert set(m["files"]) >= {"config.json", "model-00001-of-00002.safetensors"} or len(m["tensor_files"]) > 1
    for layout in ("padded", "zeroed"):
        cfg = json.loads((cases["llama", layout][0] / "config.json").read_text())
        assert "auto_map" not in cfg and "per_layer_config" not in cfg and cfg["intermediate_size"] == N
    for arch in ARCHS:  # one width everywhere: the stock config at that width, no code, the manifest still sliced
        path = cases[arch, "uniform"][0]
        cfg = json.loads((path / "config.json").read_text())
        assert "auto_map" not in cfg and "ffn_widths" not in cfg and not (path / "modeling_surgery.py").exists()
        assert cfg.get("intermediate_size", cfg.get("n_inner")) == 16, arch
        m = json.loads((path / "surgery.json").read_text())
        assert m["layout"] == "sliced" and m["ffn"]["widths"] == [16, 16, 16]


def test_reloaded_sliced_model_re_exports_padded(tmp_path):
    model, _ = make_case("gpt2", "sliced")
    export.save(model, None, tmp_path / "s", layout="sliced")
    back = export.load(tmp_path / "s")
    export.save(back, None, tmp_path / "p", layout="padded")
    r = diff_checkpoints(str(_base_folder("gpt2", tmp_path)), str(tmp_path / "p"))
    assert r.data["layers"][2]["zeroed"] == sorted(set(range(N)) - set(KEEP[2]))


def test_dtype_and_single_file(tmp_path):
    model, _ = make_case("llama", "sliced")
    export.save(model, None, tmp_path / "bf", layout="sliced", dtype="bfloat16")
    assert (tmp_path / "bf" / "model.safetensors").exists()
    loaded = export.load(tmp_path / "bf")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert json.loads((tmp_path / "bf" / "config.json").read_text())["dtype"] == "bfloat16"


# ---- safety of writes ---------------------------------------------------------------------------------------------
def test_existing_target_needs_force(tmp_path):
    model = make_tiny("gpt2")
    export.save(model, None, tmp_path / "ck", layout="zeroed")
    with pytest.raises(UsageError, match="already exists; pass --force"):
        export.save(model, None, tmp_path / "ck", layout="zeroed")
    export.save(model, None, tmp_path / "ck", layout="zeroed", force=True)
    assert inspect_checkpoint(str(tmp_path / "ck")).exit_code == 0


def test_bad_layout_choices_are_one_line_errors(tmp_path):
    model, _ = make_case("llama", "sliced")
    with pytest.raises(UsageError, match="--layout zeroed keeps base shapes"):
        export.save(model, None, tmp_path / "a", layout="zeroed")
    with pytest.raises(UsageError, match="unknown --layout"):
        export.save(model, None, tmp_path / "a", layout="squashed")
    del model.surgery_kept
    with pytest.raises(UsageError, match="--layout padded needs the kept neuron indices"):
        export.save(model, None, tmp_path / "a", layout="padded")
    assert not (tmp_path / "a").exists()


KILLER = r"""
import sys, time
sys.path.insert(0, sys.argv[2])
from conftest import make_tiny
from surgery.io import checkpoint as export
orig = export._flush
def slow(*a, **k):
    r = orig(*a, **k)
    print("WROTE", flush=True)
    time.sleep(120)
    return r
export._flush = slow
export.save(make_tiny("llama"), None, sys.argv[1], layout="zeroed", max_shard_size="20KB")
"""


def test_killed_export_leaves_no_checkpoint(tmp_path):
    """SIGKILL mid-write: the target never exists (only a hidden .NAME.tmp.* folder may remain)."""
    target = tmp_path / "ck"
    p = subprocess.Popen([sys.executable, "-c", KILLER, str(target), str(HERE)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "WROTE"
    temp = [d for d in tmp_path.iterdir() if d.name.startswith(".ck.tmp.")]
    assert temp and any(f.suffix == ".safetensors" for f in temp[0].iterdir())  # really mid-write
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not target.exists()
    assert all(d.name.startswith(".ck.tmp.") for d in tmp_path.iterdir())
    export.save(make_tiny("llama"), None, target, layout="zeroed")  # no --force needed: nothing was left
    assert inspect_checkpoint(str(target)).exit_code == 0


PEAK = r"""
import sys
from pathlib import Path
import torch, safetensors.torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM
from surgery.io import checkpoint as export
kb = lambda f: int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(f)).split()[1])
Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark (ru_maxrss would include the parent's)
before = kb("VmRSS:")
model = export.load(sys.argv[1])
print((kb("VmHWM:") - before) / 1024)
"""


def test_sliced_load_never_builds_the_base_width(tmp_path):
    """A sliced checkpoint whose base width would take 400 MB loads with a peak far below that: the generated
    class builds the base width on the meta device (transformers' loading), then resizes before any weight."""
    import transformers as T

    cfg = T.LlamaConfig(
        hidden_size=256,
        intermediate_size=16384,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    )
    with torch.device("meta"):
        dense_bytes = sum(p.numel() * 4 for p in T.AutoModelForCausalLM.from_config(cfg).parameters())
    small = T.LlamaConfig(**{**cfg.to_dict(), "intermediate_size": 256})
    model = T.AutoModelForCausalLM.from_config(small).eval()  # the sliced shape, built small
    slice_ffn(model, {0: list(range(128))})  # per-layer widths (one width everywhere would be a stock config)
    model.config.intermediate_size = 16384
    model.surgery_kept = {0: list(range(128)), **{l: list(range(256)) for l in range(1, 8)}}
    export.save(model, None, tmp_path / "ck", layout="sliced")
    saved = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert saved["intermediate_size"] == 16384 and saved["ffn_widths"] == [128] + [256] * 7
    out = subprocess.run(
        [sys.executable, "-c", PEAK, str(tmp_path / "ck")], capture_output=True, text=True, cwd=HERE.parent
    )
    peak_mb = float(out.stdout.strip().splitlines()[-1])
    assert dense_bytes / 2**20 > 390 and peak_mb < 100, (peak_mb, out.stderr[-500:])


# ---- inspect: provenance + hashes ---------------------------------------------------------------------------------
@pytest.fixture
def checkpoint(tmp_path):
    model, prov = make_case("qwen2", "sliced")
    export.save(model, tiny_tokenizer(), tmp_path / "ck", layout="sliced", provenance=prov)
    return tmp_path / "ck"


def test_inspect_reports_layout_and_widths(checkpoint, capsys):
    r = inspect_checkpoint(str(checkpoint))
    assert r.exit_code == 0 and r.data["ok"]
    assert r.data["layout"] == "sliced" and r.data["ffn"]["widths"] == [16, N, 8]
    assert r.data["ffn"]["padding"] == [0, 0, 4] and "padding neurons" in r.markdown
    assert cli_main(["inspect", str(checkpoint)]) == 0
    assert "All hashes match" in capsys.readouterr().out


def test_tampered_tensor_file_exit_1(checkpoint):
    f = checkpoint / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    r = inspect_checkpoint(str(checkpoint))
    assert r.exit_code == 1 and any("sha256 mismatch" in p for p in r.data["problems"])
    assert cli_main(["inspect", str(checkpoint)]) == 1


def test_truncated_tensor_file_exit_1(checkpoint):
    f = checkpoint / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    r = inspect_checkpoint(str(checkpoint))
    assert r.exit_code == 1
    assert any("truncated" in p for p in r.data["problems"])


def test_inspect_without_manifest_is_usage_error(tmp_path):
    make_tiny("llama").save_pretrained(tmp_path / "plain")
    with pytest.raises(UsageError, match="not a surgery checkpoint"):
        inspect_checkpoint(str(tmp_path / "plain"))


# ---- diff from weights alone ------------------------------------------------------------------------------------
def _base_folder(arch: str, tmp_path: Path) -> Path:
    make_tiny(arch).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3", "gpt_neox"])
def test_diff_finds_zeroed_scaled_amplified_and_heads(arch, tmp_path):
    base = _base_folder(arch, tmp_path)
    model, prov = make_case(arch, "zeroed")
    export.save(model, None, tmp_path / "ed", layout="zeroed", provenance=prov)
    (tmp_path / "ed" / "surgery.json").unlink()  # weights alone
    r = diff_checkpoints(str(base), str(tmp_path / "ed"))
    L = r.data["layers"]
    assert L[1]["zeroed"] == [3, 7, 9] and L[0]["zeroed"] == [] and L[2]["zeroed"] == []
    assert L[2]["scaled"] == [{"neuron": 4, "factor": 2.5}, {"neuron": 5, "factor": 0.5}]
    assert L[2]["amplified"] == [4] and "AMPLIFIED layer 2: 4 x2.5" in r.markdown
    assert L[0]["heads_zeroed"] == [1] and L[1]["heads_zeroed"] == []
    assert all(not x["modified"] for x in L) and r.data["other_tensors"] == []


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
@pytest.mark.parametrize("layout", ["sliced", "padded"])
def test_diff_reports_sliced_widths_exactly(arch, layout, tmp_path):
    base = _base_folder(arch, tmp_path)
    model, _ = make_case(arch, layout)
    export.save(model, None, tmp_path / "pr", layout=layout)
    r = diff_checkpoints(str(base), str(tmp_path / "pr"), out=str(tmp_path / "rep"))
    L = r.data["layers"]
    removed = {l: sorted(set(range(N)) - set(k)) for l, k in KEEP.items()}
    if layout == "sliced":
        assert r.data["summary"]["widths"] == [16, N, 8]
        assert L[0]["removed"] == removed[0] and L[2]["removed"] == removed[2] and L[1]["removed"] == []
        assert all(x["unmatched"] == 0 and not x["zeroed"] for x in L)
        assert [x["padding"] for x in L] == [0, 0, 4]
    else:
        assert r.data["summary"]["widths"] == [N, N, N]
        assert L[0]["zeroed"] == removed[0] and L[2]["zeroed"] == removed[2]
    assert (tmp_path / "rep" / "diff.json").exists()


def test_diff_lists_other_changed_tensors(tmp_path):
    base = _base_folder("llama", tmp_path)
    model = make_tiny("llama")
    with torch.no_grad():
        ModelView(model).layer(1).self_attn.q_proj.weight.add_(0.01)  # e.g. a merged LoRA delta
    model.save_pretrained(tmp_path / "lora")
    r = diff_checkpoints(str(base), str(tmp_path / "lora"))
    assert [o["tensor"] for o in r.data["other_tensors"]] == ["model.layers.1.self_attn.q_proj.weight"]
    assert abs(r.data["other_tensors"][0]["max_abs_diff"] - 0.01) < 1e-3


# ---- big models: device_map, offload -----------------------------------------------------------------------------
def test_export_from_device_map_and_offloaded_model(tmp_path):
    from transformers import AutoModelForCausalLM

    base = _base_folder("llama", tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager").eval()
    x = tiny_inputs()
    dm = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    m = AutoModelForCausalLM.from_pretrained(
        base, device_map=dm, offload_folder=str(tmp_path / "off"), attn_implementation="eager"
    ).eval()
    assert any(p.device.type == "meta" for p in m.parameters())  # really offloaded
    export.save(m, None, tmp_path / "out", layout="zeroed")
    back = export.load(tmp_path / "out", attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(back(**x).logits, ref(**x).logits, atol=ATOL, rtol=0)


# ---- adapters ------------------------------------------------------------------------------------------------------
def test_adapter_saved_in_peft_format_and_merged(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = make_tiny("llama")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    x = tiny_inputs()
    with torch.no_grad():
        ref = peft_model(**x).logits
    export.save(
        peft_model.base_model.model,
        None,
        tmp_path / "ck",
        layout="zeroed",
        adapter_model=peft_model,
        merge=True,
        provenance={"seed": 3},
    )
    assert (tmp_path / "ck" / "adapter" / "adapter_config.json").exists()
    back = export.load(tmp_path / "ck", attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(back(**x).logits, ref, atol=ATOL, rtol=0)
    m = json.loads((tmp_path / "ck" / "surgery.json").read_text())
    assert m["adapter"] == {"path": "adapter", "merged": True} and m["lora"]["default"]["r"] == 2
    assert isinstance(PeftModel.from_pretrained(make_tiny("llama"), tmp_path / "ck" / "adapter"), PeftModel)


# ---- the real model -------------------------------------------------------------------------------------------------
@pytest.mark.real
@pytest.mark.slow
def test_real_smollm2_sliced_round_trip_and_diff(smol, tmp_path, clean_python):
    model = copy.deepcopy(smol.model)
    g = torch.Generator().manual_seed(0)
    keep = {l: torch.randperm(1536, generator=g)[: 500 + 37 * l].sort().values for l in (3, 10, 17, 29)}
    widths = slice_ffn(model, keep)
    prompt = "Calculate: 3+5="
    ids = smol.tokenizer(prompt, return_tensors="pt").input_ids
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    out = tmp_path / "smol-sliced"
    export.save(model, smol.tokenizer, out, layout="sliced", base="smollm2-135m", max_shard_size="200MB")
    res = load_in_clean_env(
        clean_python,
        [
            {
                "path": str(out),
                "remote": True,
                "ids": str(tmp_path / "ids.pt"),
                "logits": str(tmp_path / "l.pt"),
                "prompt": prompt,
                "attn": model.config._attn_implementation,
            }
        ],
        tmp_path,
    )
    torch.testing.assert_close(torch.load(tmp_path / "l.pt"), ref, atol=ATOL, rtol=0)
    assert res[str(out)]["text"] == greedy_text(model, smol.tokenizer, prompt)
    r = diff_checkpoints("smollm2-135m", str(out))
    assert r.data["summary"]["widths"] == [widths.get(l, 1536) for l in range(30)]
    for l, k in keep.items():
        assert r.data["layers"][l]["removed"] == sorted(set(range(1536)) - set(k.tolist()))
    assert inspect_checkpoint(str(out)).exit_code == 0


@pytest.mark.real
@pytest.mark.slow
def test_real_smollm2_debiased_diff_exact(smol, tmp_path):
    model = copy.deepcopy(smol.model)
    v = ModelView(model)
    v.zero_neuron_weights(18, [5, 77, 1200])
    v.scale_neuron_values(20, [9], 3.0)
    export.save(model, smol.tokenizer, tmp_path / "deb", layout="zeroed")
    r = diff_checkpoints("smollm2-135m", str(tmp_path / "deb"))
    edited = {l["layer"]: (l["zeroed"], l["scaled"]) for l in r.data["layers"] if l["zeroed"] or l["scaled"]}
    assert edited == {18: ([5, 77, 1200], []), 20: ([], [{"neuron": 9, "factor": 3.0}])}
    assert r.data["other_tensors"] == [] and r.data["layers"][20]["amplified"] == [9]
