"""The four extension points, used from outside the package through their public registration API (no
monkeypatching), each then run: a selector, a task, an architecture entry and a command. docs/developer.md
names the one file each goes in."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from conftest import tiny_inputs

from surgery import commands
from surgery.cli import main
from surgery.commands.spec import Command, option, positive
from surgery.evals import registry
from surgery.find import cna, selectors
from surgery.io.report import Report
from surgery.model import arch
from surgery.model.arch import ModelView


def test_a_registered_selector_is_scored_and_accepted_by_the_cli(tiny_smol_dir, tmp_path):
    @selectors.register("task", "last-layer-first")
    def last_layer_first(inp: selectors.Inputs) -> selectors.Scores:
        return {l: torch.full((inp.view.ffn_width(l),), float(l)) for l in inp.layers}

    try:
        model = T.AutoModelForCausalLM.from_pretrained(tiny_smol_dir)
        scores = selectors.score("task", "last-layer-first", selectors.Inputs(ModelView(model), [1, 3], pad=2))
        assert {l: float(s[0]) for l, s in scores.items()} == {1: 1.0, 3: 3.0}
        assert "last-layer-first" in selectors.names("task")
        from surgery.commands.spec import registered

        assert registered("task")("last-layer-first") == "last-layer-first"
    finally:
        selectors.REGISTRY["task"].pop("last-layer-first")


def test_a_registered_task_is_read_by_eval(tiny_smol_dir, tmp_path, capsys):
    from datasets import Dataset

    def capitals() -> Dataset:
        return Dataset.from_dict(
            {
                "prompt": ["The capital of France is", "The capital of Italy is"],
                "target": [" Paris", " Rome"],
                "group": ["eu", "eu"],
                "split": ["", ""],
            }
        )

    registry.register(registry.Task("my-capitals", cases=capitals))
    try:
        out = tmp_path / "eval"
        assert main(["eval", "--model", str(tiny_smol_dir), "--data", "my-capitals", "--out", str(out)]) == 0
        assert (out / "report.json").exists() and "eu" in (out / "report.md").read_text()
    finally:
        registry.TASKS.pop("my-capitals")


class _MyConfig(T.LlamaConfig):
    model_type = "my_llama"


class _MyModel(T.LlamaForCausalLM):
    config_class = _MyConfig


def test_a_registered_architecture_gives_the_llama_entrys_cna():
    """A model type the table does not know, added with `arch.register`, is read exactly as the same weights
    under the llama entry: the certified CNA top-k is identical."""
    cfg = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    mine = _MyModel(_MyConfig(**cfg)).eval()
    llama = T.LlamaForCausalLM(T.LlamaConfig(**cfg)).eval()
    llama.load_state_dict(mine.state_dict())
    arch.register("my_llama", arch.ARCHS["llama"])
    try:
        inputs = tiny_inputs()
        batch = (inputs["input_ids"] % 64, inputs["attention_mask"])
        a = cna.compare(ModelView(mine), batch, [0, 1], k=5)
        b = cna.compare(ModelView(llama), batch, [0, 1], k=5)
        assert a.top.layer.tolist() == b.top.layer.tolist() and a.top.index.tolist() == b.top.index.tolist()
        torch.testing.assert_close(a.top.score, b.top.score)
    finally:
        arch.ARCHS.pop("my_llama")


def test_a_registered_command_is_listed_and_runs(capsys):
    def greet(*, name: str, times: int) -> Report:
        return Report(data={"greeting": name}, markdown=" ".join([f"hello {name}"] * times))

    commands.register(
        Command(
            "greet",
            "Say hello (an example verb).",
            [option("--name", default="world"), option("--times", type=positive, default=1)],
            greet,
        )
    )
    try:
        assert "greet" in commands.names() and commands.get("greet").run(times=2).markdown == "hello world hello world"
        assert main(["greet", "--name", "surgeon"]) == 0
        assert "hello surgeon" in capsys.readouterr().out
        with pytest.raises(SystemExit) as bad:  # its options are checked like a built-in verb's
            main(["greet", "--times", "0"])
        assert bad.value.code == 2
    finally:
        commands.unregister("greet")
