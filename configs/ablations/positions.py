"""Positional encodings and length extrapolation (Press et al., ALiBi, 2022).

Char-level tinyshakespeare (nanoGPT's CPU model: 4 layers, d_model 128, 4 heads) trained at length 64
with each positional scheme, then perplexity on the held-out 10% at 64, 128, 256 and 512 tokens
(disjoint windows). The learned table has 512 rows so that longer windows run; rows past 63 are never
trained.

  python -m ablate --config=configs/ablations/positions.py --workdir=runs/ablate_positions
"""

from configs.ablations import heads


def get_config():
  c = heads.get_config()  # the same experiment: char tinyshakespeare, nanoGPT's CPU model, 600 steps
  c.overrides = ("train.steps=600", "train.eval_every=200", "train.checkpoint_every=600", "train.eval_batches=10",
                 "train.num_samples=0", "model.max_len=512")
  c.grid = {}
  c.baseline = ""  # the first variant, sinusoidal (heads.py's baseline names one of its own variants)
  c.variants = tuple((name, (f"model.position={name}",)) for name in ("sinusoidal", "learned", "rope", "alibi", "none"))
  c.eval_lengths = (64, 128, 256, 512)
  c.metrics = ("perplexity@64", "perplexity@128", "perplexity@256", "perplexity@512", "eval/loss")
  # The paper's two claims: quality at the training length and at 8x it (Holm over 4 variants x 2 metrics).
  c.primary = ("perplexity@64", "perplexity@512")
  c.min_effect = {"perplexity@64": 0.1}  # "no difference" at the training length means within ±0.1 perplexity
  c.seeds = tuple(range(6))  # power calculation in docs/ablations.md section 1
  return c
