"""Prepared corpora (data/prepare.py, data/prepared.py) and the loader over them (data/loader.py): shards decode to
the sources, the manifest catches changes, any number of processes reads the same global batches and every
document once per epoch, resume is exact on another process count, damaged shards are named, mixtures keep
their proportions, and a run trains from a prepared DIR."""

import json
import os
import random
import shutil
import types

import numpy as np
import pytest

from data.loader import MIXTURE_BLOCK, Loader, Mixture
from data.packing import pack_documents
from data.pipeline import read_splits
from data.prepare import prepare
from data.prepared import PreparedRows, permute, read_manifest
from data.sources import DataError, read_documents, read_records
from data.tokenizer import load_tokenizer
from test_train import logged, tiny_config
from train.pretrain import train_and_evaluate

WORDS = "the river city model data café naïve Grüße 東京 🙂 def return\tx = 1".split(" ")


def _corpus(directory, seed: int, files: int = 3, docs: int = 60) -> str:
  rng = random.Random(seed)
  os.makedirs(directory, exist_ok=True)
  for f in range(files):
    with open(os.path.join(directory, f"part-{f}.jsonl"), "w") as out:
      for _ in range(docs):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60)))
        out.write(json.dumps({"text": text}) + "\n")
  return os.path.join(directory, "*.jsonl")


def data_config(train_path: str, **overrides):
  c = {"train_path": train_path, "val_path": "", "val_fraction": 0.2, "text_field": "text", "max_bytes": 0,
       "tokenizer": "char", "vocab_size": 0, "spm_model_type": "bpe", "tokenizer_train_chars": 1_000_000,
       "seed": 0, "target_len": 0, "encoding_errors": "strict"}
  return types.SimpleNamespace(**{**c, **overrides})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """(data config, DIR) of a corpus of 180 documents in shards of about 1 KB, prepared on 2 processes."""
  root = tmp_path_factory.mktemp("prepared")
  config = data_config(_corpus(root / "text", seed=0))
  prepare(config, str(root / "corpus"), workers=2, shard_mb=1 / 1024)
  return config, str(root / "corpus")


def test_shards_decode_to_the_source_documents(prepared):
  config, directory = prepared
  manifest, tokenizer = read_manifest(directory), load_tokenizer(directory)
  for split, docs in zip(("train", "validation"), read_splits(config)):
    assert len(manifest["splits"][split]["shards"]) > 3 and manifest["splits"][split]["documents"] == len(docs)
    decoded = []
    for shard in manifest["splits"][split]["shards"]:
      base = os.path.join(directory, split, shard["name"])
      tokens, starts = np.fromfile(base + ".bin", np.uint16), np.fromfile(base + ".idx", np.int64)
      for a, b in zip(starts[:-1], starts[1:]):
        assert tokens[a] == tokenizer.bos_id and tokens[b - 1] == tokenizer.eos_id
        decoded.append(tokenizer.decode(tokens[a + 1:b - 1]))
    assert decoded == docs


def test_prepared_rows_are_those_of_pack_documents_with_the_tail_kept(prepared):
  config, directory = prepared
  tokenizer, docs = load_tokenizer(directory), read_splits(config)[0]
  packed = pack_documents(tokenizer.encode_batch(docs), 16, tokenizer.bos_id, tokenizer.eos_id)
  rows = PreparedRows(directory, "train", 16)
  n = len(packed["inputs_BxL"])
  assert rows.num_rows in (n, n + 1)
  ours = rows.take(np.arange(rows.num_rows))
  for key, value in packed.items():
    np.testing.assert_array_equal(ours[key][:n], value, err_msg=key)
  if rows.num_rows == n + 1:  # the tail pack_documents drops: padded, weights 0 past the stream
    assert ours["weights_BxL"][-1].sum() < 16 and (ours["segment_ids_BxL"][-1] == 0).any()


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_permute_is_a_bijection_of_the_seed_and_epoch(n):
  orders = [permute(np.arange(n), n, seed, epoch) for seed, epoch in ((0, 0), (0, 1), (1, 0), (0, 0))]
  for order in orders:
    assert sorted(order) == list(range(n))
  assert np.array_equal(orders[0], orders[3]) and (n < 4 or not np.array_equal(orders[0], orders[1]))


class Recording(PreparedRows):
  """PreparedRows that records the rows it is asked for."""
  def __init__(self, *args):
    super().__init__(*args)
    self.taken = []

  def take(self, rows_N):
    self.taken.extend(int(r) for r in rows_N)
    return super().take(rows_N)


def _global_batches(make_source, processes: int, steps: int, batch: int = 8, state=None):
  """The global batches of `steps` steps of `processes` loaders joined, and the rows each process took."""
  sources = [make_source() for _ in range(processes)]
  loaders = [Loader(source, batch, seed=5, process_index=p, process_count=processes, prefetch=p % 2 * 2)
             for p, source in enumerate(sources)]
  for loader in loaders:
    if state:
      loader.set_state(state)
  batches = []
  for _ in range(steps):
    parts = [next(loader) for loader in loaders]
    batches.append({k: np.concatenate([part[k] for part in parts]) for k in parts[0]})
  return batches, sources, loaders[0].get_state()


def test_any_number_of_processes_reads_the_same_batches_and_every_row_once_per_epoch(prepared):
  _, directory = prepared
  make = lambda: Recording(directory, "train", 16)
  num_rows = make().num_rows
  steps = -(-num_rows // 8)
  reference, _, _ = _global_batches(make, 1, steps)
  for processes in (1, 2, 4):
    batches, sources, _ = _global_batches(make, processes, steps)
    for step, (ours, theirs) in enumerate(zip(batches, reference)):
      for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=f"{processes} processes, step {step}, {key}")
    local, row_of_slot = 8 // processes, {}
    for p, source in enumerate(sources):  # process p's i-th row of a step is global slot step * 8 + p * local + i
      for step in range(steps):
        for i, row in enumerate(source.taken[step * local:(step + 1) * local]):
          row_of_slot[step * 8 + p * local + i] = row
    assert sorted(row_of_slot[j] for j in range(num_rows)) == list(range(num_rows)), processes


@pytest.mark.parametrize("before, after", [(1, 2), (4, 1), (2, 4)])
def test_resume_mid_epoch_is_exact_on_another_process_count(prepared, before, after):
  _, directory = prepared
  make = lambda: PreparedRows(directory, "train", 16)
  whole, _, _ = _global_batches(make, 1, 9)
  _, _, state = _global_batches(make, before, 5)
  resumed, _, _ = _global_batches(make, after, 4, state=json.loads(json.dumps(state)))
  for ours, theirs in zip(resumed, whole[5:]):
    np.testing.assert_array_equal(ours["inputs_BxL"], theirs["inputs_BxL"])


def test_the_manifest_catches_a_changed_source_or_tokenizer(tmp_path):
  config = data_config(_corpus(tmp_path / "text", seed=1))
  prepare(config, str(tmp_path / "corpus"), workers=1)
  prepare(config, str(tmp_path / "corpus"), workers=1)  # finished: nothing to do
  with pytest.raises(DataError, match="prepared with data.val_fraction=0.2, not 0.3"):
    prepare(data_config(config.train_path, val_fraction=0.3), str(tmp_path / "corpus"))
  with open(tmp_path / "text" / "part-0.jsonl", "a") as f:
    f.write(json.dumps({"text": "one more"}) + "\n")
  with pytest.raises(DataError, match="prepared from other sources"):
    prepare(config, str(tmp_path / "corpus"))
  with open(tmp_path / "corpus" / "tokenizer.json", "a") as f:
    f.write(" ")
  with pytest.raises(DataError, match="tokenizer.json: missing or changed since the corpus was prepared"):
    read_manifest(str(tmp_path / "corpus"))


@pytest.mark.parametrize("damage, expected", [("truncate", "truncated or missing"), ("flip", "corrupt")])
def test_a_damaged_shard_is_named(prepared, tmp_path, damage, expected):
  _, directory = prepared
  copy = str(tmp_path / "corpus")
  shutil.copytree(directory, copy)
  shard = os.path.join(copy, "train", "00002.bin")
  with open(shard, "r+b") as f:
    if damage == "truncate":
      f.truncate(os.path.getsize(shard) - 2)
    else:
      f.seek(3)
      f.write(b"\xff")
  rows = PreparedRows(copy, "train", 16)
  with pytest.raises(DataError, match=f"{shard}: .*{expected}"):
    rows.take(np.arange(rows.num_rows))


def test_an_interrupted_preparation_resumes(prepared, tmp_path, capsys):
  config, directory = prepared
  copy = str(tmp_path / "corpus")
  shutil.copytree(directory, copy)
  os.remove(os.path.join(copy, "manifest.json"))
  for name in ("00001.json", "00001.bin", "00003.json"):  # a kill: shards 1 and 3 never recorded as done
    os.remove(os.path.join(copy, "train", name))
  capsys.readouterr()
  manifest = prepare(config, copy, workers=2, shard_mb=1 / 1024)
  assert "resuming" in capsys.readouterr().out
  assert manifest["splits"] == read_manifest(directory)["splits"]


def test_a_mixture_keeps_its_proportions(prepared, tmp_path):
  config, directory = prepared
  other = str(tmp_path / "other")
  prepare(data_config(_corpus(tmp_path / "text", seed=2)), other, workers=1, tokenizer_from=directory)
  sources = [PreparedRows(directory, "train", 16), PreparedRows(other, "train", 16)]
  mixture = Mixture(sources, [0.9, 0.1], ["main", "other"])
  loader = Loader(mixture, 32, seed=3)
  counts = loader.counts(0, 500 * 32)
  assert abs(counts["other"] / (500 * 32) - 0.1) < 0.002 and sum(counts.values()) == 500 * 32
  assert loader.counts(0, MIXTURE_BLOCK) == {"main": 3686, "other": 410}  # exact in every block
  batch = next(loader)
  assert batch["inputs_BxL"].shape == (32, 16)


def test_pretraining_reads_a_prepared_corpus_and_resumes_exactly(prepared, tmp_path):
  _, directory = prepared
  def config(steps):
    c = tiny_config(tmp_path, steps=steps, checkpoint_every=3)
    c.data.prepared = directory
    return c
  train_and_evaluate(config(6), str(tmp_path / "whole"))
  train_and_evaluate(config(3), str(tmp_path / "resumed"))
  train_and_evaluate(config(6), str(tmp_path / "resumed"))
  whole = logged(str(tmp_path / "whole"))
  assert logged(str(tmp_path / "resumed")) == whole and sorted(whole) == list(range(1, 7))
  with open(os.path.join(directory, "tokenizer.json")) as a, open(tmp_path / "whole" / "tokenizer.json") as b:
    assert a.read() == b.read()  # the corpus' tokenizer is the run's


def test_hugging_face_datasets_are_a_source(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  datasets = pytest.importorskip("datasets")
  texts = [f"document {i}: " + " ".join(WORDS[:i % 9 + 1]) for i in range(40)]
  splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts[:30], "n": list(range(30))}),
                                 "validation": datasets.Dataset.from_dict({"text": texts[30:], "n": [0] * 10})})
  splits.save_to_disk(str(tmp_path / "saved"))
  splits["train"].to_parquet(str(tmp_path / "train.parquet"))
  assert read_documents(f"hf:{tmp_path / 'saved'}") == texts[:30]
  assert read_documents(f"hf:{tmp_path / 'saved'}@validation") == texts[30:]
  assert read_documents(f"hf:{tmp_path / 'train.parquet'}") == texts[:30]
  assert [r["n"] for r in read_records(f"hf:{tmp_path / 'train.parquet'}", ["text", "n"])] == list(range(30))
  with pytest.raises(DataError, match=r"train.parquet\[0\]: no field 'body' \(fields: text, n\)"):
    read_documents(f"hf:{tmp_path / 'train.parquet'}", text_field="body")
  with pytest.raises(DataError, match="no split 'test'"):
    read_documents(f"hf:{tmp_path / 'saved'}@test")
  config = data_config(f"hf:{tmp_path / 'saved'}", val_path=f"hf:{tmp_path / 'saved'}@validation")
  manifest = prepare(config, str(tmp_path / "corpus"), workers=1)
  assert manifest["splits"]["train"]["documents"] == 30 and manifest["splits"]["validation"]["documents"] == 10
  assert len(manifest["sources"]) > 2  # every file of the saved dataset, checksummed
