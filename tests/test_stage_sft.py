"""SFT stage: the Alpaca/GSM8K prompt templates, response-only label masking (packed and unpacked), example
selection and bad-row counting, the shared GSM8K dev split, and the response loss."""
import json

import pytest
import torch
import torch.nn.functional as F

from mllm.config.pipeline_config import load_config
from mllm.data.tokenizer import get_tokenizer
from mllm.stages import sft

ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\nName a colour.\n\n### Response:\n")
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n### Instruction:\nTranslate.\n\n"
                "### Input:\nbonjour\n\n### Response:\n")


def test_prompt_templates_are_the_standard_ones():
    assert sft.alpaca_prompt({"instruction": "Name a colour.", "input": ""}) == ALPACA_NO_INPUT
    assert sft.alpaca_prompt({"instruction": "Name a colour.", "input": "  \n"}) == ALPACA_NO_INPUT
    assert sft.alpaca_prompt({"instruction": "Translate.", "input": "bonjour"}) == ALPACA_INPUT
    from mllm.evaluation.gsm8k import PROMPT_TEMPLATE

    assert sft.GSM8K_PROMPT_TEMPLATE == PROMPT_TEMPLATE  # evaluation prompts the generator as it was trained
    assert sft.gsm8k_prompt("2+2?") == "Question: 2+2?\nAnswer:"
    assert sft.gsm8k_response("It is 4.\n#### 4\n") == " It is 4.\n#### 4"


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("prompt_loss", [False, True])
def test_labels_only_on_response_tokens_and_eot(packing, prompt_loss):
    tok = get_tokenizer("byte")
    cfg = load_config("local-smoke", ["data.tokenizer=byte", "model.vocab_size=257", "sft.seq_len=64",
                                      f"sft.prompt_loss={prompt_loss}"])
    texts = [("Q: one?\nA:", " yes"), ("Q: second question?\nA:", " no, not at all"), ("Hi\n", " ok")]
    examples = [(tok.encode(p), tok.encode(r)) for p, r in texts]
    rows = sft.build_rows(examples, cfg, tok, packing=packing, seed=0)
    assert len(rows) == (1 if packing else 3)
    targets = []  # (document text so far, target token) for every labelled position
    for i in range(len(rows)):
        r = rows[i]
        ids, labels, pos = r["input_ids"], r["labels"], r["position_ids"]
        assert r["cu_seqlens"][0] == 0 and r["cu_seqlens"][-1] == 64
        for t in range(64):
            if labels[t] != -100:
                start = t - pos[t]
                targets.append((tok.decode(ids[start:t + 1].tolist()), int(labels[t])))
    want = []
    for p, r in texts:
        doc = tok.encode(p) + tok.encode(r) + [tok.eot_id]
        first = 1 if prompt_loss else len(tok.encode(p))  # token 0 is never a target
        want += [(tok.decode(doc[:j]), doc[j]) for j in range(first, len(doc))]
    assert sorted(targets) == sorted(want)


def test_select_examples_skips_too_long_and_cycles():
    tok = get_tokenizer("byte")
    pairs = [("p" * 5, "r" * 5), ("p" * 50, "r"), ("p", ""), ("ab", "cd")]
    ex, counts = sft.select_examples(pairs, n=5, seq_len=12, tok=tok, seed=0, shuffle=False)
    # 5 + 5 + eot fits in 12, 50 + 1 + eot does not; an empty response is never an example
    assert counts == {"candidates": 4, "too_long": 1, "empty_response": 1, "repeated": 3}
    assert [tok.decode(p + r) for p, r in ex] == ["ppppprrrrr", "abcd", "ppppprrrrr", "abcd", "ppppprrrrr"]
    ex, counts = sft.select_examples(pairs, n=5, seq_len=12, tok=tok, seed=0, shuffle=False, cycle=False)
    assert len(ex) == 2 and counts["repeated"] == 0


def test_gsm8k_bad_rows_skipped_and_counted(tmp_path):
    rows = [{"question": "q1", "answer": "1+1=2\n#### 2"}, {"question": "q2", "answer": "no final line"},
            {"question": "q3"}, {"question": "q4", "answer": "#### 1,000"}, ["not", "an", "object"]]
    f = tmp_path / "train.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recs, counts = sft.load_gsm8k_records(f)
    assert [r["question"] for r in recs] == ["q1", "q4"]
    assert counts == {"rows": 5, "bad_schema": 2, "no_final_answer": 1}


def test_gsm8k_dev_split_is_the_evaluation_one(data_dir):
    from mllm.data.datasets import load_gsm8k, split_holdout

    cfg = load_config("local-smoke", [f"data.data_dir={data_dir}"])
    train, dev, counts = sft.gsm8k_splits(cfg)
    _, eval_dev = split_holdout(load_gsm8k(data_dir, split="train"), cfg.data.val_fraction, seed=cfg.seed,
                                key="question")
    assert dev == eval_dev and counts["rows"] == 7473 and len(train) + len(dev) == 7473
    assert not {r["question"] for r in train} & {r["question"] for r in dev}


def test_response_loss_is_mean_ce_over_response_tokens():
    from mllm.config.pipeline_config import ModelConfig
    from mllm.models.transformer import Transformer
    from mllm.training.batches import collate_rows

    torch.manual_seed(0)
    tok = get_tokenizer("byte")
    cfg = load_config("local-smoke", ["data.tokenizer=byte", "model.vocab_size=257", "sft.seq_len=32"])
    model = Transformer(ModelConfig(vocab_size=257, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
                                    max_seq_len=32))
    examples = [(tok.encode("Q: a?\nA:"), tok.encode(" b")), (tok.encode("Q:\nA:"), tok.encode(" cc"))]
    rows = sft.build_rows(examples, cfg, tok, packing=False, seed=0)
    batch = collate_rows([rows[0], rows[1]])
    loss, _, n = sft.response_loss(model, batch)
    assert int(n) == (2 + 1) + (3 + 1)  # response bytes + eot of each example
    logp = F.log_softmax(model(batch["input_ids"]).float(), -1)
    terms = []
    for b, (p, r) in enumerate(examples):
        doc = p + r + [tok.eot_id]
        terms += [-logp[b, j - 1, doc[j]] for j in range(len(p), len(doc))]
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
