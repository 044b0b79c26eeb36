"""Sampling continuations from a trained decoder (full forward pass per token over a sliding window)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def filter_logits(logits_NxV, temperature: float, top_k: int):
  """Scales by temperature and keeps the top_k logits (others -inf); temperature 0 -> one-hot argmax."""
  if temperature <= 0:
    return jnp.where(logits_NxV == jnp.max(logits_NxV, axis=-1, keepdims=True), 0.0, -jnp.inf)
  logits_NxV = logits_NxV / temperature
  if top_k > 0:
    kth_N = jax.lax.top_k(logits_NxV, top_k)[0][:, -1:]
    logits_NxV = jnp.where(logits_NxV < kth_N, -jnp.inf, logits_NxV)
  return logits_NxV


@functools.partial(jax.jit, static_argnames=("model", "temperature", "top_k"))
def _next_tokens(params, window_NxW, index, rng, *, model, temperature, top_k):
  logits_NxWxV = model.apply({"params": params}, window_NxW)
  logits_NxV = jax.lax.dynamic_index_in_dim(logits_NxWxV, index, axis=1, keepdims=False)
  return jax.random.categorical(rng, filter_logits(logits_NxV, temperature, top_k), axis=-1)


def sample(model, params, prompt_ids, *, num_samples: int, max_new_tokens: int, window: int,
           temperature: float = 1.0, top_k: int = 0, seed: int = 0, stop_id: int = -1):
  """Returns `num_samples` lists of new token ids continuing `prompt_ids` (which should start with bos).

  Each step runs the model over the last `window` tokens; causality makes the logits at the
  last filled position independent of the zero padding after it, so one compiled shape serves all steps.
  """
  tokens = [list(prompt_ids)[-window:] for _ in range(num_samples)]
  new = [[] for _ in range(num_samples)]
  rng = jax.random.PRNGKey(seed)
  for t in range(max_new_tokens):
    filled = min(len(tokens[0]), window)
    window_NxW = np.zeros((num_samples, window), np.int32)
    window_NxW[:, :filled] = np.asarray([row[-filled:] for row in tokens])
    next_N = np.asarray(_next_tokens(params, window_NxW, filled - 1, jax.random.fold_in(rng, t),
                                     model=model, temperature=temperature, top_k=top_k))
    for row, seq, token in zip(tokens, new, next_N.tolist()):
      row.append(token)
      seq.append(token)
  if stop_id >= 0:
    new = [seq[:seq.index(stop_id)] if stop_id in seq else seq for seq in new]
  return new
