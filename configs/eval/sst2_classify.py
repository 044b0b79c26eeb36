"""SST-2 (GLUE dev, 872 sentences) through a classification run's trained head: accuracy and macro-F1."""

import ml_collections


def get_config():
  return ml_collections.ConfigDict({
      "kind": "classification",
      "data": "../shared/data/sst2/dev.jsonl",
  })
