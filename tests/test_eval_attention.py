"""Attention statistics on hand-made maps, observations derived from them, and the visualize script end to end
on a checkpoint written through mllm.training.checkpoint."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from mllm.config import load_config
from mllm.evaluation.attention_maps import (STAT_KEYS, analyze, attention_statistics, head_statistics,
                                            merge_statistics, observations, uniform_statistics)
from mllm.evaluation.loading import find_stage_checkpoints, load_stage_model
from mllm.models import Transformer
from mllm.training.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _maps(T=6):
    """Layer 0: head 0 all on token 0 (sink), head 1 on itself (diagonal), head 2 uniform over the prefix,
    head 3 on the previous token (local). Layer 1: head 2's pattern everywhere."""
    sink = torch.zeros(T, T)
    sink[:, 0] = 1
    diag = torch.eye(T)
    unif = torch.tril(torch.ones(T, T))
    unif = unif / unif.sum(-1, keepdim=True)
    prev = torch.zeros(T, T)
    prev[0, 0] = 1
    for i in range(1, T):
        prev[i, i - 1] = 1
    l0 = torch.stack([sink, diag, unif, prev])[None]
    l1 = unif.expand(1, 4, T, T).clone()
    return [l0, l1]


def test_head_statistics_by_hand():
    T = 6
    st = head_statistics(_maps(T)[0], local_window=1, skip_first=1)
    # queries i = 1..5
    assert st["first_mass"].tolist() == pytest.approx([1.0, 0.0, sum(1 / (i + 1) for i in range(1, 6)) / 5, 0.2])
    assert st["self_mass"].tolist() == pytest.approx([0.0, 1.0, sum(1 / (i + 1) for i in range(1, 6)) / 5, 0.0])
    # local band |i-j| <= 1: the uniform head has 2/(i+1) there (1/(i+1) for i = ... all i >= 1 see 2 keys)
    assert st["local_mass"].tolist() == pytest.approx([0.2, 1.0, sum(2 / (i + 1) for i in range(1, 6)) / 5, 1.0])
    assert st["entropy"].tolist() == pytest.approx([0.0, 0.0, sum(torch.log(torch.tensor(i + 1.0)).item()
                                                                  for i in range(1, 6)) / 5, 0.0], abs=1e-6)
    assert st["norm_entropy"][2].item() == pytest.approx(1.0)
    assert st["mean_distance"][0].item() == pytest.approx(3.0) and st["mean_distance"][3].item() == pytest.approx(1.0)
    assert st["sink_logit_mass"].tolist() == pytest.approx([0.0] * 4, abs=1e-6)
    # learned sinks: rows summing to 0.7 -> 30% absorbed
    st2 = head_statistics(_maps(T)[0] * 0.7, skip_first=1)
    assert st2["sink_logit_mass"].tolist() == pytest.approx([0.3] * 4)
    with pytest.raises(ValueError, match=r"\[B, H, T, T\]"):
        head_statistics(torch.zeros(2, 3, 4))



def test_merge_statistics_averages_over_texts():
    """``merge_statistics`` (one statistics dict per analysed text -> the report's numbers) must average every head's
    statistic and every layer mean over the texts, not keep one text's: two texts whose heads differ (the sink head of
    text 1 is the local head of text 2 and so on) merge to the element-wise mean, and the count of texts is kept."""
    a = attention_statistics(_maps(6), local_window=1)
    l0, l1 = _maps(8)
    b = attention_statistics([l0[:, [3, 2, 1, 0]], l1], local_window=1)  # layer 0's heads in reverse order
    merged = merge_statistics([a, b])
    assert merged["n_texts"] == 2 and merged["settings"] == a["settings"]
    differ = 0
    for l in range(2):
        for k in STAT_KEYS:
            want = (a["layers"][l][f"mean_{k}"] + b["layers"][l][f"mean_{k}"]) / 2
            assert merged["layers"][l][f"mean_{k}"] == pytest.approx(want), (l, k)
            for h in range(4):
                x, y = a["layers"][l]["heads"][h][k], b["layers"][l]["heads"][h][k]
                differ += abs(x - y) > 1e-3
                assert merged["layers"][l]["heads"][h][k] == pytest.approx((x + y) / 2), (l, h, k)
    assert differ > 10  # the two texts really disagree, so keeping either one would show
    assert merge_statistics([a])["layers"] == a["layers"]
    with pytest.raises(ValueError, match="nothing to merge"):
        merge_statistics([])

def test_observations_follow_the_numbers():
    stats = attention_statistics(_maps(), local_window=1)
    obs = observations(stats)
    text = "\n".join(obs)
    assert obs[0].startswith("Sink heads") and "L0H0 (100%)" in obs[0] and "1 of 8" in obs[0]
    assert "L0H3 (100%)" in text and "L0H1 (100%)" in text  # local, and self/diagonal
    assert "Diffuse heads" in text and "L1H0" in text
    assert "Mean attention on the first token falls with depth: 37% in layer 0, 29% in layer 1." in obs
    # with no sink-like head the observation says so, with the highest value
    flat = attention_statistics([_maps()[1]])
    assert observations(flat)[0].startswith("No head puts more than 50% of its attention on the first token")


def test_chance_level_keeps_uniform_heads_from_being_named():
    """On 6 tokens uniform causal attention keeps more than the 70% threshold within 3 tokens back: the uniform
    head (L0H2) must not be called local once the chance level is known; the chance numbers are the uniform
    head's own statistics, and a head far above chance (the sink) is still named."""
    stats = attention_statistics(_maps(), local_window=3)
    chance = uniform_statistics(6, local_window=3)
    unif = stats["layers"][0]["heads"][2]
    assert all(abs(unif[k] - chance[k]) < 1e-6 for k in ("first_mass", "local_mass", "self_mass", "mean_distance"))
    assert chance["local_mass"] > 0.7  # above the fixed threshold: without chance the uniform head was "local"
    assert "L0H2" in [o for o in observations(stats) if o.startswith("Local heads")][0]
    obs = observations(stats, chance)
    assert obs[0].startswith("Chance level") and not any(o.startswith("Local heads") for o in obs)
    assert any("L0H0 (100%)" in o for o in obs if o.startswith("Sink heads"))  # far above chance: still named


def test_no_impossible_thresholds_when_the_window_or_text_leaves_no_room():
    """A local window covering the whole text (uniform attention keeps 100% within it) puts 1.5x chance above
    100%: the observation says the test cannot be made instead of "no head keeps more than 150%"."""
    stats = attention_statistics(_maps(), local_window=10)
    obs = observations(stats, uniform_statistics(6, local_window=10))
    assert any(o.startswith("No local-head test: uniform attention already keeps 100% within 10 token(s)") for o in obs)
    assert not any(o.startswith(("Local heads", "No head keeps")) for o in obs)
    assert any(o.startswith("Sink heads") for o in obs)  # the other tests still run
    assert not any(f"{p}%" in o for o in obs for p in range(101, 1000))  # no threshold above 100%


@pytest.fixture
def run_dir(tmp_path):
    cfg = load_config("local-smoke", ["model.vocab_size=257", "model.d_model=32", "model.n_layers=2",
                                      "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=64",
                                      "data.tokenizer=byte"])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    run = tmp_path / "run"
    (run).mkdir()
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    save_checkpoint(run / "checkpoints" / "pretrain", 3,
                    {"model": model.state_dict(), "config": cfg.to_dict(), "stage": "pretrain", "step": 3,
                     "total_steps": 3, "complete": True}, final=True)
    return run, model


def test_load_stage_model_roundtrip(run_dir):
    run, model = run_dir
    found = find_stage_checkpoints(run)
    assert list(found) == ["pretrain"]
    loaded, cfg, meta = load_stage_model(found["pretrain"])
    assert meta["stage"] == "pretrain" and meta["step"] == 3 and cfg.data.tokenizer == "byte"
    ids = torch.randint(0, 257, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids))
    with pytest.raises(ValueError, match="run directory not found"):
        find_stage_checkpoints(run / "nope")


def test_analyze_transformer(run_dir, tmp_path):
    run, model = run_dir
    from mllm.data.tokenizer import get_tokenizer
    doc = analyze(model.eval(), get_tokenizer("byte"), ["hello attention world", "short text here"],
                  tmp_path / "att", local_window=2)
    assert len(doc["layers"]) == 2 and len(doc["layers"][0]["heads"]) == 4 and doc["n_texts"] == 2
    for L in doc["layers"]:
        for h in L["heads"]:
            assert 0 <= h["first_mass"] <= 1 and 0 <= h["local_mass"] <= 1 and h["entropy"] >= 0
    assert sorted(p.name for p in (tmp_path / "att").glob("*.png")) == ["layer_0.png", "layer_1.png"]
    saved = json.loads((tmp_path / "att" / "attention_stats.json").read_text())
    assert saved["observations"] == doc["observations"] and saved["observations"]
    assert "| layer |" in (tmp_path / "att" / "observations.md").read_text()
    assert "| uniform (chance) |" in (tmp_path / "att" / "observations.md").read_text()
    assert set(saved["chance"]) >= {"first_mass", "local_mass", "self_mass", "mean_distance"}


def test_visualize_script(run_dir, capsys):
    run, _ = run_dir
    spec = importlib.util.spec_from_file_location("visualize_attention", ROOT / "scripts" / "visualize_attention.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--checkpoint", str(run / "checkpoints" / "pretrain"), "--text", "a small test text"]) == 0
    out = run / "attention" / "pretrain"
    assert (out / "attention_stats.json").is_file() and (out / "layer_1.png").is_file()
    assert "pretrain step 3" in capsys.readouterr().out
    assert mod.main(["--checkpoint", str(run / "missing")]) == 2
    with pytest.raises(SystemExit):  # argparse: a usage error before anything loads
        mod.main(["--checkpoint", str(run / "checkpoints" / "pretrain"), "--local-window", "-1"])
    assert mod.main(["--checkpoint", str(run / "checkpoints" / "pretrain"), "--text", "a"]) == 2
    assert "fewer than 2 tokens" in capsys.readouterr().err
