"""Shared command-line plumbing: user errors become one line on stderr and exit status 1; a preempted run
(SIGTERM, after its checkpoint) exits 0, an interrupted one (Ctrl-C) 130 as shells expect. Offers `RunError`,
`Preempted`, `fail`, `parse_flags` and `run_reporting_errors`."""

import re
import signal
import sys

from absl import flags, logging

from data.sources import DataError
from model.config import ConfigError


class RunError(RuntimeError):
  """A run's files could not be written or read (a full disk, a corrupt checkpoint); the message is one line."""


class Preempted(Exception):
  """The run saved a checkpoint and stopped on SIGTERM or SIGINT (`signum`); the same command resumes it."""

  def __init__(self, message: str, signum: int = signal.SIGTERM):
    super().__init__(message)
    self.signum = signum

  @property
  def exit_code(self) -> int:
    return 130 if self.signum == signal.SIGINT else 0  # Ctrl-C: 128 + SIGINT, as a shell reports it


USER_ERRORS = (ConfigError, DataError, RunError, FloatingPointError, FileNotFoundError)


def fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


def flag_error(exc: Exception, argv) -> str:
  """One line naming the offending --config flag or file, from an absl / ml-collections exception."""
  while exc.args and isinstance(exc.args[0], Exception):  # ml-collections wraps KeyError in AttributeError
    exc = exc.args[0]
  text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  names = re.findall(r"'([A-Za-z_][\w]*)'", lines[0]) if lines else []
  hint = next((" (" + line + ")" for line in lines if line.startswith("Did you mean")), "")
  for arg in argv[1:]:
    if arg.startswith("--config.") and names and names[-1] in arg.split("=")[0].split("."):
      return f"{arg.split('=')[0]}: unknown config key '{names[-1]}'{hint or ' (see configs/base.py)'}"
  if "Failed loading config file" in str(exc) or "earlier failure to load" in str(exc):
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "?")
    return f"--config={path}: cannot load this config file ({lines[-1]})"
  return " ".join(lines) or type(exc).__name__


def parse_flags(argv):
  """absl flags parser for app.run that turns flag and config-file errors into one-line errors."""
  logging.set_verbosity(logging.WARNING)  # orbax and jax log every save and restore at INFO
  try:
    remaining = flags.FLAGS(argv)
    if "config" in flags.FLAGS and flags.FLAGS["config"].present:
      flags.FLAGS["config"].value.keys()  # loading is lazy: force it so a bad file fails here
    return remaining
  except flags.IllegalFlagValueError as e:
    fail(flag_error(e.__cause__ or e, argv))
  except (flags.Error, AttributeError, KeyError, OSError, TypeError, ValueError) as e:
    fail(flag_error(e, argv))


def run_reporting_errors(fn, *args, **kwargs):
  """Calls fn; a user-caused error is printed as `error: ...` without a traceback, exit status 1."""
  try:
    return fn(*args, **kwargs)
  except USER_ERRORS as e:
    fail(str(e))
  except Preempted as e:
    print(f"ablax: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
  except KeyboardInterrupt:  # Ctrl-C outside a training loop (which saves first, then raises Preempted)
    print("ablax: interrupted (Ctrl-C)", file=sys.stderr)
    sys.exit(130)
  except RuntimeError as e:  # jax's out-of-memory error, when the check before training could not know
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    fail(f"out of memory ({str(e).splitlines()[0][:200]}): lower config.train.batch_size or seq_len, raise "
         "config.train.grad_accum, set config.model.remat=True, or shard over more devices (config.mesh)")
