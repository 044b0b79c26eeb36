"""Log-likelihoods and generations of a trained model on text: what evaluation tasks and the harness adapter ask.

Offers `Scorer` (a model, its parameters and tokenizer): `loglikelihood` (per (context, continuation) text pair: the
continuation's summed log-probability and whether greedy decoding produces it), `loglikelihood_rolling` (a whole
text's, every token from as much context as the window holds) and `generate` (greedy, sampled or beam search, cut at
stop strings); `encode_pair` (lm-evaluation-harness's split of a pair into tokens) and `rolling_windows`.

Scores do not depend on the batch: each request is its own right-padded row (data/batch.py `rows`: padding has
segment id 0, so no token attends to it), and a row's token log-probabilities are summed in float64 on the host.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from data.batch import rows
from data.sources import DataError
from data.tokenizer import Tokenizer
from model.config import ConfigError
from model.decode import Sampling, beam_search, generate
from model.families import family


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str, seq2seq: bool = False
                ) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids) as lm-evaluation-harness's Hugging Face model splits a pair, with the run's
  framing (Tokenizer.frame: ablax's [bos] + text, an imported run's as its Hugging Face tokenizer frames a text).

  An empty context is bos alone. Otherwise the context's trailing whitespace moves to the continuation; a decoder's
  continuation is the ids of the framed context + continuation after the framed context's, an encoder-decoder's is
  the continuation encoded alone (its encoder reads the framed context)."""
  if not context:
    ids = tokenizer.encode(continuation)
    return ([tokenizer.bos_id], ids) if ids[:1] != [tokenizer.bos_id] else (ids[:1], ids[1:])
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  context_ids = tokenizer.frame(tokenizer.encode(context))
  if seq2seq:
    return context_ids, tokenizer.encode(continuation)
  whole = tokenizer.frame(tokenizer.encode(context + continuation))
  # A context of spaces alone frames to nothing in a run that adds no bos: bos stands in, as for an empty one.
  return context_ids or [tokenizer.bos_id], whole[len(context_ids):]


def rolling_windows(num_targets: int, window: int):
  """(begin, end, first_scored) per window over targets [0, num_targets): disjoint scored spans of `window` targets,
  the last one read with a full window of context (lm-evaluation-harness's rolling windows)."""
  scored_end = 0
  while scored_end < num_targets:
    end = min(scored_end + window, num_targets)
    yield max(0, end - window), end, scored_end
    scored_end = end


def _bucket(length: int) -> int:
  """Row length for `length` tokens: a power of two from 16, so a task compiles a few shapes."""
  return max(16, 1 << (max(length, 1) - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("model",))
def _token_scores(params, batch, *, model):
  """log p(target) [B, L] in float32, and whether each target is the most likely token [B, L]."""
  logits_BxLxV = model.apply({"params": params}, batch, method="forward").astype(jnp.float32)
  targets_BxL = batch[family(model.cfg).targets[0]]
  log_probs_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
  target_BxL = jnp.take_along_axis(log_probs_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  return target_BxL, jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL


@dataclasses.dataclass
class Scorer:
  """Scores and generations of `model` with `params`; requests go `batch_size` rows at a time, each cut to the last
  `max_len` tokens (default: the model's max_len). `prefix`: a prefix LM's decoder reads each context (prompt) as
  its bidirectional prefix (train/tasks.py `prompt_as_prefix` of the run). `progress`: a progress bar on stderr."""
  model: object
  params: dict
  tokenizer: Tokenizer
  batch_size: int = 32
  max_len: int | None = None
  prefix: bool = False
  progress: bool = False

  def __post_init__(self):
    fam = family(self.model.cfg)
    if not fam.generates:
      raise ConfigError(f"a {self.model.cfg.family} run predicts no next token, so it has no log-likelihood of a "
                        "continuation or generation; evaluate it with a classification task")
    if self.batch_size <= 0:
      raise ConfigError(f"batch_size {self.batch_size}: expected a positive integer")
    if self.prefix and fam.seq2seq:
      raise ConfigError("prefix: an encoder-decoder reads its context with the encoder")
    self.seq2seq = fam.seq2seq
    self.max_len = self.max_len or self.model.cfg.max_len

  def _batches(self, count: int, unit: str):
    """The first index of each batch of `count` items, counted on a progress bar (stderr) when `progress`."""
    with tqdm.tqdm(total=count, unit=unit, dynamic_ncols=True, mininterval=1.0, disable=not self.progress) as bar:
      for first in range(0, count, self.batch_size):
        yield first
        bar.update(min(self.batch_size, count - first))

  def _decoder_row(self, context: list[int], continuation: list[int]):
    """inputs, targets, weights and prefix length of a decoder row: the continuation's targets weigh 1, the context
    (what is left of it in max_len inputs) is the prefix."""
    if len(continuation) > self.max_len:
      raise DataError(f"a continuation of {len(continuation)} tokens does not fit the window of {self.max_len}")
    stream = (context + continuation)[-(self.max_len + 1):]
    weights = [0.0] * (len(stream) - 1 - len(continuation)) + [1.0] * len(continuation)
    return stream[:-1], stream[1:], weights, (len(stream) - len(continuation)) * self.prefix

  def _score(self, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(sum of log p, all greedy) of each (context ids, continuation ids) request; the order is the requests'."""
    results = [(0.0, True)] * len(requests)
    order = sorted((i for i, (_, cont) in enumerate(requests) if cont),
                   key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
    for first in self._batches(len(order), "requests"):
      chunk = order[first:first + self.batch_size]
      batch = self._batch([requests[i] for i in chunk])
      logp_BxL, greedy_BxL = (np.asarray(x) for x in _token_scores(self.params, batch, model=self.model))
      weights_BxL = batch[family(self.model.cfg).targets[1]]
      for row, i in enumerate(chunk):
        scored = weights_BxL[row] > 0
        results[i] = (float(np.sum(logp_BxL[row][scored].astype(np.float64))), bool(np.all(greedy_BxL[row][scored])))
    return results

  def _batch(self, requests):
    """The rows of `requests`, padded to batch_size rows (empty ones) and a bucketed length."""
    padding = [([], [])] * (self.batch_size - len(requests))
    if self.seq2seq:
      sources = [context[-self.max_len:] for context, _ in requests] + [[]] * len(padding)
      targets = [continuation for _, continuation in requests] + [[]] * len(padding)
      longest = max(map(len, targets))
      if longest > self.max_len:
        raise DataError(f"a continuation of {longest} tokens does not fit the window of {self.max_len}")
      decoder = rows([[self.tokenizer.pad_id] + t[:-1] if t else [] for t in targets], _bucket(longest),
                     targets=targets, weights=[[1.0] * len(t) for t in targets], prefix="decoder_")
      return {**rows(sources, _bucket(max(map(len, sources)))), **decoder}
    inputs, targets, weights, prefixes = zip(*[self._decoder_row(*r) for r in requests],
                                             *[([], [], [], 0)] * len(padding))
    return rows(inputs, _bucket(max(map(len, inputs))), targets=targets, weights=weights,
                prefix_lengths=prefixes if self.prefix else None)

  def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
    """(log p(continuation | context), greedy decoding gives the continuation) of each (context, continuation)."""
    return self._score([encode_pair(self.tokenizer, c, x, self.seq2seq) for c, x in pairs])

  def loglikelihood_rolling(self, texts: list[str]) -> list[float]:
    """log p of each whole text after bos, in windows of max_len (every token once, the last window full). The
    scored tokens are the text's own (ablax's framing) or, in an imported run, the framed text's, as
    lm-evaluation-harness's Hugging Face model scores them (with a Llama-style tokenizer, bos after bos too)."""
    if self.seq2seq:
      raise ConfigError("an encoder_decoder run scores continuations of an input, not whole texts")
    tok = self.tokenizer
    requests, owner = [], []
    for t, ids in enumerate(tok.encode_batch(list(texts))):
      ids = tok.frame(ids) if tok.framing else ids
      stream = [tok.bos_id] + ids
      for begin, end, first in rolling_windows(len(ids), self.max_len):
        requests.append((stream[begin:first + 1], stream[first + 1:end + 1]))
        owner.append(t)
    totals = [0.0] * len(texts)
    for t, (logp, _) in zip(owner, self._score(requests)):
      totals[t] += logp
    return totals

  def generate(self, prompts: list[str], *, max_new_tokens: int, until=(), beam: int = 1,
               length_penalty: float = 1.0, temperature: float = 0.0, seed: int = 0, strip: bool = False) -> list[str]:
    """Continuations of each framed prompt (an encoder-decoder's encoder input), each cut before its first stop string
    (`strip`: after dropping its leading whitespace, so a "\n" stop ends a line, not an empty answer); greedy
    (temperature 0), sampled, or beam search (beam > 1: the best hypothesis, length_penalty as in
    model.decode.beam_search). A learned-position model keeps the prompts' last max_len - max_new_tokens tokens."""
    keep = self.max_len - max_new_tokens if self.model.cfg.position == "learned" else None
    if keep is not None and keep < 1:
      raise ConfigError(f"max_new_tokens {max_new_tokens}: leaves no room for a prompt in max_len {self.max_len}")
    tok = self.tokenizer
    stops = tuple(s for s in until if s)
    text_of = (lambda ids: tok.decode(ids).lstrip()) if strip else tok.decode
    texts = []
    for first in self._batches(len(prompts), "prompts"):
      ids = [tok.encode_prompt(p)[-keep if keep else 0:] for p in prompts[first:first + self.batch_size]]
      if beam > 1:
        new = beam_search(self.model, self.params, ids, beam_size=beam, max_new_tokens=max_new_tokens,
                          eos_id=tok.eos_id, length_penalty=length_penalty, prompt_as_prefix=self.prefix)
      else:
        stop = (lambda row, new: any(s in text_of(new) for s in stops)) if stops else None
        new = generate(self.model, self.params, ids, max_new_tokens=max_new_tokens,
                       sampling=Sampling(temperature=temperature), seed=seed, eos_id=tok.eos_id, should_stop=stop,
                       prompt_as_prefix=self.prefix)
      texts += [text_of(row) for row in new]
    for s in stops:
      texts = [text.split(s)[0] for text in texts]
    return texts
