"""ROUGE, exact match and token F1 against hand computations."""

import pytest

from train import scores


def test_rouge_n_by_hand():
  # prediction: the cat sat on the mat; reference: the cat is on the mat
  # unigrams: the x2, cat, on, mat overlap = 5 of 6 and 6 -> F = 5/6
  assert scores.rouge_n("The cat sat on the mat.", "the cat is on the mat", 1) == pytest.approx(5 / 6)
  # bigrams: (the cat), (on the), (the mat) overlap 3 of 5 and 5 -> 3/5
  assert scores.rouge_n("The cat sat on the mat.", "the cat is on the mat", 2) == pytest.approx(3 / 5)
  assert scores.rouge_n("a b", "c d", 1) == 0.0


def test_rouge_l_by_hand():
  # LCS of "a b c d e" and "a c e f": a c e = 3 -> P 3/5, R 3/4, F = 2*(3/5)(3/4)/(3/5+3/4) = 2/3
  assert scores.lcs_length(list("abcde"), list("acef")) == 3
  assert scores.rouge_l("a b c d e", "a c e f") == pytest.approx(2 / 3)
  assert scores.rouge_l("x y", "x y") == 1.0


def test_exact_match_and_token_f1_by_hand():
  assert scores.exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
  assert scores.exact_match("Eiffel", "eiffel tower") == 0.0
  # "paris france" vs "paris": P 1/2, R 1 -> 2/3
  assert scores.token_f1("Paris, France", "the Paris") == pytest.approx(2 / 3)
  assert scores.token_f1("", "") == 1.0 and scores.token_f1("x", "") == 0.0


def test_corpus_scores_take_the_best_reference():
  result = scores.corpus_scores(["a b", "c"], [["x", "a b"], ["c"]])
  assert result["rouge1"] == 1.0 and result["exact_match"] == 1.0
  result = scores.corpus_scores(["a b", "z"], [["a b"], ["c"]])
  assert result["rougeL"] == pytest.approx(0.5) and result["token_f1"] == pytest.approx(0.5)
