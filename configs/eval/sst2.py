"""SST-2 (GLUE dev, 872 sentences) zero-shot as multiple choice: lm-evaluation-harness's glue/sst2 prompt, choices."""

import ml_collections


def get_config():
  return ml_collections.ConfigDict({
      "kind": "multiple_choice",
      "data": "../shared/data/sst2/dev.jsonl",
      "prompt": "{text}\nQuestion: Is this sentence positive or negative?\nAnswer:",
      "choices": ("negative", "positive"),
      "label_field": "label",
  })
