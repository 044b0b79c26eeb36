"""Tests of data/finetuning.py and read_records: instruction rows, classification rows, labels, records."""

import json
import os
import random

import numpy as np
import pytest

from data.finetuning import (classify_rows, encode_labels, instruct_rows, label_vocabulary, render,
                              split_records)
from data.sources import DataError, read_records
from data.tokenizer import CharTokenizer

SST2 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "sst2")
KEYS = ("inputs_BxL", "targets_BxL", "positions_BxL", "segment_ids_BxL", "weights_BxL")


@pytest.fixture(scope="module")
def tok():
  """Char tokenizer: pad 0, bos 1, eos 2, a=3 b=4 c=5 d=6 e=7 f=8 g=9 h=10."""
  return CharTokenizer("abcdefgh")


def assert_one_line_error(excinfo, *parts):
  """The DataError message is one line containing every part."""
  message = str(excinfo.value)
  assert "\n" not in message, message
  for part in parts:
    assert part in message, (part, message)


def assert_rows(rows, expected):
  """Every array of `rows` equals `expected` (a dict of nested lists), with the batch dtypes."""
  assert set(rows) == set(expected)
  for key, want in expected.items():
    dtype = np.float32 if key == "weights_BxL" else np.int32
    assert rows[key].dtype == dtype, key
    np.testing.assert_array_equal(rows[key], np.array(want, dtype), err_msg=key)


# Instruction rows.

PAIRS = [("ab", "c"), ("d", "ef"), ("g", "h")]


def test_instruct_rows_packed_by_hand(tok):
  # Streams: [1 3 4 5 2], [1 6 7 8 2], [1 9 10 2] -> 4 + 4 tokens fill row 0 exactly; the third starts row 1.
  rows = instruct_rows(tok, PAIRS, seq_len=8)
  assert_rows(rows, {
      "inputs_BxL":      [[1, 3, 4, 5, 1, 6, 7, 8], [1, 9, 10, 0, 0, 0, 0, 0]],
      "targets_BxL":     [[3, 4, 5, 2, 6, 7, 8, 2], [9, 10, 2, 0, 0, 0, 0, 0]],
      "weights_BxL":     [[0, 0, 1, 1, 0, 1, 1, 1], [0, 1, 1, 0, 0, 0, 0, 0]],
      "segment_ids_BxL": [[1, 1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 0, 0, 0, 0, 0]],
      "positions_BxL":   [[0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 0, 0, 0, 0, 0]],
  })


def test_instruct_rows_example_never_spans_rows(tok):
  # With seq_len 7 the second example (4 tokens) does not fit after the first (4): it starts a new row,
  # and the third (3 tokens) fits after it.
  rows = instruct_rows(tok, PAIRS, seq_len=7)
  assert_rows(rows, {
      "inputs_BxL":      [[1, 3, 4, 5, 0, 0, 0], [1, 6, 7, 8, 1, 9, 10]],
      "targets_BxL":     [[3, 4, 5, 2, 0, 0, 0], [6, 7, 8, 2, 9, 10, 2]],
      "weights_BxL":     [[0, 0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 1, 1]],
      "segment_ids_BxL": [[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 2, 2, 2]],
      "positions_BxL":   [[0, 1, 2, 3, 0, 0, 0], [0, 1, 2, 3, 0, 1, 2]],
  })


def test_instruct_rows_unpacked_by_hand(tok):
  rows = instruct_rows(tok, PAIRS, seq_len=5, pack=False)
  assert_rows(rows, {
      "inputs_BxL":      [[1, 3, 4, 5, 0], [1, 6, 7, 8, 0], [1, 9, 10, 0, 0]],
      "targets_BxL":     [[3, 4, 5, 2, 0], [6, 7, 8, 2, 0], [9, 10, 2, 0, 0]],
      "weights_BxL":     [[0, 0, 1, 1, 0], [0, 1, 1, 1, 0], [0, 1, 1, 0, 0]],
      "segment_ids_BxL": [[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]],
      "positions_BxL":   [[0, 1, 2, 3, 0], [0, 1, 2, 3, 0], [0, 1, 2, 0, 0]],
  })


def test_instruct_rows_truncation_keeps_the_response(tok):
  # [1 | 3 4 5 6 | 7 8 | 2] is 8 tokens, seq_len + 1 = 5: the prompt loses "abc", keeps "d".
  rows = instruct_rows(tok, [("abcd", "ef")], seq_len=4)
  assert_rows(rows, {"inputs_BxL": [[1, 6, 7, 8]], "targets_BxL": [[6, 7, 8, 2]], "weights_BxL": [[0, 1, 1, 1]],
                     "segment_ids_BxL": [[1, 1, 1, 1]], "positions_BxL": [[0, 1, 2, 3]]})
  # The response alone is too long: bos + the start of the response, no prompt, no eos; all weighted.
  rows = instruct_rows(tok, [("ab", "cdef"), ("a", "b")], seq_len=3, pack=False)
  assert_rows(rows, {"inputs_BxL": [[1, 5, 6], [1, 3, 4]], "targets_BxL": [[5, 6, 7], [3, 4, 2]],
                     "weights_BxL": [[1, 1, 1], [0, 1, 1]], "segment_ids_BxL": [[1, 1, 1], [1, 1, 1]],
                     "positions_BxL": [[0, 1, 2], [0, 1, 2]]})


def segments(rows):
  """(row, inputs, targets, weights, positions) of every segment, in row-major order."""
  found = []
  for r, seg_L in enumerate(rows["segment_ids_BxL"]):
    for s in range(1, seg_L.max() + 1):
      cols = np.flatnonzero(seg_L == s)
      assert np.array_equal(cols, np.arange(cols[0], cols[0] + len(cols))), "a segment is not contiguous"
      found.append((r, *(rows[k][r, cols] for k in ("inputs_BxL", "targets_BxL", "weights_BxL", "positions_BxL"))))
  return found


@pytest.mark.parametrize("pack", [True, False])
def test_instruct_rows_random_examples(tok, pack):
  rng = random.Random(0)
  seq_len = 24
  text = lambda n: "".join(rng.choice("abcdefgh") for _ in range(n))
  pairs = [(text(rng.randint(0, 12)), text(rng.randint(1, 9))) for _ in range(40)]  # all fit in a row
  rows = instruct_rows(tok, pairs, seq_len=seq_len, pack=pack)
  assert all(rows[k].shape == rows["inputs_BxL"].shape for k in KEYS) and rows["inputs_BxL"].shape[1] == seq_len
  found = segments(rows)
  assert len(found) == len(pairs)  # each example is exactly one segment: none spans two rows
  for (prompt, response), (r, inputs, targets, weights, positions) in zip(pairs, found):
    assert tok.decode(inputs) == prompt + response and inputs[0] == tok.bos_id
    assert list(targets) == tok.encode(prompt + response) + [tok.eos_id]
    assert list(weights) == [0.0] * len(prompt) + [1.0] * (len(response) + 1)
    assert list(positions) == list(range(len(prompt) + len(response) + 1))
  # Padding: after the segments of a row, every array is zero.
  pad_NxL = rows["segment_ids_BxL"] == 0
  assert all(np.all(rows[k][pad_NxL] == 0) for k in KEYS)
  assert np.all(np.diff(pad_NxL.astype(int), axis=1) >= 0)  # padding only at the end of a row
  used_N = (~pad_NxL).sum(1)
  if pack:  # greedy: the first example of each row did not fit in the row before
    first_of_row = {r: i for i, (r, *_) in reversed(list(enumerate(found)))}
    for r in range(1, len(used_N)):
      prompt, response = pairs[first_of_row[r]]
      assert used_N[r - 1] + len(prompt) + len(response) + 1 > seq_len
  else:
    assert len(used_N) == len(pairs)


def test_instruct_rows_errors(tok):
  with pytest.raises(DataError) as excinfo:
    instruct_rows(tok, [], seq_len=8)
  assert_one_line_error(excinfo, "no (prompt, response) pairs")


# Classification rows.

def test_classify_rows_by_hand(tok):
  rows = classify_rows(tok, ["ab", "abcdefg", ""], [1, 0, 1], seq_len=5)
  assert_rows(rows, {
      "inputs_BxL":      [[1, 3, 4, 0, 0], [1, 3, 4, 5, 6], [1, 0, 0, 0, 0]],
      "positions_BxL":   [[0, 1, 2, 0, 0], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]],
      "segment_ids_BxL": [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]],
      "weights_BxL":     [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]],
      "labels_B":    [1, 0, 1],
  })
  last_N = rows["segment_ids_BxL"].sum(1) - 1
  np.testing.assert_array_equal(last_N, [2, 4, 0])
  np.testing.assert_array_equal(rows["inputs_BxL"][np.arange(3), last_N], [4, 6, 1])  # "b", "d" (cut), bos
  with pytest.raises(DataError) as excinfo:
    classify_rows(tok, ["ab", "cd"], [1], seq_len=5)
  assert_one_line_error(excinfo, "2 texts", "1 labels")


# Labels, templates, splits.

def test_label_vocabulary_and_encode_labels():
  assert label_vocabulary([10, 9, 2, 9]) == [2, 9, 10]  # numeric, not "10" < "2"
  assert label_vocabulary(["pos", "neg", "pos"]) == ["neg", "pos"]
  np.testing.assert_array_equal(encode_labels([10, 2, 9, 2], [2, 9, 10]), [2, 0, 1, 0])
  assert encode_labels(["pos"], ["neg", "pos"]).dtype == np.int32
  with pytest.raises(DataError) as excinfo:
    encode_labels(["pos", "neutral"], ["neg", "pos"])
  assert_one_line_error(excinfo, "'neutral'", "record 1", "'neg', 'pos'")
  with pytest.raises(DataError) as excinfo:
    label_vocabulary([1, "1"])
  assert_one_line_error(excinfo, "mixed types", "int", "str")


def test_render():
  record = {"question": "2+2?", "answer": 4}
  assert render("Q: {question}\nA:", record) == "Q: 2+2?\nA:"
  assert render("{answer} {{literal}}", record) == "4 {literal}"
  with pytest.raises(DataError) as excinfo:
    render("Q: {query}", record)
  assert_one_line_error(excinfo, "template field 'query' not in record", "fields: question, answer")
  with pytest.raises(DataError) as excinfo:
    render("Q: {}", record)
  assert_one_line_error(excinfo, "template")


def test_split_records():
  records = [{"i": i} for i in range(10)]
  train, val = split_records(records, 0.25)  # every 4th: indices 3, 7
  assert val == [{"i": 3}, {"i": 7}] and train == [r for r in records if r not in val]
  assert split_records(records, 0.0) == (records, [])
  with pytest.raises(DataError):
    split_records(records[:1], 0.1)


# JSONL records.

def write_jsonl(path, lines):
  """Write `lines` (objects are JSON-encoded, strings written as they are) one per line."""
  path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))


def test_read_records(tmp_path):
  write_jsonl(tmp_path / "a.jsonl", [{"idx": 0, "text": "x", "label": 1}, "", {"idx": 1, "text": "y", "label": 0}])
  write_jsonl(tmp_path / "b.jsonl", [{"idx": 2, "text": "z", "label": 1, "extra": [1, 2]}])
  (tmp_path / "SOURCE.md").write_text("# not records\n")
  records = read_records(str(tmp_path), ["text", "label"])
  assert records == [{"idx": 0, "text": "x", "label": 1}, {"idx": 1, "text": "y", "label": 0},
                     {"idx": 2, "text": "z", "label": 1, "extra": [1, 2]}]
  assert read_records(f"{tmp_path}/b.jsonl,{tmp_path}/a.jsonl", ["idx"], max_records=2) == [
      {"idx": 2, "text": "z", "label": 1, "extra": [1, 2]}, {"idx": 0, "text": "x", "label": 1}]
  assert len(read_records(f"{tmp_path}/*.jsonl", [], max_records=1)) == 1


def test_read_records_errors(tmp_path):
  path = tmp_path / "r.jsonl"
  write_jsonl(path, [{"idx": 0, "text": "a", "label": 1}, "", {"idx": 1, "text": "b"}])
  with pytest.raises(DataError) as excinfo:
    read_records(str(path), ["text", "label"])
  assert_one_line_error(excinfo, f"{path}:3: no field 'label' (fields: idx, text)")
  write_jsonl(path, [{"text": "a"}, '{"text": "b",'])
  with pytest.raises(DataError) as excinfo:
    read_records(str(path), ["text"])
  assert_one_line_error(excinfo, f"{path}:2", "invalid JSON")
  write_jsonl(path, ["", "  "])
  with pytest.raises(DataError) as excinfo:
    read_records(str(path), ["text"])
  assert_one_line_error(excinfo, str(path), "no records")
  (tmp_path / "only.txt").write_text("text\n")
  with pytest.raises(DataError) as excinfo:
    read_records(str(tmp_path / "only.txt"), ["text"])
  assert_one_line_error(excinfo, "only.txt", ".jsonl")
  with pytest.raises(DataError) as excinfo:
    read_records(str(tmp_path / "missing.jsonl"), ["text"])
  assert_one_line_error(excinfo, "missing.jsonl", "no files match")


@pytest.mark.skipif(not os.path.isdir(SST2), reason="../shared/data/sst2 not present")
def test_read_records_sst2():
  records = read_records(os.path.join(SST2, "train.jsonl"), ["text", "label"])
  assert len(records) == 67_349
  assert {r["label"] for r in records} == {0, 1}
  assert records[0]["text"] == "hide new secretions from the parental units"
