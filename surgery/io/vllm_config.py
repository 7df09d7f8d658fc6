"""A folder vLLM serves: the sliced weights with the per-layer config its DeciLM (Nemotron-NAS) model reads.

    write_vllm(model, tokenizer, "out/vllm")     # then: vllm serve out/vllm --trust-remote-code

vLLM's `DeciLMForCausalLM` (vllm/model_executor/models/nemotron_nas.py) is the Llama graph built layer by layer
from `config.block_configs[i]`: attention with `num_attention_heads // attention.n_heads_in_group` key/value heads,
an FFN of `ffn.intermediate_size` neurons, exactly, when the block's ffn has NO `ffn_mult` attribute (with one, the
width is `int(2 * ffn_mult * hidden / 3)` rounded UP to a multiple of 256).
Weight names are Llama's. vLLM ships no config class for `model_type: nemotron-nas` and transformers has none, so
the folder carries its own `configuration_decilm.py` (`auto_map.AutoConfig`; vLLM needs `--trust-remote-code`).
NVIDIA's own config classes cannot hold these widths: one keeps only `ffn_mult` (rounded to 256 by vLLM), the
other asserts `intermediate_size % 256 == 0`. The class written here (CONFIGURATION_DECILM) turns each block into
attribute objects carrying exactly the JSON keys. Sources: vLLM main as stored in the public code index
(nemotron_nas.py @ 00bd1493, config/model.py @ 0052a5b8, transformers_utils/config.py @ 0036026e); vLLM cannot
run here, so tests/test_vllm.py parses the written folder the way that loader does.

A model of one FFN width needs none of this: its checkpoint (`prune --uniform`, unpruned, edited) is the stock
architecture, which vLLM serves as it is; the folder then holds the stock config and no code.

vLLM's newer AnyModel backend (base_architecture + per-layer blocks, no remote code) is only in an open pull
request (vllm-project/vllm#36512), so it is not written.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from surgery.errors import UsageError
from surgery.model.arch import ModelView

CONFIGURATION = "configuration_decilm.py"
# what a surgery checkpoint's config carries beyond the stock one (per-layer widths, padding, its own code)
_SURGERY_KEYS = ("ffn_widths", "ffn_padding", "per_layer_config", "surgery_ffn", "auto_map", "architectures")
_SURGERY_KEYS += ("allow_global_per_layer_attribute_access",)

CONFIGURATION_DECILM = '''"""DeciLM / Nemotron-NAS config for vLLM's DeciLMForCausalLM, written by surgery: a
LlamaConfig whose block_configs are attribute objects carrying exactly the keys of config.json (so
`ffn.intermediate_size` is used as it is, never rounded through an `ffn_mult`)."""

from types import SimpleNamespace

from transformers import LlamaConfig


def _attributes(d):
    return SimpleNamespace(**d) if isinstance(d, dict) else d


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        super().__init__(**kwargs)
        self.block_configs = [
            SimpleNamespace(attention=_attributes(b["attention"]), ffn=_attributes(b["ffn"]))
            if isinstance(b, dict)
            else b
            for b in (block_configs or [])
        ]

    def to_dict(self):
        d = super().to_dict()
        d["block_configs"] = [{"attention": vars(b.attention), "ffn": vars(b.ffn)} for b in self.block_configs]
        return d
'''


def check_vllm(model: nn.Module, per_layer: bool | None = None) -> None:
    """One line if vLLM's DeciLM graph cannot run `model` (widths aside, which it takes exactly). `per_layer`:
    whether the model will have per-layer widths (None: whether it has them now)."""
    view, cfg = ModelView(model), model.config
    if per_layer is None:
        per_layer = len(set(view.ffn_widths())) > 1
    if not per_layer:
        return  # the stock architecture: vLLM's own class for it
    if not view.arch.gguf_per_layer:  # the table's Llama family: the graphs DeciLM shares
        raise UsageError(
            f"vLLM has no per-layer-width graph for {cfg.model_type}; prune with --uniform (a stock config vLLM "
            "serves as it is) or export the padded layout"
        )
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        raise UsageError(
            f"{cfg.model_type} with a sliding window ({cfg.sliding_window}): vLLM's DeciLM graph attends over the "
            "whole context, so it would run this model differently"
        )
    if getattr(cfg, "surgery_ffn_out_bias", False):
        raise UsageError(
            "this checkpoint folds removed neurons into FFN output biases (compensate=true); vLLM's DeciLM FFN has "
            "biases on all three projections or none, so it cannot hold them; prune without compensate"
        )
    if (getattr(cfg, "hidden_act", "silu") or "silu") != "silu":
        raise UsageError(f"hidden_act {cfg.hidden_act!r}: vLLM's DeciLM FFN is SiLU-gated only")


def vllm_config(model: nn.Module) -> dict:
    """config.json for vLLM: the stock config for one FFN width; else DeciLM's, one block per layer."""
    check_vllm(model)
    view, cfg = ModelView(model), model.config
    d = json.loads(cfg.to_json_string(use_diff=False))
    for key in _SURGERY_KEYS:
        d.pop(key, None)
    widths = view.ffn_widths()
    if len(set(widths)) == 1:
        d[view.arch.width_attr] = widths[0]
        d["architectures"] = [_stock_class(model)]
        return d
    group = view.n_heads // view.n_kv_heads
    first = view.layer(0)  # which projections carry biases, read from the weights (Qwen2: q/k/v but not o)
    qkv_bias = first.get_submodule(view.arch.attn_qkv[0]).bias is not None
    o_bias = view.attn_out(0).bias is not None
    mlp_bias = view.ffn_in(0)[0].bias is not None
    d.pop("intermediate_size", None)
    d.update(
        {
            "model_type": "nemotron-nas",
            "architectures": ["DeciLMForCausalLM"],
            "auto_map": {"AutoConfig": f"{Path(CONFIGURATION).stem}.DeciLMConfig"},
            "head_dim": view.head_dim,  # NVIDIA's DeciLMConfig defaults it to 128: always explicit
            "hidden_act": "silu",
            "num_key_value_heads": view.n_kv_heads,
            # vLLM: the output projection's bias from attention_bias, q/k/v's from qkv_bias when present
            "attention_bias": o_bias,
            "qkv_bias": qkv_bias,
            "mlp_bias": mlp_bias,
            "block_configs": [
                {
                    "attention": {"no_op": False, "n_heads_in_group": group},
                    "ffn": {"no_op": False, "intermediate_size": int(w or 1), "hidden_act": "silu"},
                }
                for w in widths  # a layer without neurons: one zero neuron (vllm_tensors), its FFN bias kept
            ],
        }
    )
    return d


def _stock_class(model: nn.Module) -> str:
    """The transformers class name of the model's architecture (a surgery sliced class reports its base)."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers.models."):
            return cls.__name__
    return type(model).__name__


def vllm_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights under their Llama names, as vLLM's loader reads them: a tied LM head left out (vLLM ties it to
    the embedding); a layer cut to no neuron gets one all-zero neuron (act(0) * 0 adds nothing), not ffn.no_op,
    which would also drop a Llama FFN's output bias."""
    view, cfg = ModelView(model), model.config
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    out = {}
    for name, t in model.state_dict().items():
        if tied and name.startswith(view.arch.lm_head + "."):
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        t = t.detach().to("cpu")
        out[name] = torch.zeros([n or 1 for n in t.shape], dtype=t.dtype) if 0 in t.shape else t.contiguous().clone()
    return out


def write_vllm(model: nn.Module, tokenizer, folder: str | Path) -> dict:
    """Writes config.json (+ configuration_decilm.py for per-layer widths), model.safetensors and the tokenizer
    into `folder` (which must not hold another model); returns a record of what was written."""
    from safetensors.torch import save_file

    folder = Path(folder)
    config = vllm_config(model)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(vllm_tensors(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    per_layer = config.get("model_type") == "nemotron-nas"
    if per_layer:
        (folder / CONFIGURATION).write_text(CONFIGURATION_DECILM)
    tokenizer.save_pretrained(str(folder))
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(str(folder))
    serve = f"vllm serve {folder}" + (" --trust-remote-code" if per_layer else "")
    return {
        "format": "vllm",
        "folder": folder.name,
        "architecture": config["architectures"][0],
        "ffn_widths": ModelView(model).ffn_widths(),
        "remote_code": per_layer,
        "serve": serve,
    }
