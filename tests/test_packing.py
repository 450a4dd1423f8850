"""Sequence packing: the C++ extension (mllm._C), the pure-Python reference and the row builders.

Checked: the reference against a brute-force transcription of the specification; C++ == Python exactly on
random and adversarial length lists (both algorithms, both overflow modes, with and without a row shuffle);
plan invariants (every token placed exactly once, no row over capacity); row invariants (positions restart
at every boundary, labels never cross one, cu_seqlens valid and consistent with the attention reference);
error paths of both implementations; the one-time fallback warning; the CMake build + ctest.
Budget: ~20 s on 2 cores (the CMake build is most of it)."""
import importlib.util
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mllm.data import packing as P
from mllm_kernels.reference import doc_start_from_cu_seqlens

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("doc", "start", "length", "row", "offset", "row_ptr")
ALGOS = ("bfd", "ffd")
OVERFLOWS = ("split", "truncate")
SEEDS = (None, 0, 2**64 - 1)

needs_ext = pytest.mark.skipif(P._C is None, reason="mllm._C not built (python setup.py build_ext --inplace)")


# ----------------------------------------------------------------------------------------------- helpers
def brute_force(lengths, L, algorithm, overflow, seed):
    """The specification, literally: stable sort, then a scan of every open bin for each item."""
    items, dropped = [], 0
    for d, n in enumerate(lengths):
        if overflow == "split":
            items += [(d, s, min(L, n - s)) for s in range(0, n, L)]
        else:
            items.append((d, 0, min(n, L)))
            dropped += max(n - L, 0)
    items = sorted(items, key=lambda it: -it[2])
    caps, placed = [], []
    for d, s, n in items:
        fits = [b for b, c in enumerate(caps) if c >= n]
        if not fits:
            caps.append(L)
            b = len(caps) - 1
        elif algorithm == "ffd":
            b = fits[0]
        else:
            b = min(fits, key=lambda b: (caps[b], b))
        placed.append((b, L - caps[b], d, s, n))
        caps[b] -= n
    row_of_bin = P._row_of_bin(len(caps), seed)
    segs = sorted((row_of_bin[b], o, d, s, n) for b, o, d, s, n in placed)
    return segs, len(caps), dropped


def segments(res):
    return [tuple(int(x) for x in t) for t in zip(res.row, res.offset, res.doc, res.start, res.length)]


def assert_same(a, b):
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype == np.int64, f
        np.testing.assert_array_equal(x, y, err_msg=f)
    assert (a.n_rows, a.n_tokens, a.n_dropped) == (b.n_rows, b.n_tokens, b.n_dropped)
    assert a.efficiency == b.efficiency


def check_plan(res, lengths, L, overflow):
    """Every token placed exactly once (split) / the first min(n, L) (truncate); rows within capacity."""
    lengths = np.asarray(lengths, dtype=np.int64)
    covered = np.zeros(lengths.size, dtype=np.int64)
    order = np.lexsort((res.start, res.doc))  # per document, chunks in start order must tile [0, n)
    for k in order:
        assert res.start[k] == covered[res.doc[k]]
        assert 1 <= res.length[k] <= L
        covered[res.doc[k]] += res.length[k]
    expect = lengths if overflow == "split" else np.minimum(lengths, L)
    np.testing.assert_array_equal(covered, expect)
    assert res.n_tokens == expect.sum() and res.n_dropped == (lengths - expect).sum()
    assert res.row_ptr[0] == 0 and res.row_ptr[-1] == res.n_segments
    for r in range(res.n_rows):
        lo, hi = res.row_ptr[r], res.row_ptr[r + 1]
        assert hi > lo, "empty row"
        assert np.all(res.row[lo:hi] == r)
        ends = np.cumsum(res.length[lo:hi])
        np.testing.assert_array_equal(res.offset[lo:hi], np.concatenate([[0], ends[:-1]]))
        assert ends[-1] <= L
    if res.n_rows:
        assert res.efficiency == pytest.approx(res.n_tokens / (res.n_rows * L))


def both(lengths, L, algorithm, overflow, seed):
    """C++ (when built) and Python plans; asserts they agree and returns the Python one."""
    ref = P.pack_reference(lengths, L, algorithm, overflow, seed)
    if P._C is not None:
        assert_same(P.pack(lengths, L, algorithm, overflow, seed), ref)
    return ref


ADVERSARIAL = {
    "empty": ([], 8),
    "single": ([5], 8),
    "single_long": ([100], 8),
    "all_equal_lt": ([3] * 50, 8),
    "all_equal_eq": ([8] * 20, 8),
    "all_equal_gt": ([13] * 20, 8),
    "all_multiple": ([24] * 7, 8),
    "all_longer": (list(range(9, 60)), 8),
    "many_ones": ([1] * 500 + [7, 3], 8),
    "row_len_1": ([1, 2, 3, 1], 1),
    "descending": (list(range(16, 0, -1)), 16),
    "ascending": (list(range(1, 17)), 16),
    "complements": ([5, 3] * 10 + [6, 2] * 10, 8),
}


# ----------------------------------------------------------------------------------------------- plans
@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("overflow", OVERFLOWS)
def test_adversarial_lists_agree_with_spec(name, algorithm, overflow):
    lengths, L = ADVERSARIAL[name]
    for seed in SEEDS:
        res = both(lengths, L, algorithm, overflow, seed)
        segs, n_rows, dropped = brute_force(lengths, L, algorithm, overflow, seed)
        assert segments(res) == segs and res.n_rows == n_rows and res.n_dropped == dropped
        check_plan(res, lengths, L, overflow)


def test_random_lists_agree_with_spec():
    rng = np.random.default_rng(0)
    for trial in range(150):
        L = int(rng.integers(1, 48))
        kind = trial % 3  # mixed lengths, all fitting a row, heavy-tailed
        n = int(rng.integers(0, 120))
        if kind == 0:
            lengths = rng.integers(1, 3 * L + 2, size=n)
        elif kind == 1:
            lengths = rng.integers(1, L + 1, size=n)
        else:
            lengths = np.maximum(1, rng.pareto(1.2, size=n) * L / 4).astype(np.int64)
        for algorithm in ALGOS:
            for overflow in OVERFLOWS:
                seed = None if trial % 2 else int(rng.integers(0, 2**63))
                res = both(lengths, L, algorithm, overflow, seed)
                if trial < 40:  # the brute force is O(N·B): on a subset
                    segs, n_rows, _ = brute_force(lengths.tolist(), L, algorithm, overflow, seed)
                    assert segments(res) == segs and res.n_rows == n_rows
                check_plan(res, lengths, L, overflow)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(1, 70), max_size=60),
    L=st.integers(1, 40),
    algorithm=st.sampled_from(ALGOS),
    overflow=st.sampled_from(OVERFLOWS),
    seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)
def test_property_cpp_equals_python(lengths, L, algorithm, overflow, seed):
    res = both(lengths, L, algorithm, overflow, seed)
    check_plan(res, lengths, L, overflow)


@needs_ext
def test_large_realistic_list_agrees_and_packs_tightly():
    rng = np.random.default_rng(1)
    lengths = np.maximum(1, rng.lognormal(5.0, 0.9, size=20000)).astype(np.int64)  # median ~150 tokens
    for algorithm in ALGOS:
        res = both(lengths, 1024, algorithm, "split", 0)
        check_plan(res, lengths, 1024, "split")
        # BFD/FFD of many small items is near-perfect (a quality check of the algorithm, not a speed claim)
        assert res.efficiency > 0.99
    unpacked = P.plan_unpacked(lengths, 1024, "split")
    assert unpacked.efficiency < 0.5 < res.efficiency


def test_bfd_and_ffd_differ_where_expected():
    # L = 7, lengths 5 3 3 1: bins 5 (cap 2) and 3+3 (cap 1); the 1 goes to the tightest bin under BFD and to
    # the first bin with room under FFD.
    bfd = P.pack_reference([5, 3, 3, 1], 7, "bfd", seed=None)
    ffd = P.pack_reference([5, 3, 3, 1], 7, "ffd", seed=None)
    assert segments(bfd) == [(0, 0, 0, 0, 5), (1, 0, 1, 0, 3), (1, 3, 2, 0, 3), (1, 6, 3, 0, 1)]
    assert segments(ffd) == [(0, 0, 0, 0, 5), (0, 5, 3, 0, 1), (1, 0, 1, 0, 3), (1, 3, 2, 0, 3)]


def test_seed_only_permutes_rows():
    rng = np.random.default_rng(2)
    lengths = rng.integers(1, 30, size=300)
    base = P.pack(lengths, 32, seed=None)
    contents = lambda r: sorted(  # noqa: E731
        tuple(map(tuple, np.stack([r.doc, r.start, r.length, r.offset])[:, r.row_ptr[i]:r.row_ptr[i + 1]].T))
        for i in range(r.n_rows))
    a, b = P.pack(lengths, 32, seed=1), P.pack(lengths, 32, seed=2)
    assert contents(a) == contents(b) == contents(base)
    assert not np.array_equal(a.doc, b.doc)
    assert_same(a, P.pack(lengths, 32, seed=1))  # deterministic


def test_splitmix64_reference_value():
    assert next(P._splitmix64(0)) == 0xE220A8397B1DCDAF  # Vigna's splitmix64.c seeded with 0


def test_int32_and_list_inputs_accepted():
    a = P.pack(np.array([3, 9, 2], dtype=np.int32), 4)
    assert_same(a, P.pack(np.array([3, 9, 2], dtype=np.longlong), 4))  # int64 by another dtype object
    assert_same(a, P.pack([3, 9, 2], 4))
    assert_same(a, P.pack(np.array([3, 9, 2], dtype=np.uint16), 4))
    strided = np.array([3, 0, 9, 0, 2], dtype=np.int64)[::2]
    assert_same(a, P.pack(strided, 4))


@needs_ext
def test_cpp_reads_strided_views():
    base = np.arange(1, 41, dtype=np.int64)
    for view in (base[::3], base[::-1], base[5:6]):
        got, want = P._C.pack(view, 16, "bfd", "split", 1), P._C.pack(view.copy(), 16, "bfd", "split", 1)
        for f in FIELDS:
            np.testing.assert_array_equal(got[f], want[f])


@needs_ext
def test_cpp_accepts_int64_under_another_dtype_object():
    """np.longlong is int64 on Linux but not the same dtype object: equivalent types are accepted."""
    want = P._C.pack(np.array([3, 9, 2], dtype=np.int64), 4, "bfd", "split", 0)
    got = P._C.pack(np.array([3, 9, 2], dtype=np.longlong), 4, "bfd", "split", 0)
    for f in FIELDS:
        np.testing.assert_array_equal(got[f], want[f])
    with pytest.raises(ValueError, match="int64"):  # other byte order: same kind and size, not the same type
        P._C.pack(np.array([3, 9, 2], dtype=">i8"), 4, "bfd", "split", 0)


@needs_ext
def test_cpp_concurrent_calls_agree_with_serial():
    # the GIL is released while packing: calls from several threads must not share state
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(10)
    inputs = [rng.integers(1, 3000, size=20000) for _ in range(4)]
    serial = [P.pack(x, 1024, "bfd" if i % 2 else "ffd", "split", i) for i, x in enumerate(inputs)]
    with ThreadPoolExecutor(4) as ex:
        parallel = list(ex.map(lambda ix: P.pack(ix[1], 1024, "bfd" if ix[0] % 2 else "ffd", "split", ix[0]),
                               enumerate(inputs)))
    for a, b in zip(serial, parallel):
        assert_same(a, b)


_WRITER_SCRIPT = """
import sys, threading
import numpy as np
from mllm import _C
lengths = np.ones(1_000_000, dtype=np.int64)
stop = False
def writer():
    while not stop:
        lengths[:] = 1
        lengths[:] = 4097  # 3 pieces per document at row_len 2048 instead of 1
threading.Thread(target=writer, daemon=True).start()
for _ in range(int(sys.argv[1])):
    try:
        _C.pack(lengths, 2048, "bfd", "split", 0)
    except ValueError:  # a length read mid-write may be rejected; only a crash is a failure
        pass
stop = True
print("ok")
"""


@needs_ext
def test_cpp_survives_a_concurrent_writer(tmp_path):
    # The packer reads every length twice (count, then place) with the GIL released; when it read the caller's
    # buffer in place, a Python thread writing into it between the passes overflowed the arrays sized by the
    # first pass (SIGSEGV or abort). The extension now copies the lengths under the GIL. A race: against the old
    # build this script crashed in 3 of 4 runs of 10 calls; 1 <-> 4097 (at most 3 pieces per document) keeps the
    # fixed build's plan small whichever values its copy catches (~0.4 GB, a few seconds).
    repo = Path(__file__).resolve().parents[1]
    script = tmp_path / "writer.py"
    script.write_text(_WRITER_SCRIPT)
    r = subprocess.run([sys.executable, str(script), "10"], cwd=repo, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(repo)})
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])


# ----------------------------------------------------------------------------------------------- errors
BAD_PLANS = [
    (dict(lengths=np.ones((2, 3), dtype=np.int64)), "1-D"),
    (dict(lengths=np.array([1.0, 2.0])), "integer dtype"),
    (dict(lengths=np.array([True, False])), "integer dtype"),
    (dict(lengths=[3, 0, 2]), r"lengths\[1\] = 0"),
    (dict(lengths=[3, -4]), r"lengths\[1\] = -4"),
    (dict(row_len=0), "row_len"),
    (dict(row_len=-3), "row_len"),
    (dict(row_len=2**20 + 1), "row_len"),
    (dict(row_len=8.0), "row_len"),
    (dict(row_len=True), "row_len"),
    (dict(algorithm="nfd"), "algorithm"),
    (dict(overflow="wrap"), "overflow"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**64), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(lengths=[2**62, 2**62, 3]), r"more than 2\*\*62"),  # int64 token sums would overflow
    (dict(lengths=[2**31, 5], row_len=1), "too many pieces"),  # the int32 piece indices
]


@pytest.mark.parametrize("fn", [P.pack, P.pack_reference], ids=["pack", "pack_reference"])
@pytest.mark.parametrize("bad,msg", BAD_PLANS, ids=[m for _, m in BAD_PLANS])
def test_python_errors(fn, bad, msg):
    kw = dict(lengths=[3, 5, 2], row_len=8, algorithm="bfd", overflow="split", seed=0) | bad
    with pytest.raises(ValueError, match=msg):
        fn(**kw)


@needs_ext
@pytest.mark.parametrize("args,msg", [
    ((np.ones((2, 2), dtype=np.int64), 8), "1-D"),
    ((np.array([1, 2], dtype=np.int32), 8), "int64"),
    ((np.array([1.0, 2.0]), 8), "int64"),
    ((np.array([4, 0, 1], dtype=np.int64), 8), r"lengths\[1\] = 0"),
    ((np.array([-2], dtype=np.int64), 8), r"lengths\[0\] = -2"),
    ((np.array([1], dtype=np.int64), 0), "row_len"),
    ((np.array([1], dtype=np.int64), -1), "row_len"),
    ((np.array([1], dtype=np.int64), 2**20 + 1), "row_len"),
    ((np.array([1], dtype=np.int64), 8, "nfd"), "algorithm"),
    ((np.array([1], dtype=np.int64), 8, "bfd", "wrap"), "overflow"),
    ((np.array([1], dtype=np.int64), 8, "bfd", "split", -1), "seed"),
    ((np.array([1], dtype=np.int64), 8, "bfd", "split", 2**64), "seed"),
    ((np.array([1], dtype=np.int64), 8, "bfd", "split", "x"), "seed"),
    ((np.array([1], dtype=np.int64), 8, "bfd", "split", True), "seed"),
    # piece count and dropped-token sums are checked before they can wrap (a wrapped count wrote past the arrays)
    ((np.array([2**63 - 1, 2**63 - 1, 2], dtype=np.int64), 1, "bfd", "split"), "too many pieces"),
    ((np.array([2**63 - 1, 2**63 - 1], dtype=np.int64), 1, "bfd", "truncate"), "overflow int64"),
])
def test_cpp_errors(args, msg):
    with pytest.raises(ValueError, match=msg):
        P._C.pack(*args)


def test_fallback_warns_once(monkeypatch):
    lengths = [7, 3, 12, 1, 1, 5]
    expected = P.pack_reference(lengths, 8, "ffd", "split", 3)
    monkeypatch.setattr(P, "_C", None)
    monkeypatch.setattr(P, "_warned_fallback", False)
    # a broken build (wrong ABI, truncated .so) must show its import error, not read as "not built"
    monkeypatch.setattr(P, "_C_IMPORT_ERROR", "ImportError: invalid ELF header")
    with pytest.warns(RuntimeWarning, match="could not be imported .ImportError: invalid ELF header."):
        first = P.pack(lengths, 8, "ffd", "split", 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = P.pack(lengths, 8, "ffd", "split", 3)
    assert_same(first, expected)
    assert_same(second, expected)


# ----------------------------------------------------------------------------------------------- rows
def random_docs(rng, n, max_len, vocab=1000):
    return [rng.integers(0, vocab, size=int(rng.integers(1, max_len + 1))) for _ in range(n)]


def check_rows(out, docs, L, pad_id, eot_id=None, loss_masks=None, ignore=-100, overflow="split"):
    """Row invariants, from the token level up."""
    ids, labels, pos, di, cu = (out[k] for k in ("input_ids", "labels", "position_ids", "doc_index", "cu_seqlens"))
    R = ids.shape[0]
    assert ids.shape == labels.shape == pos.shape == di.shape == (R, L)
    assert ids.dtype == labels.dtype == pos.dtype == np.int64 and cu.dtype == np.int32
    full = [np.append(d, eot_id) if eot_id is not None else np.asarray(d) for d in docs]
    keep = None
    if loss_masks is not None:
        keep = [np.append(m, True) if eot_id is not None else np.asarray(m) for m in loss_masks]
    # cu_seqlens: 0 .. R·L, strictly increasing, every row start included; the attention reference's
    # document starts agree with the positions (start = t - position)
    assert cu[0] == 0 and cu[-1] == R * L and np.all(np.diff(cu) > 0)
    assert set(range(0, R * L, L)) <= set(cu.tolist())
    doc_start = doc_start_from_cu_seqlens(torch.from_numpy(cu), R, L, "cpu").numpy()
    np.testing.assert_array_equal(doc_start, np.arange(L)[None, :] - pos)
    seen = {d: np.zeros(len(t), dtype=np.int64) for d, t in enumerate(full)}
    n_targets = 0
    for r in range(R):
        for t in range(L):
            d = di[r, t]
            if d < 0:  # padding
                assert ids[r, t] == pad_id and labels[r, t] == ignore
                assert t == 0 or di[r, t - 1] >= 0 or pos[r, t] == pos[r, t - 1] + 1
                continue
            # a segment is a run of one document with consecutive positions starting at 0 at a cu boundary
            seg_start = t - pos[r, t]
            assert np.all(di[r, seg_start:t + 1] == d) and r * L + seg_start in set(cu.tolist())
            p = int(pos[r, t]) + int(out["plan"].start[(out["plan"].row == r) & (out["plan"].doc == d)
                                                         & (out["plan"].offset == seg_start)][0])
            assert ids[r, t] == full[d][p]
            seen[d][p] += 1
            expect = full[d][p + 1] if p + 1 < len(full[d]) else ignore
            if keep is not None and p + 1 < len(full[d]) and not keep[d][p + 1]:
                expect = ignore
            assert labels[r, t] == expect  # never the next document's token: its own next token or ignored
            n_targets += labels[r, t] != ignore
    for d, c in seen.items():
        n = len(full[d]) if overflow == "split" else min(len(full[d]), L)
        np.testing.assert_array_equal(c, np.r_[np.ones(n, np.int64), np.zeros(len(full[d]) - n, np.int64)])
    if overflow == "split":  # every token but a document's first is a target exactly once (unless masked)
        want = sum(len(f) - 1 if keep is None else int(k[1:].sum()) for f, k in zip(full, keep or full))
        assert n_targets == want
    assert out["efficiency"] == pytest.approx(out["plan"].efficiency)


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "unpacked"])
@pytest.mark.parametrize("overflow", OVERFLOWS)
@pytest.mark.parametrize("eot_id", [None, 999])
def test_rows_invariants(packing, overflow, eot_id):
    rng = np.random.default_rng(3)
    L = 16
    docs = random_docs(rng, 40, 40)
    out = P.build_rows(docs, L, pad_id=-1, packing=packing, overflow=overflow, eot_id=eot_id, seed=4,
                       algorithm="bfd")
    check_rows(out, docs, L, pad_id=-1, eot_id=eot_id, overflow=overflow)
    if not packing:  # one piece per row
        assert all(len(set(row[row >= 0].tolist())) == 1 for row in out["doc_index"])


def test_rows_with_loss_masks():
    rng = np.random.default_rng(5)
    docs = random_docs(rng, 30, 25)
    masks = [np.arange(len(d)) >= len(d) // 2 for d in docs]  # first half = "prompt"
    for packing in (True, False):
        out = P.build_rows(docs, 12, pad_id=0, packing=packing, loss_masks=masks, eot_id=7, algorithm="ffd")
        check_rows(out, docs, 12, pad_id=0, eot_id=7, loss_masks=masks)


def test_rows_small_example_by_hand():
    docs = [np.array([1, 2, 3]), np.array([4, 5]), np.array([6, 7, 8, 9, 10, 11, 12])]
    out = P.build_packed_rows(docs, 6, pad_id=0, eot_id=99, seed=None)
    # lengths with eot 4 3 8 -> items 6 (doc 2), 4 (doc 0), 3 (doc 1), 2 (doc 2's tail); BFD rows:
    # [doc2 0:6], [doc0 + doc2 tail], [doc1 + padding]
    np.testing.assert_array_equal(out["input_ids"], [[6, 7, 8, 9, 10, 11], [1, 2, 3, 99, 12, 99],
                                                     [4, 5, 99, 0, 0, 0]])
    np.testing.assert_array_equal(out["labels"], [[7, 8, 9, 10, 11, 12], [2, 3, 99, -100, 99, -100],
                                                  [5, 99, -100, -100, -100, -100]])
    np.testing.assert_array_equal(out["position_ids"], [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 0, 1],
                                                        [0, 1, 2, 0, 1, 2]])
    np.testing.assert_array_equal(out["cu_seqlens"], [0, 6, 10, 12, 15, 18])
    assert out["efficiency"] == pytest.approx(15 / 18)


def test_packed_and_unpacked_train_on_the_same_targets():
    rng = np.random.default_rng(6)
    docs = random_docs(rng, 25, 30)

    def pairs(out):  # (document, position) -> target, over all rows
        plan, res = out["plan"], {}
        for k in range(plan.n_segments):
            r, o, d, s, n = plan.row[k], plan.offset[k], plan.doc[k], plan.start[k], plan.length[k]
            for j in range(n):
                res[(int(d), int(s + j))] = int(out["labels"][r, o + j])
        return res

    packed = P.build_rows(docs, 10, pad_id=0, packing=True, eot_id=50)
    unpacked = P.build_rows(docs, 10, pad_id=0, packing=False, overflow="split", eot_id=50)
    assert pairs(packed) == pairs(unpacked)
    assert packed["input_ids"].shape[0] < unpacked["input_ids"].shape[0]


def test_materialize_subset_and_cu_seqlens_from_positions():
    rng = np.random.default_rng(7)
    docs = random_docs(rng, 50, 20)
    full = P.build_packed_rows(docs, 16, pad_id=0)
    rows = [3, 0, 5]
    part = P.materialize_rows(full["plan"], docs, rows, pad_id=0)
    for k in ("input_ids", "labels", "position_ids", "doc_index"):
        np.testing.assert_array_equal(part[k], full[k][rows])
    np.testing.assert_array_equal(part["cu_seqlens"], P.cu_seqlens_from_position_ids(full["position_ids"][rows]))
    np.testing.assert_array_equal(full["cu_seqlens"], P.cu_seqlens_from_position_ids(full["position_ids"]))


def test_iter_batches_cover_all_rows_in_order():
    rng = np.random.default_rng(9)
    docs = random_docs(rng, 60, 20)
    full = P.build_packed_rows(docs, 16, pad_id=0, eot_id=3, seed=5)
    batches = list(P.iter_batches(full["plan"], docs, 4, pad_id=0, eot_id=3))
    assert [b["input_ids"].shape[0] for b in batches][:-1] == [4] * (len(batches) - 1)
    for k in ("input_ids", "labels", "position_ids"):
        np.testing.assert_array_equal(np.concatenate([b[k] for b in batches]), full[k])
    dropped = list(P.iter_batches(full["plan"], docs, 4, pad_id=0, eot_id=3, drop_last=True, start_row=2))
    assert all(b["input_ids"].shape[0] == 4 for b in dropped) and len(dropped) == (full["plan"].n_rows - 2) // 4
    np.testing.assert_array_equal(dropped[0]["input_ids"], full["input_ids"][2:6])
    with pytest.raises(ValueError, match="batch_rows"):
        next(P.iter_batches(full["plan"], docs, 0, pad_id=0))


@pytest.mark.parametrize("call,msg", [
    (lambda: P.build_packed_rows([np.array([1, 2]), np.array([[1, 2]])], 8, 0), r"docs\[1\]"),
    (lambda: P.build_packed_rows([np.array([1.0, 2.0])], 8, 0), r"docs\[0\]"),
    (lambda: P.build_packed_rows([np.array([1, 2]), np.array([], dtype=np.int64)], 8, 0), r"docs\[1\] is empty"),
    (lambda: P.build_packed_rows([np.array([1, 2])], 0, 0), "row_len"),
    (lambda: P.build_packed_rows([np.array([1, 2])], 8, None), "pad_id"),
    (lambda: P.build_packed_rows([np.array([1, 2])], 8, 0, loss_masks=[np.array([1, 0])]), r"loss_masks\[0\]"),
    (lambda: P.build_packed_rows([np.array([1, 2])], 8, 0, loss_masks=[np.array([True])]), r"loss_masks\[0\]"),
    (lambda: P.build_packed_rows([np.array([1, 2])], 8, 0, loss_masks=[]), "loss_masks"),
    (lambda: P.build_unpacked_rows([np.array([1, 2])], 8, 0, overflow="x"), "overflow"),
    (lambda: P.materialize_rows(P.pack([2], 8), [np.array([1, 2, 3])], pad_id=0), r"docs\[0\] has 3"),
    (lambda: P.materialize_rows(P.pack([2], 8), [], pad_id=0), "plan is for 1"),
    (lambda: P.materialize_rows(P.pack([2], 8), [np.array([1, 2])], [1], pad_id=0), "rows must be"),
    # the plan-once path (materialize_rows / iter_batches) checks what it reads: no cast, no broadcast
    (lambda: P.materialize_rows(P.pack([3], 8), [np.array([1.7, 2.9, 3.5])], pad_id=0), r"docs\[0\] must be"),
    (lambda: next(P.iter_batches(P.pack([4], 8), [np.array([1, 2, 3, 4])], 1, pad_id=0,
                                 loss_masks=[np.array([True, False])])), r"loss_masks\[0\] must be"),
    (lambda: P.materialize_rows(P.pack([4], 8), [np.array([1, 2, 3, 4])], pad_id=0,
                                loss_masks=[np.array([1, 0, 2, 0])]), r"loss_masks\[0\] must be a bool"),
    (lambda: P.materialize_rows(P.pack([4], 8), [np.array([1, 2, 3, 4])], pad_id=0, loss_masks=[]),
     "loss_masks has 0 entries"),
    # a -100 id silently turned the label predicting it into ignore_index; a uint64 id wrapped to -1
    (lambda: P.build_packed_rows([np.array([1, -100, 3])], 8, 0), r"docs\[0\] holds a negative token id \(-100\)"),
    (lambda: P.build_unpacked_rows([np.array([5]), np.array([-5, 7])], 8, 0), r"docs\[1\] holds a negative"),
    (lambda: P.build_rows([np.array([2**64 - 1], dtype=np.uint64)], 8, 0), r"docs\[0\] holds token id 1844.*int64"),
    (lambda: P.materialize_rows(P.pack([2], 8), [np.array([4, -1])], pad_id=0), r"docs\[0\] holds a negative"),
    # eot_id is appended as an always-learned target: -100 (= ignore_index) was never learned and left -100 in
    # input_ids, a float was truncated, 2**63 wrapped negative, True passed as 1
    (lambda: P.build_packed_rows([np.array([1, 2])], 8, 0, eot_id=-100), r"eot_id must be in \[0, "),
    (lambda: P.build_unpacked_rows([np.array([1, 2])], 8, 0, eot_id=50256.9), "eot_id must be an int"),
    (lambda: P.build_rows([np.array([1, 2])], 8, 0, eot_id=2**63), r"eot_id must be in \[0, "),
    (lambda: P.build_rows([np.array([1, 2])], 8, 0, eot_id=True), "eot_id must be an int"),
    (lambda: P.materialize_rows(P.pack([3], 8), [np.array([1, 2])], pad_id=0, eot_id=-1), "eot_id must be in"),
    (lambda: P.cu_seqlens_from_position_ids(np.array([0, 1])), "2-D"),
    (lambda: P.cu_seqlens_from_position_ids(np.array([[1, 0]])), "row start"),
])
def test_row_builder_errors(call, msg):
    with pytest.raises(ValueError, match=msg):
        call()


@pytest.mark.parametrize("empty", [[], np.array([]), np.array([], dtype=np.uint16), torch.empty(0)],
                         ids=["list", "float64-array", "uint16-array", "float-tensor"])
def test_empty_lengths_of_any_dtype_plan_nothing(empty):
    # np.array([]) is float64 like [] is: it was rejected while [] and an empty float tensor passed
    plan = P.pack(empty, 8)
    assert plan.n_rows == 0 and plan.n_segments == 0 and plan.doc_lengths.dtype == np.int64


def test_empty_corpus_gives_no_rows():
    out = P.build_packed_rows([], 8, pad_id=0)
    assert out["input_ids"].shape == (0, 8) and out["cu_seqlens"].tolist() == [0] and out["efficiency"] == 0.0


# ----------------------------------------------------------------------------------------------- builds
def _tool(name):
    venv = Path(sys.executable).parent / name
    return str(venv) if venv.exists() else shutil.which(name)


@pytest.mark.slow
def test_cmake_build_and_ctest(tmp_path):
    cmake, ninja = _tool("cmake"), _tool("ninja")
    if cmake is None or ninja is None:
        pytest.skip("cmake or ninja not available")
    try:
        import pybind11  # noqa: F401
    except ImportError:
        pytest.skip("pybind11 not installed")
    build = tmp_path / "build"
    run = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=240)  # noqa: E731
    run(cmake, "-S", str(ROOT), "-B", str(build), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}",
        f"-DPython_EXECUTABLE={sys.executable}")
    run(cmake, "--build", str(build), "-j", "2")
    ctest = str(Path(cmake).with_name("ctest"))
    result = run(ctest if Path(ctest).exists() else "ctest", "--test-dir", str(build), "--output-on-failure")
    assert "100% tests passed" in result.stdout
    # the CMake-built module is the same extension: load it under its own name and compare
    so = next(build.glob("_C*.so"))
    spec = importlib.util.spec_from_file_location("_C", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    lengths = np.random.default_rng(8).integers(1, 100, size=500)
    out = mod.pack(lengths.astype(np.int64), 64, "bfd", "split", 9)
    ref = P.pack_reference(lengths, 64, "bfd", "split", 9)
    for f in FIELDS:
        np.testing.assert_array_equal(out[f], getattr(ref, f))


@pytest.mark.slow
def test_setup_py_builds_from_another_directory(tmp_path):
    # setuptools resolves csrc/ and --inplace against the working directory: `python /path/setup.py build_ext
    # --inplace` from elsewhere used to find no csrc/packing.cpp, build nothing and exit 0 (the package then ran
    # the ~50x slower Python fallback). setup.py now changes to its own directory.
    try:
        import pybind11  # noqa: F401
    except ImportError:
        pytest.skip("pybind11 not installed")
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info")
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("csrc", "mllm", "mllm_kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = subprocess.run([sys.executable, str(src / "setup.py"), "-q", "build_ext", "--inplace"], cwd=elsewhere,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert list((src / "mllm").glob("_C*.so")), f"no extension built under {src / 'mllm'}: {r.stderr[-2000:]}"
