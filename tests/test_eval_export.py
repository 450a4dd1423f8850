"""Hugging Face Llama export: transformers loads the folder and gives our logits; sinks/windows are refused."""
import json

import pytest
import torch

from mllm.config import ModelConfig
from mllm.evaluation.hf_export import ExportError, check_exportable, export_llama, llama_state_dict
from mllm.models import Transformer

transformers = pytest.importorskip("transformers")


def _tiny(**kw):
    base = dict(vocab_size=101, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64,
                rope_theta=5000.0, norm_eps=1e-5)
    base.update(kw)
    cfg = ModelConfig(**base)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():  # norms start at 1: randomise them so a wrong norm mapping would show
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return cfg, model.eval()


@pytest.mark.parametrize("tied,n_kv,sink_tokens,pad", [(True, 2, 0, 1), (False, 4, 0, 1), (True, 1, 4, 1),
                                                       (True, 2, 0, 64), (False, 2, 0, 64)])
def test_export_gives_same_logits(tmp_path, tied, n_kv, sink_tokens, pad):
    # pad: model.vocab_pad_multiple; the exported tables keep the 101 real rows
    cfg, model = _tiny(tie_embeddings=tied, n_kv_heads=n_kv, n_sink_tokens=sink_tokens, vocab_pad_multiple=pad)
    out = export_llama(model, cfg, tmp_path / "hf", eot_id=100)
    conf = json.loads((out / "config.json").read_text())
    assert conf["num_key_value_heads"] == n_kv and conf["tie_word_embeddings"] is tied
    assert conf["rms_norm_eps"] == 1e-5 and conf["rope_theta"] == 5000.0
    hf = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ids = torch.randint(0, 101, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-4)
    if tied:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()


def test_export_refuses_sinks_and_windows(tmp_path):
    for kw, why in [({"learned_sinks": True}, "learned attention sinks"),
                    ({"window": 16, "n_sink_tokens": 4}, "sliding window"),
                    ({"window": 16}, "model.window=16")]:
        cfg, model = _tiny(**kw)
        with pytest.raises(ExportError, match=why):
            export_llama(model, cfg, tmp_path / "x")
        assert not (tmp_path / "x" / "model.safetensors").exists()
    check_exportable(ModelConfig(n_sink_tokens=4))  # inert without a window: fine


def test_state_dict_errors_name_the_tensor():
    cfg, model = _tiny()
    state = dict(model.state_dict())
    state["layers.0.attn.bogus"] = torch.zeros(1)
    with pytest.raises(ExportError, match="layers.0.attn.bogus"):
        llama_state_dict(state, cfg)
    state = dict(model.state_dict())
    del state["layers.1.mlp.up_proj.weight"]
    with pytest.raises(ExportError, match="missing 1 tensors"):
        llama_state_dict(state, cfg)
    # a torch.compile-d module's prefix is understood
    compiled = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    assert set(llama_state_dict(compiled, cfg)) == set(llama_state_dict(model.state_dict(), cfg))


def test_export_with_gpt2_tokenizer_files(tmp_path, data_dir):
    cfg, model = _tiny(vocab_size=50257, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=16)
    out = export_llama(model, cfg, tmp_path / "hf", eot_id=50256, tokenizer_dir=data_dir / "gpt2-tokenizer")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("Hello world")["input_ids"] == [15496, 995] and tok.eos_token_id == 50256
