"""Attention maps: per-layer/head heatmaps, statistics, and observations written from the statistics.

The model supplies probabilities through ``model.attention_maps(input_ids) -> [L × [B, H, T, T]]`` (query ×
key, causal, rows sum to 1 − P(learned sink)). For each layer l and head h, averaged over the batch and over
query rows i ≥ ``skip_first`` (row 0 can only attend to token 0, which would inflate every statistic):

    self_mass      = mean_i P[i, i]
    local_mass     = mean_i Σ_{0 ≤ i−j ≤ w} P[i, j]                 (w = local_window; includes the diagonal)
    first_mass     = mean_i P[i, 0]
    sink_tokens_mass = mean_i Σ_{j < n_sink_tokens} P[i, j]         (StreamingLLM sink tokens; 0 when none)
    sink_logit_mass  = mean_i (1 − Σ_j P[i, j])                     (learned sinks' share; 0 without them)
    entropy        = mean_i −Σ_j p̂_ij ln p̂_ij,  p̂ = P / Σ_j P      (nats, over keys)
    norm_entropy   = mean_i entropy_i / ln(i + 1)                  (1 = uniform over the visible prefix)
    mean_distance  = mean_i Σ_j p̂_ij (i − j)

Observations are sentences generated from these numbers with fixed thresholds (see ``THRESHOLDS``), read against
the chance level: the same statistics of uniform causal attention over the same texts (``uniform_statistics``;
on a 40-token text a uniform head already keeps ~35% within 4 tokens back). A head is called a sink, local or self
head only above its threshold and ``CHANCE_FACTOR`` × chance.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from mllm.training.checkpoint import atomic_write_text

THRESHOLDS = {"sink": 0.5, "local": 0.7, "self": 0.5, "diffuse": 0.8}
CHANCE_FACTOR = 1.5
CHANCE_KEYS = ("first_mass", "local_mass", "self_mass", "mean_distance")
STAT_KEYS = ("self_mass", "local_mass", "first_mass", "sink_tokens_mass", "sink_logit_mass", "entropy",
             "norm_entropy", "mean_distance")


def head_statistics(probs: torch.Tensor, local_window: int = 4, n_sink_tokens: int = 0,
                    skip_first: int = 1) -> Dict[str, torch.Tensor]:
    """Statistics of one layer's probabilities [B, H, T, T] -> {name: [H]} (module docstring)."""
    if probs.dim() != 4 or probs.shape[-1] != probs.shape[-2]:
        raise ValueError(f"attention probabilities must be [B, H, T, T], got {tuple(probs.shape)}")
    B, H, T, _ = probs.shape
    if T <= skip_first:
        raise ValueError(f"need more than skip_first={skip_first} tokens, got T={T}")
    if local_window < 0:
        raise ValueError(f"local_window must be >= 0, got {local_window}")
    p = probs.detach().float().cpu()[:, :, skip_first:]  # [B, H, Tq, T]; small, so statistics run on the CPU
    i = torch.arange(skip_first, T)[:, None]
    j = torch.arange(T)[None, :]
    dist = (i - j).float()  # [Tq, T]
    row = p.sum(-1)  # [B, H, Tq]
    phat = p / row.clamp_min(1e-12)[..., None]
    ent = -(phat * torch.log(phat.clamp_min(1e-30))).sum(-1)  # [B, H, Tq]
    out = {
        "self_mass": torch.diagonal(p, offset=skip_first, dim1=-2, dim2=-1),
        "local_mass": (p * ((dist >= 0) & (dist <= local_window))).sum(-1),
        "first_mass": p[..., 0],
        "sink_tokens_mass": p[..., :n_sink_tokens].sum(-1) if n_sink_tokens > 0 else torch.zeros_like(row),
        "sink_logit_mass": (1.0 - row).clamp_min(0.0),
        "entropy": ent,
        "norm_entropy": ent / torch.log(i.squeeze(-1).float() + 1.0).clamp_min(1e-12),
        "mean_distance": (phat * dist.clamp_min(0)).sum(-1),
    }
    return {k: v.mean(dim=(0, 2)) for k, v in out.items()}


def uniform_statistics(T: int, local_window: int = 4, n_sink_tokens: int = 0, skip_first: int = 1
                       ) -> Dict[str, float]:
    """The statistics of uniform causal attention (P[i, j] = 1/(i+1) for j <= i) over T tokens: the chance level
    of each number for a text of that length."""
    p = torch.tril(torch.ones(T, T, dtype=torch.float64))
    p = (p / p.sum(-1, keepdim=True))[None, None]
    return {k: float(v[0]) for k, v in head_statistics(p, local_window, n_sink_tokens, skip_first).items()}


def attention_statistics(maps: Sequence[torch.Tensor], local_window: int = 4, n_sink_tokens: int = 0,
                         skip_first: int = 1) -> Dict:
    """{"layers": [{"layer", "heads": [{"head", **stats}], **layer means}], "settings"} for L layers' maps."""
    if not maps:
        raise ValueError("no attention maps (the model returned an empty list)")
    layers = []
    for l, probs in enumerate(maps):
        st = head_statistics(probs, local_window, n_sink_tokens, skip_first)
        H = probs.shape[1]
        heads = [{"head": h, **{k: float(st[k][h]) for k in STAT_KEYS}} for h in range(H)]
        layers.append({"layer": l, "heads": heads, **{f"mean_{k}": float(st[k].mean()) for k in STAT_KEYS}})
    return {"layers": layers, "settings": {"local_window": local_window, "n_sink_tokens": n_sink_tokens,
                                           "skip_first": skip_first, "thresholds": THRESHOLDS}}


def merge_statistics(stats: Sequence[Dict]) -> Dict:
    """Average several :func:`attention_statistics` results (one per text) head by head."""
    if not stats:
        raise ValueError("nothing to merge")
    base = json.loads(json.dumps(stats[0]))
    for l, layer in enumerate(base["layers"]):
        for k in STAT_KEYS:
            layer[f"mean_{k}"] = sum(s["layers"][l][f"mean_{k}"] for s in stats) / len(stats)
            for h, head in enumerate(layer["heads"]):
                head[k] = sum(s["layers"][l]["heads"][h][k] for s in stats) / len(stats)
    base["n_texts"] = len(stats)
    return base


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def observations(stats: Dict, chance: Optional[Dict[str, float]] = None) -> List[str]:
    """Sentences derived from the statistics: sink, local, self and diffuse heads, and per-layer trends. With
    ``chance`` (``uniform_statistics`` averaged like ``stats``) a head must also exceed ``CHANCE_FACTOR`` × chance."""
    th = dict(THRESHOLDS)
    heads = [(L["layer"], h) for L in stats["layers"] for h in L["heads"]]
    w = stats["settings"]["local_window"]
    out: List[str] = []
    if chance:
        for name_, key in (("sink", "first_mass"), ("local", "local_mass"), ("self", "self_mass")):
            th[name_] = max(th[name_], CHANCE_FACTOR * chance[key])
        out.append(f"Chance level (uniform causal attention over the same texts): first token "
                   f"{_pct(chance['first_mass'])}, within {w} token(s) back {_pct(chance['local_mass'])}, current "
                   f"token {_pct(chance['self_mass'])}, mean distance {chance['mean_distance']:.1f} tokens; the "
                   f"thresholds below are raised to {CHANCE_FACTOR}x chance where that is higher.")

    def name(l, h):
        return f"L{l}H{h['head']}"

    def listing(sel, key):
        sel = sorted(sel, key=lambda t: -t[1][key])
        return ", ".join(f"{name(l, h)} ({_pct(h[key])})" for l, h in sel)

    sink = [(l, h) for l, h in heads if h["first_mass"] > th["sink"]]
    if sink:
        out.append(f"Sink heads (> {_pct(th['sink'])} of attention on the first token): {len(sink)} of {len(heads)}: "
                   f"{listing(sink, 'first_mass')}.")
    else:
        l, h = max(heads, key=lambda t: t[1]["first_mass"])
        out.append(f"No head puts more than {_pct(th['sink'])} of its attention on the first token "
                   f"(highest: {name(l, h)} with {_pct(h['first_mass'])}).")
    local = [(l, h) for l, h in heads if h["local_mass"] > th["local"] and h["first_mass"] <= th["sink"]]
    if th["local"] >= 1:  # the window covers (nearly) the whole text: CHANCE_FACTOR x chance is out of reach
        out.append(f"No local-head test: uniform attention already keeps {_pct(chance['local_mass'])} within {w} "
                   f"token(s) back on these texts, so no head can exceed {CHANCE_FACTOR}x chance (use a smaller "
                   "local window or longer texts).")
    elif local:
        out.append(f"Local heads (> {_pct(th['local'])} of attention within {w} token(s) back): {len(local)}: "
                   f"{listing(local, 'local_mass')}.")
    else:
        l, h = max(heads, key=lambda t: t[1]["local_mass"])
        out.append(f"No head keeps more than {_pct(th['local'])} of its attention within {w} token(s) back "
                   f"(most local: {name(l, h)} with {_pct(h['local_mass'])}).")
    selfh = [(l, h) for l, h in heads if h["self_mass"] > th["self"]]
    if selfh:
        out.append(f"Self/diagonal heads (> {_pct(th['self'])} on the current token): {listing(selfh, 'self_mass')}.")
    diffuse = [(l, h) for l, h in heads if h["norm_entropy"] > th["diffuse"]]
    if diffuse:
        out.append(f"Diffuse heads (entropy > {_pct(th['diffuse'])} of uniform over the visible prefix): "
                   f"{listing(diffuse, 'norm_entropy')}.")
    layers = stats["layers"]
    if len(layers) > 1:
        a, b = layers[0]["mean_first_mass"], layers[-1]["mean_first_mass"]
        trend = "rises" if b > a + 0.05 else "falls" if b < a - 0.05 else "stays roughly flat"
        out.append(f"Mean attention on the first token {trend} with depth: {_pct(a)} in layer 0, "
                   f"{_pct(b)} in layer {len(layers) - 1}.")
        a, b = layers[0]["mean_mean_distance"], layers[-1]["mean_mean_distance"]
        out.append(f"Mean attended distance: {a:.1f} tokens in layer 0, {b:.1f} in layer {len(layers) - 1}.")
    if stats["settings"]["n_sink_tokens"] > 0:
        m = max(heads, key=lambda t: t[1]["sink_tokens_mass"])
        avg = sum(h["sink_tokens_mass"] for _, h in heads) / len(heads)
        out.append(f"The {stats['settings']['n_sink_tokens']} sink tokens receive {_pct(avg)} of the attention "
                   f"on average (most: {name(*m)} with {_pct(m[1]['sink_tokens_mass'])}).")
    sl = [(l, h) for l, h in heads if h["sink_logit_mass"] > 0.01]
    if sl:
        out.append(f"Learned sinks absorb more than 1% of the mass in {len(sl)} heads: {listing(sl, 'sink_logit_mass')}.")
    return out


def plot_layer(probs: torch.Tensor, out_png: str | Path, tokens: Optional[Sequence[str]] = None,
               title: str = "", batch_index: int = 0) -> Path:
    """One PNG for one layer: a grid of H heatmaps (query rows × key columns) of probs [B, H, T, T]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    P = probs[batch_index].float().cpu().numpy()
    H, T = P.shape[0], P.shape[-1]
    cols = min(H, 4)
    rows = math.ceil(H / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), dpi=110, squeeze=False)
    for h in range(rows * cols):
        ax = axes[h // cols][h % cols]
        if h >= H:
            ax.axis("off")
            continue
        im = ax.imshow(P[h], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"head {h}", fontsize=9)
        if tokens is not None and T <= 32:
            ax.set_xticks(range(T))
            ax.set_xticklabels(tokens, rotation=90, fontsize=5)
            ax.set_yticks(range(T))
            ax.set_yticklabels(tokens, fontsize=5)
        else:
            ax.set_xlabel("key", fontsize=7)
            ax.set_ylabel("query", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
    fig.suptitle(title)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


DEFAULT_TEXTS = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her dog. "
    "One day, Lily saw a big red ball under a tree. She ran to the ball and kicked it very hard.",
    "The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure "
    "in Paris. Its base is square, measuring 125 metres on each side.",
)


@torch.no_grad()
def analyze(model, tokenizer, texts: Sequence[str] = DEFAULT_TEXTS, out_dir: str | Path = "attention",
            local_window: int = 4, max_tokens: Optional[int] = None, plot: bool = True) -> Dict:
    """Run ``model.attention_maps`` on each text (one at a time), write ``attention_stats.json`` (merged statistics
    + per-text statistics + observations), ``observations.md`` and, for the first text, one heatmap grid per
    layer ``layer_<l>.png``. Returns the JSON's dict."""
    if not hasattr(model, "attention_maps"):
        raise ValueError(f"{type(model).__name__} has no attention_maps(input_ids) method")
    cfg = getattr(model, "cfg", None)
    n_sink = int(getattr(cfg, "n_sink_tokens", 0) or 0)
    limit = max_tokens or getattr(cfg, "max_seq_len", None)
    out_dir = Path(out_dir)
    dev = next(model.parameters()).device
    per_text, chances, figures = [], [], []
    for t_idx, text in enumerate(texts):
        ids = tokenizer.encode(text)
        if limit:
            ids = ids[:limit]
        if len(ids) < 2:
            raise ValueError(f"text {t_idx} has fewer than 2 tokens: {text!r}")
        maps = model.attention_maps(torch.tensor([ids], device=dev))
        per_text.append(attention_statistics(maps, local_window, n_sink))
        chances.append(uniform_statistics(len(ids), local_window, n_sink))
        if plot and t_idx == 0:
            toks = [tokenizer.decode([i]) for i in ids]
            for l, pr in enumerate(maps):
                figures.append(str(plot_layer(pr, out_dir / f"layer_{l}.png", toks, f"layer {l}")))
    merged = merge_statistics(per_text)
    chance = {k: sum(c[k] for c in chances) / len(chances) for k in STAT_KEYS}
    obs = observations(merged, chance)
    doc = {**merged, "chance": chance, "observations": obs, "figures": figures, "texts": list(texts),
           "n_tokens": [min(len(tokenizer.encode(t)), limit or 10**9) for t in texts], "per_text": per_text}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "attention_stats.json", json.dumps(doc, indent=2) + "\n")
    atomic_write_text(out_dir / "observations.md", observations_markdown(merged, obs, chance))
    return doc


def observations_markdown(stats: Dict, obs: Sequence[str], chance: Optional[Dict[str, float]] = None) -> str:
    """A per-layer table of mean statistics (and the chance row: uniform causal attention over the same texts)
    followed by the observations."""
    lines = ["| layer | first token | local (≤ w back) | self | entropy (nats) | mean distance |",
             "|---|---|---|---|---|---|"]
    for L in stats["layers"]:
        lines.append(f"| {L['layer']} | {_pct(L['mean_first_mass'])} | {_pct(L['mean_local_mass'])} | "
                     f"{_pct(L['mean_self_mass'])} | {L['mean_entropy']:.2f} | {L['mean_mean_distance']:.1f} |")
    if chance:
        lines.append(f"| uniform (chance) | {_pct(chance['first_mass'])} | {_pct(chance['local_mass'])} | "
                     f"{_pct(chance['self_mass'])} | {chance['entropy']:.2f} | {chance['mean_distance']:.1f} |")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {o}" for o in obs) + "\n"
