"""SciTLDR-A test (618 abstracts, 1,967 TL;DRs) zero-shot: the abstract then "TL;DR:" (GPT-2's summarization
prompt), one line generated; ROUGE F-measures against the TL;DR of the best ROUGE-1 (SciTLDR's multi-target max)."""

import ml_collections


def get_config():
  return ml_collections.ConfigDict({
      "kind": "generation",
      "data": "../shared/data/scitldr_a/test.jsonl",
      "prompt": "{source}\nTL;DR:",
      "references_field": "target",
      "until": ("\n",),
      "max_new_tokens": 48,
      "metrics": ("rouge1", "rouge2", "rougeL", "rougeLsum"),
  })
