"""Benchmarks for the kernels, the packing extension and the training step.

Run everything on the current device (CUDA if available, else CPU) with::

    python -m benchmarks.run [--only NAME ...] [--out benchmarks/results/] [--quick]

The bench-module contract (every ``benchmarks/bench_<name>.py``)
-----------------------------------------------------------------
* ``run(device: torch.device, quick: bool = False) -> list[dict]``: one dict ("row") per
  (op, shape, dtype, mode, provider). Required keys: ``op`` (str) and ``provider`` (str), and either
  ``ms`` (median time in milliseconds, a number) or ``error`` (str: this provider/shape failed) or
  ``skipped`` (str: the reason it cannot run here, e.g. "needs CUDA"). Recognised optional keys:
  ``shape`` (tuple/list of ints, a str such as ``"8x1024x1024"``, or a dict of named sizes), ``size``
  (a number used as the plot's x value; default: the product of the shape's integers), ``dtype``,
  ``mode`` (``fwd``/``bwd``/``fwd+bwd``/...), ``gbps``, ``tflops``, ``peak_mem_mb``, ``ms_p20``,
  ``ms_p80``, ``extrapolated`` (True, or a str saying how: ``ms`` was not measured at this size but scaled
  from a smaller run; marked ``*`` in the table and plot) and ``not_comparable`` (str: this row times
  different work than the other providers at the same mode, so no speed-up is computed; the reason is
  shown). ``tflops`` must count only the work that provider does in that mode: a row above the card's
  peak is flagged ``implausible``. Other keys are kept verbatim in the JSON.
  A timed row should name what timed it in ``timer`` (``triton.testing.do_bench``, ``pytest-benchmark``, or the
  module's own loop, e.g. ``bench_packing._time``); the runner fills in ``not stated by bench_<name>.run`` otherwise.
* ``quick=True`` asks for a few small shapes (CI / smoke); the default is the full sweep.
* Optional ``cpu_cases(quick: bool = False) -> list[benchmarks.common.CpuCase]``: the rows that can run on CPU, each
  with its identity (the row's fields), an untimed ``prepare()`` returning the callable to time, the bytes / FLOPs of
  one call, or a ``skipped`` reason. On CPU the runner times these with pytest-benchmark
  (``benchmarks/pytest_cpu.py``) instead of calling ``run``; a case that raises becomes an ``error`` row. A module
  without ``cpu_cases`` is called through ``run`` on CPU too and times itself (``bench_packing``,
  ``bench_host_overhead``: their docstrings say why).
* A CLI ``python -m benchmarks.bench_<name> --out DIR`` (each module's own), writing
  ``bench_<name>_<UTC YYYYMMDD-HHMMSS>_<card>.json`` / ``.md`` so that a re-run never overwrites an earlier one.

The runner (``benchmarks/run.py``) records a module that raises, cannot be imported, or returns rows
that break the contract as one ``error`` row, runs the other modules, and exits non-zero at the end. A
module that measures several providers and shapes should turn one provider's failure into an ``error`` row
for that provider and shape (``benchmarks.common.measure`` does) so that its other rows survive.
"""
