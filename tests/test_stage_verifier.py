"""Verifier stage: labelling by final-answer correctness, example layout and value-loss masking, the value head
on top of the LM, scoring, AUC, and that a few steps learn a separable labelling."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mllm.config.pipeline_config import ModelConfig, OptimConfig, StageConfig
from mllm.data.tokenizer import get_tokenizer
from mllm.models.transformer import Transformer
from mllm.stages import verifier as V


def _model(T=64, seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=257, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
                                   max_seq_len=T))


def test_label_by_final_answer():
    assert V.label_solution(" 3 + 4 = 7\n#### 7", "7") == 1
    assert V.label_solution(" 999 then\n#### 1,000", "1000") == 1  # normalised
    assert V.label_solution(" the answer is 8", "7") == 0  # last number, wrong
    assert V.label_solution(" no number at all", "7") == 0
    assert V.label_solution("", "7") == 0


def test_example_layout_masks_prompt_and_keeps_its_end():
    ex = V.verifier_example([10, 11, 12, 13], [20, 21, 22], 1, seq_len=6)
    assert ex["input_ids"].tolist() == [11, 12, 13, 20, 21, 22]  # 6 - 3 solution tokens: the prompt's last 3
    assert ex["value_mask"].tolist() == [0, 0, 0, 1, 1, 1]
    assert ex["value_target"].tolist() == [0, 0, 0, 1, 1, 1]
    assert ex["labels"].tolist() == [-100, -100, 20, 21, 22, -100]  # LM targets: the solution tokens only
    wrong = V.verifier_example([10], [20, 21], 0, seq_len=8)
    assert wrong["value_mask"].tolist() == [0, 1, 1] and wrong["value_target"].tolist() == [0, 0, 0]
    assert V.verifier_example([10], [], 1, seq_len=8) is None  # empty solution
    assert V.verifier_example([10], list(range(8)), 1, seq_len=8) is None  # no room for a prompt token


def test_labelled_examples_counts():
    tok = get_tokenizer("byte")
    rows = [{"question": "1+1?", "answer": "1+1=2\n#### 2"}, {"question": "2+2?", "answer": "#### 4"}]
    samples = [[" so 2\n#### 2", " #### 3"], ["", " x" * 100]]
    ex, counts = V.labelled_examples(tok, rows, samples, seq_len=64, include_gold=True)
    assert counts == {"questions": 2, "samples": 4, "correct_samples": 1, "empty_samples": 1, "too_long": 1,
                      "gold_solutions": 2}
    assert [int(e["label"]) for e in ex] == [1, 0, 1, 1]  # 2 samples of q1 + its gold, the gold of q2
    ex, counts = V.labelled_examples(tok, rows, samples, seq_len=64, include_gold=False)
    assert len(ex) == 2 and counts["gold_solutions"] == 0


def test_value_loss_only_on_solution_tokens_plus_lm_loss():
    vm = V.VerifierModel.from_lm(_model())
    with torch.no_grad():
        vm.value_head.weight.normal_(0, 1.0)  # non-trivial values everywhere
        vm.value_head.bias.fill_(0.3)
    items = [V.verifier_example([5, 6, 7, 8], [40, 41, 42], 1, 16), V.verifier_example([9, 10], [50, 51], 0, 16)]
    batch = V.make_collate(0)(items)
    loss, m, n = V.make_verifier_loss(lm_weight=0.5, value_weight=2.0)(vm, batch)
    assert int(n) == 5
    v = vm.values(vm.hidden_states(batch["input_ids"]))
    sol = [(0, t, 1.0) for t in (4, 5, 6)] + [(1, t, 0.0) for t in (2, 3)]
    want_v = torch.stack([F.binary_cross_entropy_with_logits(v[b, t], torch.tensor(y)) for b, t, y in sol]).mean()
    assert m["value_loss"].item() == pytest.approx(want_v.item(), rel=1e-5)
    logp = F.log_softmax(vm(batch["input_ids"]).float(), -1)
    ids = batch["input_ids"]
    want_lm = torch.stack([-logp[b, t - 1, ids[b, t]] for b, t, _ in sol]).mean()
    assert m["lm_loss"].item() == pytest.approx(want_lm.item(), rel=1e-5)
    assert loss.item() == pytest.approx(2.0 * want_v.item() + 0.5 * want_lm.item(), rel=1e-5)
    # prompt and padding positions get no value gradient: targets there may be anything
    batch2 = dict(batch, value_target=batch["value_target"] + (1 - batch["value_mask"]) * 0.77)
    assert V.make_verifier_loss(0.5, 2.0)(vm, batch2)[0].item() == pytest.approx(loss.item(), rel=1e-6)


def test_verifier_model_keeps_the_lm_and_scores_last_token():
    lm = _model()
    vm = V.VerifierModel.from_lm(lm)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(vm(ids), lm(ids))
    assert set(vm.state_dict()) - set(lm.state_dict()) == {"value_head.weight", "value_head.bias"}
    with torch.no_grad():
        vm.value_head.weight.normal_()
    tok = get_tokenizer("byte")
    scorer = V.VerifierScorer(vm, tok)
    q, s = "How many?", " 2 + 2 = 4\n#### 4"
    seq = V.gsm8k_prompt_ids(tok, q) + tok.encode(s)
    want = torch.sigmoid(vm.values(vm.hidden_states(torch.tensor([seq])))[0, -1]).item()
    assert scorer(q, s) == pytest.approx(want, rel=1e-5)
    got = scorer.score_batch([q, "Another question with more words?"], [s, " 5"])  # padded batch
    assert got[0] == pytest.approx(want, rel=1e-5) and 0 < got[1] < 1


def test_roc_auc():
    assert V.roc_auc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert V.roc_auc([0.1, 0.9], [1, 0]) == 0.0
    assert V.roc_auc([0.5, 0.5, 0.5], [1, 0, 0]) == 0.5  # ties count half
    assert V.roc_auc([0.3, 0.4], [0, 0]) is None
    rep = V.classification_report([0.9, 0.2, 0.6, 0.1], [1, 0, 0, 0])
    assert rep["base_rate"] == 0.25 and rep["auc"] == 1.0 and rep["accuracy_at_0.5"] == 0.75
    assert rep["majority_label_accuracy"] == 0.75


def test_few_steps_separate_correct_from_wrong_solutions():
    """Correct and wrong solutions drawn from disjoint token ranges (every solution token shows its label): the
    held-out per-token value loss falls well below log 2 and the AUC of the final-token score goes to ~1."""
    from mllm.training.batches import EvalBatches, RowBatchSource
    from mllm.training.trainer import Trainer

    def make(rng, n):
        out = []
        for i in range(n):
            y = i % 2
            lo = 60 if y else 90
            sol = list(rng.integers(lo, lo + 30, rng.integers(2, 6)))
            out.append(V.verifier_example(list(rng.integers(60, 120, 5)), sol, y, 32))
        return out

    train, val = make(np.random.default_rng(0), 64), make(np.random.default_rng(1), 32)
    vm = V.VerifierModel.from_lm(_model(T=32))
    sc = StageConfig(steps=15, batch_size=8, micro_batch_size=8, seq_len=32, lr=1e-2, warmup_steps=1,
                     eval_every=15, eval_batches=4, save_every=100, log_every=5)
    collate = V.make_collate(0)
    trainer = Trainer(vm, V.make_verifier_loss(0.0, 1.0), RowBatchSource(train, batch_size=8, micro_batch_size=8,
                      collate=collate), sc, OptimConfig(weight_decay=0.0), stage="verifier",
                      val_data=EvalBatches(val, micro_batch_size=8, collate=collate), seed=0, progress=False)
    trainer.fit()
    assert trainer.first_eval["val_value_loss"] == pytest.approx(math.log(2), abs=1e-4)  # zero-initialised head
    assert trainer.last_eval["val_value_loss"] < 0.5 * math.log(2)
    with torch.no_grad():
        scores = []
        for ex in val:
            ids = torch.as_tensor(ex["input_ids"])[None]
            scores.append(torch.sigmoid(vm.values(vm.hidden_states(ids))[0, -1]).item())
    assert V.roc_auc(scores, [int(e["label"]) for e in val]) >= 0.9


def test_samples_are_cached_for_a_resume(tmp_path):
    """A resumed verifier stage trains on the samples its checkpoint was trained on (read back, not drawn again:
    another world size would draw others), and samples again when the generator checkpoint or a sampling key
    changes."""
    import os
    import types

    from mllm.training import checkpoint as ckpt
    from mllm.training.distributed import DistContext

    ctx = types.SimpleNamespace(run_dir=tmp_path, dist=DistContext())
    gen = tmp_path / "sft.pt"
    gen.write_bytes(b"weights v1")
    calls = []

    def sample(tag):
        def fn():
            calls.append(tag)
            return [[f"{tag} a", f"{tag} b"]], [[f"{tag} c"]]
        return fn

    key = lambda **kw: {"generator": ckpt.file_identity(gen), "temperature": 0.7, **kw}  # noqa: E731
    assert V.cached_samples(ctx, key(), sample("first")) == (([["first a", "first b"]], [["first c"]]),
                                                                     "sampled")
    assert V.cached_samples(ctx, key(), sample("second")) == (([["first a", "first b"]], [["first c"]]),
                                                                      "cached")
    assert V.cached_samples(ctx, key(temperature=1.0), sample("hot"))[1] == "sampled"
    gen.write_bytes(b"weights v2")
    st = gen.stat()
    os.utime(gen, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert V.cached_samples(ctx, key(), sample("retrained"))[1] == "sampled"
    assert calls == ["first", "hot", "retrained"]


def test_mfu_attention_term_uses_the_padded_batch_length(tmp_path):
    """The verifier pads each micro-batch to its longest row, shorter than verifier.seq_len: the logged MFU counts
    6N + 12·L·H·Q·T FLOPs per token with T = that padded length (token-weighted over the step's micro-batches),
    not the config's seq_len."""
    from mllm.training.batches import RowBatchSource
    from mllm.training.metrics import read_metrics
    from mllm.training.trainer import Trainer

    rng = np.random.default_rng(0)
    ex = [V.verifier_example(list(rng.integers(0, 256, 4)), list(rng.integers(0, 256, int(rng.integers(2, 12)))),
                             i % 2, 64) for i in range(16)]
    vm = V.VerifierModel.from_lm(_model(T=64))
    sc = StageConfig(steps=2, batch_size=8, micro_batch_size=4, seq_len=64, lr=1e-3, warmup_steps=0, eval_every=100,
                     eval_batches=1, save_every=100, log_every=1)
    src = lambda: RowBatchSource(ex, batch_size=8, micro_batch_size=4, seed=0, collate=V.make_collate(0))  # noqa: E731
    trainer = Trainer(vm, V.make_verifier_loss(1.0, 1.0), src(), sc, OptimConfig(), stage="verifier",
                      run_dir=tmp_path, seed=0, progress=False)
    trainer.peak_flops = 1e12  # CPU has no peak: pretend one, so that MFU is computed
    trainer.fit()
    recs = [r for r in read_metrics(tmp_path / "metrics.jsonl", "verifier") if r["kind"] == "train"]
    shadow = src()
    for rec in recs:
        shapes = [tuple(shadow.next_batch()["input_ids"].shape) for _ in range(2)]  # the step's 2 micro-batches
        assert all(T < sc.seq_len for _, T in shapes)
        want = sum(B * T * vm.flops_per_token(T) for B, T in shapes) / sum(B * T for B, T in shapes)
        assert rec["mfu"] * 1e12 / rec["tokens_per_s"] == pytest.approx(want, rel=1e-5)


def test_mfu_flops_leave_out_the_lm_head_when_its_loss_weight_is_0():
    """With verifier.lm_loss_weight = 0 the loss never runs the LM head: the stage's FLOPs per token drop its
    6·V·d (measured: fwd+bwd FLOPs with the LM loss minus without it, per token, are exactly 6·V·d)."""
    from torch.utils.flop_counter import FlopCounterMode

    vm = V.VerifierModel.from_lm(_model())
    items = [V.verifier_example([5, 6, 7, 8], [40, 41, 42], 1, 16), V.verifier_example([9, 10], [50, 51], 0, 16)]
    batch = V.make_collate(0)(items)
    B, T = batch["input_ids"].shape
    measured = {}
    for w in (1.0, 0.0):
        with FlopCounterMode(display=False) as fc:
            V.make_verifier_loss(w, 1.0)(vm, batch)[0].backward()
        measured[w] = fc.get_total_flops() / (B * T)
    head = 6 * vm.cfg.vocab_size * vm.cfg.d_model
    assert measured[1.0] - measured[0.0] == head
    # what the stage gives the Trainer for MFU (before this fix: the model's own flops_per_token, head included)
    stage_flops = getattr(V, "verifier_flops_per_token", lambda model, lm_weight: model.flops_per_token)
    assert stage_flops(vm, lm_weight=1.0)(T) == vm.flops_per_token(T)
    assert vm.flops_per_token(T) - stage_flops(vm, lm_weight=0.0)(T) == head
