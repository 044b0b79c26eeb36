"""Tests of data/: sources, tokenizers, packing, the batch constructor, the resumable loader, prepare_lm_data."""

import json
import os
import random
import types

import numpy as np
import pytest

from data.holdout import holdout
from data.loader import Loader
from data.packing import pack_documents
from data.pipeline import prepare_lm_data
from data.sources import DataError, read_documents, resolve_paths, split_documents
from data.tokenizer import CharTokenizer, SentencePieceTokenizer, load_tokenizer, train_tokenizer

SHAKESPEARE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tinyshakespeare", "input.txt")
WORDS = ("the quick brown fox jumps over lazy dog river mountain city data model train value number "
         "function return import class self list dict string café naïve Grüße façade 東京 ☃ 🙂").split()


SYLLABLES = "ka ri to mel an ste por qu ing ed vo lu sha ne tri ol ba cer dis um".split()


def synthetic_text(seed: int, num_lines: int) -> str:
  """English-like prose mixed with indented Python code, unicode and digits."""
  rng = random.Random(seed)

  def word():
    if rng.random() < 0.5:
      return rng.choice(WORDS)
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3)))

  lines = []
  for i in range(num_lines):
    kind = i % 4
    if kind == 0:
      lines.append(" ".join(word() for _ in range(rng.randint(3, 12))).capitalize() + ".")
    elif kind == 1:
      lines.append(f"def {word()}_{rng.randint(0, 99)}(x, y={rng.randint(0, 10**6)}):")
    elif kind == 2:
      lines.append(" " * 4 * rng.randint(1, 3) + f"return x * {rng.random():.4f} + y  # {word()}")
    else:
      lines.append("\t" * rng.randint(0, 1) + f"{rng.randint(1900, 2030)}-{rng.randint(1, 12):02d} total: "
                   f"{rng.randint(0, 10**9)}" + (" " * rng.randint(0, 3)))
  return "\n".join(lines) + "\n"


HELD_OUT = [
    synthetic_text(seed=123, num_lines=40),
    "  leading spaces, trailing spaces  \n\n\n\tindented\twith tabs\r\nwindows line\r\n",
    "Never seen: Ωμέγα, Ж, 한국어, 🚀🚀, ∑x² = 42, null\x00byte, digits 0123456789",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def corpus():
  """A small training corpus of documents."""
  return [synthetic_text(seed=s, num_lines=150) for s in range(8)]


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def spm_tokenizer(request, corpus):
  """A sentencepiece tokenizer (bpe or unigram) trained on the corpus with a mask token."""
  return train_tokenizer(corpus, "sentencepiece", vocab_size=600, model_type=request.param,
                         special_tokens=["<mask>"])


def assert_one_line_error(excinfo, *parts):
  """The DataError message is one line containing every part."""
  message = str(excinfo.value)
  assert "\n" not in message, message
  for part in parts:
    assert part in message, (part, message)


# Tokenizers.

def test_sentencepiece_round_trip(spm_tokenizer, corpus):
  tok = spm_tokenizer
  for text in corpus[:2] + HELD_OUT:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
  assert tok.encode_batch(HELD_OUT) == [tok.encode(t) for t in HELD_OUT]
  # Trained pieces compress (digits stay single tokens): fewer tokens than bytes on text like the training text.
  assert len(tok.encode(HELD_OUT[0])) < 0.7 * len(HELD_OUT[0].encode("utf-8"))


def test_sentencepiece_special_ids(spm_tokenizer):
  tok = spm_tokenizer
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (600, 0, 2, 3)
  ids = tok.encode("def f(x):\n    return 1")
  assert tok.bos_id not in ids and tok.eos_id not in ids and tok.pad_id not in ids
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id, tok.pad_id]) == "def f(x):\n    return 1"
  mask = tok.token_id("<mask>")
  assert mask > 3 and tok.encode("a<mask>b")[1:2] == [mask]
  with pytest.raises(DataError):
    tok.token_id("<never-reserved>")


def test_sentencepiece_save_load(spm_tokenizer, tmp_path):
  spm_tokenizer.save(str(tmp_path))
  loaded = load_tokenizer(str(tmp_path))
  assert os.path.isfile(tmp_path / "tokenizer.model")
  assert isinstance(loaded, SentencePieceTokenizer)
  assert loaded.vocab_size == spm_tokenizer.vocab_size
  assert loaded.encode_batch(HELD_OUT) == spm_tokenizer.encode_batch(HELD_OUT)


def test_sentencepiece_training_is_deterministic(corpus):
  a = train_tokenizer(corpus, "sentencepiece", vocab_size=500, max_chars=50_000)
  b = train_tokenizer(corpus, "sentencepiece", vocab_size=500, max_chars=50_000)
  assert a.encode(HELD_OUT[0]) == b.encode(HELD_OUT[0])


def test_sentencepiece_errors(corpus):
  with pytest.raises(DataError) as excinfo:
    train_tokenizer(corpus[:1], "sentencepiece", vocab_size=100_000)
  assert_one_line_error(excinfo, "vocab_size 100000", "Vocabulary size too high")
  with pytest.raises(DataError) as excinfo:
    train_tokenizer(corpus, "sentencepiece", vocab_size=600, model_type="wordpiece")
  assert_one_line_error(excinfo, "wordpiece")
  with pytest.raises(DataError) as excinfo:
    train_tokenizer(corpus, "bytes", vocab_size=600)
  assert_one_line_error(excinfo, "bytes")


def test_char_tokenizer(tmp_path):
  tok = train_tokenizer(["hello", "world\n"], "char", vocab_size=12345)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.vocab_size == 3 + len("\ndehlorw")
  assert tok.encode("\nhe") == [3, 6, 5]  # sorted chars "\ndehlorw" start at id 3
  assert tok.decode([1, 3, 6, 5, 2, 0]) == "\nhe"
  assert tok.decode(tok.encode("hello\nworld")) == "hello\nworld"
  with pytest.raises(DataError) as excinfo:
    tok.encode("help")
  assert_one_line_error(excinfo, "'p'")
  tok.save(str(tmp_path))
  assert json.loads((tmp_path / "tokenizer.json").read_text()) == {
      "kind": "char", "chars": "\ndehlorw", "special_tokens": []}
  loaded = load_tokenizer(str(tmp_path))
  assert isinstance(loaded, CharTokenizer)
  assert loaded.encode("world\nhello") == tok.encode("world\nhello")


def test_char_tokenizer_special_tokens():
  tok = train_tokenizer(["ab"], "char", vocab_size=0, special_tokens=["<mask>"])
  assert tok.token_id("<mask>") == 5 and tok.vocab_size == 6
  assert tok.decode([3, 5, 4]) == "a<mask>b"


def test_load_tokenizer_missing(tmp_path):
  with pytest.raises(DataError) as excinfo:
    load_tokenizer(str(tmp_path))
  assert_one_line_error(excinfo, str(tmp_path))


@pytest.mark.skipif(not os.path.isfile(SHAKESPEARE), reason="tinyshakespeare not in ../shared/data")
def test_char_tokenizer_on_shakespeare():
  tok = train_tokenizer(read_documents(SHAKESPEARE), "char", vocab_size=0)
  assert len(tok.chars) == 65 and tok.vocab_size == 68


# Packing.

def test_pack_documents_by_hand():
  # Stream: [1 5 6 7][1 8][1 9 10 11 12], 11 tokens -> (11 - 1) // 3 = 3 rows, each reading 4 tokens.
  rows = pack_documents([[5, 6, 7], [8], [9, 10, 11, 12]], seq_len=3, bos_id=1)
  expected = {
      "inputs_BxL": [[1, 5, 6], [7, 1, 8], [1, 9, 10]],
      "targets_BxL": [[5, 6, 7], [1, 8, 1], [9, 10, 11]],
      "segment_ids_BxL": [[1, 1, 1], [1, 2, 2], [1, 1, 1]],
      "positions_BxL": [[0, 1, 2], [0, 0, 1], [0, 1, 2]],
      "weights_BxL": [[1, 1, 1], [0, 1, 0], [1, 1, 1]],
  }
  assert sorted(rows) == sorted(expected)
  for key, value in expected.items():
    assert rows[key].dtype == (np.float32 if key == "weights_BxL" else np.int32), key
    np.testing.assert_array_equal(rows[key], np.array(value), err_msg=key)


def test_pack_documents_with_eos_by_hand():
  # Stream: [1 5 6 2][1 8 2], 7 tokens -> 2 rows of 3; eos (2) is a target, the next bos (1) is not.
  rows = pack_documents([[5, 6], [8]], seq_len=3, bos_id=1, eos_id=2)
  np.testing.assert_array_equal(rows["inputs_BxL"], [[1, 5, 6], [2, 1, 8]])
  np.testing.assert_array_equal(rows["targets_BxL"], [[5, 6, 2], [1, 8, 2]])
  np.testing.assert_array_equal(rows["weights_BxL"], [[1, 1, 1], [0, 1, 1]])
  np.testing.assert_array_equal(rows["segment_ids_BxL"], [[1, 1, 1], [1, 2, 2]])


def test_pack_documents_covers_every_target():
  docs = [list(range(10, 10 + n)) for n in (5, 0, 9, 3, 14)]
  rows = pack_documents(docs, seq_len=4, bos_id=1)
  stream = [t for d in docs for t in [1] + d]
  n = (len(stream) - 1) // 4
  assert rows["inputs_BxL"].shape == (n, 4)
  np.testing.assert_array_equal(rows["targets_BxL"].ravel(), stream[1:4 * n + 1])
  np.testing.assert_array_equal(rows["weights_BxL"] == 0, rows["targets_BxL"] == 1)  # only a next bos is masked


def test_pack_documents_too_short():
  with pytest.raises(DataError) as excinfo:
    pack_documents([[5, 6], [7]], seq_len=5, bos_id=1)
  assert_one_line_error(excinfo, "5 tokens", "seq_len+1 = 6")


# Loader.

def make_rows(n: int, seq_len: int = 3) -> dict[str, np.ndarray]:
  """Rows whose inputs identify them: row r is [r, r, r]."""
  ids = np.repeat(np.arange(n, dtype=np.int32)[:, None], seq_len, axis=1)
  return {"inputs_BxL": ids, "targets_BxL": ids + 100}


def take(loader: Loader, k: int) -> list[dict[str, np.ndarray]]:
  return [next(loader) for _ in range(k)]


def row_ids(batches) -> list[int]:
  return [int(r) for b in batches for r in b["inputs_BxL"][:, 0]]


def test_loader_determinism():
  rows = make_rows(10)
  a, b, c = (row_ids(take(Loader(rows, 4, seed=s), 6)) for s in (7, 7, 8))
  assert a == b and a != c
  batch = next(Loader(rows, 4, seed=7))
  assert batch["inputs_BxL"].shape == (4, 3) and batch["inputs_BxL"].dtype == np.int32
  np.testing.assert_array_equal(batch["targets_BxL"], batch["inputs_BxL"] + 100)


def test_loader_visits_every_row_once_per_epoch():
  ids = row_ids(take(Loader(make_rows(10), 4, seed=0), 5))  # 20 rows = 2 epochs; batch 3 spans the boundary
  assert sorted(ids[:10]) == list(range(10)) and sorted(ids[10:]) == list(range(10))
  assert ids[:10] != ids[10:] and ids[:10] != list(range(10))
  assert row_ids(take(Loader(make_rows(10), 5, seed=0, shuffle=False), 2)) == list(range(10))


def test_loader_batch_larger_than_rows():
  ids = row_ids(take(Loader(make_rows(3), 8, seed=1), 3))
  for e in range(8):
    assert sorted(ids[3 * e:3 * e + 3]) == [0, 1, 2]


@pytest.mark.parametrize("k", [0, 1, 2, 3, 7])
def test_loader_resume(k):
  rows = make_rows(10)
  uninterrupted = take(Loader(rows, 4, seed=3), k + 4)
  first = Loader(rows, 4, seed=3)
  take(first, k)
  state = json.loads(json.dumps(first.get_state()))
  resumed = Loader(rows, 4, seed=3)
  resumed.set_state(state)
  assert row_ids(take(resumed, 4)) == row_ids(uninterrupted[k:])


def test_loader_state_mismatch():
  state = Loader(make_rows(10), 4, seed=3).get_state()
  for loader in (Loader(make_rows(10), 4, seed=4), Loader(make_rows(11), 4, seed=3)):
    with pytest.raises(DataError) as excinfo:
      loader.set_state(state)
    assert_one_line_error(excinfo, "seed 3")


def test_loader_process_slices():
  rows = make_rows(10)
  global_batches = take(Loader(rows, 6, seed=5), 4)
  parts = [take(Loader(rows, 6, seed=5, process_index=p, process_count=3), 4) for p in range(3)]
  for step, batch in enumerate(global_batches):
    assert parts[0][step]["inputs_BxL"].shape == (2, 3)
    joined = np.concatenate([parts[p][step]["inputs_BxL"] for p in range(3)])
    np.testing.assert_array_equal(joined, batch["inputs_BxL"])
  with pytest.raises(DataError):
    Loader(rows, 5, seed=0, process_count=2)


# Sources.

@pytest.fixture()
def files(tmp_path):
  """A small tree: a.txt, sub/b.md, sub/c.py, sub/d.jsonl, sub/e.bin."""
  (tmp_path / "sub").mkdir()
  (tmp_path / "a.txt").write_text("alpha\nfile\n")
  (tmp_path / "sub" / "b.md").write_text("# beta\n")
  (tmp_path / "sub" / "c.py").write_text("x = 1\n")
  (tmp_path / "sub" / "d.jsonl").write_text(
      json.dumps({"text": "delta one", "id": 1}) + "\n\n" + json.dumps({"text": "delta two"}) + "\n")
  (tmp_path / "sub" / "e.bin").write_text("not text")
  return tmp_path


def test_resolve_paths(files):
  t = str(files)
  assert resolve_paths(t) == [f"{t}/a.txt", f"{t}/sub/b.md", f"{t}/sub/c.py", f"{t}/sub/d.jsonl"]
  assert resolve_paths(f"{t}/sub/*.md") == [f"{t}/sub/b.md"]
  assert resolve_paths(f"{t}/sub/c.py, {t}/a.txt") == [f"{t}/sub/c.py", f"{t}/a.txt"]
  with pytest.raises(DataError) as excinfo:
    resolve_paths(f"{t}/a.txt,{t}/nothing*.txt")
  assert_one_line_error(excinfo, f"'{t}/nothing*.txt'", "no files match")


def test_read_documents(files):
  t = str(files)
  assert read_documents(t) == ["alpha\nfile\n", "# beta\n", "x = 1\n", "delta one", "delta two"]
  assert read_documents(f"{t}/sub/d.jsonl", max_bytes=3) == ["delta one"]
  assert read_documents(t, max_bytes=len("alpha\nfile\n") + 1) == ["alpha\nfile\n", "# beta\n"]


def test_read_documents_jsonl_field(tmp_path):
  path = tmp_path / "x.jsonl"
  path.write_text('{"body": "one", "n": 1}\n{"body": "two"}\n')
  assert read_documents(str(path), text_field="body") == ["one", "two"]
  with pytest.raises(DataError) as excinfo:
    read_documents(str(path))
  assert_one_line_error(excinfo, f"{path}:1", "no field 'text'", "fields: body, n")


def test_read_documents_jsonl_errors(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"text": "ok"}\n\n{"text": "broken"\n')
  with pytest.raises(DataError) as excinfo:
    read_documents(str(path))
  assert_one_line_error(excinfo, f"{path}:3", "invalid JSON")
  path.write_text('{"text": "ok"}\n{"text": 5}\n')
  with pytest.raises(DataError) as excinfo:
    read_documents(str(path))
  assert_one_line_error(excinfo, f"{path}:2", "'text'", "int")


def test_read_documents_missing_and_empty(tmp_path):
  with pytest.raises(DataError) as excinfo:
    read_documents(str(tmp_path / "missing.txt"))
  assert_one_line_error(excinfo, "missing.txt", "no files match")
  (tmp_path / "blank.txt").write_text("  \n\n")
  (tmp_path / "blank.jsonl").write_text('{"text": " "}\n')
  with pytest.raises(DataError) as excinfo:
    read_documents(str(tmp_path))
  assert_one_line_error(excinfo, str(tmp_path), "empty", "2 files")


def test_split_documents():
  assert split_documents(["abcdefghij"], 0.1) == (["abcdefghi"], ["j"])
  docs = [f"d{i}" for i in range(10)]
  train, val = split_documents(docs, 0.25)  # every 4th: indices 3, 7
  assert val == ["d3", "d7"] and train == [d for d in docs if d not in val]
  assert split_documents(docs[:2], 0.1) == (["d0"], ["d1"])
  assert split_documents(docs, 0.0) == (docs, [])


def test_builtin_python_stdlib():
  paths = resolve_paths("builtin:python_stdlib")
  assert len(paths) > 100 and paths == sorted(paths)
  assert all(p.endswith(".py") for p in paths)
  for skipped in ("site-packages", "test", "tests", "idlelib", "lib2to3"):
    assert not any(f"{os.sep}{skipped}{os.sep}" in p for p in paths), skipped
  assert any(p.endswith(f"{os.sep}json{os.sep}decoder.py") for p in paths)


# prepare_lm_data.

def data_config(train_path: str, **overrides):
  """The data section of a config, as a plain attribute object."""
  c = dict(train_path=train_path, val_path="", text_field="text", max_bytes=0, val_fraction=0.25,
           tokenizer="sentencepiece", vocab_size=500, spm_model_type="bpe", tokenizer_train_chars=1_000_000,
           seed=0, target_len=0, encoding_errors="strict")
  c.update(overrides)
  return types.SimpleNamespace(**c)


def test_prepare_lm_data(tmp_path, corpus, monkeypatch):
  data_dir, workdir = tmp_path / "data", tmp_path / "run"
  data_dir.mkdir()
  for i, doc in enumerate(corpus):
    (data_dir / f"doc{i}.txt").write_text(doc)
  config = data_config(str(data_dir))
  tok, train, val = prepare_lm_data(config, seq_len=32, workdir=str(workdir))
  assert os.path.isfile(workdir / "tokenizer.model") and tok.vocab_size == 500
  assert train["inputs_BxL"].shape[1] == 32 and train["inputs_BxL"].shape[0] > 3 * val["inputs_BxL"].shape[0] > 0
  assert tok.decode(train["inputs_BxL"][0]) == corpus[0][:len(tok.decode(train["inputs_BxL"][0]))]
  monkeypatch.setattr("data.pipeline.train_tokenizer", None)  # the second call must load, not train
  tok2, train2, val2 = prepare_lm_data(config, seq_len=32, workdir=str(workdir))
  assert tok2.encode(HELD_OUT[0]) == tok.encode(HELD_OUT[0])
  for key in train:
    np.testing.assert_array_equal(train2[key], train[key])
    np.testing.assert_array_equal(val2[key], val[key])
  with pytest.raises(DataError) as excinfo:
    prepare_lm_data(data_config(str(data_dir), vocab_size=400), seq_len=32, workdir=str(workdir))
  assert_one_line_error(excinfo, "vocab_size 500")


def test_prepare_lm_data_char_and_errors(tmp_path):
  path = tmp_path / "tiny.txt"
  path.write_text("to be or not to be, that is the question\n" * 20)
  tok, train, val = prepare_lm_data(data_config(str(path), tokenizer="char", val_fraction=0.1), 16, None)
  assert isinstance(tok, CharTokenizer) and train["inputs_BxL"].shape[1] == 16 and len(val["inputs_BxL"]) > 0
  with pytest.raises(DataError) as excinfo:
    prepare_lm_data(data_config(str(path), tokenizer="char", val_fraction=0.0), 16, None)
  assert_one_line_error(excinfo, "validation split is empty")
  with pytest.raises(DataError) as excinfo:
    prepare_lm_data(data_config(str(path), tokenizer="char", val_fraction=0.01), 16, None)
  assert_one_line_error(excinfo, "validation data", "seq_len+1 = 17")


def test_holdout_partitions_the_records_and_is_reproducible(tmp_path):
  src = tmp_path / "train.jsonl"
  records = [json.dumps({"text": f"sentence {i}", "label": i % 2}) + "\n" for i in range(50)]
  src.write_text("".join(records).rstrip("\n"))  # a last line without its newline is still a record
  holdout(str(src), str(tmp_path / "a"), n=10, seed=3)
  train, held = ((tmp_path / "a" / name).read_text().splitlines(keepends=True) for name in ("train.jsonl",
                                                                                          "holdout.jsonl"))
  assert len(held) == 10 and sorted(train + held) == sorted(records)
  assert train == [r for r in records if r not in held]  # the source's order is kept
  holdout(str(src), str(tmp_path / "b"), n=10, seed=3)
  assert (tmp_path / "b" / "holdout.jsonl").read_text() == "".join(held)
  holdout(str(src), str(tmp_path / "c"), n=10, seed=4)
  assert (tmp_path / "c" / "holdout.jsonl").read_text() != "".join(held)
  holdout(str(src), str(tmp_path / "a"), n=10, seed=3)  # the same split again: nothing to do
  with pytest.raises(DataError, match="another split"):
    holdout(str(src), str(tmp_path / "a"), n=11, seed=3)
  with pytest.raises(DataError, match="--n"):
    holdout(str(src), str(tmp_path / "d"), n=50)
