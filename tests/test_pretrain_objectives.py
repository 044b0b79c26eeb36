"""Tests of the pretraining objectives: masked LM rows, span corruption rows, prepare_lm_data per objective."""

import types

import numpy as np
import pytest

from data.pipeline import prepare_lm_data
from data.pretraining import (MASK_TOKEN, masked_lm_rows, reconstruct_span_corruption, sentinel_tokens,
                              span_corruption_rows, special_tokens_for)
from data.sources import DataError

PAD, BOS, EOS, MASK = 0, 1, 2, 3
VOCAB = 1000  # ids 4..999 are ordinary tokens
MLM = dict(bos_id=BOS, eos_id=EOS, mask_id=MASK, special_ids=[PAD, BOS, EOS, MASK], vocab_size=VOCAB)
ROW_KEYS = ("inputs_BxL", "targets_BxL", "positions_BxL", "segment_ids_BxL", "weights_BxL")
SPAN_KEYS = ("inputs_BxL", "positions_BxL", "segment_ids_BxL", "decoder_inputs_BxL", "decoder_targets_BxL",
             "decoder_positions_BxL", "decoder_segment_ids_BxL", "decoder_weights_BxL")


def random_docs(num_tokens: int, low: int, high: int, seed: int = 0) -> list[list[int]]:
  """Documents of 20..400 random ids in [low, high), about num_tokens ids in all."""
  rng = np.random.default_rng(seed)
  docs, total = [], 0
  while total < num_tokens:
    docs.append(rng.integers(low, high, rng.integers(20, 400)).tolist())
    total += len(docs[-1])
  return docs


@pytest.fixture(scope="module")
def mlm_rows():
  """Masked LM rows over ~200k random tokens."""
  return masked_lm_rows(random_docs(200_000, 4, VOCAB), 128, seed=0, **MLM)


# Masked LM.

def test_masked_lm_shares(mlm_rows):
  r = mlm_rows
  assert all(r[k].shape == r["inputs_BxL"].shape and r[k].dtype == (np.float32 if k == "weights_BxL" else np.int32)
             for k in ROW_KEYS)
  special_NxL = np.isin(r["targets_BxL"], [PAD, BOS, EOS, MASK])
  chosen_NxL = r["weights_BxL"] == 1.0
  assert set(np.unique(r["weights_BxL"])) == {0.0, 1.0}
  assert not np.any(chosen_NxL & special_NxL)  # bos / eos never chosen
  share = chosen_NxL.sum() / (~special_NxL).sum()
  assert abs(share - 0.15) < 0.005, share
  # Weights are exactly on chosen positions: everything changed is weighted, nothing else changed.
  changed_NxL = r["inputs_BxL"] != r["targets_BxL"]
  assert not np.any(changed_NxL & ~chosen_NxL)
  masked = np.sum(chosen_NxL & (r["inputs_BxL"] == MASK))
  random = np.sum(chosen_NxL & changed_NxL & (r["inputs_BxL"] != MASK))
  kept = np.sum(chosen_NxL & ~changed_NxL)
  num_chosen = chosen_NxL.sum()
  # A random replacement equals the original with probability 1/996: it then counts as kept.
  coincide = 0.10 / (VOCAB - 4)
  assert abs(masked / num_chosen - 0.80) < 0.015, masked / num_chosen
  assert abs(random / num_chosen - (0.10 - coincide)) < 0.015, random / num_chosen
  assert abs(kept / num_chosen - (0.10 + coincide)) < 0.015, kept / num_chosen
  replaced = r["inputs_BxL"][chosen_NxL & changed_NxL & (r["inputs_BxL"] != MASK)]
  assert replaced.min() >= 4 and replaced.max() < VOCAB and len(np.unique(replaced)) > 0.9 * (VOCAB - 4)


def test_masked_lm_spreads_over_positions(mlm_rows):
  # Chosen positions cover the whole row evenly: first and second halves within a point of each other.
  w_NxL = mlm_rows["weights_BxL"]
  half = w_NxL.shape[1] // 2
  assert abs(w_NxL[:, :half].mean() - w_NxL[:, half:].mean()) < 0.01


def test_masked_lm_deterministic_for_a_seed():
  docs = random_docs(5000, 4, VOCAB)
  a, b = masked_lm_rows(docs, 64, seed=7, **MLM), masked_lm_rows(docs, 64, seed=7, **MLM)
  c = masked_lm_rows(docs, 64, seed=8, **MLM)
  for key in ROW_KEYS:
    np.testing.assert_array_equal(a[key], b[key])
  np.testing.assert_array_equal(a["targets_BxL"], c["targets_BxL"])
  assert not np.array_equal(a["weights_BxL"], c["weights_BxL"]) and not np.array_equal(a["inputs_BxL"], c["inputs_BxL"])


def test_masked_lm_packing_by_hand():
  # Stream: 1 10 11 12 2 | 1 13 2 | 1 14 15 16 17 2 -> 14 tokens, 3 rows of 4 (the last 2 dropped).
  docs = [[10, 11, 12], [13], [14, 15, 16, 17]]
  rows = masked_lm_rows(docs, 4, seed=0, mask_rate=0.0, **MLM)
  np.testing.assert_array_equal(rows["targets_BxL"], [[1, 10, 11, 12], [2, 1, 13, 2], [1, 14, 15, 16]])
  np.testing.assert_array_equal(rows["segment_ids_BxL"], [[1, 1, 1, 1], [1, 2, 2, 2], [1, 1, 1, 1]])
  np.testing.assert_array_equal(rows["positions_BxL"], [[0, 1, 2, 3], [0, 0, 1, 2], [0, 1, 2, 3]])
  np.testing.assert_array_equal(rows["inputs_BxL"], rows["targets_BxL"])
  assert not rows["weights_BxL"].any()
  # mask_rate 1: every non-special token is chosen, and no bos / eos.
  rows = masked_lm_rows(docs, 4, seed=0, mask_rate=1.0, **MLM)
  np.testing.assert_array_equal(rows["weights_BxL"], [[0, 1, 1, 1], [0, 0, 1, 0], [0, 1, 1, 1]])
  np.testing.assert_array_equal(rows["targets_BxL"][:, 0], [1, 2, 1])
  # An id in special_ids (here 11 and 15) is never chosen either.
  rows = masked_lm_rows(docs, 4, seed=0, mask_rate=1.0, **{**MLM, "special_ids": [PAD, MASK, 11, 15]})
  np.testing.assert_array_equal(rows["weights_BxL"], [[0, 1, 0, 1], [0, 0, 1, 0], [0, 1, 0, 1]])
  with pytest.raises(DataError, match="fewer than seq_len = 20"):
    masked_lm_rows(docs, 20, seed=0, **MLM)


def test_masked_lm_whole_words():
  begins_V = np.arange(VOCAB) % 4 == 0  # ids divisible by 4 begin a word: words of ~4 pieces
  docs = random_docs(100_000, 4, VOCAB, seed=1)
  rows = masked_lm_rows(docs, 128, seed=3, whole_word_starts=begins_V, **MLM)
  targets_NxL, chosen_NxL = rows["targets_BxL"], rows["weights_BxL"] == 1.0
  special_NxL = np.isin(targets_NxL, [PAD, BOS, EOS, MASK])
  assert not np.any(chosen_NxL & special_NxL)
  share = chosen_NxL.sum() / (~special_NxL).sum()
  assert abs(share - 0.15) < 0.01, share
  # A piece continuing a word (not a word start, after a non-special piece in the row) shares its choice.
  continues_NxL = ~begins_V[targets_NxL] & ~special_NxL
  continues_NxL[:, 1:] &= ~special_NxL[:, :-1]
  continues_NxL[:, 0] = False
  assert np.array_equal(chosen_NxL[:, 1:][continues_NxL[:, 1:]], chosen_NxL[:, :-1][continues_NxL[:, 1:]])
  assert chosen_NxL[:, 1:][continues_NxL[:, 1:]].any()  # words of several pieces were chosen
  # A function gives the same rows as the array it computes.
  by_function = masked_lm_rows(docs, 128, seed=3, whole_word_starts=lambda i: i % 4 == 0, **MLM)
  for key in ROW_KEYS:
    np.testing.assert_array_equal(by_function[key], rows[key])


# Span corruption.

SENTINELS = list(range(1000, 1100))
SPAN = dict(eos_id=EOS, pad_id=PAD, sentinel_ids=SENTINELS)


def chunks_of(docs, raw_len):
  """The ids + [eos] stream cut into rows of raw_len (tail dropped)."""
  stream = [t for ids in docs for t in ids + [EOS]]
  return [stream[i:i + raw_len] for i in range(0, len(stream) - raw_len + 1, raw_len)]


def test_span_corruption_reconstructs_and_fits():
  docs = random_docs(100_000, 4, 1000, seed=2)
  docs[3] = [EOS] * 5 + docs[3]  # an eos inside a chunk is an ordinary token
  rows = span_corruption_rows(docs, input_len=64, target_len=16, seed=0, **SPAN)
  assert all(rows[k].dtype == (np.float32 if k == "decoder_weights_BxL" else np.int32) for k in SPAN_KEYS)
  assert rows["inputs_BxL"].shape[1] == 64 and rows["decoder_targets_BxL"].shape[1] == 16
  recovered = [reconstruct_span_corruption(i, t, SENTINELS, EOS)
               for i, t in zip(rows["inputs_BxL"], rows["decoder_targets_BxL"])]
  raw_len = len(recovered[0])
  assert recovered == chunks_of(docs, raw_len)
  noise_tokens = num_spans = 0
  for inputs, targets in zip(rows["inputs_BxL"], rows["decoder_targets_BxL"]):
    enc, dec = inputs[inputs != PAD], targets[targets != PAD]
    assert enc[-1] == EOS and dec[-1] == EOS and len(enc) <= 64 and len(dec) <= 16
    sentinels_in = enc[enc >= 1000].tolist()
    assert sentinels_in == SENTINELS[:len(sentinels_in)] == dec[dec >= 1000].tolist()  # in order, both sides
    assert dec[0] == SENTINELS[0]
    noise_tokens += len(dec) - len(sentinels_in) - 1
    num_spans += len(sentinels_in)
  assert abs(noise_tokens / (raw_len * len(recovered)) - 0.15) < 0.02
  assert abs(noise_tokens / num_spans - 3.0) < 0.5
  # The longest chunk that fits: one more token would not fit input_len.
  assert raw_len == 70  # 10 noise tokens in 3 spans: inputs 60 + 3 + 1 = 64, targets 10 + 3 + 1 = 14


def test_span_corruption_t5_lengths():
  # T5's random_spans_helper: 512 encoder tokens take chunks of 568 (85 noise in 28 spans; targets 114).
  docs = random_docs(3000, 4, 1000)
  rows = span_corruption_rows(docs, input_len=512, target_len=114, seed=0, **SPAN)
  assert (rows["segment_ids_BxL"] == 1).all() and (rows["decoder_segment_ids_BxL"] == 1).all()  # 512 and 114 exactly
  assert len(reconstruct_span_corruption(rows["inputs_BxL"][0], rows["decoder_targets_BxL"][0], SENTINELS, EOS)) == 568


def test_span_corruption_spans_are_random():
  rows = span_corruption_rows(random_docs(50_000, 4, 1000, seed=4), input_len=64, target_len=16, seed=0, **SPAN)
  # Sentinel positions in the encoder input differ across rows: 720 draws of 3 spans among 60 kept tokens
  # (C(59, 2) = 1711 layouts) give ~590 distinct layouts; the first sentinel lands anywhere in 1..58.
  sentinel_NxI = rows["inputs_BxL"] >= 1000
  assert len({tuple(np.flatnonzero(s)) for s in sentinel_NxI}) > 0.7 * len(sentinel_NxI)
  assert len(set(sentinel_NxI.argmax(1).tolist())) > 50
  span_lengths = []
  for targets in rows["decoder_targets_BxL"]:
    bounds = np.flatnonzero((targets >= 1000) | (targets == EOS))
    span_lengths += np.diff(bounds[:4] if len(bounds) >= 4 else bounds).tolist()
  assert min(span_lengths) == 1 and max(span_lengths) >= 6  # lengths 1 .. noise - spans + 2 = 9
  again = span_corruption_rows(random_docs(50_000, 4, 1000, seed=4), input_len=64, target_len=16, seed=0,
                               **SPAN)
  other = span_corruption_rows(random_docs(50_000, 4, 1000, seed=4), input_len=64, target_len=16, seed=1,
                               **SPAN)
  for key in SPAN_KEYS:
    np.testing.assert_array_equal(again[key], rows[key])
  assert not np.array_equal(other["inputs_BxL"], rows["inputs_BxL"])


def test_span_corruption_decoder_arrays():
  rows = span_corruption_rows(random_docs(5000, 4, 1000), input_len=32, target_len=12, seed=0, **SPAN)
  targets_NxJ = rows["decoder_targets_BxL"]
  np.testing.assert_array_equal(rows["decoder_inputs_BxL"][:, 0], PAD)
  np.testing.assert_array_equal(rows["decoder_inputs_BxL"][:, 1:], targets_NxJ[:, :-1])
  real_NxJ = targets_NxJ != PAD
  np.testing.assert_array_equal(rows["decoder_weights_BxL"], real_NxJ.astype(np.float32))
  np.testing.assert_array_equal(rows["decoder_segment_ids_BxL"], real_NxJ.astype(np.int32))
  assert not real_NxJ.all()  # 5 noise + 2 sentinels + eos = 8 of 12: padding exists, weighted 0
  np.testing.assert_array_equal(rows["decoder_positions_BxL"], np.where(real_NxJ, np.arange(12), 0))
  real_NxI = rows["inputs_BxL"] != PAD
  np.testing.assert_array_equal(rows["segment_ids_BxL"], real_NxI.astype(np.int32))
  np.testing.assert_array_equal(rows["positions_BxL"], np.where(real_NxI, np.arange(32), 0))


def test_span_corruption_errors():
  docs = random_docs(5000, 4, 1000)
  with pytest.raises(DataError, match="28 noise spans .* only 10 sentinel ids"):
    span_corruption_rows(docs, input_len=512, target_len=114, seed=0, eos_id=EOS, pad_id=PAD,
                         sentinel_ids=SENTINELS[:10])
  with pytest.raises(DataError, match="fewer than one span-corruption chunk of 568"):
    span_corruption_rows([[5] * 100], input_len=512, target_len=114, seed=0, **SPAN)
  with pytest.raises(DataError, match="too short"):
    span_corruption_rows(docs, input_len=2, target_len=2, seed=0, **SPAN)


# prepare_lm_data per objective.

def data_config(train_path: str, **overrides):
  """A char-tokenizer data section, as a plain attribute object."""
  c = dict(train_path=train_path, val_path="", text_field="text", max_bytes=0, val_fraction=0.1,
           tokenizer="char", vocab_size=0, spm_model_type="bpe", tokenizer_train_chars=1_000_000, seed=0,
           target_len=0, encoding_errors="strict")
  c.update(overrides)
  return types.SimpleNamespace(**c)


def test_special_tokens_for():
  assert special_tokens_for("causal_lm") == [] and special_tokens_for("masked_lm") == [MASK_TOKEN]
  assert special_tokens_for("span_corruption") == sentinel_tokens(100)
  assert sentinel_tokens(2) == ["<extra_id_0>", "<extra_id_1>"]
  with pytest.raises(DataError, match="objective 'mlm'"):
    special_tokens_for("mlm")


@pytest.fixture
def corpus_path(tmp_path):
  path = tmp_path / "tiny.txt"
  path.write_text("to be or not to be, that is the question\n" * 40)
  return path


def test_prepare_masked_lm(tmp_path, corpus_path):
  workdir = tmp_path / "run"
  tok, train, val = prepare_lm_data(data_config(str(corpus_path)), 32, str(workdir), "masked_lm")
  mask_id = tok.token_id(MASK_TOKEN)
  assert mask_id == tok.vocab_size - 1 and set(train) == set(ROW_KEYS) and train["inputs_BxL"].shape[1] == 32
  assert (train["inputs_BxL"] == mask_id).any() and train["weights_BxL"].any() and len(val["inputs_BxL"]) > 0
  assert not (train["targets_BxL"] == mask_id).any()
  tok2, train2, _ = prepare_lm_data(data_config(str(corpus_path), seed=5), 32, str(workdir), "masked_lm")
  assert tok2.token_id(MASK_TOKEN) == mask_id  # loaded from the workdir, special token kept
  assert not np.array_equal(train2["weights_BxL"], train["weights_BxL"])  # data.seed changes the masks
  with pytest.raises(DataError, match="lacks the special token '<extra_id_0>'"):
    prepare_lm_data(data_config(str(corpus_path)), 32, str(workdir), "span_corruption")


def test_prepare_span_corruption(corpus_path):
  tok, train, val = prepare_lm_data(data_config(str(corpus_path)), 32, None, "span_corruption")
  sentinel_ids = [tok.token_id(t) for t in sentinel_tokens(100)]
  assert len(set(sentinel_ids)) == 100 and max(sentinel_ids) == tok.vocab_size - 1
  assert set(train) == set(SPAN_KEYS) and len(val["inputs_BxL"]) > 0
  assert train["inputs_BxL"].shape[1] == 32 and train["decoder_targets_BxL"].shape[1] == 8  # 32 / 4 -> 8
  assert np.isin(train["inputs_BxL"], sentinel_ids).any()
  text = "".join(tok.decode(reconstruct_span_corruption(i, t, sentinel_ids, tok.eos_id))
                 for i, t in zip(train["inputs_BxL"][:3], train["decoder_targets_BxL"][:3]))
  assert text in corpus_path.read_text()
  _, train, _ = prepare_lm_data(data_config(str(corpus_path), target_len=12), 32, None, "span_corruption")
  assert train["decoder_targets_BxL"].shape[1] == 12
