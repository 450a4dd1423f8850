#!/usr/bin/env python
"""Attention heatmaps, statistics and observations of a checkpoint.

    python scripts/visualize_attention.py --checkpoint experiments/runs/<run>/checkpoints/pretrain/ \\
        [--text "Once upon a time ..."] [--text ...] [--out report/attention/pretrain] [--local-window 4]

Writes <out>/layer_<l>.png (a grid of heads per layer, first text), <out>/attention_stats.json (statistics per
layer and head, averaged over the texts, and the observations) and <out>/observations.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from mllm.data.tokenizer import tokenizer_from_config
    from mllm.evaluation.attention_maps import DEFAULT_TEXTS, analyze
    from mllm.evaluation.loading import load_stage_model, resolve_device

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint file or a stage's checkpoint folder")
    ap.add_argument("--text", action="append", default=None, help="text to analyse (repeatable; default: two built-in)")
    ap.add_argument("--out", default=None, help="output folder (default: <run>/attention/<stage>)")
    ap.add_argument("--local-window", type=int, default=4, help="w of the local-band statistic |i-j| <= w")
    ap.add_argument("--max-tokens", type=int, default=None, help="truncate texts (default: model max_seq_len)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    if args.local_window < 0:
        ap.error(f"--local-window must be >= 0, got {args.local_window}")
    if args.max_tokens is not None and args.max_tokens < 2:
        ap.error(f"--max-tokens must be >= 2 (attention over one token is trivial), got {args.max_tokens}")

    try:
        model, cfg, meta = load_stage_model(args.checkpoint, resolve_device(args.device))
        tok = tokenizer_from_config(cfg.data)
    except ValueError as e:  # CheckpointError, ConfigError, TokenizerError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    ckpt = Path(meta["checkpoint"])
    out = Path(args.out) if args.out else ckpt.parent.parent.parent / "attention" / (meta["stage"] or ckpt.parent.name)
    try:
        doc = analyze(model, tok, args.text or DEFAULT_TEXTS, out, args.local_window, args.max_tokens)
    except ValueError as e:  # a text too short to analyse, and the like: analyze names the input
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{meta['stage']} step {meta['step']} ({ckpt}):")
    for o in doc["observations"]:
        print(f"  - {o}")
    print(f"wrote {out}/attention_stats.json, observations.md and {len(doc['figures'])} heatmaps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
