"""Data throughput: preparing a corpus (MB of text per second) and the loader over it (tokens per second delivered
as packed, sharded batches), on this host's cores.

  python bench/data.py [--config=configs/wiki_small.py] [--config.data.max_bytes=0] [--seq_len=1024]
      [--batch_size=32] [--batches=200] [--processes=1] [--workers=N] [--json_out=PATH]

The goal (issue "Data at scale"): one host process delivers at least 10x what configs/gpt2_small.py consumes on
one H200 at 45% MFU, about 0.4M tokens/s per GPU, so 4M tokens/s.
"""

import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from data.loader import Loader  # noqa: E402
from data.prepare import prepare  # noqa: E402
from data.prepared import PreparedRows  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/wiki_small.py", "Config whose data section is read.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 1024, "Tokens per row.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Rows per global batch.")
_BATCHES = flags.DEFINE_integer("batches", 200, "Timed batches per run.")
_PROCESSES = flags.DEFINE_integer("processes", 1, "Simulated processes: this one reads 1/processes of each batch.")
_WORKERS = flags.DEFINE_integer("workers", None, "Preparation processes (default: every core).")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Also write the figures to this JSON file.")


def loader_tokens_per_s(rows, prefetch: int) -> float:
  """Median tokens/s of a loader's batches (this process' slice), after 5 untimed ones."""
  loader = Loader(rows, _BATCH.value, seed=0, process_count=_PROCESSES.value, prefetch=prefetch)
  for _ in range(5):
    next(loader)
  times = []
  for _ in range(_BATCHES.value):
    start = time.perf_counter()
    batch = next(loader)
    times.append(time.perf_counter() - start)
  return batch["inputs_BxL"].size / statistics.median(times)


def main(argv):
  del argv
  data_config = _CONFIG.value.data
  with tempfile.TemporaryDirectory() as directory:
    start = time.perf_counter()
    manifest = prepare(data_config, directory, _WORKERS.value)
    prepare_s = time.perf_counter() - start
    text_bytes = sum(s["text_bytes"] for split in manifest["splits"].values() for s in split["shards"])
    tokens = sum(split["tokens"] for split in manifest["splits"].values())
    rows = PreparedRows(directory, "train", _SEQ_LEN.value, manifest)
    figures = {
        "prepare_s": round(prepare_s, 2), "text_mb": round(text_bytes / 1e6, 1), "tokens": tokens,
        "prepare_mb_per_s": round(text_bytes / 1e6 / prepare_s, 2),
        "prepare_tokens_per_s": round(tokens / prepare_s),
        "loader_tokens_per_s": round(loader_tokens_per_s(rows, prefetch=0)),
        "loader_prefetched_tokens_per_s": round(loader_tokens_per_s(rows, prefetch=4)),
        "seq_len": _SEQ_LEN.value, "batch_size": _BATCH.value, "processes": _PROCESSES.value,
        "cores": os.cpu_count()}
  print("preparation (tokenizer training included) and loader throughput")
  for key, value in figures.items():
    print(f"  {key:<32}{value:,}" if isinstance(value, (int, float)) else f"  {key:<32}{value}")
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(figures, f, indent=2)


if __name__ == "__main__":
  app.run(main)
