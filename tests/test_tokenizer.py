"""Tokenizers: GPT-2 ids equal the standard encoding (checked against known ids and an independent pure-Python
BPE written from OpenAI's encoder.py), the lookup order and its errors, and the file-free byte tokenizer."""
import json
import shutil

import pytest
import regex
import tiktoken
import tiktoken.load
from hypothesis import given, settings
from hypothesis import strategies as st

from mllm.config.pipeline_config import DataConfig
from mllm.data import tokenizer as tk
from mllm.data.tokenizer import ByteTokenizer, TokenizerError, get_tokenizer

SENTENCES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces   ",
    "It's 3.14159 o'clock -- isn't it? I'll say we've 1,000,000 reasons.",
    "Ünïcödé: naïve café, 東京, Привет мир, emoji 🤖🚀!",
    "tabs\tand\nnewlines\n\n\nand\r\nCRLF",
    "def f(x):\n    return x ** 2  # comment",
    " = Homarus gammarus = \n Homarus gammarus , known as the European lobster @-@ like <unk> .",
]


@pytest.fixture
def gpt2_dir(data_dir):
    d = data_dir / "gpt2-tokenizer"
    if not (d / "encoder.json").is_file():
        pytest.skip(f"{d} has no encoder.json")
    return d


@pytest.fixture
def gpt2(gpt2_dir):
    return get_tokenizer("gpt2", gpt2_dir)


class ReferenceGPT2BPE:
    """OpenAI's gpt-2 ``encoder.py`` algorithm (byte->unicode table, greedy lowest-rank merges over each regex
    pre-token, ids looked up in encoder.json): independent of tiktoken."""

    PAT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def __init__(self, folder):
        self.encoder = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
        merges = (folder / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:-1]
        self.ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        self.byte_encoder = dict(zip(bs, map(chr, cs)))

    def bpe(self, token):
        word = list(token)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        return word

    def encode(self, text):
        ids = []
        for piece in self.PAT.findall(text):
            token = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids += [self.encoder[t] for t in self.bpe(token)]
        return ids


# ----------------------------------------------------------------------------------------------------
# GPT-2 from local files (real data folder)
# ----------------------------------------------------------------------------------------------------
def test_gpt2_known_ids(gpt2):
    assert gpt2.name == "gpt2" and gpt2.vocab_size == 50257 and gpt2.eot_id == 50256
    assert gpt2.encode("Hello") == [15496]
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" the") == [262]
    assert gpt2.encode("<|endoftext|>") == [50256]
    assert gpt2.encode("The quick brown fox jumps over the lazy dog") == [464, 2068, 7586, 21831, 18045, 625, 262,
                                                                         16931, 3290]
    # with specials off the marker is ordinary text: '<', '|', 'end', 'of', 'text', '|', '>'
    assert gpt2.encode("<|endoftext|>", allow_special=False) == [27, 91, 437, 1659, 5239, 91, 29]
    assert gpt2.encode_ordinary("a<|endoftext|>b") == gpt2.encode("a<|endoftext|>b", allow_special=False)
    assert gpt2.encode("a<|endoftext|>b") == [64, 50256, 65]


def test_gpt2_matches_reference_bpe_and_roundtrips(gpt2, gpt2_dir):
    ref = ReferenceGPT2BPE(gpt2_dir)
    for s in SENTENCES:
        ids = gpt2.encode(s)
        assert ids == ref.encode(s), s
        assert gpt2.decode(ids) == s
    assert gpt2.encode_batch(SENTENCES) == [gpt2.encode(s) for s in SENTENCES]
    assert gpt2.encode_batch(SENTENCES, allow_special=False, num_threads=2) == [ref.encode(s) for s in SENTENCES]


def test_ranks_equal_tiktokens_own_loader(gpt2_dir, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # "" disables tiktoken's download cache: nothing is written
    theirs = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(gpt2_dir / "vocab.bpe"), str(gpt2_dir / "encoder.json"))
    ours = tk.gpt2_ranks_from_files(gpt2_dir / "encoder.json", gpt2_dir / "vocab.bpe")
    assert ours == theirs and len(ours) == 50256
    assert tk.gpt2_files_are_official(gpt2_dir)


def test_lookup_from_mllm_data_dir(data_dir, gpt2_dir, monkeypatch):
    monkeypatch.setenv("MLLM_DATA_DIR", str(data_dir))
    tok = get_tokenizer("gpt2")
    assert tok.source == str(gpt2_dir.resolve()) and tok.encode("Hello") == [15496]
    # a file path selects its folder; the config helper uses data.tokenizer_path or <data_dir>/gpt2-tokenizer
    assert get_tokenizer("gpt2", gpt2_dir / "encoder.json").encode("Hello") == [15496]
    assert tk.tokenizer_from_config(DataConfig(tokenizer_path=str(gpt2_dir))).encode("Hello") == [15496]
    assert tk.tokenizer_from_config(DataConfig(data_dir=str(data_dir))).encode("Hello") == [15496]
    assert isinstance(tk.tokenizer_from_config(DataConfig(tokenizer="byte")), ByteTokenizer)


def test_hf_file_names_are_accepted(gpt2_dir, tmp_path):
    shutil.copy(gpt2_dir / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(gpt2_dir / "vocab.bpe", tmp_path / "merges.txt")
    assert get_tokenizer("gpt2", tmp_path).encode("Hello world") == [15496, 995]


def test_tiktoken_download_path_is_used_when_online(gpt2_dir, monkeypatch):
    """No network in tests: tiktoken.get_encoding is replaced, to check the fallback order and error text."""
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "MLLM_OFFLINE", "MLLM_DATA_DIR"):
        monkeypatch.delenv(k, raising=False)
    local = tk._gpt2_encoding_from_folder(str(gpt2_dir.resolve()))
    monkeypatch.setattr(tk.tiktoken, "get_encoding", lambda name: local)
    tok = get_tokenizer("gpt2")
    assert tok.source == "tiktoken:gpt2" and tok.encode("Hello") == [15496]

    def no_network(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tk.tiktoken, "get_encoding", no_network)
    with pytest.raises(TokenizerError, match=r"MLLM_DATA_DIR is not set.*get_encoding\('gpt2'\) failed.*ConnectionError"):
        get_tokenizer("gpt2")


# ----------------------------------------------------------------------------------------------------
# Errors (no data needed)
# ----------------------------------------------------------------------------------------------------
def test_missing_folder_says_where_and_how(tmp_path):
    with pytest.raises(TokenizerError) as e:
        get_tokenizer("gpt2", tmp_path / "nope")
    msg = str(e.value)
    assert str(tmp_path / "nope") in msg and "encoder.json" in msg and "vocab.bpe" in msg
    assert "MLLM_DATA_DIR" in msg and "tokenizer_path" in msg
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "encoder.json").write_text("{}")
    with pytest.raises(TokenizerError, match=r"looked for vocab\.bpe or merges\.txt in folder .*half"):
        get_tokenizer("gpt2", tmp_path / "half")


def test_offline_without_local_files(tmp_path, monkeypatch):
    monkeypatch.setenv("MLLM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(tk.tiktoken, "get_encoding", lambda name: pytest.fail("network must not be tried offline"))
    with pytest.raises(TokenizerError) as e:
        get_tokenizer("gpt2")
    assert str(tmp_path / "gpt2-tokenizer") in str(e.value) and "offline" in str(e.value.args[0]).lower()


def test_unknown_kind():
    with pytest.raises(TokenizerError, match="unknown tokenizer kind 'bpe'.*data.tokenizer"):
        get_tokenizer("bpe")


def test_inconsistent_or_malformed_files(gpt2_dir, tmp_path):
    enc = json.loads((gpt2_dir / "encoder.json").read_text(encoding="utf-8"))
    enc["Hello"], enc["Ġworld"] = enc["Ġworld"], enc["Hello"]  # ids no longer follow merge order
    (tmp_path / "encoder.json").write_text(json.dumps(enc))
    shutil.copy(gpt2_dir / "vocab.bpe", tmp_path / "vocab.bpe")
    with pytest.raises(TokenizerError, match="disagree"):
        tk.gpt2_ranks_from_files(tmp_path / "encoder.json", tmp_path / "vocab.bpe")

    (tmp_path / "encoder.json").write_text('{"a": 0,\n "b": }')
    with pytest.raises(TokenizerError, match=r"encoder\.json:2: invalid JSON"):
        tk.gpt2_ranks_from_files(tmp_path / "encoder.json", tmp_path / "vocab.bpe")

    (tmp_path / "vocab.bpe").write_text("#version: 0.2\nĠ t\nthree parts here\n")
    with pytest.raises(TokenizerError, match=r"vocab\.bpe:3: expected a merge rule"):
        tk.gpt2_ranks_from_files(tmp_path / "encoder.json", tmp_path / "vocab.bpe")
    (tmp_path / "vocab.bpe").write_text("Ġ t\n")
    with pytest.raises(TokenizerError, match=r"vocab\.bpe:1: expected a '#version"):
        tk.gpt2_ranks_from_files(tmp_path / "encoder.json", tmp_path / "vocab.bpe")


# ----------------------------------------------------------------------------------------------------
# Byte tokenizer
# ----------------------------------------------------------------------------------------------------
def test_byte_tokenizer_basics():
    tok = get_tokenizer("byte")
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("byte", 257, 256)
    assert tok.encode("Hi") == [72, 105]
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.encode("a<|endoftext|>b") == [97, 256, 98]
    assert tok.encode("a<|endoftext|>b", allow_special=False) == list(b"a<|endoftext|>b")
    assert tok.encode_batch(["a", "<|endoftext|>"]) == [[97], [256]]
    assert tok.decode([97, 256, 98]) == "a<|endoftext|>b"
    assert tok.decode([0xC3]) == "\ufffd"  # a cut multi-byte character does not raise
    with pytest.raises(ValueError, match="id 300 is outside"):
        tok.decode([300])


@settings(max_examples=60, deadline=None)
@given(st.text())
def test_byte_tokenizer_roundtrip(s):
    tok = ByteTokenizer()
    ids = tok.encode(s)
    assert all(0 <= i <= 256 for i in ids)
    assert tok.decode(ids) == s
    assert tok.decode(tok.encode_ordinary(s)) == s
