"""The vLLM folder (surgery/io/vllm_config.py) read the way vLLM's loader reads it; vLLM itself cannot run here.

`vllm_reads` re-does, step by step, what vLLM main does with the folder (sources as stored in the public code
index: vllm/transformers_utils/config.py @ 0036026e, vllm/config/model.py @ 0052a5b8,
vllm/model_executor/models/nemotron_nas.py @ 00bd1493):
- the config object: `nemotron-nas` is in neither vLLM's config registry nor transformers, so vLLM falls back to
  `AutoConfig.from_pretrained(folder, trust_remote_code=True)`, i.e. the folder's configuration_decilm.py;
- `ModelConfig.get_total_num_kv_heads`: for model_type nemotron-nas, num_attention_heads // n_heads_in_group of
  the first block whose attention is not a no-op;
- `DeciLMDecoderLayer.__init__`: per layer, attention with num_attention_heads // block.attention.n_heads_in_group
  kv heads; the FFN width `_ffn_mult_to_intermediate_size(ffn_mult)` (rounded up to 256) if the ffn block HAS an
  ffn_mult attribute, else `block.ffn.intermediate_size`; q/k/v biases from `qkv_bias` if the config has it, else
  `attention_bias`, the output projection's from `attention_bias`; the MLP's from `mlp_bias`; `ffn.no_op`: no FFN;
- `DeciLMForCausalLM.load_weights`: Llama's names, the LM head skipped when tie_word_embeddings.
The test then builds that model in torch (Llama layers at the widths read), loads the folder's safetensors into it
with strict=True (every name and shape must match) and compares its logits with the sliced model's.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import transformers as T
from conftest import make_tiny
from test_gguf import WIDTHS, needs_tokenizer, sliced, tiny, tokenizer

from surgery.errors import UsageError
from surgery.io.vllm_config import write_vllm


def _ffn_mult_to_intermediate_size(ffn_mult: float, n_embd: int) -> int:  # nemotron_nas.py, verbatim logic
    intermediate_size = int(2 * ffn_mult * n_embd / 3)
    return intermediate_size if intermediate_size % 256 == 0 else intermediate_size + 256 - intermediate_size % 256


def vllm_reads(folder) -> SimpleNamespace:
    """What vLLM's DeciLM path takes from `folder`: config, kv heads and FFN width per layer, biases."""
    cfg = T.AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
    assert cfg.model_type == "nemotron-nas" and cfg.architectures == ["DeciLMForCausalLM"]
    total_kv = next(
        cfg.num_attention_heads // b.attention.n_heads_in_group for b in cfg.block_configs if not b.attention.no_op
    )
    layers = []
    for i in range(cfg.num_hidden_layers):
        block = cfg.block_configs[i]
        kv = None if block.attention.no_op else cfg.num_attention_heads // block.attention.n_heads_in_group
        if block.ffn.no_op:
            width = 0
        elif hasattr(block.ffn, "ffn_mult"):
            width = _ffn_mult_to_intermediate_size(block.ffn.ffn_mult, cfg.hidden_size)
        else:
            width = block.ffn.intermediate_size
        act = block.ffn.hidden_act if hasattr(block.ffn, "hidden_act") else cfg.hidden_act
        layers.append({"kv_heads": kv, "width": width, "act": act})
    attention_bias = getattr(cfg, "attention_bias", False) or getattr(cfg, "bias", False)
    qkv_bias = cfg.qkv_bias if hasattr(cfg, "qkv_bias") else attention_bias
    return SimpleNamespace(
        config=cfg,
        total_kv_heads=total_kv,
        layers=layers,
        qkv_bias=qkv_bias,
        o_bias=attention_bias,
        mlp_bias=getattr(cfg, "mlp_bias", False),
    )


class _NoFFN(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def build_as_vllm(read: SimpleNamespace) -> torch.nn.Module:
    """A torch model with the layers vLLM's DeciLM builds from `read` (Llama layers at each read width)."""
    cfg = read.config
    base = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=read.total_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=cfg.rope_parameters,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=read.qkv_bias,
        mlp_bias=read.mlp_bias,
        intermediate_size=max(layer["width"] for layer in read.layers),
    )
    model = T.LlamaForCausalLM(T.LlamaConfig(**base)).eval()
    for i, layer in enumerate(read.layers):
        block = model.model.layers[i]
        assert layer["act"] == "silu" and layer["kv_heads"] == read.total_kv_heads
        block.mlp = (
            T.models.llama.modeling_llama.LlamaMLP(T.LlamaConfig(**{**base, "intermediate_size": layer["width"]}))
            if layer["width"]
            else _NoFFN()
        )
        if not read.o_bias:
            block.self_attn.o_proj.bias = None
    return model


def load_folder(model: torch.nn.Module, folder) -> None:
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    expected = {k for k in model.state_dict() if not (model.config.tie_word_embeddings and k.startswith("lm_head."))}
    assert set(state) == expected, (sorted(set(state) ^ expected))[:6]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


@needs_tokenizer
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_per_layer_widths_as_vllm_reads_them(arch, tmp_path):
    """Exact widths 64 and 96 (not multiples of 256) come out of vLLM's reading as they went in, a layer cut to no
    neuron as one zero neuron (its FFN output bias kept, as transformers computes it); the model vLLM builds from
    the folder computes what the sliced model computes."""
    widths = {**WIDTHS, 1: 0}
    model, tok = sliced(tiny(arch), widths), tokenizer()
    record = write_vllm(model, tok, tmp_path / "v")
    assert record["remote_code"] and record["serve"].endswith("--trust-remote-code")
    raw = json.loads((tmp_path / "v" / "config.json").read_text())
    assert all("ffn_mult" not in b["ffn"] for b in raw["block_configs"])  # an ffn_mult would round to 256
    read = vllm_reads(tmp_path / "v")
    assert [layer["width"] for layer in read.layers] == [64, 1, 96]
    assert read.total_kv_heads == 2 and read.config.head_dim == 16
    assert read.qkv_bias == (arch in ("llama", "qwen2")) and read.o_bias == (arch == "llama")
    rebuilt = build_as_vllm(read)
    load_folder(rebuilt, tmp_path / "v")
    ids = torch.tensor([tok.encode("Calculate: 12+7= and the capital of France is")])
    with torch.no_grad():
        assert torch.allclose(rebuilt(ids).logits, model(ids).logits, atol=1e-5)
    back = T.AutoTokenizer.from_pretrained(str(tmp_path / "v"))
    assert back.encode("Calculate: 12+7=") == tok.encode("Calculate: 12+7=")


@needs_tokenizer
def test_one_width_is_the_stock_config_without_code(tmp_path):
    model, tok = sliced(tiny("llama"), {0: 32, 1: 32, 2: 32}), tokenizer()
    record = write_vllm(model, tok, tmp_path / "v")
    assert not record["remote_code"] and not (tmp_path / "v" / "configuration_decilm.py").exists()
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["intermediate_size"] == 32 and "auto_map" not in cfg
    back = T.AutoModelForCausalLM.from_pretrained(str(tmp_path / "v")).eval()  # no remote code
    ids = torch.tensor([[1, 44, 45, 46, 47]])
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, model(ids).logits, atol=1e-5)


@needs_tokenizer
def test_vllm_refusals_are_one_line(tmp_path):
    gemma = make_tiny("gemma3")
    sliced(gemma, {0: 8, 1: 16, 2: 48})
    with pytest.raises(UsageError, match="vLLM has no per-layer-width graph for gemma3_text; prune with --uniform"):
        write_vllm(gemma, tokenizer(), tmp_path / "g")
    windowed = sliced(tiny("mistral"), WIDTHS)
    windowed.config.sliding_window = 16
    with pytest.raises(UsageError, match="sliding window"):
        write_vllm(windowed, tokenizer(), tmp_path / "m")
    compensated = sliced(tiny("llama"), WIDTHS)
    compensated.config.surgery_ffn_out_bias = True
    with pytest.raises(UsageError, match="compensate=true"):
        write_vllm(compensated, tokenizer(), tmp_path / "c")
    assert not any(tmp_path.iterdir())


@needs_tokenizer
def test_export_command_writes_a_vllm_folder(tmp_path, capfd):
    from surgery.cli import main
    from surgery.io.checkpoint import save

    ckpt = tmp_path / "ckpt"
    save(sliced(tiny("qwen2"), WIDTHS), tokenizer(), ckpt, layout="sliced")
    out = tmp_path / "out"
    assert main(["export", str(ckpt), "--format", "vllm", "--out", str(out)]) == 0
    assert "vllm serve" in capfd.readouterr().out
    assert [layer["width"] for layer in vllm_reads(out).layers] == [64, 32, 96]
    assert json.loads((out / "report.json").read_text())["results"]["architecture"] == "DeciLMForCausalLM"
