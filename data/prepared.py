"""A prepared corpus on disk (written by `python -m data.prepare`) and the rows a loader reads from it.

DIR/manifest.json             format, tokenizer (file, sha256, vocabulary, special ids), token dtype, sources
                              (path, bytes, sha256), and per split its shards (tokens, documents, sha256)
DIR/tokenizer.model|.json     the tokenizer every run on this corpus uses
DIR/<split>/<NNNNN>.bin       the split's token stream, shard by shard: [bos] + ids + [eos] per document
DIR/<split>/<NNNNN>.idx       int64 start of each document in the shard, then the shard's length

Offers `MANIFEST`, `FORMAT`, `token_dtype`, `read_manifest`, `permute` (a stateless permutation) and
`PreparedRows` (causal-LM rows of a split, built on demand from memory-mapped shards, each opened and checked
the first time a row needs it). Names carry shapes: N rows, L = seq_len, W = L + 1 tokens a row reads.
"""

import hashlib
import json
import os

import numpy as np

from data.batch import Batch
from data.packing import segments_and_positions
from data.sources import DataError

MANIFEST = "manifest.json"
FORMAT = 1


def token_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def file_sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def read_manifest(directory: str) -> dict:
  """DIR's manifest, checked: its format, and that its tokenizer file is the one it was prepared with."""
  path = os.path.join(directory, MANIFEST)
  try:
    with open(path) as f:
      manifest = json.load(f)
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror or e}); prepare the corpus with python -m data.prepare") \
        from None
  except ValueError as e:
    raise DataError(f"{path}: not a manifest ({e})") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise DataError(f"{path}: format {manifest.get('format') if isinstance(manifest, dict) else '?'}, this ablax "
                    f"reads format {FORMAT}; prepare the corpus again")
  tokenizer = os.path.join(directory, manifest["tokenizer"]["file"])
  if not os.path.isfile(tokenizer) or file_sha256(tokenizer) != manifest["tokenizer"]["sha256"]:
    raise DataError(f"{tokenizer}: missing or changed since the corpus was prepared (sha256 differs); "
                    "prepare it again")
  return manifest


def _round(x, key):
  """A keyed mixing function on uint64 (the round function of `permute`)."""
  x = (x ^ key) * np.uint64(0x9E3779B97F4A7C15)
  x ^= x >> np.uint64(29)
  x *= np.uint64(0xBF58476D1CE4E5B9)
  return x ^ (x >> np.uint64(32))


def permute(index_N: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
  """The image of `index_N` under a bijection of [0, n) that is a pure function of (seed, epoch): a 4-round
  Feistel network over [0, 4^k) >= n, walking the cycle until it lands inside. O(1) memory for any n."""
  half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
  mask = np.uint64((1 << half) - 1)
  keys = np.random.default_rng([seed, epoch, 0x5EED]).integers(0, 2**63, 4, dtype=np.uint64)

  def feistel(x):
    left, right = x >> np.uint64(half), x & mask
    for key in keys:
      left, right = right, left ^ (_round(right, key) & mask)
    return (left << np.uint64(half)) | right

  with np.errstate(over="ignore"):
    x = feistel(np.asarray(index_N, np.uint64))
    outside = x >= n
    while outside.any():
      x[outside] = feistel(x[outside])
      outside = x >= n
  return x.astype(np.int64)


class PreparedRows:
  """Causal-LM rows of `seq_len` from one split of a prepared corpus.

  Row r reads stream[r*L : r*L + L + 1] of the split's stream (the shards in order), as pack_documents does; the
  last row is padded instead of dropped, so every document is read whole once per epoch.
  """

  def __init__(self, directory: str, split: str, seq_len: int, manifest: dict | None = None):
    self.directory, self.split, self.seq_len = directory, split, seq_len
    self.manifest = manifest or read_manifest(directory)
    if split not in self.manifest["splits"]:
      raise DataError(f"{os.path.join(directory, MANIFEST)}: no split '{split}'")
    self.shards = self.manifest["splits"][split]["shards"]
    tokens_S = np.array([shard["tokens"] for shard in self.shards], np.int64)
    self.starts_S = np.concatenate([[0], np.cumsum(tokens_S)])  # first token of each shard, then the total
    self.num_tokens = int(self.starts_S[-1])
    self.num_rows = max(0, -(-(self.num_tokens - 1) // seq_len))
    if self.num_rows == 0:
      raise DataError(f"{directory}/{split}: {self.num_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    self.dtype = np.dtype(self.manifest["dtype"])
    self.pad_id = self.manifest["tokenizer"]["pad_id"]
    content = hashlib.sha256("".join(shard["sha256"]["bin"] for shard in self.shards).encode()).hexdigest()[:12]
    self.identity = f"{self.num_rows} rows of {seq_len} from {split} {content}"  # the same wherever DIR is moved
    self._open = {}  # shard index -> (tokens, document starts)

  def order(self, seed: int, epoch: int, within_N: np.ndarray) -> np.ndarray:
    return permute(within_N, self.num_rows, seed, epoch)

  def _shard(self, s: int):
    """Shard s memory-mapped, its sizes and checksums verified when first opened."""
    if s not in self._open:
      info, base = self.shards[s], os.path.join(self.directory, self.split, self.shards[s]["name"])
      for path, expected in ((base + ".bin", info["tokens"] * self.dtype.itemsize),
                             (base + ".idx", (info["documents"] + 1) * 8)):
        size = os.path.getsize(path) if os.path.exists(path) else None
        if size != expected:
          raise DataError(f"{path}: {size} bytes, the manifest says {expected} (truncated or missing); prepare the "
                          "corpus again")
        if file_sha256(path) != info["sha256"][path.rsplit(".", 1)[1]]:
          raise DataError(f"{path}: corrupt (its sha256 is not the manifest's); prepare the corpus again")
      self._open[s] = (np.memmap(base + ".bin", self.dtype, "r"), np.memmap(base + ".idx", np.int64, "r"))
    return self._open[s]

  def _window(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens [start, end) of the stream and the (global) document of each."""
    tokens, documents = [], []
    for s in range(int(np.searchsorted(self.starts_S, start, "right")) - 1, len(self.shards)):
      if self.starts_S[s] >= end:
        break
      shard_tokens, doc_starts = self._shard(s)
      lo, hi = max(start, self.starts_S[s]) - self.starts_S[s], min(end, self.starts_S[s + 1]) - self.starts_S[s]
      tokens.append(np.asarray(shard_tokens[lo:hi], np.int32))
      documents.append(s * (1 << 40) + np.searchsorted(doc_starts, np.arange(lo, hi), "right"))  # unique per shard
    return np.concatenate(tokens), np.concatenate(documents)

  def take(self, rows_N: np.ndarray) -> Batch:
    """The rows `rows_N` (indices in [0, num_rows)) as a batch [N, seq_len]."""
    n, width = len(rows_N), self.seq_len + 1
    window_NxW = np.full((n, width), self.pad_id, np.int32)
    doc_NxW = np.full((n, width), -1, np.int64)  # -1: padding after the stream's end
    for i, r in enumerate(rows_N):
      start = int(r) * self.seq_len
      tokens, documents = self._window(start, min(start + width, self.num_tokens))
      window_NxW[i, :len(tokens)], doc_NxW[i, :len(documents)] = tokens, documents
    doc_NxL = doc_NxW[:, :-1]
    segment_ids_NxL, positions_NxL = segments_and_positions(doc_NxL)
    real_NxL = doc_NxL >= 0
    return {"inputs_BxL": window_NxW[:, :-1], "targets_BxL": window_NxW[:, 1:],
            "segment_ids_BxL": np.where(real_NxL, segment_ids_NxL, 0).astype(np.int32),
            "positions_BxL": np.where(real_NxL, positions_NxL, 0).astype(np.int32),
            "weights_BxL": (real_NxL & (doc_NxL == doc_NxW[:, 1:])).astype(np.float32)}
