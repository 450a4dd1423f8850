"""pytest-benchmark timings of the bench modules' CPU cases: the CPU timer of ``python -m benchmarks.run``.

A bench module that can run on CPU lists its CPU rows as ``cpu_cases(quick=False) -> list[benchmarks.common.CpuCase]``
(row identity, an untimed ``prepare()`` returning the callable to time, bytes and FLOPs of one call, or ``skipped``).
On CPU the runner (and the module's own ``run``/CLI, through ``module_rows``) does not time them itself: ``time_module``
lists the cases, then runs this file under pytest in a subprocess,

    python -m pytest benchmarks/pytest_cpu.py -p no:cacheprovider --benchmark-enable --benchmark-only
        --benchmark-json=J --junitxml=X --benchmark-min-rounds=.. --benchmark-max-time=.. --benchmark-warmup=..

where ``test_cpu_case`` is parametrized over the same cases (one pytest id per case, ``CpuCase.id``) and hands each
case's callable to the ``benchmark`` fixture, with ``benchmark.extra_info`` = the row identity. The runner then builds
one row per case, in the order ``cpu_cases`` listed them:

  * timed (an entry in J whose ``param`` is the case id, and whose ``extra_info["row"]`` must equal the identity the
    runner listed): the row's fields plus, from pytest-benchmark's per-call ``stats`` (seconds; per iteration when it
    loops a fast call), ``ms = median * 1e3``, ``ms_min``, ``ms_max``, ``ms_mean``, ``ms_stddev``, ``ms_q1``, ``ms_q3``,
    ``ms_iqr`` (all x 1e3), ``rounds`` and ``iterations``; ``timer = "pytest-benchmark"``; then the derived
    ``bytes``/``gbps = bytes / (ms 1e-3) / 1e9`` and ``flops``/``tflops = flops / (ms 1e-3) / 1e12`` where the case
    gives them;
  * failed (the test failed or errored, so J has no entry; the JUnit XML X says why): an ``error`` row with
    pytest's message (e.g. ``RuntimeError: shape 3 is not supported``); the other cases are still timed;
  * ``skipped`` cases never reach pytest: a ``skipped`` row.
A module whose cases cannot be listed, or a pytest run that fails as a whole (collection error, bad option), raises:
the runner turns that into the module's error row. The call that pytest-benchmark makes to calibrate is not recorded
and serves as the warm-up of a quick run; a full run adds ``--benchmark-warmup`` rounds (``TIMING``).

By hand (every module's cases, pytest-benchmark's own table):

    pytest benchmarks/pytest_cpu.py --benchmark-enable [-k rms_norm]

``MLLM_BENCH_CPU_MODULES`` (``NAME=PATH`` entries joined by ``os.pathsep``; default: every ``benchmarks/bench_*.py``
with ``cpu_cases``) and ``MLLM_BENCH_CPU_QUICK=1`` (``cpu_cases(quick=True)``) choose what is collected.

Not here, on their own timers (their docstrings say why): ``bench_packing`` (wall and process CPU time of the same
calls, the first call's cold time, a Python provider extrapolated from a subset) and ``bench_host_overhead``
(providers interleaved within each repeat so that load drift cancels in their difference).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # collected by a pytest started elsewhere
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import TIMER_PYTEST_BENCHMARK, CpuCase  # noqa: E402

ENV_MODULES = "MLLM_BENCH_CPU_MODULES"
ENV_QUICK = "MLLM_BENCH_CPU_QUICK"
TEST_NAME = "test_cpu_case"
# pytest-benchmark options per run kind. Rounds = max(min_rounds, max_time / time of one call): a full run spends
# about max_time per case; a quick run (the runner's --quick, CI, the tests) a few calls per case.
TIMING = {
    "full": {"min_rounds": 5, "max_time": 1.0, "warmup": "on", "warmup_iterations": 3},
    "quick": {"min_rounds": 3, "max_time": 0.05, "warmup": "off", "warmup_iterations": 0},
}
# pytest-benchmark ``stats`` fields (seconds) -> row fields (milliseconds)
STAT_FIELDS = {"median": "ms", "min": "ms_min", "max": "ms_max", "mean": "ms_mean", "stddev": "ms_stddev",
               "q1": "ms_q1", "q3": "ms_q3", "iqr": "ms_iqr"}


# ----------------------------------------------------------------------------------------------------
# listing the cases (both processes)
# ----------------------------------------------------------------------------------------------------
def module_name(path) -> str:
    """``bench_rms_norm.py`` -> ``rms_norm``."""
    stem = Path(path).stem
    return stem[len("bench_"):] if stem.startswith("bench_") else stem


def list_cases(name: str, module, quick: bool) -> List[CpuCase]:
    """``module.cpu_cases(quick=quick)``, checked: a non-empty list of ``CpuCase``, each with a string ``op`` and
    ``provider``, either a ``skipped`` reason or a callable ``prepare``, numeric or None bytes/FLOPs, and ids unique
    within the module (the id is how a pytest-benchmark entry finds its row). ValueError naming the case otherwise."""
    fn = getattr(module, "cpu_cases", None)
    if not callable(fn):
        raise ValueError(f"bench_{name} has no cpu_cases(quick=False) function")
    cases = fn(quick=quick)
    if not isinstance(cases, (list, tuple)) or not cases:
        raise ValueError(f"bench_{name}.cpu_cases() must return a non-empty list of CpuCase, got {cases!r}")
    seen: Dict[str, int] = {}
    for i, c in enumerate(cases):
        if not isinstance(c, CpuCase):
            raise ValueError(f"bench_{name}.cpu_cases() item {i}: expected a CpuCase, got {type(c).__name__}")
        if not isinstance(c.row, dict):
            raise ValueError(f"bench_{name}.cpu_cases() item {i}: row must be a dict, got {type(c.row).__name__}")
        for key in ("op", "provider"):
            if not isinstance(c.row.get(key), str) or not c.row[key]:
                raise ValueError(f"bench_{name}.cpu_cases() item {i}: missing or non-string '{key}' ({c.row!r})")
        if c.skipped is None and not callable(c.prepare):
            raise ValueError(f"bench_{name}.cpu_cases() item {i} ({c.id}): needs a callable prepare or a skipped "
                             "reason")
        for key in ("bytes", "flops"):
            v = getattr(c, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
                raise ValueError(f"bench_{name}.cpu_cases() item {i} ({c.id}): {key} must be a number >= 0 or None, "
                                 f"got {v!r}")
        if c.id in seen:
            raise ValueError(f"bench_{name}.cpu_cases() items {seen[c.id]} and {i} have the same id {c.id!r}: rows "
                             "must differ in op, shape, dtype, mode or provider")
        seen[c.id] = i
    return list(cases)


def _requested_modules() -> List[Tuple[str, Path]]:
    spec = os.environ.get(ENV_MODULES)
    if spec:
        out = []
        for item in spec.split(os.pathsep):
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"{ENV_MODULES}: entry {item!r} is not NAME=PATH")
            out.append((name, Path(path)))
        return out
    from benchmarks.run import discover, load_module

    return [(n, p) for n, p in discover() if callable(getattr(load_module(n, p), "cpu_cases", None))]


# ----------------------------------------------------------------------------------------------------
# the pytest side (this file collected as a test module)
# ----------------------------------------------------------------------------------------------------
def pytest_generate_tests(metafunc):
    if "cpu_case" not in metafunc.fixturenames:
        return
    from benchmarks.run import load_module

    quick = os.environ.get(ENV_QUICK, "0") == "1"
    params, ids = [], []
    for name, path in _requested_modules():
        for case in list_cases(name, load_module(name, path), quick):
            if case.skipped is None:
                params.append((name, case))
                ids.append(case.id)
    if len(set(ids)) != len(ids):  # two modules in one by-hand run may share an id: keep them apart
        ids = [f"{name}:{cid}" for (name, _), cid in zip(params, ids)]
    metafunc.parametrize("cpu_case", params, ids=ids)


def test_cpu_case(benchmark, cpu_case):
    from benchmarks.run import jsonable

    name, case = cpu_case
    benchmark.extra_info.update(bench=name, case_id=case.id, row=jsonable(case.row))
    benchmark(case.prepare())


# ----------------------------------------------------------------------------------------------------
# the runner side
# ----------------------------------------------------------------------------------------------------
def nested_pytest_env(environ) -> Dict[str, str]:
    """``environ`` without what an enclosing pytest run leaves there: PYTEST_ADDOPTS (the options of
    :func:`pytest_command` are the whole story), PYTEST_CURRENT_TEST, and pytest-xdist's PYTEST_XDIST_* --
    pytest-benchmark reads PYTEST_XDIST_WORKER as "xdist is on" and refuses ``--benchmark-only``, so a runner
    called from a test under ``pytest -n`` would otherwise fail."""
    return {k: v for k, v in environ.items()
            if k not in ("PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST") and not k.startswith("PYTEST_XDIST_")}


def pytest_command(json_path: Path, junit_path: Path, quick: bool) -> List[str]:
    t = TIMING["quick" if quick else "full"]
    # no:xdist: a timing run is one process (pytest-benchmark turns itself off under xdist)
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
           "--benchmark-enable", "--benchmark-only", f"--benchmark-json={json_path}", f"--junitxml={junit_path}",
           f"--benchmark-min-rounds={t['min_rounds']}", f"--benchmark-max-time={t['max_time']}",
           f"--benchmark-warmup={t['warmup']}"]
    if t["warmup"] == "on":
        cmd.append(f"--benchmark-warmup-iterations={t['warmup_iterations']}")
    return cmd


def junit_outcomes(path: Path) -> Dict[str, Tuple[str, str]]:
    """{pytest param id: (outcome, message)} from a JUnit XML file; outcome is passed, failed, error or skipped."""
    out: Dict[str, Tuple[str, str]] = {}
    prefix = f"{TEST_NAME}["
    for tc in ET.parse(path).getroot().iter("testcase"):
        name = tc.get("name", "")
        if not (name.startswith(prefix) and name.endswith("]")):
            continue
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = el.get("message") or (el.text or "").strip()
                break
        out[name[len(prefix):-1]] = (outcome, message)
    return out


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[0] if lines else ""


def row_from_benchmark(case: CpuCase, entry: Dict[str, Any]) -> Dict[str, Any]:
    """The runner's row for ``case`` from its pytest-benchmark JSON entry (see the module docstring for the mapping)."""
    from benchmarks.run import jsonable

    if entry.get("extra_info", {}).get("row") != jsonable(case.row):
        raise ValueError(f"pytest-benchmark entry {entry.get('name')!r} carries the row {entry.get('extra_info')!r}, "
                         f"not {jsonable(case.row)!r}: cpu_cases() listed different cases in the two processes")
    stats = entry["stats"]
    row = dict(case.row)
    for src, dst in STAT_FIELDS.items():
        row[dst] = float(stats[src]) * 1e3
    row.update(rounds=int(stats["rounds"]), iterations=int(stats.get("iterations", 1)), timer=TIMER_PYTEST_BENCHMARK)
    t = row["ms"] * 1e-3
    if case.bytes is not None:
        row.update(bytes=case.bytes, gbps=case.bytes / t / 1e9 if t > 0 else None)
    if case.flops is not None:
        row.update(flops=case.flops, tflops=case.flops / t / 1e12 if t > 0 else None)
    return row


def rows_from_results(cases: Sequence[CpuCase], bench_json: Optional[Dict[str, Any]],
                      outcomes: Dict[str, Tuple[str, str]]) -> List[Dict[str, Any]]:
    """One row per case, in order: timed from ``bench_json`` (pytest-benchmark's --benchmark-json), an ``error`` row
    with pytest's message where the case has no entry there, a ``skipped`` row for a skipped case."""
    entries = {e.get("param"): e for e in (bench_json or {}).get("benchmarks", [])}
    rows = []
    for case in cases:
        if case.skipped is not None:
            rows.append({**case.row, "skipped": case.skipped})
            continue
        entry = entries.get(case.id)
        if entry is not None:
            try:
                rows.append(row_from_benchmark(case, entry))
            except (KeyError, TypeError, ValueError) as e:
                rows.append({**case.row, "error": f"{type(e).__name__}: {_first_line(e)}", "timer":
                             TIMER_PYTEST_BENCHMARK})
            continue
        outcome, message = outcomes.get(case.id, ("missing", "pytest did not report this case"))
        rows.append({**case.row, "error": _first_line(message) or f"pytest outcome: {outcome}",
                     "timer": TIMER_PYTEST_BENCHMARK})
    return rows


def time_module(name: str, path, quick: bool = False, json_out: Optional[Path] = None,
                timeout: Optional[float] = None) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Time bench_<name>'s ``cpu_cases(quick)`` with pytest-benchmark in a subprocess; returns (rows, info).

    ``json_out``: also keep pytest-benchmark's JSON there (the runner keeps it next to its results). ``info``:
    ``timer``, pytest-benchmark's version and options, the kept JSON's path and pytest's exit code. Raises
    (ValueError / RuntimeError) when the cases cannot be listed or the pytest run fails as a whole."""
    from benchmarks.run import load_module

    path = Path(path).resolve()
    cases = list_cases(name, load_module(name, path), quick)
    info: Dict[str, Any] = {"timer": TIMER_PYTEST_BENCHMARK, "timing": dict(TIMING["quick" if quick else "full"])}
    if all(c.skipped is not None for c in cases):
        return rows_from_results(cases, None, {}), info
    with tempfile.TemporaryDirectory(prefix=f"bench_{name}_cpu_") as tmp:
        json_path = Path(tmp) / "benchmark.json"
        junit_path = Path(tmp) / "junit.xml"
        env = nested_pytest_env(os.environ)
        env.update({ENV_MODULES: f"{name}={path}", ENV_QUICK: "1" if quick else "0"})
        # a bench module outside benchmarks/ (--bench-dir) still imports `benchmarks.common` from this tree
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        proc = subprocess.run(pytest_command(json_path, junit_path, quick), cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
        tail = (proc.stdout + proc.stderr)[-3000:]
        # 0: all passed, 1: some cases failed (their error rows say why); anything else is no measurement at all
        if proc.returncode not in (0, 1) or not junit_path.exists():
            raise RuntimeError(f"pytest-benchmark run of bench_{name} failed (exit {proc.returncode}):\n{tail}")
        bench_json = json.loads(json_path.read_text()) if json_path.exists() else None
        outcomes = junit_outcomes(junit_path)
        if bench_json is not None and json_out is not None:
            Path(json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(json_out).write_text(json.dumps(bench_json, indent=2) + "\n")
            info["json"] = str(json_out)
    info["returncode"] = proc.returncode
    if bench_json is not None:
        info["pytest_benchmark"] = bench_json.get("version")
        opts = next((e.get("options") for e in bench_json.get("benchmarks", [])), None)
        if opts is not None:
            info["options"] = opts
    return rows_from_results(cases, bench_json, outcomes), info


def module_rows(module_file, quick: bool = False) -> List[Dict[str, Any]]:
    """``time_module`` for a bench module's own ``run(cpu)``: its rows, the same the runner records."""
    return time_module(module_name(module_file), module_file, quick)[0]
