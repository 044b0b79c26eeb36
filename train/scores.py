"""Scores of evaluation tasks, each as the field that reports it defines it; the one home of scores.

Offers `rouge` (Google's rouge-score, as T5 / seqio: ROUGE-1/2/L/Lsum F-measures, Porter stemmer), `normalize_answer`,
`exact_match` and `token_f1` (the SQuAD v1.1 evaluation script's definitions), `extract_answer` (a regex's first
match cleaned as lm-evaluation-harness's GSM8K task does), `generation_scores` (means over examples, several
references taken as SQuAD and SciTLDR take them) and `choice_scores` (lm-evaluation-harness's acc, acc_norm and
acc_bytes of log-likelihood multiple choice).
"""

import collections
import functools
import re
import string

import numpy as np
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
GENERATION_METRICS = ("exact_match", "token_f1") + ROUGE_TYPES
PUNCTUATION = frozenset(string.punctuation)
INVALID = "[invalid]"  # the answer of a text the answer regex does not match (never equals a reference's)


@functools.cache
def _rouge_scorer() -> rouge_scorer.RougeScorer:
  return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def _sentence_lines(text: str) -> str:
  """One sentence per line, which rougeLsum reads as the summary's sentences (T5 splits at " . " alike)."""
  return re.sub(r"(?<=[.!?])\s+", "\n", text.strip())


def rouge(prediction: str, reference: str) -> dict:
  """F-measures of ROUGE-1, -2, -L (one sequence) and -Lsum (union LCS over sentences)."""
  scored = _rouge_scorer().score(_sentence_lines(reference), _sentence_lines(prediction))
  return {key: float(scored[key].fmeasure) for key in ROUGE_TYPES}


def normalize_answer(text: str) -> str:
  """SQuAD v1.1: lowercase, drop punctuation and the articles a / an / the, collapse whitespace."""
  text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
  return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
  """SQuAD v1.1: F1 of the normalised tokens' multiset overlap (0 when nothing is shared, empty answers too)."""
  predicted, wanted = normalize_answer(prediction).split(), normalize_answer(reference).split()
  overlap = sum((collections.Counter(predicted) & collections.Counter(wanted)).values())
  if overlap == 0:
    return 0.0
  precision, recall = overlap / len(predicted), overlap / len(wanted)
  return 2 * precision * recall / (precision + recall)


def extract_answer(text: str, pattern: str) -> str:
  """The first match of `pattern` (its first group, if it has one) without commas, dollar signs and a final
  period, lowercased (lm-evaluation-harness GSM8K "strict-match"); INVALID when nothing matches."""
  found = re.search(pattern, text)
  if not found:
    return INVALID
  answer = found.group(1) if found.groups() else found.group(0)
  return re.sub(r"\.$", "", answer.replace(",", "").replace("$", "")).strip().lower()


def _example_scores(prediction: str, references: list[str], metrics, answer_pattern: str) -> dict:
  """One example's scores: EM / F1 take the best reference (SQuAD); ROUGE takes every ROUGE score from the
  reference of the best ROUGE-1 (SciTLDR's multi-target max); with an answer pattern, EM compares the answers."""
  out = {}
  if answer_pattern:
    predicted = extract_answer(prediction, answer_pattern)
    out["exact_match"] = max(float(predicted != INVALID and predicted == extract_answer(r, answer_pattern))
                             for r in references)
  else:
    if "exact_match" in metrics:
      out["exact_match"] = max(exact_match(prediction, r) for r in references)
    if "token_f1" in metrics:
      out["token_f1"] = max(token_f1(prediction, r) for r in references)
  if any(m in ROUGE_TYPES for m in metrics):
    best = max((rouge(prediction, r) for r in references), key=lambda s: s["rouge1"])
    out.update({m: best[m] for m in ROUGE_TYPES if m in metrics})
  return {m: out[m] for m in metrics if m in out}


def generation_scores(predictions: list[str], references: list[list[str]], metrics=GENERATION_METRICS,
                      answer_pattern: str = "") -> tuple[dict, list[dict]]:
  """(means over examples, each example's scores) of `metrics` (names in GENERATION_METRICS)."""
  unknown = [m for m in metrics if m not in GENERATION_METRICS]
  if unknown:
    raise ValueError(f"metrics {unknown}: expected names from {list(GENERATION_METRICS)}")
  if len(predictions) != len(references) or not predictions:
    raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
  per_example = [_example_scores(p, list(refs), metrics, answer_pattern) for p, refs in zip(predictions, references)]
  means = {m: float(np.mean([e[m] for e in per_example])) for m in per_example[0]}
  return means, per_example


def choice_scores(loglikelihoods: list[list[float]], choices: list[list[str]], gold: list[int]
                  ) -> tuple[dict, list[dict]]:
  """(means, per example) of lm-evaluation-harness's multiple-choice accuracies: acc picks the choice of the highest
  summed log-likelihood, acc_norm divides it by the choice's length in characters, acc_bytes in UTF-8 bytes."""
  per_example = []
  for lls, options, answer in zip(loglikelihoods, choices, gold, strict=True):
    lls_C = np.asarray(lls, np.float64)
    chars_C = np.asarray([len(c) for c in options], np.float64)
    bytes_C = np.asarray([len(c.encode("utf-8")) for c in options], np.float64)
    picks = {"acc": int(np.argmax(lls_C)), "acc_norm": int(np.argmax(lls_C / chars_C)),
             "acc_bytes": int(np.argmax(lls_C / bytes_C))}
    per_example.append({key: float(pick == answer) for key, pick in picks.items()})
  means = {key: float(np.mean([e[key] for e in per_example])) for key in ("acc", "acc_norm", "acc_bytes")}
  return means, per_example
