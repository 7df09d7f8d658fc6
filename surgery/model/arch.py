"""THE table of per-architecture facts, and the one object that reads a model through it.

Nothing outside this module names a model's submodules (`model.model.layers[i].mlp.down_proj` and friends).
Everything else asks a `ModelView` for layers, head slices, FFN keys/values, norms and the unembedding.

Facts that hold for every supported architecture, and which the rest of the code relies on:
- the input of the attention output projection is the concatenation of the per-head outputs z_h
  (query heads, also under GQA), so head h owns input features h*dh..(h+1)*dh of that projection;
- the input of the FFN output projection is the neuron coefficient vector m (gated: act(gate).up,
  fused: the same from one gate_up matrix, plain: act(fc1 x + b)), and its weight columns are the value vectors;
- the FFN input stream r = x^{l-1} + A^l equals the layer output minus the FFN's contribution F^l,
  for sequential and parallel-residual layers alike.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor, nn

from surgery.errors import UsageError
from surgery.model.offload import offloaded, tensor


class ArchError(UsageError):
    """The model's architecture is not in the table, or a layer/head/neuron index is outside it."""


FfnKind = Literal["gated", "fused", "plain"]
NormKind = Literal["rms", "rms1p", "layer"]  # rms1p: Gemma's x * (1 + w)
# separate: q/k/v Linears, rows per head; rows: one Linear, rows [q | k | v]; cols: GPT-2 Conv1D, columns [q | k | v];
# heads: NeoX query_key_value, rows grouped per head as [q_h | k_h | v_h]
QkvLayout = Literal["separate", "rows", "cols", "heads"]


@dataclass(frozen=True)
class Arch:
    """Where things live in one architecture. Paths are attribute paths; layer-relative ones start at a layer."""

    layers: str  # model-relative ModuleList of decoder layers
    attn_out: str  # attention output projection (input = concatenated head outputs)
    ffn: str  # the FFN module
    ffn_in: tuple[str, ...]  # key projections: (gate, up) | (gate_up,) | (fc1,)
    ffn_out: str  # value projection (input = coefficients m)
    ffn_kind: FfnKind
    pre_ffn_norm: str  # the norm n(.) whose output the FFN reads
    final_norm: str  # model-relative
    norm_kind: NormKind
    lm_head: str = "lm_head"
    post_ffn_norm: str | None = None  # Gemma: F = post_norm(sum_k m_k v_k)
    conv1d: bool = False  # GPT-2 Conv1D: weight is [in, out]
    parallel_residual: bool = False  # attention and FFN read the same input (GPT-J, NeoX)
    softcap_attr: str | None = None  # config attribute holding final logit soft-capping, if any
    width_attr: str = "intermediate_size"  # config attribute holding the (base) FFN width
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # attention projections (PEFT names)
    attn_v: str | None = "self_attn.v_proj"  # value projection; fused ones give where V sits (see attn_v_fused)
    attn_v_fused: str | None = None  # "qkv_rows": Linear rows [q | k | v]; "qkv_cols": Conv1D columns [q | k | v]
    ffn_bias_attr: str | None = None  # config flag that gives the native FFN projections biases (Llama: mlp_bias)
    attn_qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # q, k, v projections
    qkv_layout: QkvLayout = "separate"  # how head h's query/key/value features sit in attn_qkv (see qkv_slices)
    # llama.cpp: the architecture a GGUF of one FFN width is written as (None: no GGUF export, `gguf_missing`
    # says why), and whether per-layer widths can go out as `deci` (llama.cpp's DeciLM graph is the Llama graph
    # with n_ff per layer)
    gguf: str | None = None
    gguf_per_layer: bool = False
    gguf_missing: str = ""


_LLAMA = Arch(
    layers="model.layers",
    attn_out="self_attn.o_proj",
    ffn="mlp",
    ffn_in=("mlp.gate_proj", "mlp.up_proj"),
    ffn_out="mlp.down_proj",
    ffn_kind="gated",
    pre_ffn_norm="post_attention_layernorm",
    final_norm="model.norm",
    norm_kind="rms",
)

ARCHS: dict[str, Arch] = {
    "llama": replace(_LLAMA, ffn_bias_attr="mlp_bias", gguf="llama", gguf_per_layer=True),
    "mistral": replace(_LLAMA, gguf="llama", gguf_per_layer=True),  # llama.cpp's converter writes Mistral as llama
    "qwen2": replace(_LLAMA, gguf="qwen2", gguf_per_layer=True),  # deci: q/k biases permuted with their rows
    # Phi-3: Llama with fused qkv and gate_up projections
    "phi3": replace(
        _LLAMA,
        ffn_in=("mlp.gate_up_proj",),
        ffn_kind="fused",
        attn_v="self_attn.qkv_proj",
        attn_v_fused="qkv_rows",
        lora_targets=("qkv_proj", "o_proj"),
        attn_qkv=("self_attn.qkv_proj",),
        qkv_layout="rows",
        gguf="phi3",
    ),
    # Gemma 3: Llama with norms around the FFN, (1 + w) RMS norms and final logit soft-capping
    "gemma3_text": replace(
        _LLAMA,
        pre_ffn_norm="pre_feedforward_layernorm",
        post_ffn_norm="post_feedforward_layernorm",
        norm_kind="rms1p",
        softcap_attr="final_logit_softcapping",
        gguf="gemma3",
    ),
    "gpt2": Arch(
        layers="transformer.h",
        attn_out="attn.c_proj",
        attn_v="attn.c_attn",
        attn_v_fused="qkv_cols",
        attn_qkv=("attn.c_attn",),
        qkv_layout="cols",
        ffn="mlp",
        ffn_in=("mlp.c_fc",),
        ffn_out="mlp.c_proj",
        ffn_kind="plain",
        pre_ffn_norm="ln_2",
        final_norm="transformer.ln_f",
        norm_kind="layer",
        conv1d=True,
        width_attr="n_inner",
        lora_targets=("attn.c_attn", "attn.c_proj"),  # not mlp.c_proj
        gguf="gpt2",
    ),
    "gptj": Arch(
        layers="transformer.h",
        attn_out="attn.out_proj",
        attn_v="attn.v_proj",
        attn_qkv=("attn.q_proj", "attn.k_proj", "attn.v_proj"),
        ffn="mlp",
        ffn_in=("mlp.fc_in",),
        ffn_out="mlp.fc_out",
        ffn_kind="plain",
        pre_ffn_norm="ln_1",
        final_norm="transformer.ln_f",
        norm_kind="layer",
        parallel_residual=True,
        width_attr="n_inner",
        lora_targets=("q_proj", "k_proj", "v_proj", "out_proj"),
        gguf_missing="llama.cpp names a GPT-J architecture but builds no graph for it",
    ),
    "gpt_neox": Arch(
        layers="gpt_neox.layers",
        attn_out="attention.dense",
        attn_v=None,  # query_key_value interleaves heads; the OV map is not read from it
        attn_qkv=("attention.query_key_value",),
        qkv_layout="heads",
        ffn="mlp",
        ffn_in=("mlp.dense_h_to_4h",),
        ffn_out="mlp.dense_4h_to_h",
        ffn_kind="plain",
        pre_ffn_norm="post_attention_layernorm",
        final_norm="gpt_neox.final_layer_norm",
        norm_kind="layer",
        parallel_residual=True,  # when config.use_parallel_residual (the default); see ModelView.parallel
        lm_head="embed_out",
        lora_targets=("attention.query_key_value", "attention.dense"),
        gguf="gptneox",
    ),
}
ARCHS["gemma3"] = ARCHS["gemma3_text"]  # a Gemma3 text checkpoint whose config says gemma3


def register(model_type: str, arch: Arch) -> Arch:
    """Add an architecture to the table under its config's `model_type` (refuses one already there: the table's
    entries are tested facts, see tests/test_arch.py). The one place a new architecture goes."""
    if model_type in ARCHS:
        raise ValueError(f"architecture {model_type!r} is already in the table")
    ARCHS[model_type] = arch
    return arch


def supported() -> list[str]:
    """The model_types in the table, sorted."""
    return sorted(ARCHS)


def arch_for(config) -> Arch:
    """The table entry for a config's model_type, or one clear error listing the supported ones."""
    mt = getattr(config, "model_type", None)
    if mt not in ARCHS:
        raise ArchError(f"unsupported architecture {mt!r}; supported: {', '.join(supported())}")
    return ARCHS[mt]


def qkv_slices(arch: Arch, n_heads: int, n_kv: int, head_dim: int, head: int) -> list[tuple[str, int, Tensor]]:
    """(layer-relative module path, axis of its weight, indices) of query head `head`'s query features and of the
    key/value features of its key/value head (head // (n_heads / n_kv): under GQA shared with the group), in the
    q/k/v projection weights. Biases use the same indices on axis 0. Pure table arithmetic (diff uses it on files)."""
    dh, kv = head_dim, head // (n_heads // n_kv)
    q, k = torch.arange(head * dh, (head + 1) * dh), torch.arange(kv * dh, (kv + 1) * dh)
    if arch.qkv_layout == "separate":
        return [(arch.attn_qkv[0], 0, q), (arch.attn_qkv[1], 0, k), (arch.attn_qkv[2], 0, k)]
    if arch.qkv_layout == "heads":  # NeoX: view(..., H, 3 * dh) then chunk(3): head h owns rows h*3dh..(h+1)*3dh
        base = head * 3 * dh
        return [(arch.attn_qkv[0], 0, torch.arange(base, base + 3 * dh))]
    idx = torch.cat([q, n_heads * dh + k, (n_heads + n_kv) * dh + k])
    return [(arch.attn_qkv[0], 1 if arch.qkv_layout == "cols" else 0, idx)]


def _get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _has(root: nn.Module, path: str) -> bool:
    try:
        _get(root, path)
        return True
    except AttributeError:
        return False


class ModelView:
    """A causal LM seen through its `Arch`: layers, heads, neurons, norms and the unembedding."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.arch = arch_for(model.config)
        if not _has(model, self.arch.lm_head) and _has(model, "lm_head"):
            self.arch = _replace(self.arch, lm_head="lm_head")

    # ---- shape facts -------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def layers(self) -> nn.ModuleList:
        return _get(self.model, self.arch.layers)

    def set_layers(self, layers: nn.ModuleList) -> None:
        """Put `layers` where the decoder ModuleList lives (hooks.run_from swaps in a tail of it, temporarily)."""
        parent, _, name = self.arch.layers.rpartition(".")
        setattr(_get(self.model, parent) if parent else self.model, name, layers)

    @property
    def n_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def head_dim(self) -> int:
        return self.attn_in_features(0) // self.n_heads

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def parallel(self) -> bool:
        if self.config.model_type == "gpt_neox":
            return bool(getattr(self.config, "use_parallel_residual", True))
        return self.arch.parallel_residual

    @property
    def softcap(self) -> float | None:
        attr = self.arch.softcap_attr
        return getattr(self.config, attr, None) if attr else None

    @property
    def n_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.n_heads)

    def native_ffn_bias(self) -> bool:
        """Whether the native class can hold an FFN output bias: always for plain FFNs (GPT-2/J/NeoX), through the
        config flag `arch.ffn_bias_attr` where the table names one (Llama's mlp_bias), never otherwise."""
        return self.arch.ffn_kind == "plain" or self.arch.ffn_bias_attr is not None

    def ffn_width(self, layer: int) -> int:
        """Number of FFN neurons in `layer` (per-layer: sliced models differ)."""
        w = self.ffn_out(layer).weight
        return w.shape[0] if self.arch.conv1d else w.shape[1]

    def ffn_widths(self) -> list[int]:
        return [self.ffn_width(i) for i in range(self.n_layers)]

    def attn_in_features(self, layer: int) -> int:
        w = self.attn_out(layer).weight
        return w.shape[0] if self.arch.conv1d else w.shape[1]

    def check_layer(self, layer: int) -> int:
        if not 0 <= layer < self.n_layers:
            raise ArchError(f"layer {layer} is outside the model (0..{self.n_layers - 1})")
        return layer

    def check_head(self, layer: int, head: int) -> None:
        self.check_layer(layer)
        if not 0 <= head < self.n_heads:
            raise ArchError(f"head {layer}.{head} is outside the model (heads 0..{self.n_heads - 1})")

    def check_editable(self, layer: int) -> None:
        """Weights edited in place must be in memory: an offloaded layer's are re-read from the offload map."""
        if any(offloaded(m) for m in self.layer(layer).modules()):
            raise ArchError(
                f"layer {layer} is offloaded (--max-memory), so its weights cannot be edited in place; "
                "give the model enough memory, or drop --max-memory"
            )

    # ---- modules -----------------------------------------------------------------------------------
    def layer(self, i: int) -> nn.Module:
        return self.layers[self.check_layer(i)]

    def attn_out(self, i: int) -> nn.Module:
        return _get(self.layer(i), self.arch.attn_out)

    def ffn(self, i: int) -> nn.Module:
        return _get(self.layer(i), self.arch.ffn)

    def ffn_in(self, i: int) -> list[nn.Module]:
        return [_get(self.layer(i), p) for p in self.arch.ffn_in]

    def ffn_out(self, i: int) -> nn.Module:
        return _get(self.layer(i), self.arch.ffn_out)

    def pre_ffn_norm(self, i: int) -> nn.Module:
        return _get(self.layer(i), self.arch.pre_ffn_norm)

    def post_ffn_norm(self, i: int) -> nn.Module | None:
        return _get(self.layer(i), self.arch.post_ffn_norm) if self.arch.post_ffn_norm else None

    def ffn_contribution_module(self, i: int) -> nn.Module:
        """The module whose output is F^l, the FFN's contribution to the residual stream."""
        return self.post_ffn_norm(i) or self.ffn(i)

    @property
    def final_norm(self) -> nn.Module:
        return _get(self.model, self.arch.final_norm)

    @property
    def lm_head(self) -> nn.Module:
        return _get(self.model, self.arch.lm_head)

    # ---- weights as math objects ------------------------------------------------------------------
    def head_out_weight(self, layer: int, head: int) -> Tensor:
        """[d_model, head_dim] block of the attention output projection that maps z_h into the residual."""
        w = tensor(self.attn_out(layer))
        sl = slice(head * self.head_dim, (head + 1) * self.head_dim)
        return w[sl, :].T if self.arch.conv1d else w[:, sl]

    def value_weight(self, layer: int) -> Tensor:
        """[kv_heads * head_dim, d_model] value projection W_V (rows = output features)."""
        if self.arch.attn_v is None:
            raise ArchError(f"the value projection of {self.config.model_type} is not in the table")
        w = tensor(_get(self.layer(layer), self.arch.attn_v))
        kv = self.head_dim * int(getattr(self.config, "num_key_value_heads", None) or self.n_heads)
        if self.arch.attn_v_fused == "qkv_rows":
            return w[-kv:]
        if self.arch.attn_v_fused == "qkv_cols":
            return w[:, -kv:].T
        return w

    def ov_matrix(self, layer: int) -> Tensor:
        """Sum over query heads h of W_O^h W_V^{kv(h)}: [d, d] (the attention's OV map with every head attending
        to one position; the pre-attention norm's gain is not included)."""
        wv = self.value_weight(layer).float()
        n_kv = wv.shape[0] // self.head_dim
        group = self.n_heads // n_kv
        total = torch.zeros(self.hidden_size, self.hidden_size, device=wv.device)
        for h in range(self.n_heads):
            kv = h // group
            total += self.head_out_weight(layer, h).float() @ wv[kv * self.head_dim : (kv + 1) * self.head_dim]
        return total

    def head_param_slices(self, layer: int, head: int) -> list[tuple[str, int, Tensor]]:
        """(parameter name, axis, indices) of every weight/bias entry owned by query head (layer, head): its query
        rows, its key/value head's key and value rows (shared with the rest of its GQA group) and its attention
        output-projection input features. The output-projection bias belongs to no head."""
        self.check_head(layer, head)
        pre = f"{self.arch.layers}.{layer}."
        out = []
        for path, axis, idx in qkv_slices(self.arch, self.n_heads, self.n_kv_heads, self.head_dim, head):
            mod = _get(self.layer(layer), path)
            out.append((f"{pre}{path}.weight", axis, idx))
            if getattr(mod, "bias", None) is not None:
                out.append((f"{pre}{path}.bias", 0, idx))
        cols = torch.arange(head * self.head_dim, (head + 1) * self.head_dim)
        out.append((f"{pre}{self.arch.attn_out}.weight", 0 if self.arch.conv1d else 1, cols))
        return out

    def ffn_param_names(self, layer: int) -> list[str]:
        """Names of every parameter of the FFN of `layer` (keys, values and their biases; norms excluded)."""
        pre = f"{self.arch.layers}.{self.check_layer(layer)}.{self.arch.ffn}."
        return [pre + n for n, _ in self.ffn(layer).named_parameters()]

    def attn_out_bias(self, layer: int) -> Tensor | None:
        return _bias(self.attn_out(layer))

    def values(self, layer: int) -> Tensor:
        """[N, d_model] value vectors v_k (rows), a view of the FFN output weight."""
        w = tensor(self.ffn_out(layer))
        return w if self.arch.conv1d else w.T

    def ffn_out_bias(self, layer: int) -> Tensor | None:
        return _bias(self.ffn_out(layer))

    def ffn_post_scale(self, layer: int, y: Tensor) -> Tensor | None:
        """Per-feature scale s [..., d] that linearises a post-FFN norm at the real FFN output y (d-vectors):
        post_norm(y) == s * y exactly, so each neuron contributes m_k * (s * v_k). None without a post norm."""
        norm = self.post_ffn_norm(layer)
        if norm is None:
            return None
        w = tensor(norm).float()
        gain = 1.0 + w if self.arch.norm_kind == "rms1p" else w
        return gain / (y.float().pow(2).mean(-1, keepdim=True) + _norm_eps(norm)).sqrt()

    def keys(self, layer: int) -> list[Tensor]:
        """Key matrices as [N, d_model] rows: (gate, up) for gated/fused FFNs, (fc1,) for plain ones."""
        mods = self.ffn_in(layer)
        if self.arch.ffn_kind == "fused":
            return list(tensor(mods[0]).chunk(2, dim=0))
        return [tensor(m).T if self.arch.conv1d else tensor(m) for m in mods]

    # ---- the frozen-norm unembedding (docs/design.md section 1) -------------------------------------------
    def final_sigma(self, h: Tensor) -> Tensor:
        """sigma of the final norm for final hidden states h [..., d]: RMS (RMSNorm) or std (LayerNorm)."""
        eps = _norm_eps(self.final_norm)
        h = h.float()
        if self.arch.norm_kind == "layer":
            return (h.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
        return (h.pow(2).mean(-1, keepdim=True) + eps).sqrt()

    def final_gain(self) -> Tensor:
        w = tensor(self.final_norm).float()
        return 1.0 + w if self.arch.norm_kind == "rms1p" else w

    def unembed_matrix(self) -> Tensor:
        """W_U as [vocab, d_model] (an offloaded head is read once and kept: every case's readout needs it)."""
        if not offloaded(self.lm_head):
            return self.lm_head.weight
        if getattr(self, "_unembed", None) is None:
            self._unembed = tensor(self.lm_head)
        return self._unembed

    def readout(self, v: Tensor, sigma: Tensor, out: Tensor | None = None) -> Tensor:
        """The linear part of U: W_U (g * centre(v)) / sigma, for directions v [..., d] (no bias terms); written
        into `out` [..., V] when given."""
        v = v.float()
        if self.arch.norm_kind == "layer":
            v = v - v.mean(-1, keepdim=True)
        return torch.matmul(v * self.final_gain() / sigma, self.unembed_matrix().float().T, out=out)

    def readout_bias(self) -> Tensor | float:
        """The constant part of U: W_U b_norm + b_lm_head (0 for RMSNorm models without a head bias)."""
        out: Tensor | float = 0.0
        nb = _bias(self.final_norm)
        if nb is not None:
            out = self.unembed_matrix().float() @ nb.float()
        hb = _bias(self.lm_head)
        if hb is not None:
            out = out + hb.float()
        return out

    def logits_frozen(self, x: Tensor, sigma: Tensor) -> Tensor:
        """U(x) with the final norm's sigma frozen: pre-softcap logits, then the arch's soft-capping."""
        return self.softcap_logits(self.readout(x, sigma) + self.readout_bias())

    def softcap_logits(self, z: Tensor) -> Tensor:
        cap = self.softcap
        return cap * torch.tanh(z / cap) if cap else z

    # ---- weight edits (structural, used by slicing/debias and by tests as references) ----------------
    @torch.no_grad()
    def zero_head_weights(self, layer: int, head: int) -> None:
        """Zero the o_proj INPUT columns of head (layer, head): the paper's head ablation, in the weights."""
        self.check_editable(layer)
        self.check_head(layer, head)
        self.head_out_weight(layer, head).zero_()

    @torch.no_grad()
    def zero_neuron_weights(self, layer: int, idx: Tensor | list[int]) -> None:
        """Zero neurons' key rows, key biases and value vectors: the neurons vanish from the function."""
        self.check_editable(layer)
        idx = torch.as_tensor(idx, dtype=torch.long)
        for k in self.keys(layer):
            k[idx] = 0.0
        for m in self.ffn_in(layer):
            b = getattr(m, "bias", None)
            if b is not None:
                b.view(-1, self.ffn_width(layer))[:, idx] = 0.0
        self.values(layer)[idx] = 0.0

    @torch.no_grad()
    def scale_neuron_values(self, layer: int, idx: Tensor | list[int], scale: float) -> None:
        """Scale neurons' value vectors: each neuron's contribution m_k v_k scales by `scale` exactly."""
        self.check_editable(layer)
        self.values(layer)[torch.as_tensor(idx, dtype=torch.long)] *= scale


def _bias(module: nn.Module) -> Tensor | None:
    return tensor(module, "bias") if getattr(module, "bias", None) is not None else None


def _norm_eps(norm: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        if hasattr(norm, attr):
            return float(getattr(norm, attr))
    raise ArchError(f"cannot find the epsilon of {type(norm).__name__}")


def _replace(arch: Arch, **kw) -> Arch:
    from dataclasses import replace

    return replace(arch, **kw)
