#!/usr/bin/env python
"""Check that every dataset a config uses can be loaded: where it resolves (local file or hub), row count, one
sample, schema. Prints a table; exits 1 when a dataset is missing or broken.

    python scripts/verify_datasets.py --quick                       # all seven datasets
    python scripts/verify_datasets.py --quick --config local-smoke  # the ones local-smoke uses
    python scripts/verify_datasets.py --quick --data-dir ../shared/data
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source tree without installing

from mllm.data.datasets import DATASETS, datasets_for_config, format_verify_table, verify_datasets  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="bounded reads: local files under 64 MiB whole, larger files and the hub first 200 rows")
    ap.add_argument("--config", default=None,
                    help="preset name or config file; only the datasets it uses are checked (default: all)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. data.data_dir=/data (repeatable)")
    ap.add_argument("--data-dir", default=None, help="data folder (default: data.data_dir, else $MLLM_DATA_DIR)")
    ap.add_argument("--datasets", default=None, help=f"comma-separated subset of {','.join(DATASETS)}")
    args = ap.parse_args(argv)

    from mllm.config.pipeline_config import ConfigError, load_config

    names = list(DATASETS)
    data_dir = args.data_dir
    if args.config or args.overrides:
        try:  # --set alone applies to the local-smoke preset (its data keys), the datasets stay all seven
            cfg = load_config(args.config or "local-smoke", overrides=args.overrides)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.config:
            names = datasets_for_config(cfg)
        data_dir = data_dir or cfg.resolved_data_dir()
    if args.datasets:
        names = [n.strip() for n in args.datasets.split(",") if n.strip()]
        unknown = [n for n in names if n not in DATASETS]
        if not names:  # "--datasets ," printed an empty table and "all datasets usable"
            print(f"error: --datasets: no dataset named in {args.datasets!r} (choose from {', '.join(DATASETS)})",
                  file=sys.stderr)
            return 2
        if unknown:
            print(f"error: --datasets: unknown {', '.join(unknown)} (choose from {', '.join(DATASETS)})",
                  file=sys.stderr)
            return 2
    data_dir = data_dir or os.environ.get("MLLM_DATA_DIR")
    print(f"data folder: {data_dir or '(none: hub only)'}   datasets: {', '.join(names)}"
          f"{'   (quick)' if args.quick else ''}")
    rows, ok = verify_datasets(names, data_dir, quick=args.quick)
    print(format_verify_table(rows))
    print("\nall datasets usable" if ok else "\nFAILED: a dataset is missing or broken (see the table)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
