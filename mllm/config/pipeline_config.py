"""Typed pipeline configuration: dataclasses, two named presets, and overrides.

    cfg = load_config("local-smoke", overrides=["model.n_layers=4", "pretrain.steps=50"], file=None)

Presets: ``local-smoke`` (CPU, whole pipeline in minutes, tiny model, small real data slices) and
``gpu-full`` (the reference run: 253M params, 40k pretraining steps on H100s).
Every error names the offending key: unknown key, wrong type, impossible value.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type, or holds an impossible value."""


RESIDUAL_DTYPES = ("param", "autocast")


@dataclass
class ModelConfig:
    vocab_size: int = 50257
    d_model: int = 1024
    n_layers: int = 12
    n_heads: int = 16
    n_kv_heads: int = 16  # GQA: n_heads % n_kv_heads == 0; equal means MHA
    ffn_dim: int = 4096  # SwiGLU hidden width (three matrices: gate, up, down)
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    init_std: float = 0.02
    # attention sinks (see mllm_kernels.reference.attention for exact semantics)
    learned_sinks: bool = False  # (a) gpt-oss: a learned per-head logit column without a value
    n_sink_tokens: int = 0  # (b) StreamingLLM: first tokens of each document stay visible ...
    window: Optional[int] = None  # ... to queries that otherwise see only the last `window` positions
    kernel_backend: str = "eager"  # "eager" (reference) | "triton"
    # triton backend: the training loss fuses the LM head and the cross-entropy (mllm_kernels.dpo_logprobs: the
    # [B, T, V] logits are never materialised); False computes logits + cross-entropy as the eager backend does
    fused_lm_loss: bool = True
    # triton backend: RoPE inside the attention kernel (True: q, k rotated per tile, no extra HBM round trip) or
    # the separate RoPE kernel first and the attention kernel without RoPE (False: the kernel's inner loop is
    # shorter; the rotated q, k are saved for the backward instead of q, k). Same function; benchmarks/NOTES.md
    rope_in_attention: bool = True
    # q, k, v projections as one GEMM over the concatenated weights (one launch and one autocast cast instead of
    # three, no sum of three input gradients; the parameters stay q_proj/k_proj/v_proj). Off until measured on a GPU
    fused_qkv: bool = False
    # dtype of the residual stream under autocast. "param": the embedding's dtype (fp32 master weights: the stream
    # and its gradient stay fp32, as in nanoGPT/HF under autocast). "autocast": the embedding output is cast to
    # the autocast dtype (bf16) once, so every fused add+norm reads and writes a bf16 stream and a bf16 gradient
    # (what FSDP's param_dtype=bf16 runs; half the norms' traffic, rounding of the sum to bf16). No effect without
    # autocast. Off until measured on a GPU (benchmarks/NOTES.md, tuning step 18)
    residual_dtype: str = "param"
    # under autocast, the matrix weights are cast to the autocast dtype once per optimizer step (kept between
    # micro-batches) instead of in every micro-batch's forward; losses and gradients are bitwise those of the
    # plain path, the copies cost 2 bytes per parameter. Off until measured on a GPU (benchmarks/NOTES.md, step 23;
    # mllm/models/weight_cache.py)
    weight_cache: bool = False
    # embedding/head tables padded to a multiple of this many rows (aligned head GEMM; outputs keep vocab_size)
    vocab_pad_multiple: int = 1

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class DataConfig:
    # folder holding the real files (../shared/data layout); None -> MLLM_DATA_DIR, else the HF hub
    data_dir: Optional[str] = None
    tokenizer: str = "gpt2"  # "gpt2" | "byte"
    tokenizer_path: Optional[str] = None  # folder with encoder.json + vocab.bpe; None -> <data_dir>/gpt2-tokenizer
    cache_dir: str = ".cache/mllm"
    pretrain_datasets: List[str] = field(default_factory=lambda: ["tinystories", "wikitext2"])
    max_docs: Optional[int] = None  # per dataset, for small slices; None = all
    val_fraction: float = 0.05
    packing: bool = False
    packing_algorithm: str = "bfd"  # "bfd" | "ffd"


@dataclass
class OptimConfig:
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient L2 norm; 0 turns clipping off (the norm is still logged)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    max_consecutive_nonfinite: int = 5


@dataclass
class StageConfig:
    steps: int = 1000
    batch_size: int = 32  # effective batch in sequences (all ranks, all accumulation steps)
    micro_batch_size: int = 8  # per rank per forward
    seq_len: int = 1024
    lr: float = 3e-4
    warmup_steps: int = 100
    eval_every: int = 500
    eval_batches: int = 20
    save_every: int = 1000
    keep_last: int = 2
    log_every: int = 10


@dataclass
class PretrainConfig(StageConfig):
    pass


@dataclass
class SFTConfig(StageConfig):
    gsm8k_weight: float = 0.3  # fraction of SFT examples drawn from GSM8K train
    max_examples: Optional[int] = None
    prompt_loss: bool = False  # train on prompt tokens too


@dataclass
class DPOConfig(StageConfig):
    beta: float = 0.1
    reference: str = "precomputed"  # "precomputed" | "frozen"
    max_pairs: Optional[int] = None
    max_prompt_len: int = 768
    heldout_pairs: int = 200


@dataclass
class VerifierConfig(StageConfig):
    samples_per_question: int = 8  # K solutions sampled per train question
    num_questions: Optional[int] = None
    temperature: float = 0.7
    max_new_tokens: int = 256
    lm_loss_weight: float = 1.0
    value_loss_weight: float = 1.0
    # also train on each question's reference (gold) solution, labelled correct: a tiny generator may sample no
    # correct solution at all, leaving the value head a single class (Cobbe et al. use samples only: False)
    include_gold_solutions: bool = False


@dataclass
class EvalConfig:
    perplexity_context: int = 1024
    perplexity_stride: Optional[int] = None  # None = context
    perplexity_split: str = "test"
    sst2_shots: int = 4
    sst2_examples: Optional[int] = None
    sst2_calibrate: bool = True
    gsm8k_examples: Optional[int] = None
    gsm8k_samples: int = 8  # N for majority vote / verifier best-of-N
    gsm8k_temperature: float = 0.7
    gsm8k_max_new_tokens: int = 256
    baselines: List[str] = field(default_factory=lambda: ["gpt2", "distilgpt2"])
    perplexity_max_documents: Optional[int] = None  # first N WikiText articles (after dropping pretrained ones)
    batch_size: int = 8  # sequences per scoring forward (perplexity, SST-2) in the eval stage
    gen_batch_size: int = 32  # prompts per generation call (GSM8K) in the eval stage


@dataclass
class PipelineConfig:
    name: str = "custom"
    seed: int = 42
    run_root: str = "experiments/runs"
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    compile: bool = False
    # torch.compile mode (None: default); "reduce-overhead" / "max-autotune" replay CUDA graphs (Trainer docstring)
    compile_mode: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved_data_dir(self) -> Optional[str]:
        return self.data.data_dir or os.environ.get("MLLM_DATA_DIR") or None


# ----------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------
def _gpu_full() -> PipelineConfig:
    return PipelineConfig(
        name="gpu-full",
        seed=42,
        model=ModelConfig(vocab_pad_multiple=64),  # d_model 1024, 12 layers, 16 heads, ffn 4096, vocab 50257
        # (tables padded to 50,304 rows), seq 1024
        data=DataConfig(pretrain_datasets=["wikitext103", "tinystories"], packing=True),
        pretrain=PretrainConfig(steps=40_000, batch_size=128, micro_batch_size=8, seq_len=1024, lr=3e-4,
                                warmup_steps=500, eval_every=1000, save_every=2000),
        sft=SFTConfig(steps=5_000, batch_size=32, micro_batch_size=8, seq_len=1024, lr=1e-5, warmup_steps=100,
                      eval_every=500, save_every=1000),
        dpo=DPOConfig(steps=3_000, batch_size=16, micro_batch_size=4, seq_len=1024, lr=5e-6, warmup_steps=100,
                      beta=0.1, eval_every=500, save_every=1000),
        verifier=VerifierConfig(steps=3_000, batch_size=32, micro_batch_size=8, seq_len=512, lr=1e-4,
                                warmup_steps=100, eval_every=500, save_every=1000, samples_per_question=16),
        eval=EvalConfig(),
    )


def _local_smoke() -> PipelineConfig:
    return PipelineConfig(
        name="local-smoke",
        seed=42,
        device="cpu",
        model=ModelConfig(vocab_size=50257, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192,
                          max_seq_len=128, n_sink_tokens=0, window=None),
        data=DataConfig(pretrain_datasets=["tinystories", "wikitext2"], max_docs=400),
        pretrain=PretrainConfig(steps=60, batch_size=16, micro_batch_size=8, seq_len=128, lr=3e-3,
                                warmup_steps=6, eval_every=30, eval_batches=4, save_every=30, log_every=5),
        sft=SFTConfig(steps=60, batch_size=8, micro_batch_size=8, seq_len=128, lr=1e-3, warmup_steps=3,
                      eval_every=30, eval_batches=4, save_every=30, log_every=5, max_examples=800),
        # DPO: one pass over 2,000 distinct pairs (more pairs seen once generalise better than few pairs seen
        # often); answers are what DPO learns from and each answer token costs a 50k-vocab LM-head row, while
        # prompt tokens are nearly free but barely help: prompts keep their last 16 tokens, answers >= 48 of the 64;
        # 1,024 held-out pairs (all evaluated) give a 95% Wilson half-width of ~0.03 on the held-out reward accuracy.
        dpo=DPOConfig(steps=125, batch_size=16, micro_batch_size=4, seq_len=64, lr=3e-3, warmup_steps=2,
                      eval_every=125, eval_batches=256, save_every=125, log_every=10, max_pairs=2000,
                      max_prompt_len=16, heldout_pairs=1024),
        verifier=VerifierConfig(steps=40, batch_size=8, micro_batch_size=8, seq_len=128, lr=1e-3,
                                warmup_steps=2, eval_every=40, eval_batches=10, save_every=20, log_every=5,
                                samples_per_question=4, num_questions=64, max_new_tokens=48,
                                include_gold_solutions=True),
        eval=EvalConfig(perplexity_context=128, perplexity_split="validation", sst2_shots=2, sst2_examples=64,
                        gsm8k_examples=16, gsm8k_samples=4, gsm8k_max_new_tokens=48, baselines=[]),
    )


PRESETS = {"local-smoke": _local_smoke, "gpu-full": _gpu_full}


# ----------------------------------------------------------------------------------------------------
# Overrides and validation
# ----------------------------------------------------------------------------------------------------
def _field_types(obj) -> Dict[str, Any]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (from JSON/YAML or a ``--set`` string) to the annotated type, or raise naming key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin in (list, List):
        if isinstance(value, str):
            s = value.strip()
            if s.startswith("["):
                try:
                    value = json.loads(s)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"config key '{key}': {value!r} is not a JSON list ({e.msg})") from e
            else:
                value = [v for v in s.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(key, v, args[0] if args else str) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"config key '{key}': expected a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    return value


# Keys that existed once: saved configs (a run's config.json, every checkpoint) still hold them and must load;
# set by hand they are an error saying so
REMOVED_KEYS: Dict[str, str] = {
    "data.num_workers": "removed: nothing read it (the batch sources are in-memory)",
}


def _drop_removed(data: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of a saved config dict without ``REMOVED_KEYS`` (nested sections or dotted keys)."""
    out = copy.deepcopy(data)
    for dotted in REMOVED_KEYS:
        out.pop(dotted, None)
        section, _, key = dotted.rpartition(".")
        node = out
        for part in section.split(".") if section else []:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(key, None)
    return out


def _set_key(cfg: PipelineConfig, dotted: str, value: Any) -> None:
    if dotted in REMOVED_KEYS:
        raise ConfigError(f"config key '{dotted}' was {REMOVED_KEYS[dotted]}")
    parts = dotted.split(".")
    obj = cfg
    for i, p in enumerate(parts):
        types = _field_types(obj)
        here = ".".join(parts[: i + 1])
        if p not in types:
            valid = ", ".join(sorted(types))
            raise ConfigError(f"unknown config key '{here}' (valid keys here: {valid})")
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(obj, p)):
                if not isinstance(value, dict):
                    raise ConfigError(f"config key '{here}' is a section; set its fields ('{here}.<field>')")
                for k2, v2 in value.items():
                    _set_key(cfg, f"{here}.{k2}", v2)
            else:
                setattr(obj, p, _coerce(here, value, types[p]))
        else:
            obj = getattr(obj, p)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"config key '{here}' is not a section")


def apply_overrides(cfg: PipelineConfig, overrides: Sequence[str]) -> PipelineConfig:
    """Apply ``key=value`` strings (``model.n_layers=4``). Values are parsed by the field's type."""
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override '{ov}' is not of the form key=value")
        k, v = ov.split("=", 1)
        _set_key(cfg, k.strip(), v.strip())
    return cfg


def apply_dict(cfg: PipelineConfig, data: Dict[str, Any], prefix: str = "") -> PipelineConfig:
    for k, v in data.items():
        _set_key(cfg, f"{prefix}{k}", v)
    return cfg


def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: Dict[str, Any], new: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every key whose value differs between two config dicts, sorted."""
    a, b = _flat(old), _flat(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


class _DuplicateKey(Exception):
    """(key, line or None): a mapping in a config file names the same key twice."""


def _unique_key_object(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k, None)
        out[k] = v
    return out


def _unique_key_yaml_loader(yaml):
    """PyYAML's SafeLoader, except that a key repeated in one mapping raises ``_DuplicateKey`` with its line."""
    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden by design
                    continue
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return Loader


def load_file(path: str | os.PathLike) -> Dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    if p.suffix not in (".json", ".yaml", ".yml"):  # a .toml was parsed as JSON and reported as "invalid JSON"
        raise ConfigError(f"{p}: config files are .json, .yaml or .yml, got '{p.suffix or 'no extension'}'")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a folder, not a config file") from None
    if p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:  # pragma: no cover - yaml is a dependency
            raise ConfigError("reading YAML configs needs PyYAML (pip install pyyaml)") from e
        try:
            data = yaml.load(text, Loader=_unique_key_yaml_loader(yaml)) or {}
        except _DuplicateKey as e:
            raise ConfigError(f"{p}:{e.args[1]}: duplicate key '{e.args[0]}' (YAML keeps only the last one, so the "
                              "earlier settings would be lost silently; merge the two)") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{where}: invalid YAML: {problem}") from e
    else:
        try:
            data = json.loads(text, object_pairs_hook=_unique_key_object)
        except _DuplicateKey as e:
            raise ConfigError(f"{p}: duplicate key '{e.args[0]}' (JSON keeps only the last one, so the earlier "
                              "settings would be lost silently; merge the two)") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}:{e.lineno}: invalid JSON: {e.msg}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of config keys")
    return data


def validate_optim(o: OptimConfig) -> None:
    """The optimizer keys (also checked by the Trainer, which can be built without a PipelineConfig). NaN fails
    every comparison, so each check is written to reject it."""
    def need(cond: bool, key: str, msg: str):
        if not cond:
            raise ConfigError(f"config key 'optim.{key}': {msg}")

    need(math.isfinite(o.weight_decay) and o.weight_decay >= 0, "weight_decay", f"must be >= 0, got {o.weight_decay}")
    for k in ("beta1", "beta2"):
        need(0.0 <= getattr(o, k) < 1.0, k, f"must be in [0, 1), got {getattr(o, k)}")
    need(math.isfinite(o.eps) and o.eps > 0, "eps", f"must be positive, got {o.eps}")
    need(math.isfinite(o.grad_clip) and o.grad_clip >= 0, "grad_clip",
         f"must be >= 0 (0 turns clipping off), got {o.grad_clip}")
    need(0.0 <= o.min_lr_ratio <= 1.0, "min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    need(isinstance(o.max_consecutive_nonfinite, int) and o.max_consecutive_nonfinite >= 1,
         "max_consecutive_nonfinite", f"must be a positive integer, got {o.max_consecutive_nonfinite}")


def _file_config(path) -> Dict[str, Any]:
    """``load_file`` without ``REMOVED_KEYS`` (a saved config.json passed back as a config), with a warning."""
    import warnings

    data = load_file(path)
    kept = _drop_removed(data)
    if kept != data:
        warnings.warn(f"{path}: ignoring config keys that no longer exist ({', '.join(REMOVED_KEYS)})")
    return kept


# torch.compile's modes (torch._inductor.list_mode_options)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def validate(cfg: PipelineConfig) -> PipelineConfig:
    m = cfg.model

    def need(cond: bool, key: str, msg: str):
        if not cond:
            raise ConfigError(f"config key '{key}': {msg}")

    for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
        need(getattr(m, k) > 0, f"model.{k}", f"must be positive, got {getattr(m, k)}")
    need(m.d_model % m.n_heads == 0, "model.d_model",
         f"d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
    need(m.n_heads % m.n_kv_heads == 0, "model.n_heads",
         f"n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}")
    need(m.head_dim % 2 == 0, "model.d_model", f"head_dim={m.head_dim} must be even for RoPE")
    need(math.isfinite(m.rope_theta) and m.rope_theta > 0, "model.rope_theta",
         f"must be a positive finite number, got {m.rope_theta}")
    need(math.isfinite(m.norm_eps) and m.norm_eps > 0, "model.norm_eps",
         f"must be a positive finite number, got {m.norm_eps}")
    # a negative or NaN std only fails inside the initialiser (torch's "normal expects std >= 0.0")
    need(math.isfinite(m.init_std) and m.init_std > 0, "model.init_std",
         f"must be a positive finite number, got {m.init_std}")
    # torch, numpy and Python's random all take seeds in [0, 2**63): -1 failed after the first evaluation
    need(0 <= cfg.seed < 2**63, "seed", f"must be an integer in [0, 2**63), got {cfg.seed}")
    need(m.n_sink_tokens >= 0, "model.n_sink_tokens", "must be >= 0")
    need(m.window is None or m.window > 0, "model.window", "must be positive or None")
    need(m.kernel_backend in ("eager", "triton"), "model.kernel_backend",
         f"must be 'eager' or 'triton', got {m.kernel_backend!r}")
    if m.kernel_backend == "triton":  # else the first forward fails, on a GPU after the stage has loaded its data
        try:
            from mllm_kernels.attention import SUPPORTED_HEAD_DIMS
        except ImportError as e:  # as ops.get_ops says it: a config error, not a traceback from the loader
            raise ConfigError(f"config key 'model.kernel_backend': 'triton' needs the triton package "
                              f"({type(e).__name__}: {e}); install triton or use model.kernel_backend=eager") from None

        need(m.head_dim in SUPPORTED_HEAD_DIMS, "model.kernel_backend",
             f"'triton' runs an attention kernel for head dims {' and '.join(map(str, SUPPORTED_HEAD_DIMS))}, but "
             f"model.d_model / model.n_heads = {m.d_model} / {m.n_heads} = {m.head_dim}: change model.d_model or "
             "model.n_heads, or use model.kernel_backend=eager")
    need(isinstance(m.vocab_pad_multiple, int) and m.vocab_pad_multiple >= 1, "model.vocab_pad_multiple",
         f"must be a positive integer, got {m.vocab_pad_multiple!r}")
    need(isinstance(m.fused_lm_loss, bool), "model.fused_lm_loss", f"must be true or false, got {m.fused_lm_loss!r}")
    need(isinstance(m.rope_in_attention, bool), "model.rope_in_attention",
         f"must be true or false, got {m.rope_in_attention!r}")
    need(isinstance(m.fused_qkv, bool), "model.fused_qkv", f"must be true or false, got {m.fused_qkv!r}")
    need(isinstance(m.weight_cache, bool), "model.weight_cache", f"must be true or false, got {m.weight_cache!r}")
    need(m.residual_dtype in RESIDUAL_DTYPES, "model.residual_dtype",
         f"must be one of {', '.join(RESIDUAL_DTYPES)}, got {m.residual_dtype!r}")
    need(cfg.data.tokenizer in ("gpt2", "byte"), "data.tokenizer", f"must be 'gpt2' or 'byte', got {cfg.data.tokenizer!r}")
    dup = sorted({n for n in cfg.data.pretrain_datasets if list(cfg.data.pretrain_datasets).count(n) > 1})
    need(not dup, "data.pretrain_datasets", f"lists {', '.join(dup)} more than once (its documents would be trained on "
         "twice)")
    need(0.0 <= cfg.data.val_fraction < 1.0, "data.val_fraction", "must be in [0, 1)")
    need(cfg.data.packing_algorithm in ("bfd", "ffd"), "data.packing_algorithm", "must be 'bfd' or 'ffd'")
    need(cfg.device in ("auto", "cpu", "cuda"), "device", f"must be auto, cpu or cuda, got {cfg.device!r}")
    need(cfg.compile_mode is None or cfg.compile_mode in COMPILE_MODES, "compile_mode",
         f"must be null or one of {', '.join(COMPILE_MODES)}, got {cfg.compile_mode!r}")
    need(cfg.compile_mode is None or cfg.compile, "compile_mode",
         f"{cfg.compile_mode!r} needs compile=true (the mode of torch.compile)")
    for stage in ("pretrain", "sft", "dpo", "verifier"):
        s = getattr(cfg, stage)
        for k in ("steps", "batch_size", "micro_batch_size", "seq_len", "eval_batches", "keep_last",
                  "log_every", "eval_every", "save_every"):
            need(getattr(s, k) > 0, f"{stage}.{k}", f"must be positive, got {getattr(s, k)}")
        # an infinite rate passes "> 0" and only surfaces as NaN weights when the first checkpoint is refused
        need(math.isfinite(s.lr) and s.lr > 0, f"{stage}.lr", f"must be a positive finite number, got {s.lr}")
        need(s.warmup_steps >= 0, f"{stage}.warmup_steps", "must be >= 0")
        need(s.batch_size % s.micro_batch_size == 0, f"{stage}.batch_size",
             f"batch_size={s.batch_size} must be a multiple of {stage}.micro_batch_size={s.micro_batch_size}")
        need(s.seq_len <= m.max_seq_len, f"{stage}.seq_len",
             f"seq_len={s.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    need(math.isfinite(cfg.dpo.beta) and cfg.dpo.beta > 0, "dpo.beta", f"must be a positive finite number, got {cfg.dpo.beta}")
    for key, n in (("data.max_docs", cfg.data.max_docs), ("sft.max_examples", cfg.sft.max_examples),
                   ("dpo.max_pairs", cfg.dpo.max_pairs)):
        need(n is None or n > 0, key, f"must be positive or null (= all), got {n}")
    need(cfg.dpo.heldout_pairs >= 0, "dpo.heldout_pairs", f"must be >= 0, got {cfg.dpo.heldout_pairs}")
    need(cfg.dpo.reference in ("precomputed", "frozen"), "dpo.reference", "must be 'precomputed' or 'frozen'")
    need(0.0 <= cfg.sft.gsm8k_weight <= 1.0, "sft.gsm8k_weight", "must be in [0, 1]")
    for key in ("lm_loss_weight", "value_loss_weight"):
        w = getattr(cfg.verifier, key)
        need(math.isfinite(w) and w >= 0, f"verifier.{key}", f"must be a finite number >= 0, got {w}")
    need(cfg.verifier.samples_per_question > 0, "verifier.samples_per_question", "must be positive")
    need(cfg.verifier.num_questions is None or cfg.verifier.num_questions > 0, "verifier.num_questions",
         f"must be positive or null, got {cfg.verifier.num_questions}")
    validate_optim(cfg.optim)
    need(cfg.eval.perplexity_split in ("test", "validation"), "eval.perplexity_split", "must be test or validation")
    for k in ("batch_size", "gen_batch_size", "gsm8k_samples", "perplexity_context"):
        need(getattr(cfg.eval, k) > 0, f"eval.{k}", f"must be positive, got {getattr(cfg.eval, k)}")
    ev = cfg.eval
    need(ev.perplexity_stride is None or 0 < ev.perplexity_stride <= ev.perplexity_context, "eval.perplexity_stride",
         f"must be null (= eval.perplexity_context) or in [1, {ev.perplexity_context}], got {ev.perplexity_stride}")
    need(ev.sst2_shots >= 0, "eval.sst2_shots", f"must be >= 0 (0 skips SST-2), got {ev.sst2_shots}")
    for key, t in (("eval.gsm8k_temperature", ev.gsm8k_temperature), ("verifier.temperature", cfg.verifier.temperature)):
        need(math.isfinite(t) and t >= 0, key, f"must be >= 0 (0 = greedy), got {t}")
    for key, n in (("eval.gsm8k_max_new_tokens", ev.gsm8k_max_new_tokens),
                   ("verifier.max_new_tokens", cfg.verifier.max_new_tokens)):
        # generation keeps the prompt's last max_seq_len - max_new_tokens tokens: at least one must remain
        need(0 < n < m.max_seq_len, key, f"must be in [1, model.max_seq_len={m.max_seq_len}), got {n}")
    for k in ("perplexity_max_documents", "sst2_examples", "gsm8k_examples"):
        v = getattr(cfg.eval, k)
        need(v is None or v > 0, f"eval.{k}", f"must be positive or null, got {v}")
    return cfg


def load_config(name: str = "local-smoke", overrides: Sequence[str] = (), file: Optional[str] = None) -> PipelineConfig:
    """Preset ``name`` (or a JSON/YAML file path as name), then ``file`` keys, then ``overrides``; validated."""
    if name in PRESETS:
        cfg = PRESETS[name]()
    elif Path(name).suffix in (".json", ".yaml", ".yml"):
        data = _file_config(name)
        # "preset" picks the base; a saved config.json has none, only its run "name" (a preset's name when the run
        # used one). "name" stays a config key either way
        base = data.pop("preset", None)
        if base is None:
            base = data["name"] if data.get("name") in PRESETS else "local-smoke"
        if base not in PRESETS:
            raise ConfigError(f"{name}: 'preset' must be one of {sorted(PRESETS)}, got {base!r}")
        cfg = apply_dict(PRESETS[base](), data)
    else:
        raise ConfigError(f"unknown config '{name}': valid presets are {', '.join(sorted(PRESETS))} "
                          "(or a .json/.yaml file)")
    if file:
        apply_dict(cfg, _file_config(file))
    apply_overrides(cfg, overrides)
    return validate(cfg)


def config_from_dict(data: Dict[str, Any]) -> PipelineConfig:
    """Rebuild a config saved with ``to_dict`` (e.g. a run's config.json)."""
    cfg = PipelineConfig()
    apply_dict(cfg, _drop_removed(data))
    return validate(cfg)
