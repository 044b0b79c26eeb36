"""GSM8K test (1,319 problems), 5 shots from train: lm-evaluation-harness's gsm8k prompt, stop strings and
strict-match exact match of the number after "####" (commas, dollar signs and a final period ignored)."""

import ml_collections


def get_config():
  return ml_collections.ConfigDict({
      "kind": "generation",
      "data": "../shared/data/gsm8k/test.jsonl",
      "prompt": "Question: {question}\nAnswer:",
      "target": "{answer}",
      "fewshot": 5,
      "fewshot_data": "../shared/data/gsm8k/train.jsonl",
      "until": ("Question:", "</s>", "<|im_end|>"),
      "max_new_tokens": 256,
      "answer_regex": r"#### (\-?[0-9\.\,]+)",
  })
