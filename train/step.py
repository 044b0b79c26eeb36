"""train_step and eval_step, the only jitted functions of training, and token_loss, the loss of every family.

A loss function `loss_fn(params, frozen, batch, rng, deterministic) -> sums` returns sums and
denominators ({"loss_sum", "weight_sum", ...}); the host divides, so metrics of microbatches, devices and
evaluation batches combine exactly. `params` are the trainable leaves, `frozen` the rest (PEFT; {} when
everything trains): gradients and optimizer state exist for `params` only. An auxiliary "z_loss_sum" (PaLM's
z-loss, config.train.z_loss) is added to "loss_sum" where the gradient is taken: "loss_sum" itself, and so every
reported loss, stays the cross entropy. A mixture of experts adds its auxiliary losses the same way ("moe_loss_sum")
and its layers' statistics ("moe"; train/moe.py).
"""

import jax
import jax.numpy as jnp
import optax

from model.families import family
from train import moe
from train.state import TrainState

PENALTIES = ("z_loss_sum", "moe_loss_sum")  # sums added to the cross entropy where the gradient is taken


def weighted_cross_entropy(logits_BxLxV, targets_BxL, weights_BxL):
  """Sum of per-token cross entropy times weight, sum of weights, and weighted count of argmax hits."""
  log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  loss_BxL = log_z_BxL - target_logit_BxL
  correct_BxL = jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL
  return (jnp.sum(loss_BxL * weights_BxL), jnp.sum(weights_BxL),
          jnp.sum(correct_BxL * weights_BxL))


def weighted_z_loss(logits_BxLxV, weights_BxL):
  """Sum of per-token log(Z)^2 times weight, Z the softmax's normaliser (PaLM's z-loss before its coefficient):
  it pulls log Z towards 0, so that the logits cannot drift as a whole while the softmax stays the same."""
  log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  return jnp.sum(jnp.square(log_z_BxL) * weights_BxL)


# Logits a row may hold at once (length x vocabulary, float32): GPT-2's 1024 x 50304 is 4 chunks of 256 positions,
# a small CPU model (256 x 4096) one, i.e. the unchunked loss.
LOGITS_PER_ROW = 2**24


def loss_chunks(length: int, vocab_size: int) -> int:
  """How many pieces of the sequence the loss takes the logits in: the fewest that divide `length` and keep
  each piece's logits within LOGITS_PER_ROW a row."""
  return next(n for n in range(1, length + 1) if length % n == 0 and (length // n) * vocab_size <= LOGITS_PER_ROW
              or n == length)


def token_loss(model, model_params=None, z_loss: float = 0.0):
  """Cross entropy of the model's logits against the batch's targets that its family names: next tokens
  (decoder), masked tokens (encoder) or the decoder's stream (encoder-decoder). `model_params(params, frozen, rng,
  deterministic)` builds the model.apply variables and extra kwargs (default: params alone). `z_loss` > 0 adds
  "z_loss_sum", z_loss times the weighted sum of log(Z)^2 over the same tokens (0: not computed at all). A mixture of
  experts adds "moe" and "moe_loss_sum" (train/moe.loss_terms).

  Where the logits of a whole row would exceed LOGITS_PER_ROW, the final hidden states are taken whole and the
  output head and cross entropy run a piece of the sequence at a time, rematerialised in the backward pass:
  [B, L, V] float32 is never held (nor its gradient), at the cost of the head's forward product once more."""
  targets_key, weights_key = family(model.cfg).targets
  sown = ["moe"] if model.cfg.mlp == "moe" else False

  def apply(variables, *args, **kwargs):
    """model.apply, and the statistics an MoE model sows ({} for others)."""
    out = model.apply(variables, *args, mutable=sown, **kwargs)
    return out if sown else (out, {})

  def token_sums(logits_BxLxV, targets_BxL, weights_BxL):
    sums = weighted_cross_entropy(logits_BxLxV, targets_BxL, weights_BxL)
    return sums + ((z_loss * weighted_z_loss(logits_BxLxV, weights_BxL),) if z_loss else ())

  def loss_fn(params, frozen, batch, rng, deterministic):
    variables, extra = model_params(params, frozen, rng, deterministic) if model_params else ({"params": params}, {})
    targets_BxL, weights_BxL = batch[targets_key], batch[weights_key]
    chunks = loss_chunks(targets_BxL.shape[1], model.cfg.vocab_size)
    if chunks == 1:
      logits_BxLxV, state = apply(variables, batch, deterministic, rngs={"dropout": rng}, method="forward", **extra)
      sums = token_sums(logits_BxLxV, targets_BxL, weights_BxL)
    else:
      hidden_BxLxD, state = apply(variables, batch, deterministic, rngs={"dropout": rng}, method="forward_hidden",
                                  **extra)

      @jax.checkpoint
      def piece(hidden_BxCxD, targets_BxC, weights_BxC):
        logits_BxCxV = model.apply(variables, hidden_BxCxD, method="head")
        return token_sums(logits_BxCxV, targets_BxC, weights_BxC)

      split = lambda x: jnp.moveaxis(x.reshape(x.shape[0], chunks, -1, *x.shape[2:]), 1, 0)  # [N, B, C, ...]
      sums = jax.tree.map(jnp.sum, jax.lax.map(lambda xs: piece(*xs),
                                               (split(hidden_BxLxD), split(targets_BxL), split(weights_BxL))))
    sums = dict(zip(("loss_sum", "weight_sum", "correct_sum", "z_loss_sum"), sums))
    if sown:
      sums.update(moe.loss_terms(model.cfg, state["moe"], sums["weight_sum"]))
    return sums
  return loss_fn


def train_step(state: TrainState, batch, frozen=None, *, loss_fn, tx, grad_accum: int = 1,
               skip_nonfinite: bool = False, rebalance=None):
  """One optimizer step on a global batch [B, ...], split into `grad_accum` microbatches.

  The gradient is that of (sum of losses [+ z-loss terms]) / (sum of weights) over the whole batch, so
  grad_accum=k equals one batch of the same size up to float rounding. metrics["nonfinite"] is 1 when the loss
  or the gradient norm is NaN or infinite; with `skip_nonfinite` that update is not applied (parameters and
  optimizer state, its count included, stay as they were) and the step's sums are zeroed. `rebalance(old params,
  new params, moe sums)` sets what the gradient does not (train/moe.rebalancer: the routers' balancing biases).
  """
  frozen = {} if frozen is None else frozen
  step_rng = jax.random.fold_in(state.rng, state.step)

  def loss_and_grads(batch_part, micro_index):
    def loss_sum(params):
      sums = loss_fn(params, frozen, batch_part, jax.random.fold_in(step_rng, micro_index), False)
      loss = sums["loss_sum"]
      for key in PENALTIES:
        loss = loss + sums[key] if key in sums else loss
      return loss, sums
    return jax.grad(loss_sum, has_aux=True)(state.params)

  if grad_accum == 1:
    grads, sums = loss_and_grads(batch, 0)
  else:
    micro_batches = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

    def accumulate(carry, inputs):
      micro_batch, index = inputs
      return jax.tree.map(jnp.add, carry, loss_and_grads(micro_batch, index)), None

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
        loss_and_grads, jax.tree.map(lambda x: x[0], micro_batches), 0))
    (grads, sums), _ = jax.lax.scan(accumulate, zeros, (micro_batches, jnp.arange(grad_accum)))

  grads = jax.tree.map(lambda g: g / jnp.maximum(sums["weight_sum"], 1.0), grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if rebalance is not None:
    params = rebalance(state.params, params, sums["moe"])
  grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
  finite = jnp.isfinite(sums["loss_sum"]) & jnp.isfinite(grad_norm)
  if skip_nonfinite:
    keep = lambda new, old: jnp.where(finite, new, old)
    params, opt_state = jax.tree.map(keep, (params, opt_state), (state.params, state.opt_state))
    sums = jax.tree.map(lambda x: jnp.where(finite, x, jnp.zeros_like(x)), sums)
  metrics = dict(sums, grad_norm=grad_norm, nonfinite=1.0 - finite.astype(jnp.float32))
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, frozen=None, *, loss_fn):
  """The loss function's sums on one batch, without dropout."""
  return loss_fn(params, {} if frozen is None else frozen, batch, jax.random.PRNGKey(0), True)
