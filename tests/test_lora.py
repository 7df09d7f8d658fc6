"""LoRA at chosen layers (PEFT, arch-table targets), Trainer-based training, teacher-forced problem accuracy."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import VOCAB, make_tiny
from datasets import Dataset

from surgery.commands.lora_sweep import job as lora_sweep
from surgery.edits import lora, training
from surgery.errors import UsageError
from surgery.evals import arithmetic
from surgery.model.arch import ModelView
from surgery.model.batching import predict_cases

TOK = SimpleNamespace(pad_token_id=0, eos_token_id=2)


def lora_layers(pm) -> set[int]:
    """Layer indices of every module that got a LoRA adapter."""
    import re

    out = set()
    for name, _ in pm.named_modules():
        if name.endswith("lora_A"):
            out.add(int(re.search(r"\.(?:layers|h)\.(\d+)\.", name).group(1)))
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3", "gpt_neox", "gptj", "gemma3"])
def test_attach_only_chosen_layer_attention(arch):
    model = make_tiny(arch)
    pm = lora.attach(model, [1], lora.LoraSpec(rank=2, alpha=4))
    assert lora_layers(pm) == {1}
    names = [n for n, _ in pm.named_modules() if n.endswith("lora_A")]
    ffn_out = ModelView(model).arch.ffn_out
    assert names and not any(ffn_out in n for n in names)  # attention only (gpt2: not mlp.c_proj)
    assert not any("lora_" in n for n, _ in model.named_parameters())  # original untouched (deep copy)


def test_attach_rejects_layer_outside():
    with pytest.raises(UsageError):
        lora.attach(make_tiny("llama"), [7], lora.LoraSpec())


def test_merged_copy_equals_adapter_model():
    pm = lora.attach(make_tiny("llama"), [1], lora.LoraSpec(rank=2))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_()
    ids = torch.randint(3, VOCAB, (2, 6))
    merged = lora.merged_copy(pm)
    torch.testing.assert_close(merged(input_ids=ids).logits, pm(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    assert any("lora_" in n for n, _ in pm.named_parameters())  # still an adapter model


def test_collator_left_pads_and_masks_prompt_and_padding():
    batch = training.Collator(0)(
        [{"input_ids": [5, 6, 7], "labels": [-100, -100, 7]}, {"input_ids": [5, 6], "labels": [-100, 6]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 5, 6]]
    assert batch["labels"].tolist() == [[-100, -100, 7], [-100, -100, 6]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3", "gpt_neox", "phi3"])
def test_answer_loss_equals_hf_loss_per_row(arch):
    """The last-positions-only loss of a left-padded batch == the HF causal-LM loss of each row alone,
    averaged over all answer tokens."""
    model = make_tiny(arch).eval()
    g = torch.Generator().manual_seed(1)
    rows = []
    for n, a in ((7, 2), (5, 3), (9, 1)):
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n - a) + ids[n - a :]})
    with torch.no_grad():
        got = training.answer_loss(model, training.Collator(0)(rows))
        per_row = [
            model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]])).loss for r in rows
        ]
    n_tok = [sum(x != -100 for x in r["labels"][1:]) for r in rows]
    want = sum(l * n for l, n in zip(per_row, n_tok)) / sum(n_tok)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_train_lora_changes_only_adapter(arch):
    model = make_tiny(arch)
    g = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": (ids := torch.randint(3, VOCAB, (6,), generator=g).tolist()), "labels": [-100] * 4 + ids[4:]}
        for _ in range(8)
    ]
    before = {n: p.clone() for n, p in model.named_parameters()}
    pm, log = lora.train_lora(
        model, TOK, rows, 1, lora.LoraSpec(rank=2), training.TrainSpec(max_steps=3, batch_size=4, lrs=[1e-2]), 1e-2
    )
    assert any("loss" in e or "train_loss" in e for e in log)
    assert any(("lora_B" in n) and p.abs().sum() > 0 for n, p in pm.named_parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def fake_cases() -> Dataset:
    """Two problems with 2 and 3 answer tokens (cases are consecutive prefixes, as arithmetic.cases builds)."""
    rows = []
    for pid, full, start in (("p1", [5, 9, 11, 12, 13], 3), ("p2", [7, 8, 20, 21, 22, 23, 24], 4)):
        for j in range(start, len(full)):
            rows.append(dict(problem_id=pid, template="t", input_ids=full[:j], target=full[j]))
    return Dataset.from_list(rows)


def test_problem_predictions_equal_per_case_predictions():
    model = make_tiny("llama")
    cases = fake_cases()
    want = predict_cases(model, TOK, cases, progress=False)["correct"]
    # make some cases correct so the comparison is not trivially all-False
    pred = predict_cases(model, TOK, cases, progress=False)["pred"]
    cases = cases.map(lambda r, i: {"target": int(pred[i]) if i % 2 == 0 else r["target"]}, with_indices=True)
    want = predict_cases(model, TOK, cases, progress=False)["correct"]
    got = arithmetic.problem_predictions(model, TOK, cases, batch_size=2)
    assert got.tolist() == want.tolist() and got.any()


def test_layer_groups_cover_every_layer():
    groups = lora_sweep._layer_groups(30, 4)
    assert groups[0][0] == 0 and groups[-1][1] == 29
    assert sum(hi - lo + 1 for lo, hi in groups) == 30


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("weight, temperature", [(0.0, 1.0), (0.5, 1.0), (2.0, 2.5)])
def test_distill_loss_equals_its_definition(arch, weight, temperature):
    """CE of the answer tokens (the HF loss) + w T^2 KL(teacher_T || student_T) over the answer positions, from
    full-sequence logits of both models."""
    student, teacher = make_tiny(arch), make_tiny(arch, seed=5)
    rows = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
        {"input_ids": [9, 10, 11], "labels": [-100, -100, 11]},
    ]
    batch = training.Collator(0)(rows)
    got = training.distill_loss(student, teacher, batch, weight, temperature)
    fwd = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
    s, t = student(**fwd).logits[:, :-1].float(), teacher(**fwd).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    on = labels != -100
    ce = torch.nn.functional.cross_entropy(s[on], labels[on])
    ls, lt = (s[on] / temperature).log_softmax(-1), (t[on] / temperature).log_softmax(-1)
    kl = (lt.exp() * (lt - ls)).sum(-1).mean()
    torch.testing.assert_close(got, ce + weight * temperature**2 * kl, atol=1e-5, rtol=1e-5)
    assert weight == 0 or float(kl) > 0  # two different models: the KL term is really there


def test_distillation_pulls_the_student_toward_the_teacher(tmp_path):
    """Same rows, steps and lr: training with the KL term ends closer to the teacher than training without."""
    teacher = make_tiny("llama", seed=5)
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}] * 8
    batch = training.Collator(0)(rows[:2])

    def trained_kl(distill: float) -> float:
        student = make_tiny("llama")
        spec = training.TrainSpec(max_steps=20, batch_size=4, lrs=[1e-2], distill=distill, warmup_ratio=0.0)
        training.answer_trainer(
            student, rows, spec, 1e-2, str(tmp_path / str(distill)), 0, teacher=teacher, device="cpu"
        ).train()
        with torch.no_grad():
            return float(training.distill_loss(student, teacher, batch, 1.0) - training.answer_loss(student, batch))

    assert trained_kl(5.0) < trained_kl(0.0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3", "gpt_neox"])
def test_lora_on_attention_and_the_pruned_ffns(arch):
    """lora.ffn: adapters on the attention of the LoRA layer AND on every FFN projection of the listed layers,
    nothing else; on a sliced model too."""
    from surgery.model.slicing import slice_ffn

    model = make_tiny(arch)
    slice_ffn(model, {2: [0, 3, 5]})
    a = ModelView(model).arch
    pm = lora.attach(model, [0], lora.LoraSpec(rank=2), ffn_layers=[2])
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in pm.named_modules() if n.endswith("lora_A")}
    attn = {
        n
        for n, _ in model.named_modules()
        if n.startswith(f"{a.layers}.0.") and any(n.endswith("." + t) for t in a.lora_targets)
    }
    want = attn | {f"{a.layers}.2.{p}" for p in (*a.ffn_in, a.ffn_out)}
    assert len(attn) == len(a.lora_targets)
    assert {w.removeprefix("base_model.model.") for w in wrapped} == want


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bf16_training_autocasts_and_keeps_fp32_weights(arch):
    """train.bf16: the forward inside the Trainer runs under bf16 autocast (a Linear's output is bf16), the LoRA
    weights and the base stay fp32, the adapter learns, and the result is close to (not equal to) the fp32 run."""
    g = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": (ids := torch.randint(3, VOCAB, (6,), generator=g).tolist()), "labels": [-100] * 4 + ids[4:]}
        for _ in range(8)
    ]

    def trained(bf16: bool):
        model, seen = make_tiny(arch), []
        spec = training.TrainSpec(max_steps=3, batch_size=4, lrs=[1e-2], bf16=bf16, warmup_ratio=0.0)
        pm = lora.attach(model, [1], lora.LoraSpec(rank=2))
        lin = next(m for n, m in pm.named_modules() if isinstance(m, torch.nn.Linear) and "lora" not in n)
        lin.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            training.answer_trainer(pm, rows, spec, 1e-2, tmp, 0, device="cpu").train()
        return pm, set(seen)

    pm32, seen32 = trained(False)
    pm16, seen16 = trained(True)
    assert seen32 == {torch.float32} and torch.bfloat16 in seen16
    b32 = {n: p for n, p in pm32.named_parameters() if "lora_B" in n}
    b16 = {n: p for n, p in pm16.named_parameters() if "lora_B" in n}
    assert all(p.dtype == torch.float32 for _, p in pm16.named_parameters())
    assert all(p.abs().sum() > 0 for p in b16.values())
    diff = max(float((b16[n] - b32[n]).abs().max()) for n in b32)
    scale = max(float(p.abs().max()) for p in b32.values())
    assert 0 < diff < 0.2 * scale


def test_train_lora_killed_after_a_save_resumes_to_the_same_adapter(tmp_path, monkeypatch):
    """save_steps=2: a LoRA training killed just after its step-2 save resumes at step 2 (adapter, AdamW, scheduler,
    RNG, data position) and ends with the same adapter and losses as an uninterrupted one (what a prune-sweep cell
    relies on to resume mid-training)."""
    from transformers import TrainerCallback

    g = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": (ids := torch.randint(3, VOCAB, (6,), generator=g).tolist()), "labels": [-100] * 4 + ids[4:]}
        for _ in range(16)
    ]
    spec = training.TrainSpec(max_steps=4, batch_size=4, lrs=[1e-2], warmup_ratio=0.0)

    def go(**kw):
        pm, log = lora.train_lora(make_tiny("llama"), TOK, rows, 1, lora.LoraSpec(rank=2), spec, 1e-2, **kw)
        return {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}, log

    whole, whole_log = go()

    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 2:
                raise KeyboardInterrupt

    real = lora.answer_trainer

    def with_callback(cb):
        def make(*a, **k):
            t = real(*a, **k)
            t.add_callback(cb)
            return t

        return make

    monkeypatch.setattr(lora, "answer_trainer", with_callback(Kill()))
    with pytest.raises(KeyboardInterrupt):
        go(state_dir=tmp_path / "s", save_steps=2)
    assert training.saved_step(tmp_path / "s") == 2
    steps = []

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            steps.append(state.global_step)

    monkeypatch.setattr(lora, "answer_trainer", with_callback(Count()))
    resumed, resumed_log = go(state_dir=tmp_path / "s", save_steps=2)
    assert steps == [3, 4]  # only the steps after the save ran
    assert resumed.keys() == whole.keys()
    for n in whole:
        assert torch.allclose(resumed[n], whole[n], rtol=1e-5, atol=1e-7), n
    losses = lambda log: [e["loss"] for e in log if "loss" in e]  # noqa: E731
    assert len(losses(whole_log)) == 4 and losses(resumed_log) == pytest.approx(losses(whole_log), rel=1e-5)
