"""Shared command-line plumbing: user errors become one line on stderr and exit code 1."""

import sys

from data.sources import DataError
from model.config import ConfigError

USER_ERRORS = (ConfigError, DataError, FloatingPointError, FileNotFoundError)


def run_reporting_errors(fn, *args, **kwargs):
  """Calls fn; a user-caused error is printed as `error: ...` without a traceback, exit status 1."""
  try:
    return fn(*args, **kwargs)
  except USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
