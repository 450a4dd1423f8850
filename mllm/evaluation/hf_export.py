"""Export our Transformer to a Hugging Face Llama folder (``config.json`` + ``model.safetensors``) so that
``transformers.LlamaForCausalLM.from_pretrained(folder)`` gives the same logits.

Why it is exact: our block is Llama's (pre-norm RMSNorm ``x·rsqrt(mean(x²)+eps)·w``, bias-free q/k/v/o
projections with GQA, half-split RoPE ``[x1·cos − x2·sin, x2·cos + x1·sin]`` = HF's ``rotate_half``, softmax
scale 1/√head_dim, SwiGLU ``down(silu(gate(x))·up(x))``, final RMSNorm, optionally tied head), so the
conversion is a renaming of tensors:

    tok_emb.weight                 -> model.embed_tokens.weight
    layers.{i}.attn_norm.weight    -> model.layers.{i}.input_layernorm.weight
    layers.{i}.attn.{q,k,v,o}_proj -> model.layers.{i}.self_attn.{q,k,v,o}_proj
    layers.{i}.mlp_norm.weight     -> model.layers.{i}.post_attention_layernorm.weight
    layers.{i}.mlp.{gate,up,down}_proj -> model.layers.{i}.mlp.{gate,up,down}_proj
    norm.weight                    -> model.norm.weight
    lm_head.weight                 -> lm_head.weight   (untied only; tied: tie_word_embeddings = true)

What Llama cannot express (the exporter refuses, saying why): learned attention sinks (an extra per-head
softmax logit with no value: not in LlamaAttention), and a sliding window (Llama attends to the whole
causal prefix; StreamingLLM's window + sink tokens is a different mask). ``n_sink_tokens`` only changes the
mask together with a window, so without one it is inert and exporting is still exact.

Needs only torch + safetensors; ``transformers`` is needed to load the result, not to write it.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Dict, Mapping, Optional

import torch

_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


class ExportError(ValueError):
    """The model cannot be written as a Hugging Face Llama checkpoint (the message says why)."""


def check_exportable(cfg) -> None:
    """Raise :class:`ExportError` when ``cfg`` (a ``ModelConfig``) uses attention Llama cannot express."""
    reasons = []
    if cfg.learned_sinks:
        reasons.append("model.learned_sinks=True: learned attention sinks add a per-head softmax logit with no "
                       "value (gpt-oss style); LlamaAttention has no such term, so its logits would differ")
    if cfg.window is not None:
        reasons.append(f"model.window={cfg.window} (with n_sink_tokens={cfg.n_sink_tokens}): a sliding window "
                       "(+ StreamingLLM sink tokens) masks distant keys; Llama attends to the whole causal prefix")
    if reasons:
        raise ExportError("cannot export to Hugging Face Llama format: " + "; ".join(reasons)
                          + ". Export a model trained with learned_sinks=False and window=None.")


def llama_config(cfg, eot_id: Optional[int] = None, dtype: torch.dtype = torch.float32) -> Dict:
    """The ``config.json`` dict of a LlamaForCausalLM equal to our ``ModelConfig`` ``cfg``.

    ``rope_theta`` is written both top-level (transformers 4.x) and as ``rope_parameters`` (5.x).
    """
    eot = cfg.vocab_size - 1 if eot_id is None else int(eot_id)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.d_model // cfg.n_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "tie_word_embeddings": bool(cfg.tie_embeddings),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": str(dtype).replace("torch.", ""),
    }


def llama_state_dict(state: Mapping[str, torch.Tensor], cfg) -> Dict[str, torch.Tensor]:
    """Rename our state dict to Llama's (see module docstring). Unknown or missing tensors raise, naming them."""
    out: Dict[str, torch.Tensor] = {}
    used = set()
    for name, t in state.items():
        if name.startswith("_orig_mod."):  # saved from a torch.compile-d module
            name = name[len("_orig_mod."):]
        m = _LAYER_RE.match(name)
        if name == "tok_emb.weight":
            new = "model.embed_tokens.weight"
        elif name == "norm.weight":
            new = "model.norm.weight"
        elif name == "lm_head.weight":
            if cfg.tie_embeddings:
                continue  # the same tensor as the embedding
            new = "lm_head.weight"
        elif m and m.group(2) in _LAYER_MAP:
            new = f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
        elif m and m.group(2) == "attn.sinks":
            raise ExportError(f"state dict has learned sinks ('{name}'): Llama cannot express them")
        else:
            raise ExportError(f"state dict entry '{name}' has no Llama equivalent")
        if new in ("model.embed_tokens.weight", "lm_head.weight") and t.shape[0] > cfg.vocab_size:
            t = t[: cfg.vocab_size]  # a padded table (model.vocab_pad_multiple): the extra rows are never used
        out[new] = t
        used.add(new)
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    expected |= {f"model.layers.{i}.{v}" for i in range(cfg.n_layers) for v in _LAYER_MAP.values()}
    if not cfg.tie_embeddings:
        expected.add("lm_head.weight")
    missing = sorted(expected - used)
    if missing:
        raise ExportError(f"state dict is missing {len(missing)} tensors for a {cfg.n_layers}-layer model, "
                          f"e.g. {missing[:3]}")
    return out


def export_llama(state_or_model, cfg, out_dir: str | Path, eot_id: Optional[int] = None,
                 dtype: torch.dtype = torch.float32, tokenizer_dir: Optional[str | Path] = None) -> Path:
    """Write ``out_dir/config.json`` + ``out_dir/model.safetensors`` (+ tokenizer files) for our model.

    state_or_model: our ``Transformer`` or its state dict; cfg: its ``ModelConfig``; eot_id: the bos/eos id
    (default vocab_size − 1, GPT-2's ``<|endoftext|>``); dtype: the stored weight dtype.
    tokenizer_dir: a folder with GPT-2's ``encoder.json`` + ``vocab.bpe`` (or ``vocab.json`` + ``merges.txt``)
    to copy as HF GPT-2 tokenizer files, so ``AutoTokenizer.from_pretrained(out_dir)`` works too.
    """
    from safetensors.torch import save_file

    check_exportable(cfg)
    state = state_or_model.state_dict() if isinstance(state_or_model, torch.nn.Module) else state_or_model
    tensors = {k: v.detach().to("cpu", dtype).contiguous().clone() for k, v in llama_state_dict(state, cfg).items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    conf = llama_config(cfg, eot_id, dtype)
    conf["mllm_model_config"] = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(vars(cfg))
    (out / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": conf["bos_token_id"], "eos_token_id": conf["eos_token_id"]}, indent=2) + "\n")
    if tokenizer_dir is not None:
        _copy_gpt2_tokenizer(Path(tokenizer_dir), out, conf["eos_token_id"])
    return out


def _copy_gpt2_tokenizer(src: Path, out: Path, eot_id: int) -> None:
    pairs = [("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")]
    for enc, merges in pairs:
        if (src / enc).is_file() and (src / merges).is_file():
            shutil.copyfile(src / enc, out / "vocab.json")
            shutil.copyfile(src / merges, out / "merges.txt")
            break
    else:
        raise ExportError(f"tokenizer_dir {src} has neither encoder.json + vocab.bpe nor vocab.json + merges.txt")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": 1_000_000_000, "add_prefix_space": False,
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, indent=2) + "\n")
