"""Generation entrypoint: sample from a trained run with the KV-cache decoder of model/decode.py.

  python -m train.generate --workdir=DIR --prompt="To be" [--max_new_tokens=200 --temperature=0.8
      --top_k=0 --top_p=1.0 --repetition_penalty=1.0 --num_samples=1 --seed=0 --step=N --stop=STR]
  python -m train.generate --workdir=DIR --prompts_file=prompts.txt   # one prompt per line

A single sample is streamed as it is generated; tokens/s is reported at the end.
"""

import sys
import time

from absl import app, flags

from model.config import ConfigError
from model.decode import Sampling, generate_text
from train import tasks
from train.cli import parse_flags, run_reporting_errors
from train.runs import load_run

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory to load the checkpoint and tokenizer from.")
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text (\\n for a newline).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "File with one prompt per line.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate per sample.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature (0 = greedy).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
_REPETITION_PENALTY = flags.DEFINE_float("repetition_penalty", 1.0, "Penalty on tokens already present (1 = off).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples per prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STOP = flags.DEFINE_multi_string("stop", None, "Stop string (repeatable).")
flags.mark_flags_as_required(["workdir"])


def read_prompts() -> list[str]:
  if (_PROMPT.value is None) == (_PROMPTS_FILE.value is None):
    raise ConfigError("give exactly one of --prompt and --prompts_file")
  if _PROMPTS_FILE.value:
    with open(_PROMPTS_FILE.value) as f:
      return [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
  return [_PROMPT.value.replace("\\n", "\n")]


def run() -> None:
  prompts = read_prompts()
  loaded = load_run(_WORKDIR.value, _STEP.value)
  model, params, tokenizer, step = loaded.run.model, loaded.params, loaded.run.tokenizer, loaded.step
  sampling = Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value, _REPETITION_PENALTY.value)
  rows = [p for p in prompts for _ in range(_NUM_SAMPLES.value)]
  streaming = len(rows) == 1
  print(f"ablax: {_WORKDIR.value} step {step}", file=sys.stderr)
  if streaming:
    sys.stdout.write(rows[0])

  def stream(piece):
    sys.stdout.write(piece)
    sys.stdout.flush()

  start = time.time()
  texts = generate_text(model, params, tokenizer, rows, max_new_tokens=_MAX_NEW_TOKENS.value,
                        sampling=sampling, seed=_SEED.value, stop=tuple(_STOP.value or ()),
                        stream=stream if streaming else None,
                        prompt_as_prefix=tasks.prompt_as_prefix(loaded.run.config))
  elapsed = time.time() - start
  if streaming:
    sys.stdout.write("\n")
  else:
    for i, (prompt, text) in enumerate(zip(rows, texts)):
      print(f"--- sample {i}\n{prompt}{text}")
  new_tokens = sum(len(tokenizer.encode(text)) for text in texts)
  print(f"ablax: {new_tokens} new tokens in {elapsed:.2f} s ({new_tokens / max(elapsed, 1e-9):.1f} tokens/s, "
        "compilation included)", file=sys.stderr)


def main(argv):
  del argv
  run_reporting_errors(run)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
