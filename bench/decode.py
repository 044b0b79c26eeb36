"""Decoding speed: prefill tokens/s and decode tokens/s, with the KV cache and without it.

  python bench/decode.py [--new_tokens=256] [--prompt_len=64] [--batch=1] [--json_out=PATH]

Random weights (speed does not depend on them). "uncached" recomputes a full forward pass over a fixed
[B, prompt_len + new_tokens] buffer for every new token (compiled once, as the cache path is); "cached"
prefills the prompt once, then runs one jitted single-token step per new token. "end_to_end" is
model.decode.generate (sampling and host bookkeeping included), after a compiling call.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from model.config import ModelConfig  # noqa: E402
from model.decode import Sampling, forward_with_cache, generate  # noqa: E402
from model.transformer import Decoder, init_cache  # noqa: E402

_NEW = flags.DEFINE_integer("new_tokens", 256, "Tokens to decode.")
_PROMPT = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens.")
_BATCH = flags.DEFINE_integer("batch", 1, "Rows decoded together.")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Also write the figures to this JSON file.")

CONFIGS = {  # rope, so that any length works
    "small (4L d128, shakespeare_char size)": dict(vocab_size=68, num_layers=4, d_model=128, num_heads=4),
    "medium (6L d384, vocab 4096)": dict(vocab_size=4096, num_layers=6, d_model=384, num_heads=6),
}


def timed(fn):
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def bench(sizes: dict, batch: int, prompt_len: int, new_tokens: int) -> dict:
  cfg = ModelConfig(head_dim=sizes["d_model"] // sizes["num_heads"], num_kv_heads=sizes["num_heads"],
                    mlp_dim=4 * sizes["d_model"], position="rope", max_len=prompt_len + new_tokens, **sizes)
  model = Decoder(cfg)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
  prompt_BxP = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
  positions_BxP = np.broadcast_to(np.arange(prompt_len, dtype=np.int32), (batch, prompt_len))
  ones_BxP = np.ones((batch, prompt_len), np.int32)

  def prefill():
    cache = init_cache(cfg, batch, prompt_len + new_tokens)
    return forward_with_cache(params, prompt_BxP, positions_BxP, ones_BxP, cache, model=model)

  timed(prefill)  # compile
  prefill_s = min(timed(prefill) for _ in range(3))
  _, cache = prefill()
  token_Bx1, ones_Bx1 = prompt_BxP[:, -1:], np.ones((batch, 1), np.int32)

  def decode(cache):
    for t in range(new_tokens):
      _, cache = forward_with_cache(params, token_Bx1, np.full((batch, 1), prompt_len + t, np.int32), ones_Bx1,
                                    cache, model=model)
    return cache

  timed(lambda: forward_with_cache(params, token_Bx1, positions_BxP[:, :1], ones_Bx1, cache, model=model))
  _, cache = prefill()  # the cache is donated to each step: the compile call above consumed the first one
  cached_s = timed(lambda: decode(cache))

  forward = jax.jit(lambda p, tokens_BxL: model.apply({"params": p}, tokens_BxL)[:, -1])
  buffer_BxL = np.zeros((batch, prompt_len + new_tokens), np.int32)
  buffer_BxL[:, :prompt_len] = prompt_BxP
  timed(lambda: forward(params, buffer_BxL))  # compile

  def uncached():
    for _ in range(new_tokens):
      out = forward(params, buffer_BxL)
    return out

  uncached_s = timed(uncached)
  run_generate = lambda: generate(model, params, [list(r) for r in prompt_BxP], max_new_tokens=new_tokens,
                                  sampling=Sampling(temperature=0.0))
  run_generate()  # compile
  end_to_end_s = timed(run_generate)
  tokens = batch * new_tokens
  return {"params_M": sum(x.size for x in jax.tree.leaves(params)) / 1e6,
          "prefill_tokens_per_s": batch * prompt_len / prefill_s,
          "decode_tokens_per_s_cached": tokens / cached_s,
          "decode_tokens_per_s_uncached": tokens / uncached_s,
          "cache_speedup": uncached_s / cached_s,
          "generate_tokens_per_s_end_to_end": tokens / end_to_end_s}


def main(argv):
  del argv
  results = {}
  for name, sizes in CONFIGS.items():
    results[name] = bench(sizes, _BATCH.value, _PROMPT.value, _NEW.value)
    print(f"{name}: batch {_BATCH.value}, prompt {_PROMPT.value}, {_NEW.value} new tokens, "
          f"backend {jax.default_backend()}")
    for key, value in results[name].items():
      print(f"  {key:<36} {value:,.1f}")
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
