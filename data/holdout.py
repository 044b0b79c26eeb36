"""Hold out records of a JSONL file: a selection split that training never reads (hyperparameters are chosen on it,
so the reported split stays untouched).

  python -m data.holdout SRC.jsonl --out=DIR --n=2000 [--seed=0]

writes DIR/train.jsonl (the other records, in their order) and DIR/holdout.jsonl (n records drawn without
replacement by `seed`, in their order). The split is a pure function of (SRC's bytes, n, seed); DIR/split.json
records them, so a second call with the same arguments does nothing and one with others is refused.
"""

import hashlib
import json
import os

import numpy as np
from absl import app, flags

from data.sources import DataError


def holdout(src: str, out: str, n: int, seed: int = 0) -> dict:
  """Split `src` into out/train.jsonl and out/holdout.jsonl; returns the record of out/split.json."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise DataError(f"--out={out}: a file, not a directory; name a new directory or a split's")
  with open(src, "rb") as f:
    raw = f.read()
  lines = [line for line in raw.splitlines(keepends=True) if line.strip()]
  if not 0 < n < len(lines):
    raise DataError(f"--n: expected 0 < n < {len(lines)} (the records of {src}), got {n}")
  record = {"src": os.path.abspath(src), "sha256": hashlib.sha256(raw).hexdigest(), "records": len(lines),
            "n": n, "seed": seed}
  manifest = os.path.join(out, "split.json")
  if os.path.exists(manifest):
    with open(manifest) as f:
      existing = json.load(f)
    if existing != record:
      raise DataError(f"{manifest}: this directory holds another split ({existing}); choose another --out")
    return record
  held = set(np.random.default_rng(seed).choice(len(lines), size=n, replace=False).tolist())
  os.makedirs(out, exist_ok=True)
  for name, keep in (("train.jsonl", lambda i: i not in held), ("holdout.jsonl", lambda i: i in held)):
    path = os.path.join(out, name)
    with open(path + ".tmp", "wb") as f:
      f.writelines(line if line.endswith(b"\n") else line + b"\n" for i, line in enumerate(lines) if keep(i))
    os.replace(path + ".tmp", path)
  with open(manifest + ".tmp", "w") as f:
    json.dump(record, f, indent=2)
  os.replace(manifest + ".tmp", manifest)  # written last: the split is complete
  return record


def main(argv) -> None:
  if len(argv) != 2:
    raise app.UsageError("expected one source file: python -m data.holdout SRC.jsonl --out=DIR --n=N")
  try:
    record = holdout(argv[1], flags.FLAGS.out, flags.FLAGS.n, flags.FLAGS.seed)
  except (DataError, OSError) as e:
    raise SystemExit(f"error: {e}") from None
  print(f"{flags.FLAGS.out}: {record['records'] - record['n']} training records, {record['n']} held out")


if __name__ == "__main__":
  flags.DEFINE_string("out", None, "output directory", required=True)
  flags.DEFINE_integer("n", None, "records to hold out", required=True)
  flags.DEFINE_integer("seed", 0, "which records")
  app.run(main)
