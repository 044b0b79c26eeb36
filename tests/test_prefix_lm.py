"""The prefix LM (T5 section 3.2.3): its mask (by hand and by gradients), cached generation with the prompt as
prefix, pretraining rows, instruction rows with the prompt as prefix, and runs that pretrain and fine-tune one.

Tiny dims (V=41, D=32, 2 layers, H=4, K=8, L=16), as in tests/test_model.py and tests/test_generate.py.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.finetune import common
from data.batch import rows
from data.finetuning import instruct_rows
from data.packing import pack_documents
from data.pipeline import prepare_lm_data
from data.pretraining import prefix_lm_rows, special_tokens_for
from data.tokenizer import CharTokenizer
from model.attention import attention_mask
from model.config import ConfigError, ModelConfig
from model.decode import Sampling, beam_search, forward_with_cache, generate, left_pad
from model.families import FAMILIES
from model.layers import Embed
from model.transformer import Decoder, Encoder, init_cache
from test_train import SEED, load_parts, logged, tiny_config
from train import tasks
from train.finetune import finetune
from train.pretrain import train_and_evaluate

POSITIONS = ["sinusoidal", "learned", "rope", "alibi", "relative", "none"]
B, L, V = 4, 16, 41
GREEDY = Sampling(temperature=0.0)


def tiny(position="rope", num_kv_heads=4, max_len=64, seed=0):
  """A decoder with larger-than-init random weights, so logits are far from uniform and argmax ties cannot occur."""
  cfg = ModelConfig(vocab_size=V, num_layers=2, d_model=32, num_heads=4, num_kv_heads=num_kv_heads, head_dim=8,
                    mlp_dim=64, max_len=max_len, position=position)
  model = Decoder(cfg)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))["params"])
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  return model, jax.tree.unflatten(tree, [jax.random.normal(k, x.shape) * 0.3 for k, x in zip(keys, leaves)])


# ----------------------------------------------------------------------------------------------------------
# 1. The mask
# ----------------------------------------------------------------------------------------------------------

def test_attention_mask_by_hand():
  segments = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 0]])
  prefix = jnp.asarray([[1, 1, 0, 0, 1, 1, 0, 0]])
  expected = np.array([[1, 1, 0, 0, 0, 0, 0, 0],   # prefix: both prefix tokens of its segment
                       [1, 1, 0, 0, 0, 0, 0, 0],
                       [1, 1, 1, 0, 0, 0, 0, 0],   # after the prefix: causal
                       [1, 1, 1, 1, 0, 0, 0, 0],
                       [0, 0, 0, 0, 1, 1, 0, 0],   # segment 2 never sees segment 1
                       [0, 0, 0, 0, 1, 1, 0, 0],
                       [0, 0, 0, 0, 1, 1, 1, 0],
                       [0, 0, 0, 0, 0, 0, 0, 0]], bool)  # padding attends nothing
  np.testing.assert_array_equal(attention_mask(segments, segments, True, 0, prefix, prefix)[0], expected)
  causal = attention_mask(segments, segments, True)[0]
  np.testing.assert_array_equal(attention_mask(segments, segments, True, 0, 0 * prefix, 0 * prefix)[0], causal)
  # Decoding into a cache: the query in slot 7 sees its segment's prefix and every slot up to its own.
  keys = jnp.asarray([[0, 1, 1, 1, 1, 1, 1, 1]])
  key_prefix = jnp.asarray([[0, 1, 1, 1, 0, 0, 0, 0]])
  step = attention_mask(jnp.asarray([[1]]), keys, True, 7, jnp.asarray([[0]]), key_prefix)[0, 0]
  np.testing.assert_array_equal(step, [0, 1, 1, 1, 1, 1, 1, 1])


def prefix_grad_fn(cfg: ModelConfig):
  """(params, tokens, positions, segments, prefix, cotangent_BxLxV) -> d <logits, cotangent> / d input embeddings
  [B, L, D] (a zero delta added to the token embedding's output, as in tests/test_model.py)."""
  @jax.jit
  def grad(params, tokens_BxL, positions_BxL, segment_ids_BxL, prefix_BxL, cotangent_BxLxV):
    def logits_from(delta_BxLxD):
      def add_delta(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, Embed) and context.method_name == "__call__":
          out = out + delta_BxLxD.astype(out.dtype)
        return out
      with nn.intercept_methods(add_delta):
        return Decoder(cfg).apply({"params": params}, tokens_BxL, positions_BxL, segment_ids_BxL,
                                  prefix_BxL=prefix_BxL)
    _, vjp = jax.vjp(logits_from, jnp.zeros(tokens_BxL.shape + (cfg.d_model,), jnp.float32))
    return vjp(cotangent_BxLxV)[0]
  return grad


@pytest.mark.parametrize("position, num_kv_heads", [(p, 4) for p in POSITIONS] + [("rope", 2), ("alibi", 1)])
def test_prefix_attention_by_gradients(position, num_kv_heads):
  model, params = tiny(position, num_kv_heads)
  # One packed row: segment 1 = columns 0..6 with prefix 0..3, segment 2 = 7..12 with prefix 7..9, padding 13..15.
  seg_1, seg_2 = np.arange(0, 7), np.arange(7, 13)
  segments = np.array([1] * 7 + [2] * 6 + [0] * 3)
  positions = np.concatenate([np.arange(7), np.arange(6), np.zeros(3, int)])
  prefix = np.array([1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0])
  # Row b probes query q_b: the cotangent is a random vector on logits[b, q_b] and zero elsewhere.
  queries = [1, 5, 7, 11]
  cotangent_BxLxV = np.zeros((B, L, V), np.float32)
  for b, q in enumerate(queries):
    cotangent_BxLxV[b, q] = np.random.default_rng(b).standard_normal(V)
  tile = lambda x: jnp.asarray(np.tile(x, (B, 1)), jnp.int32)
  tokens = jnp.asarray(np.random.default_rng(9).integers(3, V, (B, L)), jnp.int32)
  grad_BxLxD = prefix_grad_fn(model.cfg)(params, tokens, tile(positions), tile(segments), tile(prefix),
                                        jnp.asarray(cotangent_BxLxV))
  influence_BxL = np.abs(np.asarray(grad_BxLxD)).max(axis=-1)
  seen = {1: seg_1[:4], 5: seg_1[:6], 7: seg_2[:3], 11: seg_2[:5]}  # exactly what each query may read
  for b, q in enumerate(queries):
    assert np.all(influence_BxL[b, seen[q]] > 0.0), (q, influence_BxL[b])
    unseen = np.setdiff1d(np.arange(L), seen[q])
    assert np.all(influence_BxL[b, unseen] == 0.0), (q, influence_BxL[b])
  # Query 1 (prefix) reads the later prefix tokens 2 and 3; no query reads a later non-prefix token (5 -> 6,
  # 11 -> 12) or the other segment: both are in `unseen` above.
  assert influence_BxL[0, 3] > 0.0 and influence_BxL[1, 6] == 0.0


@pytest.mark.parametrize("position", ["rope", "learned", "alibi", "none"])
def test_no_prefix_is_causal_and_a_whole_prefix_is_the_encoder(position):
  model, params = tiny(position)
  tokens = jax.random.randint(jax.random.PRNGKey(3), (B, L), 0, V)
  causal = model.apply({"params": params}, tokens)
  zeros = model.apply({"params": params}, tokens, prefix_BxL=jnp.zeros((B, L), jnp.int32))
  np.testing.assert_array_equal(zeros, causal)  # a causal_lm batch (no prefix) computes exactly what it did
  whole = model.apply({"params": params}, tokens, prefix_BxL=jnp.ones((B, L), jnp.int32))
  encoder = Encoder(model.cfg).apply({"params": params}, tokens)  # the same parameter tree, bidirectional
  np.testing.assert_allclose(whole, encoder, atol=1e-5, rtol=0)
  assert np.abs(np.asarray(whole - causal)).max() > 1e-3


# ----------------------------------------------------------------------------------------------------------
# 2. Cached generation with the prompt as prefix
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("position, num_kv_heads", [(p, 4) for p in POSITIONS] + [("rope", 2), ("alibi", 1)])
def test_cached_prefix_decoding_equals_full_forward(position, num_kv_heads):
  model, params = tiny(position, num_kv_heads)
  tokens_BxL = jax.random.randint(jax.random.PRNGKey(7), (3, 14), 0, V)
  prefix_BxL = jnp.asarray(np.arange(14)[None] < np.array([[6], [3], [1]]), jnp.int32)  # prefixes of 6, 3, 1
  full_BxLxV = jax.jit(model.apply)({"params": params}, tokens_BxL, prefix_BxL=prefix_BxL)
  step = jax.jit(lambda tokens, positions, prefix, cache: model.apply(
      {"params": params}, tokens, positions, cache=cache, prefix_BxL=prefix))
  logits, cache = step(tokens_BxL[:, :6], jnp.broadcast_to(jnp.arange(6), (3, 6)), prefix_BxL[:, :6],
                       init_cache(model.cfg, 3, 20))
  pieces = [logits]
  for t in range(6, 14):
    logits, cache = step(tokens_BxL[:, t:t + 1], jnp.full((3, 1), t), None, cache)
    pieces.append(logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full_BxLxV, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(cache["prefix"][:, :14], prefix_BxL)


def full_forward_prefix_argmax(model, params, prompt, steps, width=32):
  """Greedy decoding without a cache: a full forward pass per token over a [1, width] buffer whose prefix is
  the prompt (later zeros are outside the prefix, so the causal positions do not see them)."""
  tokens, forward = list(prompt), jax.jit(model.apply)
  prefix = np.zeros((1, width), np.int32)
  prefix[0, :len(prompt)] = 1
  for _ in range(steps):
    buffer = np.zeros((1, width), np.int32)
    buffer[0, :len(tokens)] = tokens
    tokens.append(int(jnp.argmax(forward({"params": params}, buffer, prefix_BxL=prefix)[0, len(tokens) - 1])))
  return tokens[len(prompt):]


@pytest.mark.parametrize("position", POSITIONS)
def test_greedy_prefix_generation_equals_full_forward(position):
  model, params = tiny(position)
  prompt = [1, 5, 9, 2, 30, 17]
  expected = full_forward_prefix_argmax(model, params, prompt, 12)
  assert generate(model, params, [prompt], max_new_tokens=12, sampling=GREEDY, prompt_as_prefix=True)[0] == expected
  assert beam_search(model, params, [prompt], beam_size=1, max_new_tokens=12, prompt_as_prefix=True)[0] == expected
  # The prefix matters: the prompt read causally gives other next-token logits after the prefill.
  tokens, positions, segments, prefix, _ = left_pad([prompt], [len(prompt)])
  prefill = lambda flags: forward_with_cache(params, tokens, positions, segments, init_cache(model.cfg, 1, 8), None,
                                             flags, model=model)[0]
  assert np.abs(np.asarray(prefill(prefix) - prefill(0 * prefix))).max() > 1e-3


@pytest.mark.parametrize("position", ["rope", "learned", "alibi"])
def test_batched_prefix_prompts_of_different_lengths_equal_each_alone(position):
  model, params = tiny(position)
  prompts = [[1, 4, 9, 16, 25, 36, 7], [1, 2], [1, 30, 31, 32]]
  batched = generate(model, params, prompts, max_new_tokens=8, sampling=GREEDY, prompt_as_prefix=True)
  alone = [generate(model, params, [p], max_new_tokens=8, sampling=GREEDY, prompt_as_prefix=True)[0]
           for p in prompts]
  assert batched == alone


def test_learned_positions_slide_past_max_len_with_a_prefix():
  model, params = tiny("learned", max_len=16)
  out = generate(model, params, [[1, 5, 6, 7]], max_new_tokens=30, sampling=GREEDY, prompt_as_prefix=True)[0]
  assert len(out) == 30


# ----------------------------------------------------------------------------------------------------------
# 3. Rows
# ----------------------------------------------------------------------------------------------------------

def test_rows_fill_the_prefix_by_hand():
  batch = rows([[5, 6, 7], [8, 9], [3, 4, 5, 6]], 6, row_of=[0, 0, 1], prefix_lengths=[2, 0, 4])
  np.testing.assert_array_equal(batch["prefix_BxL"], [[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
  assert batch["prefix_BxL"].dtype == np.int32
  left = rows([[5, 6, 7], [8]], 4, left=True, prefix_lengths=[3, 1])
  np.testing.assert_array_equal(left["prefix_BxL"], [[0, 1, 1, 1], [0, 0, 0, 1]])
  assert "prefix_BxL" not in rows([[5, 6]], 4)
  with pytest.raises(ValueError, match="prefix of 3"):
    rows([[5, 6]], 4, prefix_lengths=[3])


def test_prefix_lm_rows_by_hand():
  docs = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]
  got = prefix_lm_rows(docs, 6, bos_id=1, eos_id=2, seed=0)
  causal = pack_documents(docs, 6, 1, 2)
  # The packing is causal LM's: stream 1 5 6 7 2 | 1 8 9 10 11 12 2 | 1 13 14 2, rows of 6 overlapping by one.
  for key in ("inputs_BxL", "targets_BxL", "positions_BxL", "segment_ids_BxL"):
    np.testing.assert_array_equal(got[key], causal[key], err_msg=key)
  prefix, weights = got["prefix_BxL"], got["weights_BxL"]
  assert prefix.dtype == np.int32 and weights.dtype == np.float32
  # Each segment's prefix is a run of 1..n tokens from its start.
  for r in range(len(prefix)):
    for s in np.unique(got["segment_ids_BxL"][r]):
      flags = prefix[r, got["segment_ids_BxL"][r] == s]
      p = int(flags.sum())
      assert 1 <= p <= len(flags) and flags[:p].all()
  # Weight 0 where the target is a prefix token of the row (the next input), else the causal weight.
  expected = causal["weights_BxL"].copy()
  for r in range(len(prefix)):
    for j in range(5):
      if prefix[r, j + 1]:
        expected[r, j] = 0.0
  np.testing.assert_array_equal(weights, expected)
  # With this seed: row 0 = [bos 5 6 7 | eos] | [bos], prefixes of 4 and 1; row 1 = 8 9 10 11 12 eos, prefix 1.
  np.testing.assert_array_equal(prefix, [[1, 1, 1, 1, 0, 1], [1, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(weights, [[0, 0, 0, 1, 0, 1], [1, 1, 1, 1, 1, 0]])


def test_prefix_lengths_are_uniform_and_seeded():
  rng = np.random.default_rng(0)
  docs = [rng.integers(3, 100, rng.integers(5, 60)).tolist() for _ in range(400)]
  got = prefix_lm_rows(docs, 32, bos_id=1, eos_id=2, seed=5)
  starts = got["positions_BxL"] == 0
  segment = np.cumsum(starts.ravel()) - 1
  n_S = np.bincount(segment)
  p_S = np.bincount(segment, weights=got["prefix_BxL"].ravel())
  assert p_S.min() >= 1 and np.all(p_S <= n_S)
  # p uniform over 1..n: mean (n + 1) / 2 and variance (n^2 - 1) / 12, so these z-scores have mean 0 and std 1.
  several = n_S > 1
  z_S = (p_S - (n_S + 1) / 2)[several] / np.sqrt((n_S[several] ** 2 - 1) / 12)
  assert several.sum() > 500 and abs(z_S.mean()) < 0.1 and abs(z_S.std() - 1) < 0.1, (z_S.mean(), z_S.std())
  assert np.any(p_S == 1) and np.any(p_S == n_S)
  again = prefix_lm_rows(docs, 32, bos_id=1, eos_id=2, seed=5)
  np.testing.assert_array_equal(again["prefix_BxL"], got["prefix_BxL"])
  other = prefix_lm_rows(docs, 32, bos_id=1, eos_id=2, seed=6)
  assert np.any(other["prefix_BxL"] != got["prefix_BxL"])
  scored = got["weights_BxL"].sum() / pack_documents(docs, 32, 1, 2)["weights_BxL"].sum()
  assert 0.4 < scored < 0.7, scored  # about half of the causal targets are after a prefix


def test_prepare_lm_data_makes_prefix_rows(tmp_path):
  assert special_tokens_for("prefix_lm") == []
  _, train, val = prepare_lm_data(tiny_config(tmp_path).data, 16, None, "prefix_lm")
  for split in (train, val):
    assert set(split) == {"inputs_BxL", "targets_BxL", "positions_BxL", "segment_ids_BxL", "weights_BxL",
                          "prefix_BxL"}
    assert split["prefix_BxL"][:, 0].all()  # every row starts a segment, and every segment with a prefix
  assert np.any(train["prefix_BxL"] != val["prefix_BxL"][:1])  # the splits draw with seeds data.seed and + 1


def test_instruct_rows_with_the_prompt_as_prefix_by_hand():
  tok = CharTokenizer("abcdefgh")  # pad 0, bos 1, eos 2, a=3 ... h=10
  pairs = [("ab", "c"), ("d", "ef"), ("g", "h")]
  plain = instruct_rows(tok, pairs, seq_len=8)
  got = instruct_rows(tok, pairs, seq_len=8, prompt_as_prefix=True)
  # Streams [1 3 4 5 2], [1 6 7 8 2], [1 9 10 2]: the prefix is bos + prompt of each segment.
  np.testing.assert_array_equal(got["prefix_BxL"], [[1, 1, 1, 0, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]])
  assert set(got) == set(plain) | {"prefix_BxL"}
  for key in plain:
    np.testing.assert_array_equal(got[key], plain[key], err_msg=key)
  # The loss starts at the last prefix token, which predicts the first response token.
  np.testing.assert_array_equal(got["weights_BxL"], [[0, 0, 1, 1, 0, 1, 1, 1], [0, 1, 1, 0, 0, 0, 0, 0]])
  one_per_row = instruct_rows(tok, pairs, seq_len=8, pack=False, prompt_as_prefix=True)
  np.testing.assert_array_equal(one_per_row["prefix_BxL"][:, :3], [[1, 1, 1], [1, 1, 0], [1, 1, 0]])


# ----------------------------------------------------------------------------------------------------------
# 4. Runs: pretraining, the objective check, fine-tuning with the prompt as prefix
# ----------------------------------------------------------------------------------------------------------

def test_the_decoder_accepts_prefix_lm_and_keeps_causal_lm_as_default(tmp_path):
  assert FAMILIES["decoder"].objectives == ("causal_lm", "prefix_lm")
  assert FAMILIES["decoder"].objective == "causal_lm"
  config = tiny_config(tmp_path)
  config.objective = "prefix_lm"
  config.model.family = "encoder"
  with pytest.raises(ConfigError, match="config.objective: 'prefix_lm' does not pretrain a encoder.*'masked_lm'"):
    train_and_evaluate(config, str(tmp_path / "run"))


@pytest.fixture(scope="module")
def prefix_base(tmp_path_factory):
  """A prefix_lm pretraining run of the tiny char model (sampling at the end) and its workdir."""
  root = tmp_path_factory.mktemp("prefix_lm")
  config = tiny_config(root, steps=120, eval_every=60, checkpoint_every=120, decay_steps=120, learning_rate=3e-3,
                       warmup_steps=5, num_samples=1, sample_tokens=12, sample_prompt="line 1")
  config.objective = "prefix_lm"
  config.model.position = "rope"
  last = train_and_evaluate(config, str(root / "base"))
  return root, str(root / "base"), last


def test_prefix_lm_pretraining_lowers_the_loss_and_samples(prefix_base):
  _, workdir, last = prefix_base
  losses = list(logged(workdir).values())
  first, final = np.mean(losses[:3]), np.mean(losses[-5:])
  # ABLAX_TEST_SEED 0, 1, 2: 3.76 / 3.77 / 3.78 -> 1.44 / 1.44 / 1.34 (eval 1.31 / 1.29 / 1.27), against 2.26 here.
  assert final < 0.6 * first, (first, final)
  assert np.isfinite(last["eval/loss"]) and last["eval/loss"] < 0.6 * first, last
  with open(f"{workdir}/samples.txt") as f:
    text = f.read()
  assert text.startswith("--- sample 0\nline 1")  # the continuation may be empty: eos is a likely next token


def _jsonl(path, records):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  return str(path)


def test_instruct_fine_tuning_with_the_prompt_as_prefix(prefix_base):
  root, base, _ = prefix_base
  pairs = [{"prompt": f"line {i}: the", "response": f" fox {i % 7}."} for i in range(64)]
  config = common.get_config()
  config.init_from = base
  config.task = "instruct"
  config.data.update(train_path=_jsonl(root / "pairs.jsonl", pairs), val_fraction=0.25, prompt_as_prefix=True)
  config.peft.method = "full"
  config.train.update(steps=30, batch_size=8, seq_len=32, learning_rate=3e-3, warmup_steps=3, eval_every=30,
                      eval_batches=4, checkpoint_every=30, log_every=1, num_samples=0, seed=SEED)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  workdir = str(root / "ft")
  last = finetune(config, workdir)
  losses = list(logged(workdir).values())
  assert np.isfinite(last["eval/loss"]) and np.mean(losses[-5:]) < np.mean(losses[:3]), losses
  loaded_config, model, params, tokenizer, _ = load_parts(workdir)
  assert tasks.prompt_as_prefix(loaded_config)
  # The fine-tuned decoder generates with its prompt as prefix, from the cache as from full forward passes.
  prompt = [tokenizer.bos_id] + tokenizer.encode("line 3: the")
  cached = generate(model, params, [prompt], max_new_tokens=6, sampling=GREEDY, prompt_as_prefix=True)[0]
  assert cached == full_forward_prefix_argmax(model, params, prompt, len(cached))[:len(cached)]


@pytest.mark.parametrize("task, family, message", [
    ("lm", "decoder", "only the instruct task has a prompt"),
    ("classify", "decoder", "only the instruct task has a prompt"),
    ("instruct", "encoder_decoder", "an encoder-decoder reads the prompt with its encoder")])
def test_prompt_as_prefix_errors_name_the_key(tmp_path, task, family, message):
  config = common.get_config()
  config.task, config.model.family = task, family
  config.data.update(train_path=_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "response": "b"}] * 4),
                     prompt_as_prefix=True)
  with pytest.raises(ConfigError, match=f"config.data.prompt_as_prefix: {message}"):
    tasks.build_rows(config, CharTokenizer("ab"))
