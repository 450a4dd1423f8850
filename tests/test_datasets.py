"""Dataset loaders: every loader and file format on small fixtures written here, every error path (missing file,
malformed line with its number, wrong schema, offline hub), the hub code path with a stand-in for
``datasets.load_dataset``, held-out carving, and the real files of ../shared/data (counts from its README)."""
import gzip
import json
import re
import sys
from pathlib import Path

import pytest

from mllm.config.pipeline_config import load_config
from mllm.data import datasets as D
from mllm.data.datasets import DatasetError

WIKI = (" \n = Alpha = \n \n Alpha is a letter @-@ like thing .\n \n = = History = = \n \n It began .\n \n"
        " = Beta = \n \n Beta follows alpha .\n")
STORIES_EOT = "Once upon a time, a cat sat.\nIt was happy.\n<|endoftext|>\nOne day, a dog ran.\n<|endoftext|>\n"
STORIES_BLANK = ("Once upon a time, a cat sat.\n\nThe cat was happy.\n\nOnce there was a dog.\n\nThe dog ran.\n\n"
                 "The end.\n\n")
ALPACA = [{"instruction": "Add.", "input": "1 2", "output": "3"}, {"instruction": "Hi.", "input": "", "output": "Hello"}]
HH = [{"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}]
GSM = [{"question": "2+2?", "answer": "2+2=<<2+2=4>>4\n#### 4"}, {"question": "Big?", "answer": "so\n#### 1,000"}]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def online_hub(monkeypatch):
    """The hub path with ``datasets.load_dataset`` replaced: returns the calls made, rows come from ``tables``."""
    datasets = pytest.importorskip("datasets")
    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "MLLM_OFFLINE", "MLLM_DATA_DIR"):
        monkeypatch.delenv(k, raising=False)
    calls, tables = [], {}

    def fake_load_dataset(path, name=None, split=None, data_dir=None, streaming=False):
        calls.append({"path": path, "name": name, "split": split, "data_dir": data_dir, "streaming": streaming})
        key = (path, name, split, data_dir)
        if key not in tables:
            raise ConnectionError(f"no table for {key}")
        return iter(tables[key]) if streaming else list(tables[key])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return calls, tables


# ----------------------------------------------------------------------------------------------------
# Text datasets
# ----------------------------------------------------------------------------------------------------
def test_wikitext_documents_and_lines(tmp_path):
    f = write(tmp_path / "wikitext-2" / "wiki.valid.tokens", WIKI)
    docs = D.load_wikitext2(tmp_path, split="validation")
    assert [next(x for x in d["text"].split("\n") if x.strip()) for d in docs] == [" = Alpha = ", " = Beta = "]
    assert "".join(d["text"] for d in docs) == WIKI  # articles are exact slices, sections stay inside
    assert " = = History = = " in docs[0]["text"]
    lines = D.load_wikitext2(f, granularity="lines")
    assert [r["text"] for r in lines] == WIKI.splitlines(keepends=True)
    assert D.load_wikitext2(tmp_path, split="valid", max_rows=1) == docs[:1]
    assert len(D.load_wikitext2(f, granularity="lines", max_rows=3)) == 3
    # raw files live in wikitext-2-raw/ (or next to the tokenized ones); wikitext103 has its own folder
    write(tmp_path / "wikitext-2-raw" / "wiki.test.raw", WIKI.replace(" @-@ ", "-"))
    assert "letter-like" in D.load_wikitext2(tmp_path, split="test", raw=True)[0]["text"]
    write(tmp_path / "wikitext-103" / "wiki.train.tokens.gz", WIKI)
    assert D.load_wikitext103(tmp_path, split="train") == docs
    write(tmp_path / "w.jsonl", jsonl({"text": line} for line in WIKI.splitlines(keepends=True)))
    assert D.load_wikitext2(tmp_path / "w.jsonl") == docs  # json rows of an HF export are lines
    with pytest.raises(DatasetError, match="granularity"):
        D.load_wikitext2(f, granularity="words")


def test_tinystories_story_splitting(tmp_path):
    eot = write(tmp_path / "tinystories" / "TinyStories-valid.txt", STORIES_EOT)
    assert [r["text"] for r in D.load_tinystories(eot)] == ["Once upon a time, a cat sat.\nIt was happy.",
                                                           "One day, a dog ran."]
    blank = write(tmp_path / "blank.txt", STORIES_BLANK)
    assert [r["text"] for r in D.load_tinystories(blank)] == [
        "Once upon a time, a cat sat.\n\nThe cat was happy.", "Once there was a dog.\n\nThe dog ran.\n\nThe end."]
    assert len(D.load_tinystories(blank, story_split="paragraphs")) == 5
    assert len(D.load_tinystories(blank, story_split="eot")) == 1  # no marker: the whole file is one story
    with pytest.raises(DatasetError, match="TinyStories split mode"):
        D.load_tinystories(blank, story_split="sentences")
    # the folder layout picks the split's file; jsonl(.gz) has one story per record, empty ones dropped
    assert D.load_tinystories(tmp_path, split="validation", max_rows=1)[0]["text"].startswith("Once upon")
    gz = write(tmp_path / "ts" / "train.jsonl.gz", jsonl([{"text": " A story. "}, {"text": "  "}, {"text": "B."}]))
    assert D.load_tinystories(gz.parent, split="train") == [{"text": "A story."}, {"text": "B."}]


# ----------------------------------------------------------------------------------------------------
# Record datasets, every format
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["alpaca_data.json", "alpaca_data.json.gz", "train.jsonl", "train.jsonl.gz"])
def test_alpaca_formats(tmp_path, name):
    text = json.dumps(ALPACA, indent=4) if ".json" in name and "jsonl" not in name else jsonl(ALPACA)
    write(tmp_path / "alpaca" / name, text)
    assert D.load_alpaca(tmp_path) == ALPACA
    assert D.load_alpaca(tmp_path / "alpaca" / name, max_rows=1) == ALPACA[:1]


def test_alpaca_extra_fields_are_dropped(tmp_path):
    f = write(tmp_path / "a.json", json.dumps({"data": [dict(ALPACA[0], text="### Instruction ...")]}))
    assert D.load_alpaca(f) == ALPACA[:1]


def test_hh_rlhf_subsets(tmp_path):
    for i, sub in enumerate(D.HH_RLHF_SUBSETS):
        write(tmp_path / "hh-rlhf" / f"{sub}-test.jsonl.gz", jsonl([dict(HH[0], chosen=HH[0]["chosen"] + str(i))]))
    rows = D.load_hh_rlhf(tmp_path, split="test")
    assert [r["chosen"][-1] for r in rows] == ["0", "1", "2", "3"]  # subsets concatenated in order
    assert len(D.load_hh_rlhf(tmp_path, split="test", subsets=["helpful-online"])) == 1
    # the official repository's layout <subset>/<split>.jsonl.gz
    write(tmp_path / "repo" / "helpful-base" / "train.jsonl", jsonl(HH * 3))
    assert D.load_hh_rlhf(tmp_path / "repo", subsets=["helpful-base"], max_rows=2) == HH * 2
    with pytest.raises(DatasetError, match=r"harmless-base/train\.jsonl"):
        D.load_hh_rlhf(tmp_path / "repo")  # a requested subset is missing: named, no silent partial load
    with pytest.raises(DatasetError, match="unknown hh-rlhf subset"):
        D.load_hh_rlhf(tmp_path, subsets=["red-team"])


@pytest.mark.parametrize("name", ["train.jsonl", "train.jsonl.gz", "train.json"])
def test_gsm8k_formats_and_final_answer(tmp_path, name):
    write(tmp_path / "gsm8k" / name, json.dumps(GSM) if name.endswith(".json") else jsonl(GSM))
    rows = D.load_gsm8k(tmp_path)
    assert rows == GSM
    assert [D.gsm8k_final_answer(r["answer"]) for r in rows] == ["4", "1000"]


def test_gsm8k_final_answer_parsing():
    f = D.gsm8k_final_answer
    assert f("x\n#### 72") == "72" and f("#### -3") == "-3" and f("#### 1,234,567\n") == "1234567"
    assert f("#### +5") == "5" and f("#### 3.50") == "3.5" and f("#### 2.0") == "2" and f("#### -0") == "0"
    assert f("no answer here", strict=False) is None and f("#### many", strict=False) is None
    with pytest.raises(DatasetError, match="no final '#### <number>' line"):
        f("The answer is 4")


def test_sst2_formats(tmp_path):
    write(tmp_path / "sst2" / "train.tsv", "sentence\tlabel\ngood film \t1\nbad film \t0\n")
    write(tmp_path / "sst2" / "dev.tsv.gz", "sentence\tlabel\nfine \t1\n")
    write(tmp_path / "sst2" / "test.tsv", "index\tsentence\n0\tunknown .\n")
    assert D.load_sst2(tmp_path) == [{"sentence": "good film ", "label": 1}, {"sentence": "bad film ", "label": 0}]
    assert D.load_sst2(tmp_path, split="validation") == [{"sentence": "fine ", "label": 1}]
    assert D.load_sst2(tmp_path, split="test") == [{"sentence": "unknown .", "label": -1}]
    f = write(tmp_path / "s.jsonl", jsonl([{"idx": 0, "sentence": "ok", "label": 1}]))
    assert D.load_sst2(f) == [{"sentence": "ok", "label": 1}]


# ----------------------------------------------------------------------------------------------------
# Error paths
# ----------------------------------------------------------------------------------------------------
def test_missing_file_names_what_was_looked_for(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    with pytest.raises(DatasetError) as e:
        D.load_gsm8k(tmp_path, split="test")
    assert str(tmp_path / "gsm8k" / "test.jsonl") in str(e.value)
    with pytest.raises(DatasetError, match="does not exist"):
        D.load_sst2(tmp_path / "nope.tsv")
    with pytest.raises(DatasetError, match="alpaca has no test split"):
        D.load_alpaca(tmp_path, split="test")
    with pytest.raises(DatasetError, match="unknown split 'dev2'"):
        D.load_gsm8k(tmp_path, split="dev2")


def test_malformed_lines_report_file_and_line(tmp_path):
    f = write(tmp_path / "g.jsonl", jsonl(GSM) + "\n" + '{"question": "q", "answer": \n')
    with pytest.raises(DatasetError, match=r"g\.jsonl:4: malformed JSON line"):
        D.load_gsm8k(f)
    f = write(tmp_path / "a.json.gz", '[\n  {"instruction": "x",\n   "input": "" "output": "y"}\n]')
    with pytest.raises(DatasetError, match=r"a\.json\.gz:3: malformed JSON"):
        D.load_alpaca(f)
    f = write(tmp_path / "s.tsv", "sentence\tlabel\nok \t1\nno label here\n")
    with pytest.raises(DatasetError, match=r"s\.tsv:3: malformed TSV row: 1 columns"):
        D.load_sst2(f)
    f = write(tmp_path / "s2.tsv", "sentence\tlabel\nok \tpositive\n")
    with pytest.raises(DatasetError, match=r"s2\.tsv:2: wrong schema, field 'label'"):
        D.load_sst2(f)
    f = tmp_path / "bad-utf8.txt"
    f.write_bytes(b"Once upon a time.\n\nIt was \xff\xfe odd.\n")
    with pytest.raises(DatasetError, match=r"bad-utf8\.txt:3: not valid UTF-8"):
        D.load_tinystories(f)
    f = tmp_path / "broken.jsonl.gz"
    packed = gzip.compress(jsonl([dict(HH[0], chosen=str(i) * i) for i in range(300)]).encode())
    f.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DatasetError, match=r"broken\.jsonl\.gz:\d+: cannot read"):
        D.load_hh_rlhf(f)


def test_wrong_schema_names_fields(tmp_path):
    f = write(tmp_path / "h.jsonl", jsonl(HH + [{"prompt": "x", "chosen": "y"}]))
    with pytest.raises(DatasetError, match=r"h\.jsonl:2: wrong schema, missing field\(s\) 'rejected'.*found prompt, chosen"):
        D.load_hh_rlhf(f)
    f = write(tmp_path / "a.json", json.dumps([{"instruction": "x", "input": "", "output": 3}]))
    with pytest.raises(DatasetError, match=r"record #0: wrong schema, field 'output' should be str, got int"):
        D.load_alpaca(f)
    f = write(tmp_path / "g.jsonl", jsonl([{"question": "q", "answer": "4"}]))
    with pytest.raises(DatasetError, match=r"g\.jsonl:1: wrong schema, field 'answer'.*####"):
        D.load_gsm8k(f)
    f = write(tmp_path / "s.tsv", "text\tlabel\nok\t1\n")
    with pytest.raises(DatasetError, match=r"missing field\(s\) 'sentence'"):
        D.load_sst2(f)
    f = write(tmp_path / "s.jsonl", jsonl([{"sentence": "ok", "label": 2}]))
    with pytest.raises(DatasetError, match="should be 0 or 1 in the train split, got 2"):
        D.load_sst2(f)
    f = write(tmp_path / "l.jsonl", "[1, 2]\n")
    with pytest.raises(DatasetError, match="expected a JSON object"):
        D.load_gsm8k(f)
    with pytest.raises(DatasetError, match=r"missing field\(s\) 'label'"):
        D.load_sst2(write(tmp_path / "train.tsv", "index\tsentence\n0\tx\n"))  # only the test split may lack labels
    with pytest.raises(DatasetError, match=r"s\.jsonl:1: .*should be 0 or 1 in the validation split, got -1"):
        D.load_sst2(write(tmp_path / "s.jsonl", jsonl([{"sentence": "ok", "label": -1}])), split="validation")
    with pytest.raises(DatasetError, match=r"empty\.jsonl: no gsm8k records"):
        D.load_gsm8k(write(tmp_path / "empty.jsonl", ""))
    with pytest.raises(DatasetError, match=r"gsm8k cannot be read from a \.tsv file"):
        D.load_gsm8k(write(tmp_path / "g.tsv", "question\tanswer\nq\t#### 1\n"))
    with pytest.raises(DatasetError, match=r"unsupported file type '\.csv'"):
        D.load_gsm8k(write(tmp_path / "g.csv", "question,answer\n"))


def test_offline_hub_error(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("MLLM_DATA_DIR", str(tmp_path))
    with pytest.raises(DatasetError) as e:
        D.load_gsm8k(split="test")
    msg = str(e.value)
    assert str(tmp_path / "gsm8k" / "test.jsonl") in msg and "offline" in msg and "openai/gsm8k" in msg
    with pytest.raises(DatasetError, match="hub is offline"):
        D.load_tinystories("hub", split="validation")
    monkeypatch.delenv("MLLM_DATA_DIR")
    with pytest.raises(DatasetError, match="MLLM_DATA_DIR / data.data_dir unset.*offline"):
        D.load_sst2()


def test_max_rows_validation(tmp_path):
    f = write(tmp_path / "g.jsonl", jsonl(GSM))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(DatasetError, match="max_rows must be a positive integer"):
            D.load_gsm8k(f, max_rows=bad)


# ----------------------------------------------------------------------------------------------------
# The hub code path (load_dataset replaced; no network)
# ----------------------------------------------------------------------------------------------------
def test_hub_path_arguments_and_schema(online_hub):
    calls, tables = online_hub
    tables[("tatsu-lab/alpaca", None, "train", None)] = [dict(r, text="full prompt") for r in ALPACA]
    tables[("stanfordnlp/sst2", None, "validation", None)] = [{"idx": 0, "sentence": "fine ", "label": 1}]
    tables[("openai/gsm8k", "main", "test", None)] = GSM
    tables[("roneneldan/TinyStories", None, "validation", None)] = [{"text": " A. "}, {"text": ""}, {"text": "B."}]
    wiki_rows = [{"text": line} for line in WIKI.splitlines(keepends=True)]
    tables[("Salesforce/wikitext", "wikitext-103-raw-v1", "train", None)] = wiki_rows
    for sub in D.HH_RLHF_SUBSETS:
        tables[("Anthropic/hh-rlhf", None, "train", sub)] = HH

    assert D.load_alpaca() == ALPACA and calls[-1]["streaming"] is False
    assert D.load_sst2(split="validation", max_rows=5) == [{"sentence": "fine ", "label": 1}]
    assert calls[-1]["streaming"] is True  # a slice streams instead of downloading the split
    assert D.load_gsm8k("hub", split="test") == GSM and calls[-1]["name"] == "main"
    assert D.load_tinystories(split="validation") == [{"text": "A."}, {"text": "B."}]
    docs = D.load_wikitext103(split="train", raw=True, max_rows=1)
    assert docs == [{"text": WIKI[: WIKI.index(" = Beta = ")]}]
    assert D.load_hh_rlhf(max_rows=3) == HH * 3
    assert [c["data_dir"] for c in calls[-3:]] == list(D.HH_RLHF_SUBSETS[:3])
    assert D.resolve_source("alpaca").kind == "hub"

    tables[("openai/gsm8k", "main", "train", None)] = [{"question": "q"}]
    with pytest.raises(DatasetError, match=r"hub openai/gsm8k \(main\) split=train row 0: wrong schema, missing field\(s\) 'answer'"):
        D.load_gsm8k()
    with pytest.raises(DatasetError, match=r"hub load of stanfordnlp/sst2 split=train failed \(ConnectionError"):
        D.load_sst2()


def test_hub_without_datasets_package(monkeypatch):
    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "MLLM_OFFLINE", "MLLM_DATA_DIR"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DatasetError, match=r"needs the 'datasets' package \(pip install datasets\)"):
        D.load_gsm8k()


# ----------------------------------------------------------------------------------------------------
# Held-out carving, registry, resolution
# ----------------------------------------------------------------------------------------------------
def test_split_holdout_is_per_record():
    recs = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(2000)]
    kept, held = D.split_holdout(recs, 0.1, seed=7)
    assert len(kept) + len(held) == 2000 and 140 < len(held) < 260  # Binomial(2000, 0.1): mean 200, sd 13
    assert D.split_holdout(recs, 0.1, seed=7) == (kept, held)
    # a slice agrees with the full set, whatever the order: no leakage between stages that load different slices
    k2, h2 = D.split_holdout(list(reversed(recs[:500])), 0.1, seed=7)
    assert set(r["question"] for r in h2) == set(r["question"] for r in held if int(r["question"][1:]) < 500)
    assert D.split_holdout(recs, 0.1, seed=8)[1] != held
    assert D.split_holdout(recs, 0.0)[1] == []
    # keyed by a field: records sharing the question land together
    dup = [{"question": "same", "answer": str(i)} for i in range(50)]
    assert len({len(p) for p in D.split_holdout(dup, 0.5, key="question")}) == 2  # all on one side
    with pytest.raises(DatasetError, match=r"fraction must be in \[0, 1\)"):
        D.split_holdout(recs, 1.0)
    with pytest.raises(DatasetError, match="key field"):
        D.split_holdout(recs, 0.1, key="prompt")


def test_registry_and_resolution(tmp_path, monkeypatch, offline):
    assert set(D.DATASETS) == set(D.DATASET_NAMES) and len(D.DATASETS) == 7
    assert D.dataset_fields("hh_rlhf") == ("chosen", "rejected")
    with pytest.raises(DatasetError, match="unknown dataset 'c4'"):
        D.load_dataset("c4")
    f = write(tmp_path / "gsm8k" / "train.jsonl", jsonl(GSM))
    write(tmp_path / "train.jsonl", jsonl(HH))  # a generic name at a data folder's root belongs to no dataset
    r = D.resolve_source("gsm8k", tmp_path, "train")
    assert r.kind == "local" and r.paths == [f] and r.location == str(f)
    assert D.resolve_source("gsm8k", tmp_path, "test").kind == "missing"
    assert D.resolve_source("alpaca", tmp_path, "train").kind == "missing"
    assert D.local_splits("gsm8k", tmp_path) == ["train"]
    monkeypatch.setenv("MLLM_DATA_DIR", str(tmp_path))
    assert D.load_dataset("gsm8k", max_rows=1) == GSM[:1]


def test_a_data_folder_passed_as_source_reads_only_its_layout(tmp_path, offline):
    """The stages pass the data folder itself as ``source``. A folder with the shared layout (here ``wikitext-2/``)
    must not lend its root's generic ``train.txt`` to a dataset whose own subfolder is missing: that file was read as
    TinyStories, and the error for a missing WikiText-103 named ``<folder>/wiki.train.tokens``."""
    write(tmp_path / "wikitext-2" / "wiki.train.tokens", " = A = \n\n text \n")
    write(tmp_path / "train.txt", STORIES_EOT)
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "tinystories" / "TinyStoriesV2-GPT4-train.txt"))):
        D.load_tinystories(tmp_path)
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "wikitext-103" / "wiki.train.tokens"))):
        D.load_wikitext103(tmp_path)
    assert len(D.load_wikitext2(tmp_path)) == 1
    own = tmp_path / "my-stories"  # a dataset's own folder (no layout subfolders) still reads its generic names
    write(own / "train.txt", STORIES_EOT)
    assert D.load_tinystories(own) == D.load_tinystories(tmp_path / "train.txt")


def test_empty_files_are_errors_naming_the_file(tmp_path, offline):
    """An empty text file loaded as 0 documents without a word, and one empty hh-rlhf subset file added 0 pairs."""
    empty = write(tmp_path / "tinystories" / "validation-head.txt", "")
    with pytest.raises(DatasetError, match=re.escape(str(empty)) + ": no tinystories documents"):
        D.load_tinystories(tmp_path, split="validation")
    blank = write(tmp_path / "wikitext-2" / "wiki.valid.tokens", "\n \n")
    with pytest.raises(DatasetError, match=re.escape(str(blank)) + ": no wikitext2 documents"):
        D.load_wikitext2(tmp_path, split="validation")
    for i, sub in enumerate(D.HH_RLHF_SUBSETS):
        write(tmp_path / "hh-rlhf" / f"{sub}-test.jsonl.gz", "" if i == 2 else jsonl(HH))
    with pytest.raises(DatasetError, match=rf"{D.HH_RLHF_SUBSETS[2]}-test\.jsonl\.gz: no hh_rlhf records in the file"):
        D.load_hh_rlhf(tmp_path, split="test")
    assert len(D.load_hh_rlhf(tmp_path, split="test", max_rows=2)) == 2  # rows before the empty file suffice


def test_verify_datasets_reports_and_fails(tmp_path, offline):
    write(tmp_path / "gsm8k" / "train.jsonl", jsonl(GSM))
    write(tmp_path / "sst2" / "train.tsv", "sentence\tlabel\nok \t1\n")
    write(tmp_path / "sst2" / "test.tsv", "index\tsentence\n0\tx\n0\ty\tz\n")  # malformed line 3
    rows, ok = D.verify_datasets(["gsm8k", "sst2", "alpaca"], tmp_path, quick=True)
    by = {(r.dataset, r.split): r for r in rows}
    assert not ok
    assert by[("gsm8k", "train")].status == "ok" and by[("gsm8k", "train")].rows == "2"
    assert by[("sst2", "test")].status == "error" and "test.tsv:3" in by[("sst2", "test")].message
    assert by[("alpaca", "train")].status == "unavailable"
    table = D.format_verify_table(rows)
    assert "UNAVAILABLE" in table and "ERROR" in table and "question='2+2?'" in table
    rows, ok = D.verify_datasets(["gsm8k"], tmp_path)
    assert ok  # gsm8k test is absent offline, but the dataset is usable


def test_verify_script_set_and_bad_names(tmp_path, offline, capsys, monkeypatch):
    """``--set data.data_dir=...`` alone points the check at that folder (it was ignored without --config); an
    unknown preset or dataset name is one error line with exit 2."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        import verify_datasets
    finally:
        sys.path.pop(0)
    monkeypatch.delenv("MLLM_DATA_DIR", raising=False)
    write(tmp_path / "gsm8k" / "train.jsonl", jsonl(GSM))
    assert verify_datasets.main(["--quick", "--set", f"data.data_dir={tmp_path}", "--datasets", "gsm8k"]) == 0
    assert f"data folder: {tmp_path}" in capsys.readouterr().out
    assert verify_datasets.main(["--config", "nope"]) == 2
    assert verify_datasets.main(["--datasets", "gsm9k"]) == 2
    assert "unknown gsm9k" in capsys.readouterr().err
    assert verify_datasets.main(["--datasets", ","]) == 2  # was an empty table and "all datasets usable"
    assert "no dataset named in ','" in capsys.readouterr().err
    # a file given as the data folder is called a file, not a missing folder
    assert verify_datasets.main(["--quick", "--data-dir", str(tmp_path / "gsm8k" / "train.jsonl"),
                                 "--datasets", "gsm8k"]) == 1
    out = capsys.readouterr().out
    assert "(data folder is a file, not a folder)" in out and "does not exist" not in out


def test_datasets_for_config():
    assert D.datasets_for_config(load_config("local-smoke")) == ["tinystories", "wikitext2", "alpaca", "gsm8k",
                                                                 "hh_rlhf", "sst2"]
    assert set(D.datasets_for_config(load_config("gpu-full"))) == set(D.DATASETS) - {"wikitext2"}


# ----------------------------------------------------------------------------------------------------
# The real files (../shared/data); counts from its README
# ----------------------------------------------------------------------------------------------------
def test_real_gsm8k(data_dir):
    rows = D.load_gsm8k(data_dir, split="train")
    assert len(rows) == 7473
    assert rows[0]["question"].startswith("Natalia sold clips") and D.gsm8k_final_answer(rows[0]["answer"]) == "72"
    finals = [D.gsm8k_final_answer(r["answer"]) for r in rows]  # every answer parses (schema check did too)
    assert any(f.startswith("-") for f in finals) and all("," not in f for f in finals)


def test_real_sst2(data_dir):
    train = D.load_sst2(data_dir)
    assert len(train) == 67349 and sum(r["label"] for r in train) == 37569
    assert train[0] == {"sentence": "hide new secretions from the parental units ", "label": 0}
    test = D.load_sst2(data_dir, split="test")
    assert len(test) == 1821 and {r["label"] for r in test} == {-1}


def test_real_alpaca(data_dir):
    rows = D.load_alpaca(data_dir)
    assert len(rows) == 52002 and sum(r["input"] == "" for r in rows) == 31323
    assert rows[0]["instruction"] == "Give three tips for staying healthy."


def test_real_hh_rlhf(data_dir):
    sizes = {"harmless-base": 2312, "helpful-base": 2354, "helpful-online": 1137, "helpful-rejection-sampled": 2749}
    same = {"harmless-base": 0, "helpful-base": 2, "helpful-online": 2, "helpful-rejection-sampled": 32}
    for sub in D.HH_RLHF_SUBSETS:
        rows = D.load_hh_rlhf(data_dir, split="test", subsets=[sub])
        assert len(rows) == sizes[sub] and sum(r["chosen"] == r["rejected"] for r in rows) == same[sub]
        assert all(r["chosen"].startswith("\n\nHuman: ") for r in rows)
    assert len(D.load_hh_rlhf(data_dir, split="test")) == 8552


def test_real_wikitext2(data_dir):
    path = data_dir / "wikitext-2" / "wiki.valid.tokens"
    lines = D.load_wikitext2(data_dir, split="validation", granularity="lines")
    assert len(lines) == 3760 and sum(r["text"].strip() == "" for r in lines) == 1299
    assert sum(len(r["text"].split()) + 1 for r in lines) == 217646  # the published token count (+ <eos>)
    docs = D.load_wikitext2(data_dir, split="validation")
    assert len(docs) == 60 and docs[0]["text"].startswith(" \n = Homarus gammarus = \n")
    assert "".join(d["text"] for d in docs) == path.read_text(encoding="utf-8")


def test_real_tinystories(data_dir):
    path = data_dir / "tinystories" / "validation-head.txt"
    stories = D.load_tinystories(data_dir, split="validation")
    assert len(stories) == 785 and stories[0]["text"].startswith("Spot. Spot saw the shiny car")
    # grouping only joins blocks: every paragraph of the file is in exactly one story, in order
    # (a line holding only spaces separates paragraphs too)
    paragraphs = [p.strip() for p in re.split(r"\n[ \t]*\n", path.read_text(encoding="utf-8")) if p.strip()]
    assert [p for s in stories for p in s["text"].split("\n\n")] == paragraphs
    sample = D.load_tinystories(data_dir / "tinystories" / "cs336-tinystories_sample.txt")
    assert len(sample) == 5 and all("<|endoftext|>" not in s["text"] for s in sample)


def test_real_verify_local_smoke(data_dir, offline, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        import verify_datasets
    finally:
        sys.path.pop(0)
    assert verify_datasets.main(["--quick", "--config", "local-smoke", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "all datasets usable" in out and "7,473" in out and "67,349" in out
    # wikitext103 is not in the shared folder and the hub is offline: the default (all seven) run fails
    assert verify_datasets.main(["--quick", "--data-dir", str(data_dir), "--datasets", "wikitext103"]) == 1
