#!/usr/bin/env python
"""Run a pipeline stage: ``python scripts/run_pipeline.py --config local-smoke --stage pretrain``.

All logic lives in ``mllm.training.runner`` (``--help`` lists the flags); under ``torchrun`` every rank runs this.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source tree too

from mllm.training.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
