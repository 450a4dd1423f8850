"""DPO stage: hh-rlhf parsing and skip counts, truncation, answer log-probs, loss maths, reference modes, and a few
DPO steps that raise held-out reward accuracy on a synthetic preference task."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mllm.config.pipeline_config import ConfigError, ModelConfig, OptimConfig, StageConfig
from mllm.data.tokenizer import get_tokenizer
from mllm.models.transformer import Transformer
from mllm.stages import dpo

H, A = "\n\nHuman:", "\n\nAssistant:"


def _tiny_model(V=64, T=32, seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
                                   max_seq_len=T))


# ----------------------------------------------------------------------------------------------------
# parsing
# ----------------------------------------------------------------------------------------------------
def test_parse_shared_prefix_is_prompt_final_turns_are_answers():
    pre = f"{H} Hi{A} Hello!{H} What is 2+2?{A}"
    pair, why = dpo.parse_hh_pair(pre + " It is 4.", pre + " It is 5, I think.")
    assert why is None
    assert pair == {"prompt": pre, "chosen": " It is 4.", "rejected": " It is 5, I think."}
    # the texts diverge inside the answer ("It is"): the prompt is still cut at the last Assistant marker
    assert pair["prompt"].endswith(A)


def test_parse_skips_and_counts_bad_pairs():
    good = (f"{H} a{A} yes", f"{H} a{A} no")
    records = [
        {"chosen": good[0], "rejected": good[1]},
        {"chosen": f"{H} a{A} same", "rejected": f"{H} a{A} same"},  # identical texts
        {"chosen": f"{H} a{A} fine", "rejected": f"{H} a{A}   "},  # empty answer
        {"chosen": f"{H} only a human turn", "rejected": f"{H} only a human turn!"},  # no Assistant turn
        {"chosen": f"{H} a{A}", "rejected": f"{H} a{A} b"},  # empty chosen
        {"chosen": f"{H} x{A} y", "rejected": f"{H} z{A} y"},  # divergence before any Assistant turn
        # divergence in an earlier Assistant turn: the "answers" would carry the later Human turn
        {"chosen": f"{H} a{A} No.{H} why?{A} because", "rejected": f"{H} a{A} Yes.{H} why?{A} because"},
    ]
    pairs, counts = dpo.parse_hh_records(records)
    assert len(pairs) == 1 and pairs[0]["chosen"] == " yes"
    assert counts == {"pairs_in": 7, "no_assistant_turn": 2, "identical": 1, "empty_answer": 2, "not_final_turn": 1}


def test_tokenize_keeps_prompt_end_and_truncates_answers():
    tok = get_tokenizer("byte")
    pair = {"prompt": f"{H} " + "x" * 100 + A, "chosen": " good answer here", "rejected": " bad"}
    t = dpo.tokenize_pair(pair, tok, seq_len=30, max_prompt_len=20)
    assert tok.decode(t["prompt"]) == pair["prompt"][-20:] and tok.decode(t["prompt"]).endswith("Assistant:")
    assert len(t["prompt"]) + len(t["chosen"]) == 30  # cut to the budget: no eot fits
    assert tok.decode(t["chosen"]) == " good answ"  # 30 - 20 = 10 bytes
    assert t["rejected"].tolist() == tok.encode(" bad") + [tok.eot_id]  # short answer keeps its eot
    # answers equal within the budget -> dropped
    same = {"prompt": pair["prompt"], "chosen": " abcdefghi-1", "rejected": " abcdefghi-2"}
    assert dpo.tokenize_pair(same, tok, seq_len=30, max_prompt_len=20) is None
    with pytest.raises(ConfigError, match="dpo.max_prompt_len"):
        dpo.tokenize_pair(pair, tok, seq_len=30, max_prompt_len=30)


def test_real_hh_rlhf_parses_with_counts(data_dir):
    from mllm.data.datasets import load_hh_rlhf

    recs = load_hh_rlhf(data_dir, split="test", subsets=("helpful-base",))
    pairs, counts = dpo.parse_hh_records(recs)
    # the README: helpful-base-test has 2,354 pairs, 2 of them with identical chosen and rejected
    assert counts["pairs_in"] == 2354 and counts["identical"] >= 2
    assert len(pairs) == 2354 - sum(v for k, v in counts.items() if k != "pairs_in")
    assert all(p["prompt"].endswith(A) and p["chosen"] != p["rejected"] for p in pairs)
    assert not any(m in p[k] for p in pairs for k in ("chosen", "rejected") for m in (H, A))  # final turns only


# ----------------------------------------------------------------------------------------------------
# log-probs and loss
# ----------------------------------------------------------------------------------------------------
def _pairs(rng, n, prompt_len=(3, 8), ans_len=(1, 5), V=64):
    out = []
    for _ in range(n):
        p = rng.integers(10, V, rng.integers(*prompt_len))
        c = rng.integers(10, V, rng.integers(*ans_len))
        r = rng.integers(10, V, rng.integers(*ans_len))
        out.append({"prompt": p.astype(np.int64), "chosen": c.astype(np.int64), "rejected": r.astype(np.int64)})
    return out


def test_answer_logprobs_match_full_log_softmax():
    model = _tiny_model()
    items = _pairs(np.random.default_rng(0), 5)
    batch = dpo.make_collate(pad_id=3)(items)
    ids, labels, B = dpo._both(batch)
    got = dpo.answer_logprobs(model, ids, labels)
    logp = F.log_softmax(model(ids).float(), -1)
    for i in range(2 * B):
        it = items[i % B]
        ans = it["chosen"] if i < B else it["rejected"]
        P = len(it["prompt"])
        want = sum(logp[i, P - 1 + j, int(ans[j])] for j in range(len(ans)))
        assert got[i].item() == pytest.approx(want.item(), abs=1e-4)


def test_dpo_loss_maths_on_tiny_tensors():
    from mllm_kernels import dpo_loss

    pc, pr = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0])
    loss, rew_c, rew_r = dpo_loss(pc, pr, rc, rr, 0.5)
    assert rew_c.tolist() == [0.25, -0.5] and rew_r.tolist() == [-0.25, 0.5]
    want = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.0))) / 2  # mean -log σ(margin), margins 0.5, -1
    assert loss.item() == pytest.approx(want, rel=1e-6)
    m = dpo.reward_metrics(rew_c, rew_r)
    assert m["rewards/accuracies"].item() == 0.5 and m["rewards/margins"].item() == pytest.approx(-0.25)
    assert m["rewards/chosen"].item() == pytest.approx(-0.125) and m["rewards/rejected"].item() == pytest.approx(0.125)


def test_policy_equal_to_reference_and_frozen_equals_precomputed():
    model = _tiny_model()
    data = dpo.PairDataset(_pairs(np.random.default_rng(1), 6))
    data.ref = dpo.reference_logprobs(model, data, batch_size=4, device="cpu", progress=False)
    batch = dpo.make_collate(0)([data[i] for i in range(6)])
    loss, m, n = dpo.make_dpo_loss(0.1)(model, batch)
    assert n == 6 and loss.item() == pytest.approx(math.log(2), abs=1e-5)  # all rewards 0
    assert abs(m["rewards/margins"].item()) < 1e-5
    # a changed policy: the frozen copy of the reference gives the same loss as the precomputed log-probs
    ref_model = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pre, m1, _ = dpo.make_dpo_loss(0.1)(model, batch)
    fro, m2, _ = dpo.make_dpo_loss(0.1, ref_model)(model, batch)
    assert abs(pre.item() - math.log(2)) > 1e-4
    assert fro.item() == pytest.approx(pre.item(), abs=1e-5)
    assert m1["rewards/margins"].item() == pytest.approx(m2["rewards/margins"].item(), abs=1e-5)
    fro.backward()
    assert all(p.grad is None for p in ref_model.parameters())


def test_few_dpo_steps_raise_heldout_reward_accuracy_on_synthetic_preferences():
    """Chosen answers start with token 1, rejected with token 2, the rest is shared noise: the preference is
    learnable and generalises to held-out prompts, so held-out reward accuracy must go from ~0 (ties) to ~1."""
    from mllm.training.batches import EvalBatches, RowBatchSource
    from mllm.training.trainer import Trainer

    def make(rng, n):
        out = []
        for _ in range(n):
            p = rng.integers(10, 64, rng.integers(3, 8)).astype(np.int64)
            tail = rng.integers(10, 64, rng.integers(1, 4)).astype(np.int64)
            out.append({"prompt": p, "chosen": np.r_[1, tail], "rejected": np.r_[2, tail]})
        return out

    model = _tiny_model(seed=3)
    train, val = dpo.PairDataset(make(np.random.default_rng(0), 64)), dpo.PairDataset(make(np.random.default_rng(9), 32))
    train.ref = dpo.reference_logprobs(model, train, 16, "cpu", progress=False)
    val.ref = dpo.reference_logprobs(model, val, 16, "cpu", progress=False)
    sc = StageConfig(steps=12, batch_size=8, micro_batch_size=8, seq_len=32, lr=1e-2, warmup_steps=1,
                     eval_every=12, eval_batches=4, save_every=100, log_every=4)
    collate = dpo.make_collate(0)
    trainer = Trainer(model, dpo.make_dpo_loss(0.1), RowBatchSource(train, batch_size=8, micro_batch_size=8,
                      collate=collate), sc, OptimConfig(weight_decay=0.0), stage="dpo",
                      val_data=EvalBatches(val, micro_batch_size=8, collate=collate), seed=0, progress=False)
    trainer.fit()
    first, last = trainer.first_eval, trainer.last_eval
    assert first["val_rewards/accuracies"] <= 0.25 and abs(first["val_rewards/margins"]) < 1e-3
    assert last["val_rewards/accuracies"] >= 0.9
    assert last["val_rewards/margins"] > 0.1 and last["val_loss"] < math.log(2) - 0.05


def test_wilson_interval_known_values():
    """The 95% Wilson score interval the held-out reward accuracy is reported with (textbook values: 50/100 ->
    [0.4038, 0.5962], 0/10 -> [0, 0.2775]); it is not the normal (Wald) interval, which gives [0, 0] at p = 0."""
    lo, hi = dpo.wilson_interval(0.5, 100)
    assert lo == pytest.approx(0.40383, abs=1e-4) and hi == pytest.approx(0.59617, abs=1e-4)
    lo, hi = dpo.wilson_interval(0.0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.27754, abs=1e-4)
    # more pairs narrow it: the same 0.55 is compatible with chance at n=256 but not at n=1024
    assert dpo.wilson_interval(0.55, 256)[0] < 0.5 < dpo.wilson_interval(0.55, 1024)[0]
    assert dpo.wilson_interval(0.7, 0) is None


def test_reference_cache_follows_the_sft_checkpoint_file_not_its_name(tmp_path):
    """The cached reference log-probs are reused only for the same SFT checkpoint file: an SFT retrained into the
    same file name (same step count) must not leave DPO training against the old reference."""
    import os
    import types

    from mllm.config.pipeline_config import PipelineConfig
    from mllm.training import checkpoint as ckpt
    from mllm.training.distributed import DistContext

    cfg = PipelineConfig()
    cfg.dpo.micro_batch_size = 2
    ctx = types.SimpleNamespace(run_dir=tmp_path, dist=DistContext(), progress=False)
    rng = np.random.default_rng(3)
    src = tmp_path / "step_00000060.pt"

    def save(seed):
        model = _tiny_model(seed=seed)
        torch.save(model.state_dict(), src)
        st = src.stat()
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + seed * 10**9))  # coarse-mtime file systems too
        return model

    def run(model):
        train, val = dpo.PairDataset(list(pairs)), dpo.PairDataset(list(pairs[:2]))
        info = dpo.attach_reference(model, train, val, cfg, ctx, src, "cpu")
        return info["reference"], train.ref, dpo.reference_logprobs(model, train, 4, "cpu", progress=False)

    pairs = _pairs(rng, 4)
    model = save(seed=0)
    how, ref, true = run(model)
    assert how == "precomputed" and np.array_equal(ref, true)
    how, ref, true = run(model)
    assert how == "precomputed (cached)" and np.array_equal(ref, true)
    model = save(seed=1)  # other weights, same path
    how, ref, true = run(model)
    assert how == "precomputed" and np.array_equal(ref, true)
    assert ckpt.file_identity(src)["size"] == src.stat().st_size
