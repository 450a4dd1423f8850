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


def test_next_token_loss_on_packed_rows_equals_each_document_alone():
    """A packed micro-batch (row 0: two documents, row 1: one) must give exactly the token-weighted mean of the
    losses of every document run on its own: ``next_token_loss`` (the pretraining and SFT loss) has to hand the
    model the rows' ``cu_seqlens`` (no attention across a document boundary) and ``position_ids`` (RoPE positions
    restart in each document). Dropping either lets document 2 see document 1 and changes its loss."""
    import numpy as np

    from mllm.config.pipeline_config import ModelConfig
    from mllm.models.transformer import Transformer, causal_lm_loss
    from mllm.stages.common import SegmentRows, next_token_loss
    from mllm.training.batches import collate_rows

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64,
                                    max_seq_len=16))
    g = np.random.default_rng(0)
    T = 12
    docs = [g.integers(0, 64, n) for n in (5, 7, 12)]
    layout = [[docs[0], docs[1]], [docs[2]]]  # row 0 packs documents 0 and 1, row 1 holds document 2
    ids, labels, pos = np.zeros((2, T), np.int64), np.full((2, T), -100, np.int64), np.zeros((2, T), np.int64)
    for r, row in enumerate(layout):
        s = 0
        for d in row:
            n = len(d)
            ids[r, s:s + n] = d
            labels[r, s:s + n - 1] = d[1:]  # aligned labels; a document's last token predicts nothing
            pos[r, s:s + n] = np.arange(n)
            s += n
    rows = SegmentRows({"input_ids": ids, "labels": labels, "position_ids": pos})
    batch = collate_rows([rows[0], rows[1]])
    assert batch["cu_seqlens"].tolist() == [0, 5, 12, 24]  # the batch carries both rows' document bounds
    with torch.no_grad():
        loss, _, n = next_token_loss(model, batch)
        total, count = 0.0, 0
        for d in docs:
            x = torch.as_tensor(d)[None]
            lab = torch.full_like(x, -100)
            lab[0, :-1] = x[0, 1:]
            total += causal_lm_loss(model(x), lab, reduction="sum").item()
            count += len(d) - 1
        # the second document of row 0 alone (labels of the others ignored): no share of the first one's context
        only = {**batch, "labels": batch["labels"].clone()}
        only["labels"][0, :5] = -100
        only["labels"][1] = -100
        loss1, _, n1 = next_token_loss(model, only)
        x = torch.as_tensor(docs[1])[None]
        ref1 = causal_lm_loss(model(x), torch.cat([x[:, 1:], torch.full((1, 1), -100)], 1)).item()
    assert int(n) == count == 4 + 6 + 11
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    assert int(n1) == 6 and loss1.item() == pytest.approx(ref1, rel=1e-5)


def _sft_data_dir(root, n=40):
    """A data folder (shared layout) with n Alpaca and n GSM8K train records, all distinct and all short."""
    (root / "alpaca").mkdir(parents=True)
    (root / "gsm8k").mkdir()
    alp = [{"instruction": f"Say word {i}.", "input": "", "output": f"word {i}"} for i in range(n)]
    (root / "alpaca" / "alpaca_data.json").write_text(json.dumps(alp))
    gsm = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(n)]
    (root / "gsm8k" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm))
    return alp, gsm


def _documents(rows, tok):
    """(source, key) of every unpacked SFT row: the Alpaca instruction or the GSM8K question it was built from."""
    out = []
    for i in range(len(rows)):
        text = tok.decode([t for t in rows[i]["input_ids"].tolist() if t != tok.eot_id])
        if text.startswith("Question: "):
            out.append(("gsm8k", text[len("Question: "):].split("\nAnswer:")[0]))
        else:
            assert text.startswith("Below is an instruction"), text
            out.append(("alpaca", text.split("### Instruction:\n")[1].split("\n\n")[0]))
    return out


def test_sft_data_trains_on_neither_held_out_slice_and_mixes_by_weight(tmp_path):
    """``build_sft_data`` on a small local data folder: no training example comes from the Alpaca held-out slice or
    the GSM8K dev slice (both carved by ``split_holdout`` with the run's seed and ``data.val_fraction``; the
    validation rows come from those slices only), even when the requested number of examples exceeds the training
    pool (the training records are then repeated, never topped up with held-out ones), and the share of GSM8K
    examples is ``round(sft.gsm8k_weight · n) / n``."""
    from mllm.data.datasets import split_holdout

    alp, gsm = _sft_data_dir(tmp_path)
    tok = get_tokenizer("byte")
    w = 0.25
    cfg = load_config("local-smoke", [f"data.data_dir={tmp_path}", "data.tokenizer=byte", "model.vocab_size=257",
                                      "model.max_seq_len=256", "data.val_fraction=0.25", "data.packing=false",
                                      f"sft.gsm8k_weight={w}", "sft.max_examples=null", "sft.seq_len=256",
                                      "sft.batch_size=4", "sft.micro_batch_size=4", "sft.eval_batches=2"])
    alp_train, alp_held = split_holdout(alp, 0.25, seed=cfg.seed, key=("instruction", "input"))
    gsm_train, gsm_dev = split_holdout(gsm, 0.25, seed=cfg.seed, key="question")
    assert len(alp_held) >= 6 and len(gsm_dev) >= 2  # enough for the 8 validation examples (no repeats there)
    train, val, _, info = sft.build_sft_data(cfg, tok)
    docs = _documents(train, tok)
    n = len(alp_train) + len(gsm_train)  # sft.max_examples=null: as many as both training pools hold
    assert len(docs) == info["train_examples"] == n
    n_alp = n - round(w * n)
    assert n_alp > len(alp_train), "the test needs more Alpaca examples than the training pool holds"
    train_alp = {k for s, k in docs if s == "alpaca"}
    train_gsm = {k for s, k in docs if s == "gsm8k"}
    assert train_alp == {r["instruction"] for r in alp_train}  # all of the pool, repeated, and nothing else
    assert not train_alp & {r["instruction"] for r in alp_held}
    assert train_gsm <= {r["question"] for r in gsm_train}
    assert not train_gsm & {r["question"] for r in gsm_dev}
    assert info["alpaca"]["heldout_pool"] == len(alp_held) and info["gsm8k"]["dev_pool"] == len(gsm_dev)
    # the mixture: round(w · n) GSM8K examples, the rest Alpaca
    n_gsm = sum(s == "gsm8k" for s, _ in docs)
    assert n_gsm == info["gsm8k"]["train_examples"] == round(w * n)
    assert abs(n_gsm / n - w) <= 1 / n
    # validation: only held-out records, and the same mixture over eval_batches · micro_batch_size examples
    vdocs = _documents(val, tok)
    assert len(vdocs) == 8 and sum(s == "gsm8k" for s, _ in vdocs) == round(w * 8)
    assert {k for s, k in vdocs if s == "alpaca"} <= {r["instruction"] for r in alp_held}
    assert {k for s, k in vdocs if s == "gsm8k"} <= {r["question"] for r in gsm_dev}
