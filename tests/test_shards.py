"""Token shards: layout (documents + eot, offsets), dtype choice, memmap read-back, the cache key, atomic writes
(including a lost race), corruption detection, and a GPT-2 round trip on real TinyStories text."""
import os

import numpy as np
import pytest

from mllm.data import shards as S
from mllm.data.shards import ShardKey, build_shard, load_shard, shard_dtype
from mllm.data.tokenizer import ByteTokenizer, get_tokenizer

TEXTS = ["hello", "", "wörld<|endoftext|>!", "abc"]


class OffsetTokenizer(ByteTokenizer):
    """Byte ids shifted by 70,000 in a 70,257-id vocabulary: exercises the uint32 path."""
    name = "byte+70000"
    vocab_size = 70257
    eot_id = 70256

    def encode_batch(self, texts, allow_special=True, num_threads=None):
        return [[70000 + i for i in t.encode("utf-8")] for t in texts]


def test_shard_dtype():
    assert shard_dtype(257) == np.uint16 and shard_dtype(50257) == np.uint16 and shard_dtype(65536) == np.uint16
    assert shard_dtype(65537) == np.uint32 and shard_dtype(100_000) == np.uint32
    for bad in (0, -5, 2.5):
        with pytest.raises(ValueError, match="vocab_size"):
            shard_dtype(bad)


def test_layout_and_memmap(tmp_path):
    tok = ByteTokenizer()
    shard = build_shard(TEXTS, tok, tmp_path, ShardKey("toy", "train", {"n": 4}), progress=False)
    docs = [tok.encode_ordinary(t) + [256] for t in TEXTS]  # special text stays ordinary bytes
    assert isinstance(shard.tokens, np.memmap) and shard.tokens.dtype == np.uint16
    assert shard.tokens.tolist() == [i for d in docs for i in d]
    assert shard.doc_offsets.dtype == np.int64 and shard.doc_offsets.tolist() == [0, 6, 7, 28, 32]
    assert shard.doc_lengths.tolist() == [len(d) for d in docs] and shard.n_docs == 4 and len(shard) == 32
    assert shard.doc(1).tolist() == [256] and shard.doc(-1).tolist() == docs[-1]
    assert (shard.tokens == 256).sum() == 4  # exactly one eot per document
    assert tok.decode(shard.doc(2)[:-1]) == TEXTS[2]
    with pytest.raises(IndexError, match="out of range"):
        shard.doc(4)
    assert shard.meta["tokenizer"] == "byte" and shard.meta["params"] == {"n": 4} and not shard.cache_hit
    assert shard.path.name.startswith("toy-train-byte-")
    assert sorted(os.listdir(tmp_path)) == [shard.path.name]  # no temporary folder left behind


def test_cache_key(tmp_path):
    tok = ByteTokenizer()
    a = build_shard(TEXTS, tok, tmp_path, ShardKey("toy", "train"), progress=False)
    b = build_shard(TEXTS, tok, tmp_path, ShardKey("toy", "train"), progress=False)
    assert b.cache_hit and b.path == a.path and np.array_equal(a.tokens, b.tokens)
    others = [
        build_shard(TEXTS, tok, tmp_path, ShardKey("toy", "validation"), progress=False),
        build_shard(TEXTS, tok, tmp_path, ShardKey("toy", "train", {"max_rows": 4}), progress=False),
        build_shard(TEXTS[:3] + ["abd"], tok, tmp_path, ShardKey("toy", "train"), progress=False),  # content
        build_shard(["ab", "c"], tok, tmp_path, ShardKey("toy", "train"), progress=False),
        build_shard(["a", "bc"], tok, tmp_path, ShardKey("toy", "train"), progress=False),
        build_shard(TEXTS, OffsetTokenizer(), tmp_path, ShardKey("toy", "train"), progress=False),
    ]
    assert len({a.path} | {o.path for o in others}) == 7 and not any(o.cache_hit for o in others)
    assert build_shard(TEXTS, tok, tmp_path, "toy", progress=False).path.name.startswith("toy-all-byte-")
    want = a.tokens.tolist()
    with open(a.path / "tokens.bin", "r+b") as f:  # an in-range change that loading cannot tell: rebuild must
        f.write(bytes([ord("j"), 0]))              # rewrite the file, not reopen it
    c = build_shard(TEXTS, tok, tmp_path, ShardKey("toy", "train"), progress=False, rebuild=True)
    assert not c.cache_hit and c.path == a.path and c.tokens.tolist() == want

    class OtherVocab(ByteTokenizer):  # same name and sizes, different ids: a GPT-2-shaped vocabulary would be
        fingerprint = "other"         # this, since any consistent encoder.json + vocab.bpe loads as "gpt2"

    d = build_shard(TEXTS, OtherVocab(), tmp_path, ShardKey("toy", "train"), progress=False)
    assert not d.cache_hit and d.path != a.path
    with pytest.raises(ValueError, match="JSON-serialisable"):
        build_shard(TEXTS, tok, tmp_path, ShardKey("toy", "train", {"f": object()}), progress=False)


def test_uint32_shard(tmp_path):
    shard = build_shard(["ab", "c"], OffsetTokenizer(), tmp_path, "big", progress=False)
    assert shard.tokens.dtype == np.uint32
    assert shard.tokens.tolist() == [70097, 70098, 70256, 70099, 70256]
    assert load_shard(shard.path).tokens.tolist() == shard.tokens.tolist()


def test_lost_race_uses_the_winner(tmp_path, monkeypatch):
    """Another process renames its identical shard into place between our build and our rename."""
    tok = ByteTokenizer()
    real_rename = os.rename

    def rename_after_other_process(src, dst):
        monkeypatch.setattr(S.os, "rename", real_rename)
        build_shard(TEXTS, tok, tmp_path, "toy", progress=False)  # the winner
        real_rename(src, dst)  # fails: dst exists and is not empty

    monkeypatch.setattr(S.os, "rename", rename_after_other_process)
    shard = build_shard(TEXTS, tok, tmp_path, "toy", progress=False)
    assert shard.tokens.tolist() == [i for t in TEXTS for i in tok.encode_ordinary(t) + [256]]
    assert len(os.listdir(tmp_path)) == 1  # our temporary folder was removed


def test_bad_inputs_and_corruption(tmp_path):
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="no texts"):
        build_shard([], tok, tmp_path, "toy")
    with pytest.raises(ValueError, match="not one string"):
        build_shard("hello", tok, tmp_path, "toy")
    with pytest.raises(ValueError, match=r"texts\[1\] is int"):
        build_shard(["a", 3], tok, tmp_path, "toy")

    class Broken(ByteTokenizer):
        name = "broken"

        def encode_batch(self, texts, allow_special=True, num_threads=None):
            return [[300] for _ in texts]

    with pytest.raises(ValueError, match=r"produced id 300 outside \[0, 257\)"):
        build_shard(["a"], Broken(), tmp_path, "toy", progress=False)
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())  # failed build cleaned up

    shard = build_shard(TEXTS, tok, tmp_path, "toy", progress=False)
    with open(shard.path / "tokens.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="disagree with meta.json.*delete it to rebuild"):
        load_shard(shard.path)
    with pytest.raises(ValueError, match="not a token shard"):
        load_shard(tmp_path)



def _flip_high_byte(p):
    with open(p / "tokens.bin", "r+b") as f:
        f.write(b"h\x01")


def _corrupt(tmp_path, name, edit):
    shard = build_shard(TEXTS, ByteTokenizer(), tmp_path / name, "toy", progress=False)
    edit(shard.path)
    return shard.path


@pytest.mark.parametrize("name,edit,msg", [
    # a flipped high byte: id 0x0168 = 360 >= 257 would index past the embedding on a GPU
    ("flip", _flip_high_byte, r"id 360 outside"),
    ("swap", lambda p: np.save(p / "doc_offsets.npy", np.load(p / "doc_offsets.npy")[[0, 2, 1, 3, 4]]),
     "offsets do not increase"),
    ("eot", lambda p: np.save(p / "doc_offsets.npy", np.load(p / "doc_offsets.npy") - [0, 1, 1, 1, 0]),
     "does not end with eot_id=256"),
    ("dtype", lambda p: (p / "meta.json").write_text((p / "meta.json").read_text().replace("uint16", "float16")),
     "dtype float16 does not hold"),
    ("missing", lambda p: (p / "doc_offsets.npy").unlink(), r"doc_offsets\.npy: unreadable"),
    ("empty", lambda p: (p / "doc_offsets.npy").write_bytes(b""), r"doc_offsets\.npy: unreadable"),
])
def test_load_detects_corruption(tmp_path, name, edit, msg):
    path = _corrupt(tmp_path, name, edit)
    with pytest.raises(ValueError, match=msg) as e:
        load_shard(path)
    assert "to rebuild" in str(e.value)
    # build_shard meets the damaged cache: it warns and rebuilds it (it used to stop the stage with a traceback)
    with pytest.warns(UserWarning, match="token cache is damaged, rebuilding it: .*" + msg):
        again = build_shard(TEXTS, ByteTokenizer(), tmp_path / name, "toy", progress=False)
    assert again.path == path and not again.cache_hit
    fresh = build_shard(TEXTS, ByteTokenizer(), tmp_path / "fresh", "toy", progress=False)
    assert [again.doc(i).tolist() for i in range(again.n_docs)] == [fresh.doc(i).tolist() for i in range(fresh.n_docs)]
    assert build_shard(TEXTS, ByteTokenizer(), tmp_path / name, "toy", progress=False).cache_hit


def test_gpt2_roundtrip_on_real_text(data_dir, tmp_path):
    from mllm.data.datasets import load_tinystories

    tok = get_tokenizer("gpt2", data_dir / "gpt2-tokenizer")
    texts = [r["text"] for r in load_tinystories(data_dir, split="validation", max_rows=40)]
    shard = build_shard(texts, tok, tmp_path, ShardKey("tinystories", "validation", {"max_rows": 40}),
                        batch_size=16, progress=False)
    assert shard.tokens.dtype == np.uint16 and shard.n_docs == 40
    for i, t in enumerate(texts):
        doc = shard.doc(i)
        assert doc[-1] == 50256 and 50256 not in doc[:-1].tolist()
        assert doc[:-1].tolist() == tok.encode_ordinary(t) and tok.decode(doc[:-1]) == t
    again = load_shard(shard.path)
    assert np.array_equal(again.tokens, shard.tokens) and np.array_equal(again.doc_offsets, shard.doc_offsets)


def test_gpt2_fingerprint_tells_vocabularies_apart(data_dir, tmp_path):
    """Two self-consistent GPT-2 file pairs (the last two merges and their ids swapped) both load as "gpt2" but
    encode some text differently: their fingerprints, hence their shard folders, differ."""
    import json

    src = data_dir / "gpt2-tokenizer"
    enc = json.loads((src / "encoder.json").read_text(encoding="utf-8"))
    lines = (src / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    a, b = lines[-3], lines[-2]  # the last two merges (the file ends with a newline)
    ta, tb = a.replace(" ", ""), b.replace(" ", "")
    lines[-3], lines[-2] = b, a
    enc[ta], enc[tb] = enc[tb], enc[ta]
    (tmp_path / "mod").mkdir()
    (tmp_path / "mod" / "vocab.bpe").write_text("\n".join(lines), encoding="utf-8")
    (tmp_path / "mod" / "encoder.json").write_text(json.dumps(enc), encoding="utf-8")
    official, modified = get_tokenizer("gpt2", src), get_tokenizer("gpt2", tmp_path / "mod")
    assert official.fingerprint == get_tokenizer("gpt2", src).fingerprint != modified.fingerprint
    assert S.shard_dirname(ShardKey("x"), official, "d") != S.shard_dirname(ShardKey("x"), modified, "d")
    with pytest.raises(ValueError, match=r"id 50257 is outside \[0, 50257\)"):
        official.decode([50257])
    with pytest.raises(ValueError, match=r"id -1 is outside"):
        official.decode([-1])
