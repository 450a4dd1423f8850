"""benchmarks/bench_attention.py's tile sweep (``--tune``), on CPU. The interpreter ignores ``GPU_CONFIGS``, so the
timings come from a stand-in ``measure`` that runs the real provider once (the plumbing: inputs, forward, backward)
and returns a time that depends on the tile in ``GPU_CONFIGS`` at that moment. That checks the bookkeeping the GPU run
relies on: the shipped tile timed first and last, one kernel varied at a time, failures kept as rows, the shipped
configs restored, winners named only when they beat the shipped tile's drift."""
import json

import pytest
import torch

from benchmarks import bench_attention as BA

A = __import__("importlib").import_module("mllm_kernels.attention")  # the package root exports a function of the same name

FWD, DKDV, DQ = (tuple(A.GPU_CONFIGS[(k, 64, 2)][f] for f in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))
                 for k in ("fwd", "dkdv", "dq"))


def _fake_measure(times, seen):
    def measure(fn, inputs, mode):
        key = ("fwd" if mode == "fwd" else seen["kernel"], 64, 2)
        cfg = A.GPU_CONFIGS[key]
        tile = (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"])
        seen["tiles"].append((key[0], tile, {k: A.GPU_CONFIGS[(k, 64, 2)] for k in ("fwd", "dkdv", "dq")}))
        if not seen["ran"]:  # the provider really runs, forward and backward, once
            leaves = [x.detach().requires_grad_() if x is not None else None for x in inputs]
            fn(*leaves).float().sum().backward()
            seen["ran"] = True
        t = times.get((key[0], tile), 1.0)
        if isinstance(t, Exception):
            raise t
        return t
    return measure


def test_tune_times_each_kernel_alone_and_restores_the_shipped_tiles():
    shipped_before = {k: dict(v) for k, v in A.GPU_CONFIGS.items()}
    fast, slow = (64, 64, 4, 3), (32, 32, 4, 2)
    cands = {"fwd": [fast, slow, (128, 128, 8, 4)], "dq": [slow]}
    times = {("fwd", fast): 0.5, ("fwd", slow): 1.5, ("fwd", (128, 128, 8, 4)): RuntimeError("out of resources"),
             ("dq", slow): 0.999}
    seen = {"tiles": [], "ran": False, "kernel": None}
    rows = []
    for kernel in ("fwd", "dq"):
        seen["kernel"] = kernel
        rows += BA.tune(1, 1, 64, 64, "mllm", (kernel,), cands, device="cpu", measure=_fake_measure(times, seen))
    assert seen["ran"] and A.GPU_CONFIGS == shipped_before
    fwd = [r for r in rows if r["kernel"] == "fwd"]
    assert [tuple(r["tile"]) for r in fwd] == [FWD, fast, slow, (128, 128, 8, 4), FWD]
    assert [r["shipped"] for r in fwd] == [True, False, False, False, True] and fwd[-1]["repeat"]
    assert fwd[3]["ms"] is None and "out of resources" in fwd[3]["error"]
    for kernel, tile, configs in seen["tiles"]:  # only the kernel under test moved off its shipped tile
        for other in {"fwd", "dkdv", "dq"} - {kernel}:
            assert configs[other] == shipped_before[(other, 64, 2)]
    md = BA.tune_markdown(rows, {"card": "cpu", "torch": torch.__version__})
    assert "- fwd: fastest (64, 64, 4, 3) 0.5000 ms vs shipped 1.0000 ms (2.000x" in md
    assert "`(\"fwd\", 64, 2): dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)`" in md
    assert "- dq: fastest (32, 32, 4, 2) 0.9990 ms" in md and md.rstrip().endswith("keep the shipped tile")


def test_candidates_from_an_aot_sweep_keep_the_tiles_that_compile_without_spilling(tmp_path):
    def row(kernel, m, n, w, st, spill=0, error=None):
        return dict(kernel=kernel, BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st, registers=128,
                    spill_stores=spill, shared=1024, ctas_per_sm=2, error=error)

    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"meta": {}, "rows": [
        row("fwd", 128, 64, 4, 3), row("fwd", 128, 64, 4, 3), row("fwd", 128, 128, 4, 3, spill=512),
        row("dq", 64, 64, 4, 2), row("dq", 128, 128, 8, 4, error="out of shared memory"),
    ]}))
    assert BA.candidates_from_aot(path) == {"fwd": [(128, 64, 4, 3)], "dq": [(64, 64, 4, 2)]}
    assert BA.candidates_from_aot(path, max_spill=1024)["fwd"] == [(128, 64, 4, 3), (128, 128, 4, 3)]
    assert BA.candidates_from_aot(path, min_tile=8192) == {"fwd": [(128, 64, 4, 3)]}


def test_tune_rejects_an_unknown_provider():
    with pytest.raises(KeyError):
        BA.tune(1, 1, 64, 64, "nope", ("fwd",), {}, device="cpu", measure=lambda *a: 1.0)


def test_winning_tiles_become_a_tile_table(tmp_path):
    """``--write-tiles``: only tiles that win (faster than the shipped tile by more than its drift and 1%) go into
    the table, in the format ``MLLM_ATTN_TILES`` loads (``attention.read_tiles``)."""
    def row(kernel, tile, ms, shipped=False, repeat=False):
        return dict(kernel=kernel, D=64, shape="8x1024x16x64", provider="mllm", tile=list(tile), shipped=shipped,
                    repeat=repeat, ms=ms, error=None)

    rows = [row("fwd", FWD, 1.0, shipped=True), row("fwd", (64, 64, 4, 3), 0.8), row("fwd", FWD, 1.02, True, True),
            row("dq", DQ, 1.0, shipped=True), row("dq", (64, 64, 4, 3), 0.995), row("dq", DQ, 1.0, True, True),
            row("dkdv", DKDV, 1.0, shipped=True), row("dkdv", (64, 64, 4, 3), 0.99), row("dkdv", DKDV, 1.05, True, True)]
    verdicts = {v["kernel"]: v["wins"] for v in BA.tune_verdicts(rows)}
    assert verdicts == {"fwd": True, "dq": False, "dkdv": False}  # dq: < 1% faster; dkdv: inside the 5% drift
    table = BA.tiles_table(rows, {"card": "H100"}, "python benchmarks/bench_attention.py --tune")
    assert [(t["kernel"], t["head_dim"], t["dtype"]) for t in table["tiles"]] == [("fwd", 64, "bf16")]
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps(table))
    assert A.read_tiles(path) == [(("fwd", 64, 2), dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3))]
