"""Prepare a corpus once: read config.data's sources, train (or keep) the tokenizer, tokenize every split on all
cores into shards, write the manifest (format: data/prepared.py). Runs then read it with data.prepared=DIR.

  python -m data.prepare --config=configs/wiki_small.py --out=DIR [--workers=N] [--shard_mb=64]
      [--tokenizer_from=DIR] [--config.data.train_path=...]

An interrupted preparation resumes (each shard is written whole, then recorded); a finished DIR is left as it is
and said so; a DIR prepared from other sources or with another tokenizer is refused. Offers `prepare`.
"""

import json
import multiprocessing
import os
import sys

import numpy as np
import tqdm
from absl import app, flags
from ml_collections import config_flags

from data.pipeline import read_splits, tokenizer_for
from data.prepared import FORMAT, MANIFEST, file_sha256, token_dtype
from data.sources import HUGGING_FACE, DataError, resolve_paths
from data.tokenizer import CHAR_FILE, SPM_FILE, load_tokenizer

SETTINGS = ("train_path", "val_path", "val_fraction", "text_field", "max_bytes", "tokenizer", "vocab_size",
            "spm_model_type", "tokenizer_train_chars", "encoding_errors")  # the data keys a corpus depends on
_worker_tokenizer = None


def _files(path_spec: str) -> list[str]:
  """The files a path spec reads: resolve_paths, and every file of a Hugging Face dataset part ("hf:...")."""
  files = []
  for part in (p.strip() for p in path_spec.split(",") if p.strip()):
    if part.startswith(HUGGING_FACE):
      path = part[len(HUGGING_FACE):].partition("@")[0]
      files.extend(sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names) if os.path.isdir(path)
                   else resolve_paths(path))
    else:
      files.extend(resolve_paths(part))
  return files


def _sources(data_config) -> list[dict]:
  """path, bytes and sha256 of every file the corpus is read from."""
  paths = _files(data_config.train_path) + (_files(data_config.val_path) if data_config.val_path else [])
  return [{"path": os.path.abspath(p), "bytes": os.path.getsize(p), "sha256": file_sha256(p)} for p in paths]


def _write_atomic(path: str, data: bytes) -> None:
  with open(path + ".tmp", "wb") as f:
    f.write(data)
  os.replace(path + ".tmp", path)


def _plan(docs: list[str], shard_bytes: int) -> list[tuple[int, int]]:
  """Document ranges [a, b) of about shard_bytes of text each."""
  ranges, start, size = [], 0, 0
  for i, doc in enumerate(docs):
    size += len(doc)
    if size >= shard_bytes:
      ranges.append((start, i + 1))
      start, size = i + 1, 0
  if start < len(docs):
    ranges.append((start, len(docs)))
  return ranges


def _init_worker(directory: str) -> None:
  global _worker_tokenizer
  _worker_tokenizer = load_tokenizer(directory)


def _tokenize(job) -> tuple[str, str, dict]:
  """Writes one shard: the documents' [bos] + ids + [eos] streams and their starts; returns its record."""
  directory, split, name, docs, dtype = job
  tokenizer = _worker_tokenizer
  streams = [[tokenizer.bos_id, *ids, tokenizer.eos_id] for ids in tokenizer.encode_batch(docs)]
  lengths = np.array([len(s) for s in streams], np.int64)
  base = os.path.join(directory, split, name)
  _write_atomic(base + ".bin", np.concatenate([np.asarray(s, dtype) for s in streams]).tobytes())
  _write_atomic(base + ".idx", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64).tobytes())
  record = {"name": name, "tokens": int(lengths.sum()), "documents": len(docs),
            "text_bytes": sum(len(d.encode("utf-8")) for d in docs),
            "sha256": {"bin": file_sha256(base + ".bin"), "idx": file_sha256(base + ".idx")}}
  _write_atomic(base + ".json", json.dumps(record).encode())  # written last: the shard is complete
  return split, name, record


def _done(directory: str, split: str, name: str):
  path = os.path.join(directory, split, name + ".json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def prepare(data_config, out: str, workers: int | None = None, shard_mb: float = 64,
            tokenizer_from: str | None = None) -> dict:
  """Prepares config.data into `out` (or finds it prepared); returns the manifest. `tokenizer_from` (a prepared
  DIR or a run) gives the tokenizer instead of training one: corpora of a mixture share theirs."""
  if not out:
    raise DataError("--out: name the directory of the prepared corpus")
  if os.path.exists(out) and not os.path.isdir(out):
    raise DataError(f"--out={out}: a file, not a directory; name a new directory or a prepared one")
  sources, settings = _sources(data_config), {k: getattr(data_config, k) for k in SETTINGS}
  manifest_path = os.path.join(out, MANIFEST)
  if os.path.exists(manifest_path):
    with open(manifest_path) as f:
      manifest = json.load(f)
    if manifest.get("sources") != sources:
      raise DataError(f"{out}: prepared from other sources (or they changed since: sizes or sha256 differ); prepare "
                      "into a new --out")
    changed = [k for k in SETTINGS if manifest["data"].get(k) != settings[k]]
    if changed:
      raise DataError(f"{out}: prepared with data.{changed[0]}={manifest['data'].get(changed[0])!r}, not "
                      f"{settings[changed[0]]!r}; prepare into a new --out")
    print(f"ablax: {out} is prepared already ({manifest['splits']['train']['tokens']:,} train tokens); nothing to do")
    return manifest
  train_docs, val_docs = read_splits(data_config)  # a data error leaves nothing behind
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    raise DataError(f"--out={out}: cannot create this directory ({e.strerror or e})") from None
  if tokenizer_from and not any(os.path.exists(os.path.join(out, name)) for name in (SPM_FILE, CHAR_FILE)):
    load_tokenizer(tokenizer_from).save(out)
  tokenizer = tokenizer_for(data_config, train_docs, val_docs, out)  # trained once; kept on resume
  tokenizer_file = SPM_FILE if os.path.exists(os.path.join(out, SPM_FILE)) else CHAR_FILE
  dtype = token_dtype(tokenizer.vocab_size)
  jobs, records = [], {}
  for split, docs in (("train", train_docs), ("validation", val_docs)):
    os.makedirs(os.path.join(out, split), exist_ok=True)
    for i, (a, b) in enumerate(_plan(docs, int(shard_mb * 2**20))):
      name = f"{i:05d}"
      record = _done(out, split, name)
      if record is None:
        jobs.append((out, split, name, docs[a:b], dtype))
      else:
        records[(split, name)] = record
  total = sum(len(d.encode("utf-8")) for d in train_docs + val_docs)
  done = sum(r["text_bytes"] for r in records.values())
  if records:
    print(f"ablax: resuming {out}: {len(records)} shards done, {len(jobs)} to go")
  workers = workers or os.cpu_count() or 1
  with tqdm.tqdm(total=total, initial=done, unit="B", unit_scale=True, desc="prepare", dynamic_ncols=True) as bar:
    with multiprocessing.get_context("fork").Pool(workers, _init_worker, (out,)) as pool:
      for split, name, record in pool.imap_unordered(_tokenize, jobs):
        records[(split, name)] = record
        bar.update(record["text_bytes"])
  splits = {}
  for split in ("train", "validation"):
    shards = [records[key] for key in sorted(records) if key[0] == split]
    splits[split] = {"shards": shards, "tokens": sum(s["tokens"] for s in shards),
                     "documents": sum(s["documents"] for s in shards)}
  manifest = {
      "format": FORMAT, "dtype": np.dtype(dtype).name, "sources": sources, "splits": splits,
      "tokenizer": {"file": tokenizer_file, "sha256": file_sha256(os.path.join(out, tokenizer_file)),
                    "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
                    "pad_id": tokenizer.pad_id},
      "data": settings}
  _write_atomic(manifest_path, json.dumps(manifest, indent=2).encode())
  print(f"ablax: prepared {out}: " + ", ".join(f"{s} {v['tokens']:,} tokens in {v['documents']:,} documents"
                                                for s, v in splits.items()))
  return manifest


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  try:
    prepare(f.config.data, f.out, f.workers, f.shard_mb, f.tokenizer_from)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Experiment config file (its data section is prepared).")
  flags.DEFINE_string("out", None, "Directory of the prepared corpus.")
  flags.DEFINE_integer("workers", None, "Tokenizing processes (default: every core).")
  flags.DEFINE_float("shard_mb", 64, "Megabytes of text per shard.")
  flags.DEFINE_string("tokenizer_from", None, "A prepared DIR or a run whose tokenizer to use (mixtures share one).")
  flags.mark_flags_as_required(["config", "out"])
  app.run(main)
