"""llama.cpp, through llama-cpp-python, as the runtime that checks and uses the GGUF files surgery writes.

    llm = open_gguf("out/model-f32.gguf")           # None-free: a file llama.cpp refuses raises UsageError
    ids = tokenize(llm, "Calculate: 12+7=")
    scores = logits(llm, ids)                       # [len(ids), vocab] float32, every position
    new = greedy(llm, ids, 32)                      # the next 32 token ids, argmax each step

llama-cpp-python is an optional dependency (the `gguf` extra; `make setup` installs it, building llama.cpp from
source once, then pip's wheel cache reuses the build).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from surgery.errors import UsageError
from surgery.model.batching import cache_kwargs, output_cache


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp logs model loading to fd 2 from C; keep it off the user's terminal (errors are raised)."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def open_gguf(
    path: str | Path, n_ctx: int = 512, threads: int | None = None, f32_cache: bool = True, logits_all: bool = True
):
    """A llama_cpp.Llama over `path` that keeps the logits of every position (logits_all; False: the last one
    only, as a deployment runs), on the CPU. The KV cache is f32 unless f32_cache=False (llama.cpp's default,
    f16: it alone moves SmolLM2's logits by ~3e-2, so comparisons with transformers use f32; deployments usually
    keep f16)."""
    if not available():
        raise UsageError("llama-cpp-python is not installed; `make setup` installs it (or pip install 'surgery[gguf]')")
    from llama_cpp import Llama

    threads = threads or max(1, min(os.cpu_count() or 1, int(os.environ.get("OMP_NUM_THREADS", "0")) or 8))
    try:
        with _quiet_stderr():
            return Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                logits_all=logits_all,
                verbose=False,
                n_gpu_layers=0,
                type_k=0 if f32_cache else 1,  # GGML_TYPE_F32 / GGML_TYPE_F16
                type_v=0 if f32_cache else 1,
            )
    except ValueError as e:
        raise UsageError(f"llama.cpp refused {path}: {str(e).splitlines()[0][:160]}") from e


def tokenize(llm, text: str, special: bool = True) -> list[int]:
    """llama.cpp's token ids of `text` (no BOS added: the GGUF's own add_bos_token decides, as HF's does)."""
    return llm.tokenize(
        text.encode("utf-8"), add_bos=bool(llm.metadata.get("tokenizer.ggml.add_bos_token") == "true"), special=special
    )


def logits(llm, ids: list[int]) -> np.ndarray:
    """Logits [len(ids), vocab] of every position of one sequence, from a fresh context."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def greedy(llm, ids: list[int], n: int) -> list[int]:
    """The next `n` token ids by argmax (no sampling, no stop token), as transformers' greedy decoding."""
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def transformers_greedy(model, ids: list[int], n: int) -> list[int]:
    """The same argmax decoding in transformers, with its KV cache and no stop token (generate() would also
    suppress EOS under min_new_tokens): the reference `greedy` is compared with."""
    import torch

    out, past, step = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            res = model(step, **cache_kwargs(model, past))
            past = output_cache(res)
            out.append(int(res.logits[0, -1].argmax()))
            step = torch.tensor([[out[-1]]])
    return out
