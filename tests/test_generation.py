"""Generation tests (CPU, tiny model): the KV cache equals full recompute (with sinks and windows too), left
padding is invisible, eos stops a row, seeded sampling reproduces, top-k / top-p restrict the support."""
import numpy as np
import pytest
import torch

from mllm.config import ModelConfig
from mllm.models.generation import filter_logits, generate, sample_next
from mllm.models.transformer import Transformer

VARIANTS = {
    "plain": {},
    "sink_tokens_window": {"n_sink_tokens": 2, "window": 3},
    "learned_sinks": {"learned_sinks": True},
    "all": {"learned_sinks": True, "n_sink_tokens": 1, "window": 4},
}
PROMPTS = [[5, 9, 2, 33, 7], [1, 60], [8, 8, 3, 41, 12, 19, 4]]


def tiny_model(seed=0, **kw) -> Transformer:
    # init_std 0.3 spreads the logits, so greedy choices are far from ties and float noise cannot flip them
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=40,
                      init_std=0.3, **kw)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for layer in model.layers:
            if layer.attn.sinks is not None:
                layer.attn.sinks.normal_(0.0, 1.0)
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cache_logits_equal_full_forward(variant):
    """Prefill + one-token steps through the cache give the logits of a full forward at every position,
    including a left-padded row (its padding is a separate document)."""
    model = tiny_model(**VARIANTS[variant])
    seq = torch.randint(0, 64, (12,))
    full = model(seq[None])[0]  # [12, V]
    pad = 3
    ids = torch.cat([torch.zeros(pad, dtype=torch.long), seq])[None]
    doc_start = torch.tensor([[0] * pad + [pad] * 12])
    pos = torch.arange(15)[None] - doc_start
    cache = model.new_kv_cache(doc_start)
    with torch.no_grad():
        got = [model.forward_with_cache(ids[:, :pad + 5], pos[:, :pad + 5], cache, last_only=False)[0, pad:]]
        for t in range(pad + 5, pad + 12):
            got.append(model.forward_with_cache(ids[:, t:t + 1], pos[:, t:t + 1], cache)[0])
    torch.testing.assert_close(torch.cat(got), full, rtol=1e-4, atol=1e-4)
    assert cache.length == 15


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_greedy_equals_full_recompute(variant):
    model = tiny_model(**VARIANTS[variant])
    cached = generate(model, PROMPTS, max_new_tokens=12)
    full = generate(model, PROMPTS, max_new_tokens=12, use_cache=False)
    assert cached == full
    assert [len(r) for r in cached] == [12, 12, 12]


@pytest.mark.parametrize("variant", ["plain", "all"])
def test_batched_equals_each_prompt_alone(variant):
    model = tiny_model(**VARIANTS[variant])
    batched = generate(model, PROMPTS, max_new_tokens=10)
    alone = [generate(model, [p], max_new_tokens=10)[0] for p in PROMPTS]
    assert batched == alone
    assert generate(model, PROMPTS, max_new_tokens=10, batch_size=2) == batched


def test_greedy_continuation_is_the_argmax_of_the_full_forward():
    model = tiny_model()
    new = generate(model, [PROMPTS[0]], max_new_tokens=6)[0]
    seq = torch.tensor([PROMPTS[0] + new])
    with torch.no_grad():
        argmax = model(seq)[0].argmax(-1)
    P = len(PROMPTS[0])
    assert argmax[P - 1:P - 1 + 6].tolist() == new


def test_eos_stops_only_its_row():
    model = tiny_model()
    free = generate(model, PROMPTS, max_new_tokens=10)
    eos = free[0][3]
    got = generate(model, PROMPTS, max_new_tokens=10, eos_id=eos)
    first = free[0].index(eos)
    assert got[0] == free[0][:first + 1]  # ends with the eos token
    for g, f in zip(got[1:], free[1:]):  # other rows run on until their own eos or the limit
        assert g == (f[:f.index(eos) + 1] if eos in f else f)
    # every row hitting eos at once ends the loop early
    assert generate(model, [PROMPTS[0]], max_new_tokens=10, eos_id=free[0][0]) == [[free[0][0]]]


def test_seeded_sampling_is_reproducible():
    model = tiny_model()
    kw = dict(max_new_tokens=15, temperature=1.5, seed=123)
    a = generate(model, PROMPTS, **kw)
    assert a == generate(model, PROMPTS, **kw)
    assert a != generate(model, PROMPTS, **{**kw, "seed": 124})
    assert a != generate(model, PROMPTS, max_new_tokens=15)  # not greedy
    # top_k = 1 leaves only the argmax: sampling becomes greedy
    assert generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, top_k=1, seed=0) == \
        generate(model, PROMPTS, max_new_tokens=8)


@pytest.mark.parametrize("kw, allowed", [(dict(top_k=3), 3), (dict(top_p=0.3), None)])
def test_sampled_tokens_stay_in_the_filtered_support(kw, allowed):
    model = tiny_model()
    new = generate(model, PROMPTS, max_new_tokens=10, temperature=1.0, seed=7, **kw)
    for prompt, gen in zip(PROMPTS, new):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + gen]))[0, len(prompt) - 1:-1]  # logits that produced gen
        keep = torch.isfinite(filter_logits(logits, **kw))
        if allowed is not None:
            assert torch.all(keep.sum(-1) == allowed)
        assert all(keep[t, tok] for t, tok in enumerate(gen))


def test_filter_logits_top_k_and_top_p():
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25]])
    logits = probs.log()
    kept = lambda **kw: torch.isfinite(filter_logits(logits, **kw))[0].nonzero().squeeze(-1).tolist()  # noqa: E731
    assert kept(top_k=2) == [1, 3]
    assert kept(top_p=0.3) == [1]
    assert kept(top_p=0.6) == [1, 3]
    assert kept(top_p=0.8) == [1, 2, 3]
    assert kept(top_p=1.0) == [0, 1, 2, 3]
    assert kept(top_k=2, top_p=0.9) == [1, 3]


def test_sample_next_support_and_renormalisation():
    probs = torch.tensor([0.1, 0.5, 0.15, 0.25])
    logits = probs.log()[None].expand(4000, 4)
    gen = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=1.0, top_p=0.6, generator=gen)
    counts = torch.bincount(draws, minlength=4).float() / 4000
    assert counts[0] == 0 and counts[2] == 0
    assert abs(counts[1].item() - 0.5 / 0.75) < 0.03  # renormalised over the nucleus {1, 3}
    assert torch.equal(sample_next(logits[:3], temperature=0.0), torch.tensor([1, 1, 1]))
    # a tiny temperature is (almost) greedy, not NaN probabilities from logits / T overflowing to inf
    assert torch.equal(sample_next(logits[:3], temperature=1e-40, generator=gen), torch.tensor([1, 1, 1]))


def test_generation_argument_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="prompts\\[1\\] is empty"):
        generate(model, [[1], []], 3)
    with pytest.raises(ValueError, match="outside"):
        generate(model, [[1, 64]], 3)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1] * 30], 11)
    for bad in (-1.0, float("nan"), float("inf"), None, "0.7"):
        with pytest.raises(ValueError, match="temperature"):
            generate(model, [[1]], 3, temperature=bad)
    with pytest.raises(ValueError, match=r"prompts\[0\] holds non-integer"):
        generate(model, [[1.9, 2.2]], 3)
    with pytest.raises(ValueError, match=r"prompts\[0\] holds non-integer"):
        generate(model, [torch.tensor([1.0, 2.0])], 3)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], 3, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, [[1]], 3, top_k=0)


def test_malformed_arguments_get_a_named_error():
    """A prompt that is not a 1-D id sequence (a [1, T] tensor, a nested list, a bare int) and an eos_id / top_k /
    top_p / batch_size of the wrong type raise a ValueError naming the argument, instead of an unrelated TypeError
    or RuntimeError deep inside, or (eos_id=1.5) silently never stopping."""
    model = tiny_model()
    for prompts in ([torch.tensor([[1, 2, 3]])], [[[1, 2]], [3]], [[1, 2], 5]):
        with pytest.raises(ValueError, match=r"prompts\[\d\]"):
            generate(model, prompts, 3)
    for kw, name in ((dict(eos_id=1.5), "eos_id"), (dict(eos_id="1"), "eos_id"), (dict(eos_id=True), "eos_id"),
                     (dict(temperature=1.0, top_k=True), "top_k"), (dict(temperature=1.0, top_p="0.9"), "top_p"),
                     (dict(batch_size=1.5), "batch_size"), (dict(batch_size="2"), "batch_size")):
        with pytest.raises(ValueError, match=name):
            generate(model, PROMPTS, 3, **kw)


def test_zero_new_tokens_and_train_mode_restored():
    model = tiny_model()
    model.train()
    assert generate(model, PROMPTS, 0) == [[], [], []]
    generate(model, PROMPTS, 2)
    assert model.training


@pytest.mark.parametrize("temperature", [1e-46, 1e-300, 1e300])
def test_sample_next_extreme_temperatures_give_no_nan(temperature):
    """A temperature that passes generate's check (finite, > 0) but under/overflows float32 (1e-46 -> 0,
    1e300 -> inf) must still sample: tiny = greedy among the maxima, huge = uniform over the finite logits."""
    logits = torch.tensor([[0.1, 2.0, 0.5, float("-inf")]]).expand(400, 4)
    gen = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=temperature, generator=gen)
    if temperature < 1:
        assert torch.all(draws == 1)
    else:
        assert set(draws.tolist()) == {0, 1, 2}
    model = tiny_model()
    if temperature < 1:
        assert generate(model, PROMPTS, 4, temperature=temperature, seed=0) == generate(model, PROMPTS, 4)


@pytest.mark.parametrize("prompt", [torch.tensor(5), np.array(5), np.int64(5)])
def test_a_scalar_prompt_gets_a_named_error(prompt):
    """A 0-d tensor or array (e.g. ``ids[0, 0]`` where ``ids[0]`` was meant) has ``__len__`` but no length: it is
    rejected with the same named ValueError as a bare int, not len()'s TypeError."""
    with pytest.raises(ValueError, match=r"prompts\[0\] must be a sequence of token ids"):
        generate(tiny_model(), [prompt], 3)
