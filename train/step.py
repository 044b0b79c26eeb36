"""train_step and eval_step: the only jitted functions of training.

Both return sums and denominators (loss_sum, weight_sum, ...); the host divides, so metrics of
microbatches, devices and evaluation batches combine exactly.
"""

import jax
import jax.numpy as jnp
import optax

from train.state import TrainState


def weighted_cross_entropy(logits_BxLxV, targets_BxL, weights_BxL):
  """Sum of per-token cross entropy times weight, sum of weights, and weighted count of argmax hits."""
  log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  loss_BxL = log_z_BxL - target_logit_BxL
  correct_BxL = jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL
  return (jnp.sum(loss_BxL * weights_BxL), jnp.sum(weights_BxL),
          jnp.sum(correct_BxL * weights_BxL))


def _loss_sums(params, batch, model, rng, deterministic):
  logits_BxLxV = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
                             deterministic=deterministic, rngs={"dropout": rng})
  return weighted_cross_entropy(logits_BxLxV, batch["targets"], batch["weights"])


def train_step(state: TrainState, batch, *, model, tx, grad_accum: int = 1):
  """One optimizer step on a global batch [B, L], split into `grad_accum` microbatches.

  The gradient is that of (sum of token losses) / (sum of weights) over the whole batch, so
  grad_accum=k equals one batch of the same size up to float rounding.
  """
  step_rng = jax.random.fold_in(state.rng, state.step)

  def loss_and_grads(batch_part, micro_index):
    def loss_sum(params):
      sums = _loss_sums(params, batch_part, model, jax.random.fold_in(step_rng, micro_index), False)
      return sums[0], sums
    return jax.grad(loss_sum, has_aux=True)(state.params)

  if grad_accum == 1:
    grads, (loss_sum, weight_sum, correct_sum) = loss_and_grads(batch, 0)
  else:
    micro_batches = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

    def accumulate(carry, inputs):
      micro_batch, index = inputs
      grads, sums = loss_and_grads(micro_batch, index)
      return jax.tree.map(jnp.add, carry, (grads, sums)), None

    zeros = (jax.tree.map(jnp.zeros_like, state.params), (0.0, 0.0, 0.0))
    (grads, (loss_sum, weight_sum, correct_sum)), _ = jax.lax.scan(
        accumulate, zeros, (micro_batches, jnp.arange(grad_accum)))

  grads = jax.tree.map(lambda g: g / jnp.maximum(weight_sum, 1.0), grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss_sum": loss_sum, "weight_sum": weight_sum, "correct_sum": correct_sum,
             "grad_norm": jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, *, model):
  """Loss and accuracy sums of one batch without dropout."""
  loss_sum, weight_sum, correct_sum = _loss_sums(params, batch, model, jax.random.PRNGKey(0), True)
  return {"loss_sum": loss_sum, "weight_sum": weight_sum, "correct_sum": correct_sum}
