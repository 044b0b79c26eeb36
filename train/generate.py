"""Generation entrypoint: sample from a trained run with the KV-cache decoder of model/decode.py.

  python -m train.generate --workdir=DIR --prompt="To be" [--max_new_tokens=200 --temperature=0.8
      --top_k=0 --top_p=1.0 --repetition_penalty=1.0 --num_samples=1 --seed=0 --step=N --stop=STR]
  python -m train.generate --workdir=DIR --prompts_file=prompts.txt   # one prompt per line

--prompt, the lines of --prompts_file and --stop take the escapes a user types: \\n (newline), \\t (tab) and
\\\\ (a backslash). A prompt is read as the run frames a text ([bos] + prompt in ablax's own runs, as its Hugging
Face tokenizer does in an imported one: config.data.framing). A single sample is streamed as it is generated;
tokens/s is reported at the end.
"""

import re
import sys
import time

from absl import app, flags

from model.config import ConfigError
from model.decode import Sampling, generate_text
from train import tasks
from train.cli import parse_flags, run_reporting_errors
from train.runs import load_run

ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory to load the checkpoint and tokenizer from.")
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text (\\n for a newline, \\t for a tab, \\\\ for a backslash).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "File with one prompt per line (the same escapes).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate per sample.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature (0 = greedy).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
_REPETITION_PENALTY = flags.DEFINE_float("repetition_penalty", 1.0, "Penalty on tokens already present (1 = off).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples per prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STOP = flags.DEFINE_multi_string("stop", None, "Stop string, repeatable; takes the escapes \\n, \\t and \\\\ "
                                  "(--stop='\\n\\n' stops at a blank line).")
flags.mark_flags_as_required(["workdir"])


def unescape(text: str) -> str:
  """`text` with the escapes a user types on a command line (\\n, \\t, \\\\) made the characters; any other
  backslash stays as typed."""
  return re.sub(r"\\([nt\\])", lambda m: ESCAPES[m.group(1)], text)


def read_prompts() -> list[str]:
  if (_PROMPT.value is None) == (_PROMPTS_FILE.value is None):
    raise ConfigError("give exactly one of --prompt and --prompts_file")
  if _PROMPTS_FILE.value:
    try:
      with open(_PROMPTS_FILE.value, encoding="utf-8") as f:
        prompts = [unescape(line.rstrip("\n")) for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
      raise ConfigError(f"--prompts_file={_PROMPTS_FILE.value}: cannot read ({getattr(e, 'strerror', None) or e})"
                        ) from None
    if not prompts:
      raise ConfigError(f"--prompts_file={_PROMPTS_FILE.value}: no prompt (every line is blank)")
    return prompts
  return [unescape(_PROMPT.value)]


def check_settings() -> None:
  """ConfigErrors of the sampling flags, before the run is loaded."""
  checks = [(_MAX_NEW_TOKENS.value >= 1, "--max_new_tokens", "a positive number of tokens"),
            (_NUM_SAMPLES.value >= 1, "--num_samples", "a positive number"),
            (_TEMPERATURE.value >= 0, "--temperature", "0 (greedy) or more"),
            (_TOP_K.value >= 0, "--top_k", "0 (off) or a positive number"),
            (0 < _TOP_P.value <= 1, "--top_p", "a mass in (0, 1]"),
            (_REPETITION_PENALTY.value > 0, "--repetition_penalty", "a positive factor (1 = off)")]
  for ok, flag, expected in checks:
    if not ok:
      raise ConfigError(f"{flag}={flags.FLAGS[flag[2:]].value}: expected {expected}")
  if any(not unescape(s) for s in _STOP.value or ()):
    raise ConfigError("--stop: an empty stop string would stop before the first token")


def window_warning(model_cfg, lengths: list[int]) -> str | None:
  """The warning line for prompts a learned-position model cannot read whole (longer than its max_len), or None."""
  if model_cfg.position != "learned":
    return None
  window = model_cfg.max_len
  over = [(i, n) for i, n in enumerate(lengths) if n > window]
  if not over:
    return None
  i, n = max(over, key=lambda x: x[1])
  which = f"prompt {i}" if len(lengths) > 1 else "the prompt"
  more = f" ({len(over)} prompts are)" if len(over) > 1 else ""
  return (f"ablax: warning: {which} is {n} tokens{more}, longer than this model's window of {window} (learned "
          f"positions, config.model.max_len): it reads the last {window}, then the last {window // 2} as the window "
          "slides")


def run() -> None:
  check_settings()
  prompts = read_prompts()
  loaded = load_run(_WORKDIR.value, _STEP.value)
  model, params, tokenizer, step = loaded.run.model, loaded.params, loaded.run.tokenizer, loaded.step
  sampling = Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value, _REPETITION_PENALTY.value)
  rows = [p for p in prompts for _ in range(_NUM_SAMPLES.value)]
  streaming = len(rows) == 1
  print(f"ablax: {_WORKDIR.value} step {step}", file=sys.stderr)
  warning = window_warning(model.cfg, [len(tokenizer.encode_prompt(p)) for p in prompts])
  if warning:
    print(warning, file=sys.stderr)
  if streaming:
    sys.stdout.write(rows[0])

  def stream(piece):
    sys.stdout.write(piece)
    sys.stdout.flush()

  start = time.time()
  texts = generate_text(model, params, tokenizer, rows, max_new_tokens=_MAX_NEW_TOKENS.value,
                        sampling=sampling, seed=_SEED.value, stop=tuple(unescape(s) for s in _STOP.value or ()),
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
