"""The loader: a deterministic, resumable, per-process stream of fixed-shape batches.

The rows a global step reads are a pure function of (data seed, step, position in the batch): global slot j
(j = step * batch_size + i) is row order(seed, epoch)[j % N] of epoch j // N. So a run resumes exactly from
its position alone, on any number of processes, each of which takes its slice of every global batch.

Offers `InMemoryRows` (a Batch of prepared rows), `Mixture` (several sources in fixed proportions), `as_source`,
`rows_at` and `Loader`. A row source has `num_rows`, `take(rows_N) -> Batch`, `order(seed, epoch, within_N) -> rows_N`
and `identity` (data/prepared.py's PreparedRows is one).
"""

import concurrent.futures

import numpy as np

from data import batch as batch_lib
from data.batch import Batch
from data.prepared import permute
from data.sources import DataError

MIXTURE_BLOCK = 4096  # slots in which a mixture's proportions are met exactly


class InMemoryRows:
  """A Batch of N rows; its epochs are numpy permutations of (seed, epoch)."""

  def __init__(self, rows: Batch):
    self.rows, self.num_rows = rows, batch_lib.num_rows(rows)
    self.identity = f"{self.num_rows} rows"
    self._orders = {}  # (seed, epoch) -> row order, for at most three neighbouring epochs

  def order(self, seed: int, epoch: int, within_N: np.ndarray) -> np.ndarray:
    if (seed, epoch) not in self._orders:
      self._orders = {k: v for k, v in self._orders.items() if k[0] == seed and abs(k[1] - epoch) <= 1}
      self._orders[(seed, epoch)] = np.random.default_rng([seed, epoch]).permutation(self.num_rows)
    return self._orders[(seed, epoch)][within_N]

  def take(self, rows_N: np.ndarray) -> Batch:
    return batch_lib.take(self.rows, rows_N)


def as_source(rows):
  """A row source: a Batch of rows as InMemoryRows, a source as it is."""
  return InMemoryRows(rows) if isinstance(rows, dict) else rows


def rows_at(source, seed: int, slots_N: np.ndarray, shuffle: bool = True) -> Batch:
  """The rows of `source` at global slots: slot j is row order(seed, j // N)[j % N]."""
  epochs_N, within_N = np.divmod(np.asarray(slots_N, np.int64), source.num_rows)
  rows_N = within_N.copy()
  if shuffle:
    for epoch in np.unique(epochs_N):
      rows_N[epochs_N == epoch] = source.order(seed, int(epoch), within_N[epochs_N == epoch])
  return source.take(rows_N)


class Mixture:
  """Rows of several sources in proportions: every block of MIXTURE_BLOCK slots holds round(block * weight) slots
  of each source (largest remainders), placed by a permutation of (seed, block); source k's n-th slot reads its
  n-th row (rows_at with seed + k), so the sources keep their own epochs."""

  def __init__(self, sources: list, weights: list[float], names: list[str]):
    if len(sources) != len(weights) or not sources or min(weights) <= 0:
      raise DataError(f"data mixture: expected positive weights, one per corpus, got {weights}")
    shares = np.asarray(weights, np.float64) / sum(weights)
    counts = np.floor(shares * MIXTURE_BLOCK).astype(np.int64)
    counts[np.argsort(counts - shares * MIXTURE_BLOCK)[:MIXTURE_BLOCK - counts.sum()]] += 1
    self.sources, self.names, self.counts = sources, names, counts
    self.source_of_position = np.repeat(np.arange(len(sources)), counts)  # before the block's permutation
    self.rank_of_position = np.concatenate([np.arange(c) for c in counts])
    self.identity = "mixture " + ", ".join(f"{n}={c}/{MIXTURE_BLOCK} ({s.identity})"
                                           for n, c, s in zip(names, counts, sources))

  def assign(self, seed: int, slots_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source, index within that source's slots) of every global slot."""
    blocks_N, offsets_N = np.divmod(np.asarray(slots_N, np.int64), MIXTURE_BLOCK)
    sources_N, index_N = np.empty_like(blocks_N), np.empty_like(blocks_N)
    for block in np.unique(blocks_N):
      here = blocks_N == block
      position_N = permute(offsets_N[here], MIXTURE_BLOCK, seed, int(block))
      sources_N[here] = self.source_of_position[position_N]
      index_N[here] = block * self.counts[sources_N[here]] + self.rank_of_position[position_N]
    return sources_N, index_N

  def take_slots(self, seed: int, slots_N: np.ndarray) -> Batch:
    sources_N, index_N = self.assign(seed, slots_N)
    parts = [(np.flatnonzero(sources_N == k), rows_at(source, seed + k, index_N[sources_N == k]))
             for k, source in enumerate(self.sources) if (sources_N == k).any()]
    out = {key: np.empty((len(slots_N), *value.shape[1:]), value.dtype) for key, value in parts[0][1].items()}
    for where_N, rows in parts:
      for key, value in rows.items():
        out[key][where_N] = value
    return out


class Loader:
  """Deterministic, resumable iterator of fixed-shape batches from a Batch of rows or a row source.

  `prefetch` > 0 builds that many batches ahead on a thread (each batch is a pure function of its position), so
  the host does not stall the step.
  """

  def __init__(self, rows, batch_size: int, seed: int, shuffle: bool = True, process_index: int = 0,
               process_count: int = 1, prefetch: int = 0):
    self.source = as_source(rows)
    if getattr(self.source, "num_rows", 1) == 0:
      raise DataError("loader: no rows to iterate")
    if batch_size <= 0 or batch_size % process_count:
      raise DataError(f"loader: batch_size {batch_size} should be a positive multiple of "
                      f"the process count {process_count}")
    self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
    self.local_batch_size = batch_size // process_count
    self.local_offset = process_index * self.local_batch_size
    self.position = 0  # global slot of the next batch
    self.prefetch = prefetch
    self._pool = concurrent.futures.ThreadPoolExecutor(1) if prefetch else None
    self._pending = {}  # position -> future of its batch

  def _batch(self, position: int) -> Batch:
    slots_N = position + self.local_offset + np.arange(self.local_batch_size)
    if isinstance(self.source, Mixture):
      return self.source.take_slots(self.seed, slots_N)
    return rows_at(self.source, self.seed, slots_N, self.shuffle)

  def counts(self, start: int, end: int) -> dict[str, int]:
    """Rows of each corpus of a mixture in the global slots [start, end) ({} for one source)."""
    if not isinstance(self.source, Mixture):
      return {}
    sources_N, _ = self.source.assign(self.seed, np.arange(start, end))
    return {name: int(np.sum(sources_N == k)) for k, name in enumerate(self.source.names)}

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    """The next batch, this process' slice: each value [batch_size // process_count, ...]."""
    position = self.position
    self.position += self.batch_size
    if self._pool is None:
      return self._batch(position)
    future = self._pending.pop(position, None) or self._pool.submit(self._batch, position)
    for ahead in range(1, self.prefetch + 1):
      later = position + ahead * self.batch_size
      if later not in self._pending:
        self._pending[later] = self._pool.submit(self._batch, later)
    return future.result()

  def get_state(self) -> dict:
    """JSON-able position: the global slot of the next batch, with what it depends on."""
    return {"position": self.position, "seed": self.seed, "rows": self.source.identity}

  def set_state(self, state: dict) -> None:
    """Continue from a position saved by get_state (same seed and rows); also reads the epoch/index states of
    runs saved before positions."""
    rows = state.get("rows", f"{state.get('num_rows')} rows")
    if state.get("seed") != self.seed or rows != self.source.identity:
      raise DataError(f"data state (seed {state.get('seed')}, {rows}) does not match this loader "
                      f"(seed {self.seed}, {self.source.identity})")
    self.position = int(state["position"]) if "position" in state else \
        int(state["epoch"]) * self.source.num_rows + int(state["index"])
    self._pending = {}
