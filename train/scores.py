"""Text-generation scores: ROUGE-1/2/L F-measures (summarization), exact match and token F1 (extractive QA).

Tokenisation follows the reference implementations' spirit: lowercase, runs of letters and digits.
SQuAD-style answers are also stripped of punctuation and the articles a / an / the before comparison.
"""

import collections
import re
import string


def rouge_tokens(text: str) -> list[str]:
  return re.findall(r"[a-z0-9]+", text.lower())


def _f_measure(overlap: int, predicted: int, reference: int) -> float:
  if overlap == 0:
    return 0.0
  precision, recall = overlap / predicted, overlap / reference
  return 2 * precision * recall / (precision + recall)


def rouge_n(prediction: str, reference: str, n: int) -> float:
  """F-measure of the clipped overlap of n-grams."""
  def ngrams(tokens):
    return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
  predicted, wanted = ngrams(rouge_tokens(prediction)), ngrams(rouge_tokens(reference))
  overlap = sum((predicted & wanted).values())
  return _f_measure(overlap, sum(predicted.values()), sum(wanted.values()))


def lcs_length(a: list, b: list) -> int:
  """Length of the longest common subsequence (dynamic programming, one row at a time)."""
  previous = [0] * (len(b) + 1)
  for x in a:
    current = [0]
    for j, y in enumerate(b):
      current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
    previous = current
  return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
  """F-measure of the longest common subsequence of tokens (sentence-level ROUGE-L)."""
  predicted, wanted = rouge_tokens(prediction), rouge_tokens(reference)
  return _f_measure(lcs_length(predicted, wanted), len(predicted), len(wanted))


def normalize_answer(text: str) -> list[str]:
  text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
  return [word for word in text.split() if word not in ("a", "an", "the")]


def exact_match(prediction: str, reference: str) -> float:
  return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
  predicted, wanted = normalize_answer(prediction), normalize_answer(reference)
  if not predicted or not wanted:
    return float(predicted == wanted)
  overlap = sum((collections.Counter(predicted) & collections.Counter(wanted)).values())
  return _f_measure(overlap, len(predicted), len(wanted))


def corpus_scores(predictions: list[str], references: list[list[str]]) -> dict:
  """Means over examples; each prediction takes its best score over its references."""
  scorers = {"rouge1": lambda p, r: rouge_n(p, r, 1), "rouge2": lambda p, r: rouge_n(p, r, 2),
             "rougeL": rouge_l, "exact_match": exact_match, "token_f1": token_f1}
  return {name: sum(max(score(p, r) for r in refs) for p, refs in zip(predictions, references)) / len(predictions)
          for name, score in scorers.items()}
