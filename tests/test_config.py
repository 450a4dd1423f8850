"""Config tests: presets, typed overrides, errors that name the key, JSON / YAML files."""
import json

import pytest

from mllm.config import ConfigError, PipelineConfig, config_from_dict, load_config
from mllm.config.pipeline_config import load_file


def test_presets_load_and_validate():
    for name in ("local-smoke", "gpu-full"):
        cfg = load_config(name)
        assert isinstance(cfg, PipelineConfig) and cfg.name == name


def test_gpu_full_matches_the_reference_run():
    c = load_config("gpu-full")
    m = c.model
    assert (m.d_model, m.n_layers, m.n_heads, m.ffn_dim, m.vocab_size, m.max_seq_len, m.tie_embeddings) == \
        (1024, 12, 16, 4096, 50257, 1024, True)
    p = c.pretrain
    assert (p.steps, p.batch_size, p.micro_batch_size, p.lr, p.warmup_steps) == (40_000, 128, 8, 3e-4, 500)
    assert (c.sft.steps, c.sft.batch_size, c.sft.lr) == (5_000, 32, 1e-5)
    assert (c.dpo.steps, c.dpo.batch_size, c.dpo.lr, c.dpo.beta) == (3_000, 16, 5e-6, 0.1)
    assert (c.verifier.steps, c.verifier.batch_size, c.verifier.lr) == (3_000, 32, 1e-4)
    assert c.seed == 42


def test_local_smoke_is_small_and_never_uses_wikitext103():
    c = load_config("local-smoke")
    assert c.device == "cpu" and c.model.d_model <= 128 and c.pretrain.steps <= 200
    assert "wikitext103" not in c.data.pretrain_datasets


def test_local_smoke_dpo_evaluates_every_heldout_pair_and_sees_each_train_pair_once():
    """The held-out reward accuracy and its Wilson interval are over ``eval_batches · micro_batch_size`` pairs:
    that must be the whole held-out slice (reference log-probs of pairs never evaluated are wasted time, and a
    smaller n widens the interval). Training is one pass over distinct pairs (steps · batch ≤ max_pairs): on
    hh-rlhf a tiny model's held-out accuracy grows with the number of distinct pairs, not with epochs."""
    d = load_config("local-smoke").dpo
    assert d.heldout_pairs == d.eval_batches * d.micro_batch_size
    assert d.heldout_pairs >= 500  # Wilson half-width ≤ 0.044 at 95%: room to tell ~0.55 from chance
    assert d.max_pairs is not None and d.steps * d.batch_size <= d.max_pairs
    assert 0 < d.max_prompt_len < d.seq_len and d.eval_every <= d.steps


def test_overrides_coerce_types():
    c = load_config("local-smoke", overrides=[
        "model.n_layers=4", "pretrain.lr=1e-3", "model.learned_sinks=true", "model.window=16",
        "model.n_sink_tokens=4", "data.pretrain_datasets=tinystories,wikitext2", "seed=7", "pretrain.steps=1_000",
    ])
    assert c.model.n_layers == 4 and isinstance(c.model.n_layers, int)
    assert c.pretrain.lr == 1e-3 and isinstance(c.pretrain.lr, float)
    assert c.model.learned_sinks is True
    assert c.model.window == 16 and c.model.n_sink_tokens == 4
    assert c.data.pretrain_datasets == ["tinystories", "wikitext2"]
    assert c.seed == 7 and c.pretrain.steps == 1000
    assert load_config("local-smoke", overrides=["model.window=none"]).model.window is None
    assert load_config("local-smoke", overrides=["model.rope_theta=500000"]).model.rope_theta == 500000.0
    c = load_config("local-smoke", overrides=["compile=true", "compile_mode=reduce-overhead"])
    assert c.compile is True and c.compile_mode == "reduce-overhead"


@pytest.mark.parametrize("override, key", [
    ("model.n_layer=4", "model.n_layer"),  # unknown field
    ("modle.n_layers=4", "modle"),  # unknown section
    ("model.n_layers=four", "model.n_layers"),  # wrong type
    ("model.n_layers=2.5", "model.n_layers"),
    ("model.learned_sinks=maybe", "model.learned_sinks"),
    ("pretrain.lr=fast", "pretrain.lr"),
    ("model.d_model=100", "model.d_model"),  # 100 % 4 heads == 0 but head_dim 25 is odd -> RoPE impossible
    ("model.d_model=66", "model.d_model"),  # not divisible by n_heads=4
    ("model.n_kv_heads=3", "model.n_heads"),  # n_heads=4 not divisible by 3
    ("pretrain.micro_batch_size=3", "pretrain.batch_size"),  # 16 % 3 != 0
    ("pretrain.seq_len=256", "pretrain.seq_len"),  # > model.max_seq_len=128
    ("model.n_layers=0", "model.n_layers"),
    ("model.kernel_backend=cuda", "model.kernel_backend"),
    ("model.window=0", "model.window"),
    ("compile_mode=reduce_overhead", "compile_mode"),  # not a torch.compile mode
    ("compile_mode=reduce-overhead", "compile_mode"),  # a mode without compile=true
    ("optim.weight_decay=nan", "optim.weight_decay"),  # NaN passes a plain `< 0` check
    ("optim.eps=-1", "optim.eps"),
    ("optim.grad_clip=-1", "optim.grad_clip"),
    ("optim.grad_clip=nan", "optim.grad_clip"),
    ("optim.beta2=1.0", "optim.beta2"),
    ("verifier.num_questions=-3", "verifier.num_questions"),  # would slice "all but 3"
    ("eval.perplexity_stride=0", "eval.perplexity_stride"),  # was read as "stride = context"
    ("eval.perplexity_stride=2000", "eval.perplexity_stride"),
    ("eval.sst2_shots=-2", "eval.sst2_shots"),
    ("eval.gsm8k_temperature=-1", "eval.gsm8k_temperature"),
    ("verifier.temperature=-0.5", "verifier.temperature"),
    ("eval.gsm8k_max_new_tokens=128", "eval.gsm8k_max_new_tokens"),  # = model.max_seq_len: no prompt left
    ("verifier.max_new_tokens=500", "verifier.max_new_tokens"),
    ("data.num_workers=2", "data.num_workers"),  # removed: it was accepted and never used
    ("pretrain.lr=inf", "pretrain.lr"),  # passed `> 0`, trained to NaN weights, failed at the first checkpoint
    ("sft.lr=nan", "sft.lr"),
    ("dpo.beta=inf", "dpo.beta"),
    ("data.max_docs=0", "data.max_docs"),  # failed later naming the loader's `max_rows`, not the key
    ("sft.max_examples=-5", "sft.max_examples"),
    ("dpo.max_pairs=0", "dpo.max_pairs"),
    ("dpo.heldout_pairs=-1", "dpo.heldout_pairs"),
    ("model.init_std=-1", "model.init_std"),  # failed in the initialiser: "normal expects std >= 0.0"
    ("model.init_std=nan", "model.init_std"),
    ("model.rope_theta=inf", "model.rope_theta"),
    ("model.norm_eps=inf", "model.norm_eps"),
    ("seed=-1", "seed"),  # trained through the first evaluation, then numpy's "expected non-negative integer"
    ("seed=99999999999999999999", "seed"),  # "Overflow when unpacking long long"
    ("verifier.lm_loss_weight=nan", "verifier.lm_loss_weight"),
    ("verifier.value_loss_weight=-1", "verifier.value_loss_weight"),
    ("data.pretrain_datasets=[tinystories,tinystories]", "data.pretrain_datasets"),  # trained on twice
])
def test_bad_overrides_raise_config_error_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config("local-smoke", overrides=[override])
    assert f"'{key}'" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_triton_backend_needs_a_head_dim_its_attention_kernel_has():
    # local-smoke's head dim is 64 / 4 = 16: the model built, and the first forward on a GPU failed in the kernel
    with pytest.raises(ConfigError, match=r"'model.kernel_backend'.*head dims 64 and 128.*64 / 4 = 16"):
        load_config("local-smoke", overrides=["model.kernel_backend=triton"])
    c = load_config("local-smoke", overrides=["model.kernel_backend=triton", "model.n_heads=1", "model.n_kv_heads=1"])
    assert c.model.head_dim == 64
    assert load_config("gpu-full", overrides=["model.kernel_backend=triton"]).model.head_dim == 64


def test_triton_backend_without_triton_is_a_config_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mllm_kernels.attention", None)  # makes the import fail, as without triton
    with pytest.raises(ConfigError, match=r"'model.kernel_backend': 'triton' needs the triton package"):
        load_config("gpu-full", overrides=["model.kernel_backend=triton"])


def test_override_syntax_and_unknown_preset():
    with pytest.raises(ConfigError, match="key=value"):
        load_config("local-smoke", overrides=["model.n_layers"])
    with pytest.raises(ConfigError, match="unknown config 'tiny'"):
        load_config("tiny")
    with pytest.raises(ConfigError, match="'model' is a section"):
        load_config("local-smoke", overrides=["model=3"])


def test_json_and_yaml_file_overrides(tmp_path):
    js = tmp_path / "o.json"
    js.write_text(json.dumps({"model": {"n_layers": 3, "learned_sinks": True}, "pretrain.steps": 11}))
    c = load_config("local-smoke", file=str(js))
    assert (c.model.n_layers, c.model.learned_sinks, c.pretrain.steps) == (3, True, 11)
    ym = tmp_path / "o.yaml"
    ym.write_text("model:\n  n_heads: 2\n  n_kv_heads: 1\nsft:\n  lr: 2.0e-4\n")
    c = load_config("local-smoke", file=str(ym), overrides=["model.n_heads=8", "model.n_kv_heads=8"])
    assert (c.model.n_heads, c.model.n_kv_heads, c.sft.lr) == (8, 8, 2e-4)  # --set wins over the file
    # a file can itself be the config, naming its base preset
    full = tmp_path / "run.yaml"
    full.write_text("preset: gpu-full\npretrain:\n  steps: 10\n")
    c = load_config(str(full))
    assert c.model.d_model == 1024 and c.pretrain.steps == 10


def test_file_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "model": {"n_layers": 2,}\n}')
    with pytest.raises(ConfigError, match="bad.json:2"):
        load_config("local-smoke", file=str(bad))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model:\n  n_layers: many\n")
    with pytest.raises(ConfigError, match="'model.n_layers'"):
        load_config("local-smoke", file=str(wrong))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("optim:\n  momentum: 0.9\n")
    with pytest.raises(ConfigError, match="'optim.momentum'"):
        load_config("local-smoke", file=str(unknown))
    with pytest.raises(ConfigError, match="not found"):
        load_config("local-smoke", file=str(tmp_path / "missing.json"))
    binary = tmp_path / "bin.json"
    binary.write_bytes(b'{"name": "\xff\xfe"}')
    with pytest.raises(ConfigError, match=r"bin\.json: not UTF-8 text \(byte 10"):  # was a UnicodeDecodeError traceback
        load_config("local-smoke", file=str(binary))
    toml = tmp_path / "ok.toml"
    toml.write_text("[pretrain]\nsteps = 3\n")
    with pytest.raises(ConfigError, match=r"ok\.toml: config files are \.json, \.yaml or \.yml, got '\.toml'"):
        load_config("local-smoke", file=str(toml))  # was reported as "invalid JSON"
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(ConfigError, match=r"dir\.json: is a folder"):
        load_config("local-smoke", file=str(tmp_path / "dir.json"))
    syntax = tmp_path / "syntax.yaml"
    syntax.write_text("model:\n  n_layers: 2\n  window: [1, 2\n")
    with pytest.raises(ConfigError, match=r"syntax\.yaml:\d+: invalid YAML"):
        load_config("local-smoke", file=str(syntax))
    # a repeated key: the parsers keep the last one, so `n_layers: 3` was dropped without a word
    dup = tmp_path / "dup.yaml"
    dup.write_text("model:\n  n_layers: 3\npretrain:\n  steps: 4\nmodel:\n  d_model: 32\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml:5: duplicate key 'model'"):
        load_config("local-smoke", file=str(dup))
    dup_js = tmp_path / "dup.json"
    dup_js.write_text('{"pretrain": {"steps": 4, "steps": 5}}')
    with pytest.raises(ConfigError, match=r"dup\.json: duplicate key 'steps'"):
        load_config("local-smoke", file=str(dup_js))
    merged = tmp_path / "merge.yaml"  # YAML merge keys may be overridden: not a duplicate
    merged.write_text("base: &b {steps: 4, lr: 1.0e-3}\npretrain:\n  <<: *b\n  steps: 6\n")
    assert load_file(merged)["pretrain"] == {"steps": 6, "lr": 1e-3}
    with pytest.raises(ConfigError, match="'data.pretrain_datasets'.*not a JSON list"):
        load_config("local-smoke", overrides=["data.pretrain_datasets=[tinystories,"])


def test_config_file_name_and_preset_keys(tmp_path):
    """``preset`` picks the base and ``name`` stays the run's name; a saved config.json (no preset) that names a
    preset run still loads on that preset."""
    f = tmp_path / "run.yaml"
    f.write_text("preset: gpu-full\nname: my-exp\n")
    c = load_config(str(f))
    assert (c.name, c.model.d_model) == ("my-exp", 1024)
    f.write_text("name: my-exp\npretrain:\n  steps: 7\n")
    c = load_config(str(f))
    assert (c.name, c.pretrain.steps) == ("my-exp", 7)
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps({"name": "gpu-full", "pretrain": {"steps": 9}}))
    c = load_config(str(saved))
    assert (c.name, c.model.d_model, c.pretrain.steps) == ("gpu-full", 1024, 9)


def test_round_trip_through_dict():
    c = load_config("local-smoke", overrides=["model.window=8", "model.n_sink_tokens=2"])
    assert config_from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_saved_configs_with_removed_keys_still_load(tmp_path):
    """Every checkpoint and config.json written before a key was removed still holds it: loading them must work
    (evaluation, resume); setting the key by hand is an error that says it was removed."""
    saved = load_config("gpu-full").to_dict()
    saved["data"]["num_workers"] = 4
    assert config_from_dict(saved) == load_config("gpu-full")
    f = tmp_path / "config.json"
    f.write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match="no longer exist.*data.num_workers"):
        assert load_config(str(f)) == load_config("gpu-full")
    with pytest.raises(ConfigError, match="'data.num_workers' was removed"):
        load_config("local-smoke", overrides=["data.num_workers=2"])


def test_config_changes_flattens_sections():
    """One diff of two config dicts, shared by the run's config-change warning and the trainer's resume errors."""
    from mllm.config.pipeline_config import config_changes
    from mllm.training.runner import config_diff

    old = {"seed": 1, "model": {"n_layers": 2, "d_model": 64}, "data": {"max_docs": 400}}
    new = {"seed": 1, "model": {"n_layers": 3, "d_model": 64}, "data": {}, "compile": True}
    assert config_changes(old, new) == [("compile", None, True), ("data.max_docs", 400, None), ("model.n_layers", 2, 3)]
    assert config_diff(old, new) == ["compile: None -> True", "data.max_docs: 400 -> None", "model.n_layers: 2 -> 3"]
