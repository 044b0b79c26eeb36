"""lm-evaluation-harness adapter: an ablax run as an `lm_eval` model, registered as "ablax".

  python -m train.harness --model ablax --model_args workdir=RUN[,step=N,max_len=N] --tasks TASK[,TASK] \\
      [--include_path=DIR_OF_YAML_TASKS --num_fewshot=N --limit=N --batch_size=N --log_samples --output_path=DIR]

runs the harness's own command line with this model registered. Offers `AblaxLM`: `loglikelihood`,
`loglikelihood_rolling` and `generate_until` over train/likelihood.py's Scorer, so a harness task scores as the
built-in tasks of train/evaluate.py do (the same tokens, rows and sums). A run imported from Hugging Face frames
texts as its tokenizer does (config.data.framing), so its numbers are those of lm_eval's own `hf` model on the
Hugging Face checkpoint. Needs `pip install lm-eval`, which nothing else in ablax imports. A run that cannot be
loaded (a missing workdir, a bad step) is one `error:` line and exit status 1.
"""

import collections

from lm_eval.__main__ import cli_evaluate
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from model.config import ConfigError
from train import tasks
from train.cli import run_reporting_errors
from train.likelihood import Scorer
from train.runs import load_run


def _integer(key: str, value) -> int | None:
  """A --model_args value as an int (None stays None); a ConfigError naming the key otherwise."""
  if value is None:
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"--model_args: {key}={value!r}: expected an integer") from None


@register_model("ablax")
class AblaxLM(LM):
  """An ablax run for the harness: `workdir` (and `step`) to load one, or a ready `scorer`."""

  def __init__(self, workdir: str | None = None, step: int | None = None, batch_size=32, max_len: int | None = None,
               scorer: Scorer | None = None, **unused):  # the harness also passes device, max_batch_size
    super().__init__()
    size = int(batch_size) if str(batch_size).isdigit() else 32  # "auto" is not supported: 32
    if scorer is None:
      if not workdir:
        raise ConfigError("--model_args: workdir=RUN is required (the ablax run to evaluate)")
      loaded = load_run(workdir, _integer("step", step))
      scorer = Scorer(loaded.run.model, loaded.params, loaded.run.tokenizer, batch_size=size,
                      max_len=_integer("max_len", max_len), prefix=tasks.prompt_as_prefix(loaded.run.config))
    self.scorer = scorer

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    """(log p(continuation | context), greedy) per request; args = (context, continuation)."""
    return self.scorer.loglikelihood([tuple(r.args[:2]) for r in requests])

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """log p of each whole text (args = (text,)) after bos, every token once."""
    return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Continuations of each context (args = (context, gen_kwargs)): greedy unless do_sample, until a stop string,
    at most max_gen_toks tokens (the harness's default 256); requests with the same settings share batches."""
    groups = collections.defaultdict(list)
    for i, request in enumerate(requests):
      context, kwargs = request.args[0], dict(request.args[1])
      until = kwargs.pop("until", ())
      until = (until,) if isinstance(until, str) else tuple(until)
      temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
      settings = (until, int(kwargs.pop("max_gen_toks", 256)), temperature)
      groups[settings].append((i, context))
    out = [""] * len(requests)
    for (until, max_new_tokens, temperature), items in groups.items():
      texts = self.scorer.generate([context for _, context in items], max_new_tokens=max_new_tokens, until=until,
                                   temperature=temperature)
      for (i, _), text in zip(items, texts):
        out[i] = text
    return out


if __name__ == "__main__":
  run_reporting_errors(cli_evaluate)
