"""Scores against hand computations and the reference implementations: ROUGE equals Google's rouge-score (stemmer
on), exact match and token F1 follow the SQuAD v1.1 script, GSM8K answers as lm-evaluation-harness extracts them,
and the harness's multiple-choice acc / acc_norm / acc_bytes."""

import pytest
from rouge_score import rouge_scorer

from train import scores

PAIRS = [  # (prediction, reference)
    ("The cat sat on the mat.", "the cat is on the mat"),
    ("We propose a new method for training deep networks faster.",
     "A method that trains deep neural networks faster, with less memory."),
    ("running dogs are barking loudly", "the dog runs and barks"),
    ("First sentence here. Second one follows! And a third?", "Second one follows. First sentence here."),
    ("Ünïcödé 東京 text", "unicode text"),
    ("", "an empty prediction"),
    ("identical words", "identical words"),
]


def test_rouge_by_hand():
  # unigrams of "the cat sat on the mat" vs "the cat is on the mat": the x2, cat, on, mat = 5 of 6 and 6 -> 5/6
  result = scores.rouge("The cat sat on the mat.", "the cat is on the mat")
  assert result["rouge1"] == pytest.approx(5 / 6)
  assert result["rouge2"] == pytest.approx(3 / 5)  # (the cat), (on the), (the mat) of 5 and 5
  # LCS of "a b c d e" and "a c e f" is a c e: P 3/5, R 3/4 -> F 2/3
  assert scores.rouge("a b c d e", "a c e f")["rougeL"] == pytest.approx(2 / 3)
  assert scores.rouge("a b", "c d")["rouge1"] == 0.0
  # The Porter stemmer (words over 3 letters): running -> run, dogs -> dog
  assert scores.rouge("running dogs", "run dog")["rouge1"] == 1.0


@pytest.mark.parametrize("prediction, reference", PAIRS)
def test_rouge_equals_rouge_score(prediction, reference):
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
  theirs = scorer.score(reference, prediction)
  ours = scores.rouge(prediction, reference)
  for key in ("rouge1", "rouge2", "rougeL"):
    assert ours[key] == theirs[key].fmeasure, key
  # rougeLsum reads one sentence per line: ours splits after . ! ? before scoring
  split = lambda text: text.replace(". ", ".\n").replace("! ", "!\n").replace("? ", "?\n")
  assert ours["rougeLsum"] == scorer.score(split(reference), split(prediction))["rougeLsum"].fmeasure


def test_rouge_lsum_is_summary_level():
  # Sentences swapped: the whole-text LCS finds one sentence, the union of per-sentence LCSs finds both.
  result = scores.rouge("b c. a d.", "a d. b c.")
  assert result["rougeL"] == pytest.approx(0.5) and result["rougeLsum"] == pytest.approx(1.0)


def test_squad_normalisation_by_hand():
  assert scores.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
  assert scores.normalize_answer("A theatre, an apple") == "theatre apple"  # articles only as words
  assert scores.exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
  assert scores.exact_match("Eiffel", "eiffel tower") == 0.0
  assert scores.exact_match("", "") == 1.0


def test_squad_token_f1_by_hand():
  assert scores.token_f1("Paris, France", "the Paris") == pytest.approx(2 / 3)  # P 1/2, R 1
  assert scores.token_f1("the cat cat", "a cat") == pytest.approx(2 / 3)  # counts clip: 1 of 2 predicted
  assert scores.token_f1("in 1888 by Eiffel", "by gustave eiffel in 1888") == pytest.approx(2 * 1 * 0.8 / 1.8)
  # SQuAD v1.1 scores no shared token as 0, two empty answers included (v2.0 would give 1).
  assert scores.token_f1("", "") == 0.0 and scores.token_f1("x", "") == 0.0


def test_gsm8k_answers_as_the_harness_extracts_them():
  pattern = r"#### (\-?[0-9\.\,]+)"
  assert scores.extract_answer("She pays 3 * 4 = 12 dollars.\n#### $1,234.", r"#### (\-?[$0-9\.\,]+)") == "1234"
  assert scores.extract_answer("so 5 + 7 = 12\n#### 12\nQuestion: more", pattern) == "12"
  assert scores.extract_answer("the answer is 12", pattern) == scores.INVALID
  means, per_example = scores.generation_scores(
      ["#### 12", "The answer is 7", "#### 1,000.", "#### -3"],
      [["Work.\n#### 12"], ["#### 7"], ["#### 1000"], ["#### 3"]], metrics=("exact_match",), answer_pattern=pattern)
  assert [e["exact_match"] for e in per_example] == [1.0, 0.0, 1.0, 0.0]
  assert means == {"exact_match": 0.5}


def test_several_references():
  means, _ = scores.generation_scores(["a b", "c"], [["x", "a b"], ["c"]])
  assert means["rouge1"] == 1.0 and means["exact_match"] == 1.0
  # EM / F1: the best reference; ROUGE: every ROUGE score from the reference of the best ROUGE-1 (SciTLDR).
  _, (example,) = scores.generation_scores(["a b c d"], [["a b c d x y z w", "a c b d"]])
  # rouge2 comes from "a c b d" (no shared bigram), not from the first reference (0.6 on its own).
  assert example["rouge1"] == 1.0 and example["rouge2"] == 0.0
  assert example["token_f1"] == 1.0 and example["exact_match"] == 0.0
  with pytest.raises(ValueError, match="metrics"):
    scores.generation_scores(["a"], [["a"]], metrics=("bleu",))


def test_choice_scores_as_the_harness_defines_them():
  # acc: the highest sum; acc_norm: divided by characters (-3/1 < -4/4); acc_bytes: by UTF-8 bytes ("é" is 2).
  means, per_example = scores.choice_scores([[-3.0, -4.0], [-2.0, -2.2]], [["a", "bbbb"], ["é", "ab"]], [1, 0])
  assert per_example[0] == {"acc": 0.0, "acc_norm": 1.0, "acc_bytes": 1.0}
  assert per_example[1] == {"acc": 1.0, "acc_norm": 0.0, "acc_bytes": 1.0}  # -2/1 < -2.2/2 but -2/2 > -2.2/2
  assert means == {"acc": 0.5, "acc_norm": 0.5, "acc_bytes": 1.0}
