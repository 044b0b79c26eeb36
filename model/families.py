"""The three model families, chosen here once: each one's module, pretraining objectives and use of a batch.

Offers `Family`, `FAMILIES`, `family(cfg)`, `build_model(cfg)` and `init_params(model, rng)`. The modules read a
batch themselves (`forward`: logits for the batch's targets; `features`: the states a classification head
pools), so the losses, the tasks and the decoder ask this table only what differs.
"""

import dataclasses

import flax.linen as nn

from data.batch import rows
from model.config import FAMILIES as FAMILY_NAMES
from model.config import ModelConfig
from model.transformer import Decoder, Encoder, EncoderDecoder


@dataclasses.dataclass(frozen=True)
class Family:
  """What differs between the decoder, the encoder and the encoder-decoder."""
  module: type[nn.Module]
  objectives: tuple[str, ...]  # the pretraining objectives it accepts (data/pretraining.py); the first is its default
  pooling: str                 # what a classification head reads: the last token | the first token | the mean of all
  seq2seq: bool                # an encoder reads inputs_*, a decoder predicts decoder_* (generation: encoder once)
  generates: bool              # predicts next tokens: it samples, and fine-tunes on the lm and instruct tasks

  @property
  def objective(self) -> str:
    """Its default pretraining objective."""
    return self.objectives[0]

  @property
  def targets(self) -> tuple[str, str]:
    """The batch keys of the targets and weights that `forward`'s logits predict."""
    prefix = "decoder_" if self.seq2seq else ""
    return f"{prefix}targets_BxL", f"{prefix}weights_BxL"


FAMILIES = {
    "decoder": Family(Decoder, ("causal_lm", "prefix_lm"), pooling="last", seq2seq=False, generates=True),
    "encoder": Family(Encoder, ("masked_lm",), pooling="first", seq2seq=False, generates=False),
    "encoder_decoder": Family(EncoderDecoder, ("span_corruption",), pooling="mean", seq2seq=True, generates=True),
}
assert tuple(FAMILIES) == FAMILY_NAMES


def family(cfg: ModelConfig) -> Family:
  return FAMILIES[cfg.family]


def build_model(cfg: ModelConfig) -> nn.Module:
  """The module of `cfg.family`."""
  return family(cfg).module(cfg)


def init_params(model: nn.Module, rng, length: int = 1) -> dict:
  """Freshly initialised parameters (boxed with their logical axes) of any family."""
  batch = rows([[0] * length], length)
  if family(model.cfg).seq2seq:
    batch.update(rows([[0] * length], length, prefix="decoder_"))
  return model.init(rng, batch, method="forward")["params"]
