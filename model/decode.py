"""Decoding with a key/value cache: greedy, temperature, top-k, top-p, repetition penalty, stop conditions,
and beam search (with a length penalty), for decoder-only and encoder-decoder models.

Prompts of different lengths are left-padded (padding has segment id 0, so it is never attended) and
prefilled in one call; then one jitted step per token, compiled once per batch shape. With `prompt_as_prefix`
(a prefix LM) a decoder-only model's prompt is prefilled as one bidirectional prefix and decoding is causal.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from data.batch import rows
from model.families import family
from model.transformer import init_cache


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen; temperature 0 = greedy."""
  temperature: float = 1.0
  top_k: int = 0                    # keep the k most likely tokens (0 = all)
  top_p: float = 1.0                # keep the smallest set of tokens whose probability reaches p
  repetition_penalty: float = 1.0   # CTRL-style: divide positive / multiply negative logits of seen tokens


def top_p_mask(logits_BxV, top_p: float):
  """True for the tokens of the nucleus: the most likely ones until their probability reaches top_p."""
  probs_BxV = jax.nn.softmax(logits_BxV, axis=-1)
  order_BxV = jnp.argsort(-probs_BxV, axis=-1)
  sorted_BxV = jnp.take_along_axis(probs_BxV, order_BxV, axis=-1)
  mass_before_BxV = jnp.cumsum(sorted_BxV, axis=-1) - sorted_BxV
  keep_sorted_BxV = mass_before_BxV < top_p  # the most likely token is always kept
  rows_Bx1 = jnp.arange(logits_BxV.shape[0])[:, None]
  return jnp.zeros_like(keep_sorted_BxV).at[rows_Bx1, order_BxV].set(keep_sorted_BxV)


def filter_logits(logits_BxV, seen_BxV, sampling: Sampling):
  """Logits with repetition penalty, temperature, top-k and top-p applied (-inf = excluded)."""
  if sampling.repetition_penalty != 1.0:
    penalised_BxV = jnp.where(logits_BxV > 0, logits_BxV / sampling.repetition_penalty,
                              logits_BxV * sampling.repetition_penalty)
    logits_BxV = jnp.where(seen_BxV, penalised_BxV, logits_BxV)
  if sampling.temperature <= 0:
    best_Bx1 = jnp.max(logits_BxV, axis=-1, keepdims=True)
    return jnp.where(logits_BxV == best_Bx1, 0.0, -jnp.inf)
  logits_BxV = logits_BxV / sampling.temperature
  if sampling.top_k > 0:
    kth_Bx1 = jax.lax.top_k(logits_BxV, sampling.top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  if sampling.top_p < 1.0:
    logits_BxV = jnp.where(top_p_mask(logits_BxV, sampling.top_p), logits_BxV, -jnp.inf)
  return logits_BxV


@functools.partial(jax.jit, static_argnames=("sampling",))
def choose(logits_BxV, seen_BxV, rng, row_ids_B, *, sampling: Sampling):
  """Next token per row; each row draws from its own key, so a row's sample does not depend on the batch."""
  filtered_BxV = filter_logits(logits_BxV, seen_BxV, sampling)
  if sampling.temperature <= 0:
    return jnp.argmax(filtered_BxV, axis=-1).astype(jnp.int32)
  keys_B = jax.vmap(lambda row: jax.random.fold_in(rng, row))(row_ids_B)
  return jax.vmap(jax.random.categorical)(keys_B, filtered_BxV).astype(jnp.int32)


def _last_logits(model, params, tokens_BxL, positions_BxL, segment_ids_BxL, cache, context, prefix_BxL=None):
  """Feeds L tokens through the cache (and, for an encoder-decoder, attends `context` = (encoded, segments));
  a decoder-only model attends bidirectionally among the tokens of `prefix_BxL`."""
  if context is None:
    logits_BxLxV, cache = model.apply({"params": params}, tokens_BxL, positions_BxL, segment_ids_BxL, cache=cache,
                                      prefix_BxL=prefix_BxL)
  else:
    encoded_BxSxD, segment_ids_BxS = context
    logits_BxLxV, cache = model.apply({"params": params}, tokens_BxL, encoded_BxSxD, segment_ids_BxS,
                                      positions_BxL, segment_ids_BxL, cache=cache, method="decode")
  return logits_BxLxV[:, -1], cache


@functools.partial(jax.jit, static_argnames=("model", "sampling"), donate_argnames=("seen_BxV", "cache"))
def choose_and_step(params, logits_BxV, seen_BxV, cache, positions_B, rng, row_ids_B, context=None, *, model,
                    sampling):
  """One decoding step in one dispatch: choose the next tokens, then feed them through the cache.

  Returns (next_B, logits after them [B, V], seen tokens [B, V], cache).
  """
  next_B = choose(logits_BxV, seen_BxV, rng, row_ids_B, sampling=sampling)
  seen_BxV = seen_BxV.at[jnp.arange(next_B.shape[0]), next_B].set(True)
  logits_BxV, cache = _last_logits(model, params, next_B[:, None], positions_B[:, None],
                                   jnp.ones_like(next_B)[:, None], cache, context)
  return next_B, logits_BxV, seen_BxV, cache


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def forward_with_cache(params, tokens_BxL, positions_BxL, segment_ids_BxL, cache, context=None, prefix_BxL=None, *,
                       model):
  """Writes L tokens into the cache (those of `prefix_BxL` as one bidirectional prefix); returns the logits after
  the last one [B, V] and the cache."""
  return _last_logits(model, params, tokens_BxL, positions_BxL, segment_ids_BxL, cache, context, prefix_BxL)


@functools.partial(jax.jit, static_argnames=("model",))
def encode(params, inputs_BxS, positions_BxS, segment_ids_BxS, *, model):
  """The encoder's output of an encoder-decoder, and its segment ids: the decoder's context."""
  encoded_BxSxD = model.apply({"params": params}, inputs_BxS, positions_BxS, segment_ids_BxS, method="encode")
  return encoded_BxSxD, segment_ids_BxS


def encoder_context(model, params, prompts: list[list[int]]):
  """(context, decoder prompts): encoder-decoders read the prompts with the encoder and start the
  decoder from token 0 (T5's start token is the pad id); decoder-only models keep their prompts."""
  if not family(model.cfg).seq2seq:
    return None, prompts
  inputs_BxS, positions_BxS, segment_ids_BxS, _, _ = left_pad(prompts)
  return encode(params, inputs_BxS, positions_BxS, segment_ids_BxS, model=model), [[0] for _ in prompts]


def left_pad(prompts: list[list[int]], prefix_lengths=None):
  """Prompts as right-aligned rows: tokens, positions, segment ids, prefix flags [B, P] (0 on padding; 1 on the
  first prefix_lengths[i] tokens of prompt i, none without prefix_lengths) and lengths [B]."""
  lengths_B = np.array([len(p) for p in prompts], np.int32)
  if lengths_B.min() == 0:
    raise ValueError("every prompt needs at least one token (start with bos)")
  prefix_lengths = [0] * len(prompts) if prefix_lengths is None else prefix_lengths
  batch = rows(prompts, int(lengths_B.max()), left=True, prefix_lengths=prefix_lengths)
  return batch["inputs_BxL"], batch["positions_BxL"], batch["segment_ids_BxL"], batch["prefix_BxL"], lengths_B


def _check_prompt_as_prefix(model, prompt_as_prefix: bool):
  if prompt_as_prefix and family(model.cfg).seq2seq:
    raise ValueError("prompt_as_prefix: an encoder-decoder reads its prompt with the encoder")


def generate(model, params, prompts: list[list[int]], *, max_new_tokens: int, sampling: Sampling = Sampling(),
             seed: int = 0, eos_id: int = -1, should_stop=None, on_token=None,
             prompt_as_prefix: bool = False) -> list[list[int]]:
  """New token ids for each prompt (token id lists, usually starting with bos; an encoder-decoder's
  prompts are its encoder inputs). `prompt_as_prefix`: each prompt is a prefix LM's bidirectional prefix.

  A row ends at `eos_id` (not included) or when `should_stop(row, ids)` says so; `on_token(row, ids)` is
  called after every token, for streaming. Decoding stops when every row has ended. A model with learned
  positions sees at most max_len tokens: when its cache is full, the last max_len // 2 tokens of every
  row are prefilled into a fresh cache (nanoGPT crops its context the same way, one token at a time).
  """
  cfg = model.cfg
  _check_prompt_as_prefix(model, prompt_as_prefix)
  context, prompts = encoder_context(model, params, prompts)
  max_context = cfg.max_len if cfg.position == "learned" else None
  histories = [list(p) for p in prompts]
  batch = len(prompts)

  def prefill(context_len, remaining):
    windows = [h[-context_len:] for h in histories]
    # A sliding window keeps as prefix what it keeps of the prompt.
    prefix_lengths = [max(0, len(p) - (len(h) - len(w))) if prompt_as_prefix else 0
                      for p, h, w in zip(prompts, histories, windows)]
    tokens_BxP, positions_BxP, segment_ids_BxP, prefix_BxP, lengths_B = left_pad(windows, prefix_lengths)
    capacity = tokens_BxP.shape[1] + remaining
    capacity = min(capacity, max_context) if max_context else capacity
    cache = init_cache(cfg, batch, capacity)
    logits_BxV, cache = forward_with_cache(params, tokens_BxP, positions_BxP, segment_ids_BxP, cache, context,
                                           prefix_BxP, model=model)
    return logits_BxV, cache, lengths_B, tokens_BxP.shape[1], capacity

  logits_BxV, cache, lengths_B, filled, capacity = prefill(max_context or max(map(len, histories)),
                                                           max_new_tokens)
  seen_np = np.zeros((batch, cfg.vocab_size), bool)
  for row, prompt in enumerate(prompts):
    seen_np[row, prompt] = True
  seen_BxV = jnp.asarray(seen_np)
  rng, row_ids_B = jax.random.PRNGKey(seed), jnp.arange(batch)
  new = [[] for _ in range(batch)]
  done = np.zeros(batch, bool)
  for t in range(max_new_tokens):
    rng_t = jax.random.fold_in(rng, t)
    stepped = filled < capacity and t < max_new_tokens - 1
    if stepped:
      next_B, logits_BxV, seen_BxV, cache = choose_and_step(params, logits_BxV, seen_BxV, cache, lengths_B, rng_t,
                                                            row_ids_B, context, model=model, sampling=sampling)
      lengths_B, filled = lengths_B + 1, filled + 1
    else:  # the last token, or a full window
      next_B = choose(logits_BxV, seen_BxV, rng_t, row_ids_B, sampling=sampling)
      seen_BxV = seen_BxV.at[row_ids_B, next_B].set(True)
    next_B = np.asarray(next_B)
    for row in range(batch):
      histories[row].append(int(next_B[row]))
      if done[row]:
        continue
      if next_B[row] == eos_id:
        done[row] = True
        continue
      new[row].append(int(next_B[row]))
      if on_token:
        on_token(row, new[row])
      if should_stop and should_stop(row, new[row]):
        done[row] = True
    if done.all() or t == max_new_tokens - 1:
      break
    if not stepped:  # only with learned positions: slide the context window
      logits_BxV, cache, lengths_B, filled, capacity = prefill(max_context // 2, max_new_tokens - t - 1)
  return new


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def _reorder_and_step(params, cache, rows_R, tokens_R, positions_R, context=None, *, model):
  """Beam bookkeeping in one dispatch: the cache rows follow their beams, then the chosen tokens go in."""
  cache = jax.tree.map(lambda x: x[rows_R] if x.ndim else x, cache)
  logits_RxV, cache = _last_logits(model, params, tokens_R[:, None], positions_R[:, None],
                                   jnp.ones_like(tokens_R)[:, None], cache, context)
  return jax.nn.log_softmax(logits_RxV, axis=-1), cache


def beam_search(model, params, prompts: list[list[int]], *, beam_size: int, max_new_tokens: int, eos_id: int = -1,
                length_penalty: float = 1.0, prompt_as_prefix: bool = False) -> list[list[int]]:
  """The highest-scoring continuation of each prompt; a hypothesis scores sum(log p) / length**length_penalty.

  Each prompt keeps `beam_size` live beams (R = B * beam_size cache rows); a beam that emits eos is
  finished, and a prompt is done once it has beam_size finished hypotheses. beam_size 1 is greedy decoding.
  `prompt_as_prefix` as in `generate`.
  """
  cfg, k = model.cfg, beam_size
  _check_prompt_as_prefix(model, prompt_as_prefix)
  context, prompts = encoder_context(model, params, prompts)
  batch = len(prompts)
  expanded = [p for p in prompts for _ in range(k)]
  if context is not None:
    context = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), context)
  tokens_RxP, positions_RxP, segment_ids_RxP, prefix_RxP, lengths_R = left_pad(
      expanded, [len(p) if prompt_as_prefix else 0 for p in expanded])
  if cfg.position == "learned" and tokens_RxP.shape[1] + max_new_tokens > cfg.max_len:
    raise ValueError(f"max_new_tokens: prompt plus {max_new_tokens} tokens exceed max_len={cfg.max_len}")
  cache = init_cache(cfg, batch * k, tokens_RxP.shape[1] + max_new_tokens)
  logits_RxV, cache = forward_with_cache(params, tokens_RxP, positions_RxP, segment_ids_RxP, cache, context,
                                         prefix_RxP, model=model)
  logprobs_BxKxV = np.asarray(jax.nn.log_softmax(logits_RxV, axis=-1)).reshape(batch, k, -1)
  scores_BxK = np.full((batch, k), -np.inf)
  scores_BxK[:, 0] = 0.0  # all beams start identical: expand only the first
  beams = [[[] for _ in range(k)] for _ in range(batch)]
  finished = [[] for _ in range(batch)]  # (normalised score, tokens)
  normalise = lambda score, n: score / max(n, 1) ** length_penalty
  for t in range(max_new_tokens):
    vocab = logprobs_BxKxV.shape[-1]
    candidates_BxKV = (scores_BxK[:, :, None] + logprobs_BxKxV).reshape(batch, -1)
    rows_R, tokens_R = np.zeros(batch * k, np.int32), np.zeros(batch * k, np.int32)
    new_scores_BxK, new_beams = np.full((batch, k), -np.inf), [[[] for _ in range(k)] for _ in range(batch)]
    for b in range(batch):
      kept = 0
      for flat in np.argsort(-candidates_BxKV[b], kind="stable")[:2 * k]:
        beam, token = divmod(int(flat), vocab)
        score = candidates_BxKV[b, flat]
        if not np.isfinite(score) or len(finished[b]) >= k:
          break
        if token == eos_id:
          finished[b].append((normalise(score, len(beams[b][beam]) + 1), beams[b][beam]))
          continue
        rows_R[b * k + kept], tokens_R[b * k + kept] = b * k + beam, token
        new_scores_BxK[b, kept], new_beams[b][kept] = score, beams[b][beam] + [token]
        kept += 1
        if kept == k:
          break
    scores_BxK, beams = new_scores_BxK, new_beams
    if all(len(f) >= k for f in finished) or t == max_new_tokens - 1:
      break
    logprobs_RxV, cache = _reorder_and_step(params, cache, rows_R, tokens_R, lengths_R + t, context, model=model)
    logprobs_BxKxV = np.asarray(logprobs_RxV).reshape(batch, k, -1)
  for b in range(batch):
    if len(finished[b]) < k:
      finished[b] += [(normalise(scores_BxK[b, j], len(beams[b][j])), beams[b][j])
                      for j in range(k) if np.isfinite(scores_BxK[b, j])]
  return [max(f, key=lambda item: item[0])[1] for f in finished]


def generate_text(model, params, tokenizer, prompts: list[str], *, max_new_tokens: int,
                  sampling: Sampling = Sampling(), seed: int = 0, stop: tuple = (), stream=None,
                  prompt_as_prefix: bool = False) -> list[str]:
  """Continuations of text prompts; each ends at eos or just before the first stop string.

  Each prompt is read as its run frames a text (`tokenizer.encode_prompt`: [bos] + prompt in ablax's own runs, as
  its Hugging Face tokenizer does in an imported one). `stream`, if given, receives the new text of row 0 piece by
  piece as it is generated (up to its stop string, which is never printed); `prompt_as_prefix`: the framed prompt is
  a prefix LM's bidirectional prefix.
  """
  printed = [0]
  hold = max(map(len, stop), default=1) - 1  # what may start a stop string is printed once it is known not to

  def cut(text):
    for s in stop:
      text = text.split(s)[0]
    return text

  def on_token(row, ids):
    if stream and row == 0:
      text = tokenizer.decode(ids)
      if text.endswith("\ufffd"):  # a character split over byte-level tokens: wait for its last byte
        return
      shown = cut(text)
      end = len(shown) if len(shown) < len(text) else len(text) - hold
      if end > printed[0]:
        stream(text[printed[0]:end])
        printed[0] = end

  def should_stop(row, ids):
    return bool(stop) and any(s in tokenizer.decode(ids) for s in stop)

  ids = generate(model, params, [tokenizer.encode_prompt(p) for p in prompts],
                 max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, eos_id=tokenizer.eos_id,
                 should_stop=should_stop if stop else None, on_token=on_token if stream else None,
                 prompt_as_prefix=prompt_as_prefix)
  texts = [cut(tokenizer.decode(row)) for row in ids]
  if stream and ids:
    stream(texts[0][printed[0]:])
  return texts
