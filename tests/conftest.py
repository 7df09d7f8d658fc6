"""Shared fixtures: tiny random-init models of every supported architecture, and the real SmolLM2 (marked)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one thread each (no spinning)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
import transformers as T

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

VOCAB, D, N, LAYERS, HEADS = 96, 32, 48, 3, 4


def tiny_config(arch: str):
    """A tiny config of `arch` exercising its quirks (GQA, biases, Conv1D, fused gate_up, parallel residual, post-FFN
    norm)."""
    common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    llama_like = dict(
        hidden_size=D,
        intermediate_size=N,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        **common,
    )
    if arch == "llama":
        return T.LlamaConfig(**llama_like, attention_bias=True, mlp_bias=True)
    if arch == "mistral":
        return T.MistralConfig(**llama_like)
    if arch == "qwen2":
        return T.Qwen2Config(**llama_like)
    if arch == "gemma3":
        return T.Gemma3TextConfig(**llama_like, head_dim=8, sliding_window=4, final_logit_softcapping=30.0)
    if arch == "phi3":
        return T.Phi3Config(**llama_like)
    if arch == "gpt2":
        return T.GPT2Config(n_embd=D, n_layer=LAYERS, n_head=HEADS, n_inner=N, n_positions=128, **common)
    if arch == "gptj":
        return T.GPTJConfig(n_embd=D, n_layer=LAYERS, n_head=HEADS, n_inner=N, rotary_dim=4, n_positions=128, **common)
    if arch == "gpt_neox":
        return T.GPTNeoXConfig(
            hidden_size=D,
            intermediate_size=N,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=128,
            **common,
        )
    raise KeyError(arch)


ARCHS = ["llama", "mistral", "qwen2", "gemma3", "phi3", "gpt2", "gptj", "gpt_neox"]


def make_tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny fp32 random-init causal LM of `arch`, eval mode, with non-trivial norm weights and biases."""
    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    cfg._attn_implementation = "eager"
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: perturb so identities are tested for real
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(params=ARCHS)
def tiny(request):
    return make_tiny(request.param)


def tiny_inputs(batch: int = 3, seq: int = 7, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(scope="session")
def smol():
    """The real SmolLM2-135M (fp32), converted once into checkpoints/base/; skipped if the package is absent."""
    pytest.importorskip("gguf")
    from surgery.io.loading import ModelNotFound, load_model

    try:
        return load_model("smollm2-135m")
    except ModelNotFound as e:  # pragma: no cover - only without the embedded package
        pytest.skip(str(e))


SMOL_DIR = "checkpoints/base/smollm2-135m"


@pytest.fixture(scope="session")
def tiny_smol_dir(tmp_path_factory):
    """A tiny 4-layer Llama with the real SmolLM2 tokenizer, saved as a HF folder (loads in a second): for CLI
    tests that need real prompts but not real weights."""
    import shutil
    from pathlib import Path

    smol = Path(SMOL_DIR)
    if not (smol / "tokenizer.json").exists():
        pytest.skip("needs the converted SmolLM2 tokenizer (make setup)")
    cfg = T.LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    T.AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smol / f, d / f)
    return d
