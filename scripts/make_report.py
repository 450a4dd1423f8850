#!/usr/bin/env python
"""Write a run's REPORT.md from its results JSONs, metrics and figures.

    python scripts/make_report.py --run experiments/runs/<run>/ [--results DIR] [--out FILE_OR_DIR]

--results defaults to <run>/results (written by scripts/evaluation/evaluate_tasks.py); --out to
<run>/report/REPORT.md, where the eval stage writes it (./REPORT.md with --results alone). Every number in the
report is read from those JSONs or from <run>/metrics.jsonl; missing ones are printed as "not run: <why>".
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from mllm.evaluation.common import command_line
    from mllm.evaluation.report import build_report, report_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=None, help="run directory (metrics.jsonl, config.json, figures/)")
    ap.add_argument("--results", default=None, help="results folder (default: RUN/results)")
    # not report/REPORT.md relative to the working directory: from the repo root that overwrote the committed sample
    ap.add_argument("--out", default=None,
                    help="the Markdown file to write (an existing folder: FOLDER/REPORT.md), figures/ beside it; "
                         "default RUN/report/REPORT.md, as the eval stage writes it (./REPORT.md without --run)")
    args = ap.parse_args(argv)
    if args.run is None and args.results is None:
        ap.error("give --run RUN (and/or --results DIR)")
    results = Path(args.results) if args.results else Path(args.run) / "results"
    if args.out is None:
        args.out = str(Path(args.run) / "report" / "REPORT.md") if args.run else "REPORT.md"
    try:
        build_report(results, args.run, args.out,
                     command=command_line("scripts/make_report.py", sys.argv[1:] if argv is None else argv))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {report_path(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
