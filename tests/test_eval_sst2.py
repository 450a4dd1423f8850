"""SST-2 prompting: label-word scores, calibration maths by hand, shots drawn with a seed and disjoint from the
evaluation rows, confusion counts."""
import math

import pytest
import torch

from eval_stubs import KeywordLM, PrefixMeanLM, WordTokenizer
from mllm.evaluation.sst2 import (
    build_prompt, calibrate, confusion, draw_shots, evaluate_sst2, label_logprobs, split_pool_and_eval,
)

WORDS = ["Review", "Sentiment", "positive", "negative", "great", "fun", "awful", "dull", "the", "movie", "a",
         "plot", "N/A", "was", "is"]
ROWS = [
    {"sentence": "great movie", "label": 1}, {"sentence": "the plot was awful", "label": 0},
    {"sentence": "fun fun", "label": 1}, {"sentence": "dull movie", "label": 0},
    {"sentence": "a great plot", "label": 1}, {"sentence": "awful dull movie", "label": 0},
    {"sentence": "the movie is fun", "label": 1}, {"sentence": "a dull plot", "label": 0},
]


def _setup(**kw):
    tok = WordTokenizer(WORDS)
    ids = tok.stoi
    model = KeywordLM(tok.vocab_size, ids[" positive"], ids[" negative"],
                      [ids[" great"], ids[" fun"], ids["great"], ids["fun"]],
                      [ids[" awful"], ids[" dull"], ids["awful"], ids["dull"]], **kw)
    return tok, model


def test_calibration_maths_by_hand():
    # label probs (negative, positive) for two inputs, already normalised: (.6, .4) and (.3, .7)
    logp = torch.log(torch.tensor([[0.6, 0.4], [0.3, 0.7]], dtype=torch.float64))
    # content-free input: p_cf = (.8, .2) -> calibrated ∝ (.6/.8, .4/.2) = (.75, 2) -> positive;
    #                                                  (.3/.8, .7/.2) = (.375, 3.5) -> positive
    cf = torch.log(torch.tensor([0.8, 0.2], dtype=torch.float64))
    cal = calibrate(logp, cf)
    assert torch.allclose(cal, torch.log(torch.tensor([[0.75, 2.0], [0.375, 3.5]], dtype=torch.float64)))
    assert cal.argmax(-1).tolist() == [1, 1] and logp.argmax(-1).tolist() == [0, 1]
    # unnormalised inputs: renormalised over the label set first (scale-free)
    cal2 = calibrate(logp + math.log(0.01), cf + math.log(3.0))
    assert torch.allclose(cal2, cal)
    # several content-free inputs: their label probabilities are averaged: mean((.9,.1),(.7,.3)) = (.8,.2)
    cf2 = torch.log(torch.tensor([[0.9, 0.1], [0.7, 0.3]], dtype=torch.float64))
    assert torch.allclose(calibrate(logp, cf2), cal)
    with pytest.raises(ValueError, match="calibrate needs"):
        calibrate(logp, torch.zeros(3))


def test_label_logprobs_single_and_multi_token_agree_with_direct_scoring():
    tok = WordTokenizer(WORDS)
    model = PrefixMeanLM(tok.vocab_size, seed=3)
    prompts = [build_prompt(r["sentence"]) for r in ROWS[:3]]
    # single-token words: one forward per prompt
    got = label_logprobs(model, tok, prompts, batch_size=2)
    # multi-token words: " positive movie" vs " negative plot"; every sequence separately
    got2 = label_logprobs(model, tok, prompts, (" negative plot", " positive movie"), batch_size=2)
    for i, p in enumerate(prompts):
        pid = tok.encode(p)
        for l, w in enumerate((" negative", " positive")):
            lp = torch.log_softmax(model(torch.tensor([pid]))[0, -1].double(), -1)
            assert got[i, l].item() == pytest.approx(lp[tok.stoi[w]].item(), abs=1e-6)
        for l, w in enumerate((" negative plot", " positive movie")):
            wid = tok.encode(w)
            seq = torch.tensor([pid + wid])
            lp = torch.log_softmax(model(seq)[0].double(), -1)
            ref = sum(lp[len(pid) - 1 + j, wid[j]].item() for j in range(len(wid)))
            assert got2[i, l].item() == pytest.approx(ref, abs=1e-5)


def test_keyword_model_accuracy_and_confusion():
    tok, model = _setup()
    res = evaluate_sst2(model, tok, ROWS, calibrate_with=None, progress=False)
    assert res["uncalibrated"]["accuracy"] == 1.0 and res["calibrated"] is None
    assert res["uncalibrated"]["confusion"] == {"negative": {"negative": 4, "positive": 0},
                                               "positive": {"negative": 0, "positive": 4}}
    assert confusion([0, 1, 1], [1, 1, 0]) == {"negative": {"negative": 0, "positive": 1},
                                              "positive": {"negative": 1, "positive": 1}}


def test_calibration_removes_a_label_bias():
    # a strong prior for " positive" (+3 nats) makes every weakly negative sentence come out positive;
    # the content-free input sees only the prior, so calibration subtracts exactly it
    tok, model = _setup(strength=2.0, bias_pos=3.0)
    res = evaluate_sst2(model, tok, ROWS, calibrate_with=("N/A",), progress=False)
    assert res["uncalibrated"]["accuracy"] < 1.0
    assert res["uncalibrated"]["confusion"]["negative"]["positive"] > 0
    assert res["calibrated"]["accuracy"] == 1.0
    p_cf = res["calibrated"]["content_free_probs"]
    assert p_cf[1] == pytest.approx(math.exp(3) / (1 + math.exp(3)))


def test_shots_seeded_balanced_and_disjoint():
    rows = [{"sentence": f"s{i}", "label": i % 2} for i in range(40)] + [{"sentence": "s3", "label": 1}]
    pool, ev = split_pool_and_eval(rows, 10, seed=0)
    ev_sent = {r["sentence"] for r in ev}
    assert len(ev) == 10 and not ev_sent & {r["sentence"] for r in pool}
    a = draw_shots(pool, 4, seed=5)
    assert a == draw_shots(pool, 4, seed=5)
    assert sorted(r["label"] for r in a) == [0, 0, 1, 1]
    assert any(draw_shots(pool, 4, seed=s) != a for s in range(6, 12))
    assert len(draw_shots(pool, 3, seed=1)) == 3
    with pytest.raises(ValueError, match="label 1"):
        draw_shots([{"sentence": "x", "label": 0}] * 5, 2)


def test_k_shot_prompt_and_disjointness_in_evaluate():
    tok, model = _setup()
    pool = ROWS + [{"sentence": "fun plot", "label": 1}, {"sentence": "awful plot", "label": 0}]
    res = evaluate_sst2(model, tok, ROWS[:4], pool, shots=2, seed=0, progress=False)
    shots = res["shot_examples"]
    assert len(shots) == 2 and {s["label"] for s in shots} == {0, 1}
    assert not {s["sentence"] for s in shots} & {r["sentence"] for r in ROWS[:4]}
    p = build_prompt("great movie", shots)
    assert p.count("Review:") == 3 and p.endswith("Review: great movie\nSentiment:")
    assert p.startswith(f"Review: {shots[0]['sentence']}\nSentiment: {('negative', 'positive')[shots[0]['label']]}\n\n")
    assert res["shots"] == 2 and "2-shot" in res["convention"]


def test_bad_rows_and_truncation():
    tok, model = _setup()
    with pytest.raises(ValueError, match="label"):
        evaluate_sst2(model, tok, [{"sentence": "x", "label": 2}], progress=False)
    # max_len keeps the end of the prompt (label-word scores use the last tokens)
    long = build_prompt("great " * 30)
    full = label_logprobs(model, tok, [long])
    cut = label_logprobs(model, tok, [long], max_len=4)
    assert not torch.allclose(full, cut)


class Recording(torch.nn.Module):
    """Wraps a stub LM and keeps every input_ids batch it is given."""

    def __init__(self, lm):
        super().__init__()
        self.lm, self.inputs = lm, []

    def forward(self, input_ids):
        self.inputs.append(input_ids.clone())
        return self.lm(input_ids)


@pytest.mark.parametrize("words", [(" negative", " positive"), (" negative plot", " positive movie")])
def test_truncation_scores_the_end_of_the_prompt(words):
    """With ``max_len`` shorter than the prompt, the scored sequence must be the prompt's LAST tokens (the query
    sentence and the "Sentiment:" cue the label word follows), ``max_len`` tokens in all with the label word's
    leading tokens, and the scores those of that window. Keeping the start would score a label word after a cut-off
    demonstration. Single-token words (one sequence per prompt) and multi-token words (one per label)."""
    tok = WordTokenizer(WORDS)
    model = Recording(PrefixMeanLM(tok.vocab_size, seed=1))
    prompt = build_prompt("dull movie", [{"sentence": "great fun " * 6, "label": 1}])
    pids = tok.encode(prompt)
    max_len = 7
    assert len(pids) > 2 * max_len
    got = label_logprobs(model, tok, [prompt], words, max_len=max_len)
    (batch,) = model.inputs  # one forward; both label sequences have the same length here, so no padding
    seqs = [row.tolist() for row in batch]
    for l, w in enumerate(words):
        wids = tok.encode(w)
        keep = max_len - len(wids) + 1
        want = pids[-keep:] + wids[:-1]
        if len(wids) == 1:  # the prompt alone, scored once for every label
            assert seqs == [want]
        else:
            assert seqs[l] == want and len(want) == max_len
        lp = torch.log_softmax(model.lm(torch.tensor([pids[-keep:] + wids]))[0].double(), -1)
        ref = sum(lp[keep - 1 + j, wids[j]].item() for j in range(len(wids)))
        assert got[0, l].item() == pytest.approx(ref, abs=1e-5)
    assert tok.decode(pids[-max_len:]).endswith("movie\nSentiment:")
