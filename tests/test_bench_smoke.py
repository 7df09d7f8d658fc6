"""Every script in bench/ keeps running: each runs its whole code path with --smoke (a tiny random model with
SmolLM2's tokenizer, or no model, at the smallest sizes; files only under a temporary folder), all in ONE child
interpreter (bench/_smoke.py run_all: torch and transformers import once, not 17 times), and each must exit 0 and
print the line it always ends with. A new bench without an entry here fails `test_every_bench`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOL = ROOT / "checkpoints" / "base" / "smollm2-135m"
needs_tokenizer = pytest.mark.skipif(
    not (SMOL / "tokenizer.json").exists(), reason="needs SmolLM2's tokenizer in checkpoints/base (make setup)"
)
slow = pytest.mark.slow

SPEEDUP = r"^speedup [\d.]+x \("
# bench -> (marks, lines its --smoke output must contain: regexes, matched per line)
BENCHES = {
    "circuit": ([needs_tokenizer, slow], [r"^56 components x 4 prompts", SPEEDUP + r"reference .*identical=true$"]),
    "cna": (
        [needs_tokenizer, slow],
        [
            r"^certified \d/2; max \|score diff\| ",
            SPEEDUP + r"reference .*identical=true$",
            r"certified \d/2; margin 8, ablated 1\.4$",
            r"^work model per case \(GMAC\): ",
        ],
    ),
    "cna_ab": (
        [needs_tokenizer, slow],
        [r" score: surgery per case ms: min [\d.]+", r" ablate 1\.4: surgery per case ms: min [\d.]+"],
    ),
    "cna_aggregate": (
        [needs_tokenizer, slow],
        [r"^4 cases, layers 2-3, score delta: pearson ", r"^top 50%: Jaccard\(exact CNA, activation\) = [\d.]+"],
    ),
    "cna_parts": (
        [needs_tokenizer, slow],
        [r"^topk k 32 of ", r"^gemm 16 rows", r"^bounds with vocabulary range only: ", r"^mm share of a batch-2 "],
    ),
    "cna_peak": ([needs_tokenizer, slow], [r"^scan 4 cases, .*: peak RSS \d+ MB; at the peak heap "]),
    "cna_scan": ([needs_tokenizer, slow], [r"^GEMM rate ", r"^scan 4 cases: .*certified \d/4, .* VmHWM \d+ MB$"]),
    "cna_vocab": (
        [needs_tokenizer, slow],
        [r"^vocab llama: [\d.]+x SmolLM2's cost", r"^vocab gemma3: [\d.]+x SmolLM2's cost"],
    ),
    "compensation_error": (
        [needs_tokenizer, slow],
        [r"^layer 3: removed 32", r"^error ratio \(compensated / uncompensated.*: all [\d.]+, no-first [\d.]+"],
    ),
    "finetune": ([needs_tokenizer, slow], [SPEEDUP + r"full [\d.]+s, precise [\d.]+s\), trained [\d,]+ of "]),
    "deploy": (
        [needs_tokenizer, slow],
        [
            r"^round 1/1: (dense|pruned) [\d.]+ tok/s",
            r"^\| generation tok/s \| [\d.]+ \| [\d.]+ \| [\d.]+x \| [\d.]+x \|$",
        ],
    ),
    "heads": ([needs_tokenizer, slow], [r"^12 heads x \d+ cases", SPEEDUP + r"reference .*identical=true$"]),
    "keep_overlap": ([], [r"^\| 25% \| cna \| random \| [\d.]+ \|", r"^overlap 2 budgets, 6 selector pairs$"]),
    "no_recovery": ([needs_tokenizer, slow], [r"^original: 1-digit ", r"^compensated 50% magnitude: 1-digit [\d.]+"]),
    "pack_work": (
        [needs_tokenizer, slow],
        [r"^capitals\.csv \(20 rows\)", r"^arithmetic digits \(1, 2\) \(limit 20\)"],
    ),
    "prune": (
        [needs_tokenizer, slow],
        [
            r"^peak RSS \(load \+ forward, fresh process\): dense \d+ MiB",
            r"^model .*: sweep .*: 6 cells",
            SPEEDUP + r"dense [\d.]+s, sliced [\d.]+s\), params [\d,]+ -> [\d,]+$",
        ],
    ),
    "runtime_accuracy": (
        [needs_tokenizer, slow],
        [r"^\| llama\.cpp, f32 KV cache \| [\d.]+% \[.*\] \(\d+/8\) \| 0 \|$"],
    ),
    "train_step": ([needs_tokenizer, slow], [SPEEDUP + r"fp32 [\d.]+s, bf16 [\d.]+s\), loss fp32 [\d.]+ bf16"]),
    "gpu_check": ([needs_tokenizer, slow], [r"^gpu_check: 8/8 checks ok \(cpu \(dry run\)\)$"]),
    "scale": ([needs_tokenizer], [r"^scale tiny: cna [\d.]+/case \([\d.]+x a batched forward\), peak [\d.]+ GB$"]),
    "uniform": (
        [needs_tokenizer, slow],
        [r"^\| uniform \| [\d.]+% .* \| \d+ \| \d+ in every layer \|$", r"^\| per-layer \| [\d.]+% .* \| \d+ \| "],
    ),
    "widths": ([], [r"^d=576 tokens=8 threads=1 ", r"^\s+80\s+[\d.]+\s+[\d.]+"]),
}


def bench_scripts() -> set[str]:
    """The benches: bench/*.py but the helpers (a leading underscore, e.g. _smoke.py)."""
    return {p.stem for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_")}


def test_every_bench_has_a_smoke_run():
    assert bench_scripts() == set(BENCHES), "add the bench to BENCHES (with its --smoke) or remove the stale entry"


@pytest.fixture(scope="module")
def smoke_runs(request) -> dict[str, dict]:
    """Every selected bench's --smoke, run once for the module in ONE child interpreter (bench/_smoke.py run_all:
    each as __main__ with its own argv, output captured per bench): {name: {"rc", "stdout", "stderr"}}."""
    names = [i.callspec.params["name"] for i in request.session.items if i.originalname == "test_bench_smoke"]
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
    )
    report = request.getfixturevalue("tmp_path_factory").mktemp("bench-smoke") / "runs.json"
    try:
        done = subprocess.run(
            [sys.executable, "bench/_smoke.py", str(report), *names],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
    except subprocess.TimeoutExpired as e:  # pragma: no cover - a hang
        pytest.fail(f"the bench smokes ran past {e.timeout}s")
    assert report.exists(), f"bench/_smoke.py exited {done.returncode} before reporting:\n{done.stderr[-3000:]}"
    return json.loads(report.read_text())


@pytest.mark.parametrize("name", [pytest.param(n, marks=marks, id=n) for n, (marks, _) in BENCHES.items()])
def test_bench_smoke(name, smoke_runs):
    out = smoke_runs[name]
    assert out["rc"] == 0, f"bench/{name}.py --smoke exited {out['rc']}:\n{out['stderr'][-3000:]}"
    lines = out["stdout"].splitlines()
    for pattern in BENCHES[name][1]:
        assert any(re.search(pattern, line) for line in lines), f"no line matches {pattern!r} in:\n{out['stdout']}"


def test_a_broken_bench_is_reported_and_the_rest_still_run(tmp_path):
    """The one-interpreter runner reports a bench that raises (rc 1, its traceback) and goes on to the next."""
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "_smoke.py").write_text((ROOT / "bench" / "_smoke.py").read_text())
    (bench / "boom.py").write_text("print('before')\nraise ValueError('boom')\n")
    (bench / "fine.py").write_text("import sys\nprint('ok', sys.argv[1:])\n")
    report = tmp_path / "runs.json"
    subprocess.run([sys.executable, str(bench / "_smoke.py"), str(report), "boom", "fine"], check=True, timeout=120)
    runs = json.loads(report.read_text())
    boom = runs["boom"]
    assert boom["rc"] == 1 and "before" in boom["stdout"] and "ValueError: boom" in boom["stderr"]
    assert runs["fine"] == {"rc": 0, "stdout": "ok ['--smoke']\n", "stderr": ""}
