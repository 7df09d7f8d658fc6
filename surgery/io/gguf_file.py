"""GGUF files that llama.cpp runs, written from a Hugging Face model in memory (pruned, edited or untouched).

    path = write_gguf(model, tokenizer, "out/model-f32.gguf", "f32", manifest)   # -> GgufWritten

One writer for the architectures llama.cpp shares a graph with (the arch table's `gguf` name). A model whose
layers all have the same FFN width is written as its own llama.cpp architecture (`llama`, `qwen2`, ...). One with
per-layer widths (a sliced `surgery prune`) is written as `deci` where the table allows it: llama.cpp's DeciLM
graph is the Llama graph (RMSNorm, RoPE NORM, SiLU-gated FFN, optional q/k/v biases, tied output fallback) and
builds each layer at its own `feed_forward_length[i]`, while the `llama` / `qwen2` builders size every layer's FFN
from layer 0 and refuse the file.

What follows llama.cpp's own converter (convert_hf_to_gguf.py, as vendored in llama-cpp-python 0.3.36):
- Q and K rows are permuted from the HF rotate-half layout to llama.cpp's interleaved NORM rope for `llama` and
  `deci` (biases too: Qwen2 under `deci`); `qwen2` reads the HF layout (NEOX rope) as it is;
- 1-D tensors (norms, biases) stay f32; `--gguf-type` applies to the matrices;
- the tokenizer: a byte-level BPE vocabulary as `gpt2` with the pre-tokenizer named by the hash of a fixed text
  (`gguf_pretokenizers`), token types (control for special added tokens), merges, special-token ids, add-BOS/EOS
  flags and the chat template (gguf-py's SpecialVocab);
- a tied LM head is not written: llama.cpp falls back to the token embedding.

The provenance of a surgery checkpoint (its surgery.json) goes into the metadata as `surgery.manifest`, and
`surgery.digest` is a SHA-256 over every other key-value pair and every tensor's bytes, so `surgery inspect`
tells an edited GGUF from the one written here (`verify_gguf`).
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import numpy as np
import torch
from torch import nn

from surgery.errors import UsageError
from surgery.io.gguf_pretokenizers import CHECK_TEXT, NAMES
from surgery.model.arch import ModelView

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
BLOCK = {"q8_0": 32, "q4_0": 32}  # the block a row length must be a multiple of
MANIFEST_KEY, DIGEST_KEY = "surgery.manifest", "surgery.digest"


@dataclass
class GgufWritten:
    path: Path
    arch: str  # the llama.cpp architecture written (general.architecture)
    gguf_type: str
    widths: list[int]
    tensors: int
    bytes: int


# ---- which llama.cpp architecture -----------------------------------------------------------------------------
def gguf_arch(model: nn.Module) -> str:
    """The llama.cpp architecture `model` is written as: the table's own name when every layer has one FFN width,
    `deci` for per-layer widths where the table allows it; otherwise one line saying what to do."""
    view = ModelView(model)
    name = view.arch.gguf
    if name is None:
        why = f" ({view.arch.gguf_missing})" if view.arch.gguf_missing else ""
        raise UsageError(
            f"no GGUF export for {model.config.model_type!r}{why}; export the safetensors checkpoint instead"
        )
    widths = view.ffn_widths()
    if len(set(widths)) == 1:
        return name
    if view.arch.gguf_per_layer:
        return "deci"
    raise UsageError(
        f"{model.config.model_type} with per-layer FFN widths has no llama.cpp architecture (its {name} graph "
        "builds every layer at one width); prune with --uniform (one width for every layer) or export the "
        "padded layout (--layout padded)"
    )


def check_type(model: nn.Module, gguf_type: str) -> None:
    """A block type needs every matrix row length (hidden size and each FFN width) to be a multiple of its
    block; one line naming the first that is not, and the `--multiple` that fixes it."""
    if gguf_type not in TYPES:
        raise UsageError(f"unknown --gguf-type {gguf_type!r}; use one of {', '.join(TYPES)}")
    block = BLOCK.get(gguf_type)
    if block is None:
        return
    view = ModelView(model)
    lengths = {"hidden size": view.hidden_size, **{f"layer {i} FFN width": w for i, w in enumerate(view.ffn_widths())}}
    for what, n in lengths.items():
        if n % block:
            raise UsageError(
                f"--gguf-type {gguf_type} stores rows in blocks of {block}, but the {what} is {n}; prune with "
                f"--multiple {block} (widths rounded up to a multiple of {block}) or use --gguf-type f32, f16 or bf16"
            )


# ---- tensors ------------------------------------------------------------------------------------------------
def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows -> llama.cpp interleaved rows, per head (llama.cpp's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_freqs(config) -> torch.Tensor | None:
    """Llama-3.1-style rope scaling as llama.cpp's `rope_freqs` factors (None for plain rope)."""
    params = getattr(config, "rope_parameters", None) or {}
    if str(params.get("rope_type", "")).lower() != "llama3":
        return None
    base = params.get("rope_theta", 10000.0)
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old = params.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _tensors(model: nn.Module, arch: str, empty: int = 1) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, fp32 tensor) for every weight llama.cpp reads, in the converter's layout; a layer cut to no
    FFN neuron gets `empty` all-zero neurons."""
    import gguf

    cfg = model.config
    view = ModelView(model)
    names = gguf.get_tensor_name_map(_MODEL_ARCH(arch), view.n_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    conv1d = {f"{n}.weight" for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    for hf_name, t in model.state_dict().items():
        if tied and hf_name.startswith(view.arch.lm_head + "."):
            continue
        if hf_name.endswith(("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")):  # buffers, not weights
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UsageError(
                f"no GGUF name for tensor {hf_name!r} of {arch}; this checkpoint has parts llama.cpp lacks"
            )
        t = t.detach().to("cpu", torch.float32)
        if 0 in t.shape:  # an FFN cut to no neuron: `empty` zero neurons instead (see _written_widths)
            t = torch.zeros([n or empty for n in t.shape])
        if hf_name in conv1d:  # GPT-2 Conv1D keeps [in, out]; llama.cpp reads [out, in] like a Linear
            t = t.T.contiguous()
        yield name, _converted(t, hf_name, arch, view)
    freqs = _rope_freqs(cfg)
    if freqs is not None:
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS], freqs


_NORM_ROPE = ("llama", "deci")  # llama.cpp graphs that rotate interleaved pairs; the others read HF's rotate-half


def _converted(t: torch.Tensor, hf_name: str, arch: str, view: ModelView) -> torch.Tensor:
    """What llama.cpp's converter changes in a tensor (as convert_hf_to_gguf.py does), from the arch table's facts:
    - under a NORM-rope llama.cpp graph (`_NORM_ROPE`): Q and K rows (and biases) from the HF rotate-half layout to
      llama.cpp's interleaved one;
    - `rms1p` norms (Gemma's x * (1 + w)): every norm weight + 1, as llama.cpp computes x * w;
    - a `heads` qkv layout (NeoX's per-head [q_h | k_h | v_h] rows): regrouped to [q | k | v]."""
    table = view.arch
    if arch in _NORM_ROPE:
        if hf_name.endswith(_suffixes(table.attn_qkv[0])):
            return _permute(t, view.n_heads)
        if hf_name.endswith(_suffixes(table.attn_qkv[1])):
            return _permute(t, view.n_kv_heads)
    if table.norm_kind == "rms1p" and hf_name.endswith("norm.weight"):
        return t + 1.0
    if table.qkv_layout == "heads" and hf_name.endswith(_suffixes(table.attn_qkv[0])):
        n, dh = view.n_heads, view.head_dim
        grouped = t.reshape(n, 3, dh, *t.shape[1:])
        return torch.cat([grouped[:, i].reshape(n * dh, *t.shape[1:]) for i in range(3)])
    return t


def _suffixes(path: str) -> tuple[str, str]:
    return f"{path}.weight", f"{path}.bias"


def _MODEL_ARCH(name: str):  # noqa: N802 - gguf's enum, looked up by its llama.cpp name
    import gguf

    return next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == name)


def _encode(t: torch.Tensor, gguf_type: str):
    """(array, raw_dtype or None) for GGUFWriter.add_tensor: 1-D tensors f32, matrices in `gguf_type`."""
    import gguf

    data = t.numpy()
    if data.ndim == 1 or gguf_type == "f32":
        return data.astype(np.float32), None
    if gguf_type == "f16":
        return data.astype(np.float16), None
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}.get(
        gguf_type, gguf.GGMLQuantizationType.Q4_0
    )
    return gguf.quants.quantize(data, qtype), qtype


_FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32}  # llama_ftype


# ---- metadata -----------------------------------------------------------------------------------------------
def _written_widths(model: nn.Module, gguf_type: str) -> list[int]:
    """Each layer's FFN width in the file: its own, except that a layer cut to no neuron is written with zero
    neurons (one, or a block of a block type): llama.cpp's `deci` skips a layer of width 0 entirely, attention
    included, while an all-zero neuron adds exactly nothing (act(0) * 0 with a zero value column), as the
    empty FFN does in transformers."""
    empty = BLOCK.get(gguf_type, 1)
    return [w or empty for w in ModelView(model).ffn_widths()]


def _hparams(w, model: nn.Module, arch: str, gguf_type: str) -> None:
    """The hyperparameters llama.cpp reads for `arch`, as its converter writes them from the HF config."""
    cfg = model.config
    view = ModelView(model)
    widths = _written_widths(model, gguf_type)
    w.add_block_count(view.n_layers)
    w.add_context_length(int(_first(cfg, "max_position_embeddings", "n_positions", default=2048)))
    w.add_embedding_length(view.hidden_size)
    w.add_feed_forward_length(widths if arch == "deci" else widths[0])
    w.add_head_count(view.n_heads)
    w.add_vocab_size(int(cfg.vocab_size))
    w.add_file_type(_FILE_TYPE[gguf_type])
    if view.arch.norm_kind == "layer":  # GPT-2, NeoX: LayerNorm, no grouped keys/values
        w.add_layer_norm_eps(float(_first(cfg, "layer_norm_epsilon", "layer_norm_eps")))
        if arch == "gptneox":  # rotary (partly) and, by default, the parallel residual
            rotary = _rope(cfg).get("partial_rotary_factor", getattr(cfg, "rotary_pct", 1.0))
            w.add_rope_dimension_count(int(rotary * view.head_dim))
            w.add_rope_freq_base(float(_rope(cfg).get("rope_theta", getattr(cfg, "rotary_emb_base", 10000.0))))
            w.add_parallel_residual(view.parallel)
        return
    w.add_head_count_kv(view.n_kv_heads)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_key_length(view.head_dim)
    w.add_value_length(view.head_dim)
    if arch == "gemma3":
        _gemma3_hparams(w, cfg)
        return
    rope = _rope(cfg)
    w.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * view.head_dim))
    if "rope_theta" in rope:
        w.add_rope_freq_base(float(rope["rope_theta"]))
    if arch == "phi3":
        w.add_rope_scaling_orig_ctx_len(
            int(rope.get("original_max_position_embeddings") or cfg.max_position_embeddings)
        )
        w.add_sliding_window(int(getattr(cfg, "sliding_window", None) or 0))


def _gemma3_hparams(w, cfg) -> None:
    """Gemma 3: global rope base (full-attention layers) and local base (sliding layers), the sliding window with
    each layer's kind as llama.cpp's per-layer pattern, final logit soft-capping, linear rope scaling if any."""
    import gguf

    scalar = getattr(cfg, "query_pre_attn_scalar", None)
    if scalar is not None and scalar != cfg.head_dim:
        raise UsageError(
            f"query_pre_attn_scalar {scalar} is not head_dim {cfg.head_dim}: llama.cpp's gemma3 graph scales "
            "queries by 1/sqrt(head_dim) (27B excepted), so this model would run differently there"
        )
    full, local = _rope(cfg, "full_attention"), _rope(cfg, "sliding_attention")
    w.add_rope_freq_base(float(full.get("rope_theta", 1_000_000.0)))
    if "rope_theta" in local:
        w.add_rope_freq_base_swa(float(local["rope_theta"]))
    if full.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(full["factor"]))
    if getattr(cfg, "final_logit_softcapping", None):
        w.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
    kinds = list(getattr(cfg, "layer_types", None) or [])
    if getattr(cfg, "sliding_window", None) and "sliding_attention" in kinds:
        w.add_sliding_window(int(cfg.sliding_window))
        w.add_sliding_window_pattern([k == "sliding_attention" for k in kinds])


def _rope(cfg, kind: str | None = None) -> dict:
    """The config's rope parameters (transformers 5 `rope_parameters`, per layer kind for Gemma 3), with the
    older top-level `rope_theta` / `partial_rotary_factor` as fallbacks."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    if kind is not None:
        params = dict(params.get(kind, params))
    for key in ("rope_theta", "partial_rotary_factor"):
        if key not in params and getattr(cfg, key, None) is not None:
            params[key] = getattr(cfg, key)
    return params


def _first(cfg, *keys: str, default=None):
    for key in keys:
        if getattr(cfg, key, None) is not None:
            return getattr(cfg, key)
    return default


def looks_special(text: str) -> bool:
    """An added token the converter makes a control token though the tokenizer does not mark it special
    (llama.cpp's `does_token_look_special`)."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<｜") and text.endswith("｜>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def _vocab(w, tokenizer, vocab_size: int) -> None:
    """The tokenizer as llama.cpp's converter writes a byte-level BPE one (its `_set_vocab_gpt2`)."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model_kind = spec.get("model", {}).get("type")
    if model_kind == "BPE" and spec["model"].get("byte_fallback"):
        _vocab_sentencepiece(w, tokenizer, vocab_size, spec)
        return
    if model_kind != "BPE":
        raise UsageError(
            f"GGUF export writes BPE tokenizers (byte-level: Llama-3, Qwen2, SmolLM; SentencePiece-style: Gemma, "
            f"Llama 2); this one is "
            f"{model_kind or type(tokenizer).__name__}"
        )
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    pre = NAMES.get(digest)
    if pre is None:
        raise UsageError(
            f"llama.cpp has no pre-tokenizer for this tokenizer (check hash {digest[:16]}...); it cannot tokenize "
            "text as transformers does, so no GGUF is written"
        )
    vocab = tokenizer.get_vocab()
    reverse = {i: tok for tok, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            special = decoder[i].special or looks_special(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if getattr(tokenizer, "add_prefix_space", None) is not None:
        w.add_add_space_prefix(bool(tokenizer.add_prefix_space))
    _special(w, tokenizer, vocab_size, merges=True)


def _special(w, tokenizer, vocab_size: int, merges: bool) -> None:
    """Special-token ids, merges (byte-level BPE), the chat template (gguf-py's SpecialVocab over the saved
    tokenizer), and whether BOS / EOS are added, as transformers adds them to "a" (where SpecialVocab found no
    flag in the tokenizer's config)."""
    import gguf

    with tempfile.TemporaryDirectory(prefix="surgery-tokenizer-") as d:
        tokenizer.save_pretrained(d)
        special = gguf.SpecialVocab(Path(d), load_merges=merges, n_vocab=vocab_size)
    with_special = tokenizer.encode("a", add_special_tokens=True)
    plain = tokenizer.encode("a", add_special_tokens=False)
    added = len(with_special) > len(plain)
    flags = {"bos": added and with_special[0] == tokenizer.bos_token_id}
    flags["eos"] = added and with_special[-1] == tokenizer.eos_token_id
    for kind, value in flags.items():
        special.add_special_token.setdefault(kind, value)
    special.add_to_gguf(w, quiet=True)


def _vocab_sentencepiece(w, tokenizer, vocab_size: int, spec: dict) -> None:
    """A SentencePiece-style tokenizer (BPE with byte fallback, spaces as U+2581: Gemma, Llama 2) as llama.cpp's
    `llama` vocabulary, the way its converter writes one (`_set_vocab_sentencepiece`): pieces, scores, token types
    (byte <0xNN>, unknown, control for special added tokens, user-defined for the other added ones).

    llama.cpp's SentencePiece tokenizer merges, at each step, the adjacent pair whose concatenation is the vocabulary
    piece with the HIGHEST score; a Hugging Face BPE merges the pair of LOWEST rank. With no tokenizer.model (the
    scores) at hand, each piece gets minus the rank of the first merge that produces it, so the two orders agree
    (transformers builds a SentencePiece vocabulary's merges in score order); pieces no merge produces (single
    characters, bytes, added tokens) get the converter's defaults. Checked on Gemma-3-270M: the same ids as
    transformers on every test prompt."""
    import gguf

    model = spec["model"]
    first: dict[str, int] = {}
    for rank, merge in enumerate(model.get("merges", [])):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        first.setdefault(a + b, rank)
    reverse = {i: piece for piece, i in model["vocab"].items()}
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    unk = model.get("unk_token")
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        if i in added:
            piece = added[i]["content"]
            special = added[i].get("special") or looks_special(piece)
            kind = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
            score = -1000.0
        elif i in reverse:
            piece = reverse[i]
            kind = gguf.TokenType.NORMAL
            if piece == unk:
                kind = gguf.TokenType.UNKNOWN
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                kind = gguf.TokenType.BYTE
            score = -float(first[piece]) if piece in first else 0.0
        else:
            piece, kind, score = f"[PAD{i}]", gguf.TokenType.UNUSED, -10000.0
        tokens.append(piece)
        scores.append(score)
        types.append(kind)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode("a", add_special_tokens=False))
    w.add_add_space_prefix(bool(pieces) and pieces[0].startswith("\u2581"))  # SentencePiece's dummy prefix
    _special(w, tokenizer, vocab_size, merges=False)


# ---- the file -----------------------------------------------------------------------------------------------
def write_gguf(
    model: nn.Module,
    tokenizer,
    path: str | Path,
    gguf_type: str = "f32",
    manifest: dict | None = None,
    name: str | None = None,
) -> GgufWritten:
    """Writes `model` + `tokenizer` as one GGUF file at `path` (atomically: a temporary file in the same folder,
    renamed when complete). `manifest`: the checkpoint's provenance, stored as `surgery.manifest`."""
    import gguf

    arch = gguf_arch(model)
    check_type(model, gguf_type)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(name or Path(str(getattr(model.config, "_name_or_path", "") or "model")).name)
        _hparams(w, model, arch, gguf_type)
        _vocab(w, tokenizer, int(model.config.vocab_size))
        count = 0
        for name, t in _tensors(model, arch, BLOCK.get(gguf_type, 1)):
            data, raw = _encode(t, gguf_type)
            w.add_tensor(name, data, raw_dtype=raw)
            count += 1
        if manifest is not None:
            w.add_string(MANIFEST_KEY, json.dumps(manifest, sort_keys=True))
        w.add_string(DIGEST_KEY, _PLACEHOLDER)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        _seal(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return GgufWritten(path, arch, gguf_type, _written_widths(model, gguf_type), count, path.stat().st_size)


_PLACEHOLDER = "0" * 64


def _seal(path: Path) -> None:
    """Replaces the placeholder digest in a written file with `file_digest` (patched in place: the same length,
    so nothing moves)."""
    at = header(path)["digest_at"]
    if at is None:
        raise RuntimeError(f"{path}: no {DIGEST_KEY} to seal")
    digest = file_digest(path)
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(digest.encode())


def file_digest(path: str | Path) -> str:
    """SHA-256 of the whole file with the 64 bytes of the surgery.digest value read as the placeholder: every
    metadata pair, tensor description, padding byte and tensor byte counts."""
    at = header(path)["digest_at"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        pos = 0
        while chunk := f.read(1 << 24):
            if at is not None and at < pos + len(chunk) and at + 64 > pos:
                buf = bytearray(chunk)
                lo, hi = max(at - pos, 0), min(at + 64 - pos, len(buf))
                buf[lo:hi] = _PLACEHOLDER.encode()[lo - (at - pos) : hi - (at - pos)]
                chunk = bytes(buf)
            h.update(chunk)
            pos += len(chunk)
    return h.hexdigest()


# ---- reading one back ---------------------------------------------------------------------------------------
# A GGUF header parser of its own: gguf-py's GGUFReader maps every element of every array (a 49k-token vocabulary
# and its merges) into numpy views, ~5 s a file on this CPU; metadata and tensor shapes need one pass over bytes.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def header(path: str | Path, max_items: int = 64) -> dict:
    """{"version", "kv": {key: value}, "tensors": {name: shape (HF order)}, "digest_at": offset of the
    surgery.digest value or None}. Arrays longer than `max_items` are read past and given as {"array": length}."""
    with open(path, "rb") as f:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _parse(data, max_items)
    except (struct.error, IndexError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})"[:200]) from e
    finally:
        data.close()


def _parse(b, max_items: int) -> dict:
    if b[:4] != b"GGUF":
        raise ValueError("no GGUF magic")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", b, 4)
    pos = 24

    def string(p: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", b, p)
        return bytes(b[p + 8 : p + 8 + n]).decode("utf-8"), p + 8 + n

    def value(kind: int, p: int):
        if kind == _STRING:
            return string(p)
        if kind == _ARRAY:
            sub, n = struct.unpack_from("<IQ", b, p)
            p += 12
            items = []
            for _ in range(n):
                v, p = value(sub, p)
                if n <= max_items:
                    items.append(v)
            return (items if n <= max_items else {"array": n}), p
        fmt = _SCALARS[kind]
        return struct.unpack_from(fmt, b, p)[0], p + struct.calcsize(fmt)

    kv, digest_at = {}, None
    for _ in range(n_kv):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", b, pos)
        if key == DIGEST_KEY and kind == _STRING:
            digest_at = pos + 4 + 8
        kv[key], pos = value(kind, pos + 4)
    tensors = {}
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", b, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", b, pos + 4)
        pos += 4 + 8 * n_dims + 4 + 8
        tensors[name] = [int(d) for d in reversed(dims)]
    return {"version": version, "kv": kv, "tensors": tensors, "digest_at": digest_at}


def read_gguf(path: str | Path) -> dict:
    """{"arch", "manifest" (dict or None), "widths", "tensors": {name: shape}, "problems": [..], "metadata"} of a
    GGUF file; problems lists what verification found (empty: the file is as surgery wrote it)."""
    h = header(path)
    kv = h["kv"]
    arch = kv.get("general.architecture")
    problems = []
    stored = kv.get(DIGEST_KEY)
    if stored is None:
        problems.append("no surgery.digest: not written by surgery, nothing to verify against")
    elif stored != file_digest(path):
        problems.append("surgery.digest does not match: the metadata or tensors were changed after export")
    manifest = kv.get(MANIFEST_KEY)
    try:
        manifest = json.loads(manifest) if isinstance(manifest, str) else None
    except json.JSONDecodeError:
        problems.append(f"{MANIFEST_KEY} is not valid JSON")
        manifest = None
    widths = kv.get(f"{arch}.feed_forward_length")
    return {
        "arch": arch,
        "manifest": manifest,
        "widths": widths if isinstance(widths, list) else [widths] * int(kv.get(f"{arch}.block_count", 0)),
        "tensors": h["tensors"],
        "problems": problems,
        "metadata": {k: v for k, v in kv.items() if not k.startswith("tokenizer.ggml.")},
    }


def field_value(f):
    """A gguf-py GGUFReader field as the plain value GGUFWriter was given (str, number, or list)."""
    import gguf

    if not f.types:
        return None
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        sub = f.types[-1]
        items = [f.parts[i] for i in f.data]
        if sub == gguf.GGUFValueType.STRING:
            return [bytes(p).decode("utf-8", "replace") for p in items]
        return [p.tolist()[0] for p in items]
    value = f.parts[f.data[0]]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(value).decode("utf-8", "replace")
    return value.tolist()[0]


# ---- tensors back to HF names (surgery diff) ----------------------------------------------------------------------
# The inverse of `_tensors`: a GGUF file's tensors under the state-dict names of the Hugging Face model a config
# describes, in HF layout, with what `_converted` and the Conv1D transpose did undone, so `surgery diff` can set an
# exported file against a checkpoint folder. Every undo is a reshuffle of the same numbers except Gemma 3's norms
# (w + 1 - 1 in float32: within one float32 rounding of w). A layer written with `empty` zero neurons (cut to none)
# reads back as that many all-zero neurons.
def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp interleaved rows -> HF rotate-half rows, per head: the inverse of `_permute`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unconverted(t: torch.Tensor, hf_name: str, arch: str, table, n_heads: int, n_kv: int, values: bool = True):
    """The inverse of `_converted` for a tensor the writer stored under `arch` (the file's general.architecture);
    `table`: the model's arch table entry. values=False (a rounding bound): the reshuffles only, no norm shift."""
    qkv = table.attn_qkv
    if arch in _NORM_ROPE:
        if hf_name.endswith(_suffixes(qkv[0])):
            return _unpermute(t, n_heads)
        if hf_name.endswith(_suffixes(qkv[1])):
            return _unpermute(t, n_kv)
    if table.norm_kind == "rms1p" and hf_name.endswith("norm.weight"):
        return t - 1.0 if values else t
    if table.qkv_layout == "heads" and hf_name.endswith(_suffixes(qkv[0])):  # [q | k | v] -> per head [q_h|k_h|v_h]
        dh = t.shape[0] // (3 * n_heads)
        return t.reshape(3, n_heads, dh, *t.shape[1:]).swapaxes(0, 1).reshape(t.shape)
    return t


def _model_names(config) -> tuple[list[str], set[str]] | None:
    """(state-dict names, Conv1D weight names) of the stock causal LM `config` describes, from an instance on the
    meta device (no weights, no remote code); None when transformers cannot build one."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        with torch.device("meta"):
            model = cls(config)
    except Exception:  # noqa: BLE001 - any failure here only means: take the names from the other side
        return None
    conv1d = {f"{n}.weight" for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    return list(model.state_dict()), conv1d


_QUANT_NAMES = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0", "Q4_0": "q4_0"}


class GgufTensors:
    """The tensors of a GGUF file (as `write_gguf` writes them) by Hugging Face name, read lazily and dequantised
    to float32 in HF layout. `config`: the checkpoint the file is compared with (its architecture must be the one
    the file was written as: the arch table's `gguf` name, or `deci` for per-layer widths); `names`: further HF
    names to look for (the other side's tensors, e.g. an FFN output bias the stock class lacks), preferred over
    the stock model's names where both map to one GGUF tensor. GGUF tensors with no HF name keep their GGUF name;
    llama.cpp's `rope_freqs` (computed from the config) is left out."""

    def __init__(self, path: str | Path, config, names=()):
        import gguf

        from surgery.model.arch import arch_for

        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(str(self.path))
            field = self.reader.fields.get("general.architecture")
            self.arch = field_value(field) if field is not None else None
        except (ValueError, OSError, KeyError, IndexError, TypeError, struct.error) as e:
            raise UsageError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})"[:200]) from None
        table = arch_for(config)
        allowed = [a for a in (table.gguf, "deci" if table.gguf_per_layer else None) if a]
        if self.arch not in allowed:
            expect = " or ".join(repr(a) for a in allowed) if allowed else "none (no GGUF export)"
            raise UsageError(
                f"{path} holds a llama.cpp {self.arch!r} model, but the checkpoint it is compared with is "
                f"{config.model_type} (GGUF architecture {expect}); diff compares two models of one architecture"
            )
        self.table = table
        self.n_heads = int(config.num_attention_heads)
        self.n_kv = int(getattr(config, "num_key_value_heads", None) or self.n_heads)
        stock = _model_names(config)
        n_layers = int(config.num_hidden_layers)
        if stock is not None:
            self.conv1d = stock[1]
        else:  # GPT-2: every projection inside a layer is a Conv1D
            paths = (*table.attn_qkv, table.attn_out, *table.ffn_in, table.ffn_out) if table.conv1d else ()
            self.conv1d = {f"{table.layers}.{l}.{p}.weight" for l in range(n_layers) for p in paths}
        tmap = gguf.get_tensor_name_map(_MODEL_ARCH(self.arch), n_layers)
        by_gguf = {t.name: t for t in self.reader.tensors}
        self.where: dict[str, str] = {}
        for hf in [*names, *(stock[0] if stock is not None else [])]:
            g = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
            if hf not in self.where and g in by_gguf and g not in self.where.values():
                self.where[hf] = g
        lm_head = f"{table.lm_head}.weight"
        embd = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
        if lm_head in names and lm_head not in self.where and getattr(config, "tie_word_embeddings", False):
            self.where[lm_head] = embd  # a tied head is not written: llama.cpp reads the embedding
        rope = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        mapped = set(self.where.values())
        self.where.update({g: g for g in by_gguf if g not in mapped and g != rope})
        self.tensors = by_gguf
        types = {t.tensor_type.name for t in self.reader.tensors if len(t.shape) > 1}
        worst = next((q for q in ("Q4_0", "Q8_0", "BF16", "F16") if q in types), None)
        other = sorted(types - set(_QUANT_NAMES))
        self.gguf_type = other[0].lower() if other else _QUANT_NAMES.get(worst, "f32")

    def names(self) -> set[str]:
        return set(self.where)

    def get(self, name: str) -> torch.Tensor | None:
        import gguf

        g = self.where.get(name)
        if g is None:
            return None
        t = self.tensors[g]
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise UsageError(f"{self.path}: cannot dequantise {g} ({t.tensor_type.name}: {e})"[:200]) from None
        return self._hf(name, g, np.array(data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)]))

    def bound(self, name: str) -> torch.Tensor | None:
        """Per entry (HF layout), how far `get(name)` may be from the value the writer was given: the rounding of
        a q8_0 / q4_0 block (from the block's stored scale d); None for a tensor stored as f32 / f16 / bf16."""
        import gguf

        g = self.where.get(name)
        t = None if g is None else self.tensors[g]
        rule = None if t is None else _ROUNDING.get(t.tensor_type.name)
        if rule is None:
            return None
        block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        scales = np.ascontiguousarray(np.asarray(t.data, dtype=np.uint8).reshape(-1, size)[:, :2])
        d = np.abs(scales.view(np.float16).astype(np.float32))  # [blocks, 1]
        per_entry = np.repeat(rule[0] * d + rule[1] * 2.0**-25, block, axis=1)
        return self._hf(name, g, per_entry.reshape([int(n) for n in reversed(t.shape)]), values=False)

    def _hf(self, name: str, g: str, x: np.ndarray, values: bool = True) -> torch.Tensor:
        """A stored tensor (GGUF layout) in HF layout: what `_converted` and the Conv1D transpose did, undone
        (for a bound, `values=False`, only the reshuffles: no Gemma 3 norm shift)."""
        x = torch.from_numpy(x)
        if g == name:  # no HF name: as stored
            return x
        x = _unconverted(x, name, self.arch, self.table, self.n_heads, self.n_kv, values)
        return x.T.contiguous() if name in self.conv1d else x


# |stored - given| <= a * |d| + m * 2^-25 per entry of a block with stored (f16) scale d, as gguf-py quantises:
# q8_0 rounds x / d to the nearest of -127..127 (half a step), q4_0 truncates x / d + 8.5 into 0..15 (half a step,
# a whole one where 16 is clipped to 15); codes are computed with the float32 scale, read back with its float16
# rounding (relative 2^-11, absolute 2^-25 below float16's normal range) times codes up to m.
_ROUNDING = {"Q8_0": (0.5 + 127 * 2.0**-10, 127), "Q4_0": (1 + 8 * 2.0**-10, 8)}


def hf_tensors(path: str | Path, config, names=()) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file by Hugging Face name, float32, HF layout (`GgufTensors`, read at once)."""
    g = GgufTensors(path, config, names)
    return {n: g.get(n) for n in sorted(g.names())}
