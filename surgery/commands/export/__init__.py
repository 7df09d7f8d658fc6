"""Write a model or checkpoint as one GGUF file that llama.cpp (Ollama, LM Studio, llama-cpp-python) runs.

SRC is any checkpoint surgery wrote (sliced, padded or zeroed; pruned, debiased, edited, or fine-tuned with
its LoRA merged) or a plain Hugging Face folder or registry name. OUT/NAME-TYPE.gguf is written in llama.cpp's
own graph for the architecture when every layer has one FFN width, and as `deci` (llama.cpp's per-layer-width
Llama graph) for a Llama, Mistral or Qwen2 pruned to per-layer widths; other per-layer-width models are refused
(prune with --uniform, or export the padded layout). --gguf-type q8_0 / q4_0 store rows in blocks of 32: every
width must be a multiple of 32 (prune with --multiple 32). The checkpoint's surgery.json goes into the GGUF's
metadata with a digest of the whole file, so `surgery inspect FILE.gguf` verifies it. `--format vllm` writes a
folder vLLM serves: per-layer widths as DeciLM block_configs (exact widths; `vllm serve OUT --trust-remote-code`),
one width as the stock config. `--format native` writes a checkpoint plain `from_pretrained` loads without
remote code: one width as the stock config at that width, per-layer widths as base shapes padded with zeros.
"""

from surgery.commands.spec import FORCE, OUT, Command, option

COMMAND = Command(
    "export",
    __doc__,
    [
        option("src", help="checkpoint folder, HF model folder, or registry name"),
        option(
            "--format",
            default="gguf",
            help="gguf (one file for llama.cpp) | vllm (a folder vLLM serves: per-layer widths as DeciLM blocks) | "
            "native (plain from_pretrained: one width as the stock config, per-layer widths padded with zeros)",
        ),
        option("--gguf-type", default="f32", help="f32 | f16 | bf16 | q8_0 | q4_0 (matrices; norms stay f32)"),
        option(
            "--prompt",
            default="Calculate: 12+7=",
            help="run through llama.cpp after writing, compared with transformers (when llama-cpp-python is installed)",
        ),
        *OUT,
        *FORCE,
        option(
            "--trust-remote-code",
            action="store_true",
            help="run SRC's own Python code (auto_map); surgery's own sliced checkpoints need no flag",
        ),
    ],
    "surgery.commands.export.job:export",
)
run = COMMAND.run
