"""StereoSet intrasentence (evals/stereoset.py): the metrics by their definition, and a planted bias measured."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from surgery.errors import UsageError
from surgery.evals import stereoset


def test_ss_lms_icat_by_definition():
    """Rows: (stereotype, anti-stereotype, unrelated) scores. 3 of 4 items prefer the stereotype (SS 75); 6 of the
    8 meaningful-vs-unrelated comparisons prefer the meaningful sentence (LMS 75); ICAT = 75 x 25 / 50."""
    scores = torch.tensor([[0.0, -1, -2], [-1, 0, -2], [0, -1, 1], [0, -1, -5]])
    assert stereoset.metrics(scores) == {"ss": 75.0, "lms": 75.0, "icat": 37.5}
    unbiased = torch.tensor([[0.0, -1, -2], [-1, 0, -2]])
    assert stereoset.metrics(unbiased)["icat"] == 100.0  # SS 50 and LMS 100: the ideal model
    out = stereoset.with_intervals(scores, resamples=200)
    for k in ("ss", "lms", "icat"):
        lo, hi = out[f"{k}_ci95"]
        assert lo <= out[k] <= hi


def test_items_are_the_held_out_intrasentence_sets():
    gender = stereoset.items("gender")
    assert len(gender) == 255 and len(stereoset.items("profession")) == 810
    assert all(r["context"].count("BLANK") == 1 for r in gender)
    with pytest.raises(UsageError, match="unknown StereoSet bias type"):
        stereoset.items("weather")


def test_a_planted_bias_is_measured(tiny_smol_dir):
    """A tiny model whose logits are pushed up for the tokens that only the stereotype sentences contain prefers
    the stereotype on nearly every item (SS near 100), where the same model without the push does not."""
    model = T.AutoModelForCausalLM.from_pretrained(str(tiny_smol_dir)).eval()
    tok = T.AutoTokenizer.from_pretrained(str(tiny_smol_dir))
    rows = stereoset.items("gender")[:30]
    planted = set()
    for r in rows:
        planted |= set(tok.encode(r["stereotype"])) - set(tok.encode(r["anti-stereotype"]))
    plain = stereoset.evaluate(model, tok, "gender", limit=30, resamples=50)
    push = torch.zeros(model.config.vocab_size)
    push[sorted(planted)] = 20.0
    handle = model.lm_head.register_forward_hook(lambda m, i, o: o + push)
    try:
        biased = stereoset.evaluate(model, tok, "gender", limit=30, resamples=50)
    finally:
        handle.remove()
    assert biased["ss"] >= 90 and biased["ss"] > plain["ss"] + 20, (plain["ss"], biased["ss"])
    assert biased["n"] == plain["n"] == 30
