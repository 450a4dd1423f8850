"""Baselines through transformers: a tiny random GPT-2 saved to a temp folder runs perplexity, SST-2 and GSM8K
through the same evaluation functions; a missing model gives a "skipped" record."""
import math

import pytest
import torch

from mllm.data.tokenizer import get_tokenizer
from mllm.evaluation.baselines import BaselineUnavailable, load_baseline, skip_record
from mllm.evaluation.gsm8k import default_generate_fn, evaluate_gsm8k
from mllm.evaluation.perplexity import token_perplexity
from mllm.evaluation.sst2 import evaluate_sst2

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=257, n_positions=96, n_embd=16, n_layer=2, n_head=2,
                                  bos_token_id=256, eos_token_id=256)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(tiny_gpt2):
    return load_baseline(str(tiny_gpt2), tokenizer=get_tokenizer("byte"))


def test_perplexity_matches_hf_loss(tiny_gpt2):
    model, tok = load_baseline(str(tiny_gpt2), tokenizer=get_tokenizer("byte"))
    assert model.max_seq_len == 96
    ids = torch.tensor(tok.encode("The quick brown fox jumps over the lazy dog. " * 2))[:64]
    with torch.no_grad():
        hf_loss = model.hf(ids[None], labels=ids[None]).loss.item()
    res = token_perplexity(model, ids.tolist(), context=64)
    assert res["n_tokens"] == 63 and res["perplexity"] == pytest.approx(math.exp(hf_loss), rel=1e-4)


def test_sst2_and_gsm8k_run_through_the_adapter(loaded):
    model, tok = loaded
    rows = [{"sentence": "a fine film", "label": 1}, {"sentence": "dreadful", "label": 0}]
    res = evaluate_sst2(model, tok, rows, pool_rows=rows * 2 + [{"sentence": "ok", "label": 1},
                                                               {"sentence": "bad", "label": 0}],
                        shots=2, max_len=96, progress=False)
    assert res["uncalibrated"]["n"] == 2 and res["calibrated"]["n"] == 2
    gsm = [{"question": "What is 2+2?", "answer": "#### 4"}, {"question": "And 3+3, then?", "answer": "#### 6"}]
    out = evaluate_gsm8k(model, tok, gsm, n_samples=2, max_new_tokens=6, max_len=96, progress=False)
    assert out["greedy"]["n"] == 2 and len(out["per_question"][0]["sample_answers"]) == 2


def test_batched_left_padded_generation_equals_one_by_one(loaded):
    model, tok = loaded
    gen = default_generate_fn(model)
    assert gen == model.generate_tokens
    prompts = [tok.encode("Question: hi\nAnswer:"), tok.encode("Q: a much longer prompt here\nA:")]
    batched = gen(prompts, 8, temperature=0.0, eos_id=tok.eot_id)
    single = [gen([p], 8, temperature=0.0, eos_id=tok.eot_id)[0] for p in prompts]
    assert batched == single and all(1 <= len(b) <= 8 for b in batched)
    s1 = gen(prompts, 8, temperature=1.0, eos_id=tok.eot_id, seed=3)
    assert s1 == gen(prompts, 8, temperature=1.0, eos_id=tok.eot_id, seed=3)


def test_unavailable_baseline_gives_skip_record(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BaselineUnavailable, match="skipped: mllm-test/no-such-model not available offline"):
        load_baseline("mllm-test/no-such-model")
    with pytest.raises(BaselineUnavailable, match="has no loadable weights"):
        load_baseline(str(tmp_path))
    rec = skip_record("gpt2", "skipped: gpt2 not available offline")
    assert rec == {"name": "gpt2", "status": "skipped", "reason": "skipped: gpt2 not available offline"}
