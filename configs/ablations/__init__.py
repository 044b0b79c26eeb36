"""Ablation configs (python -m ablate --config=configs/ablations/NAME.py[:ARGUMENT])."""


def parse_numbers(text: str, names) -> dict:
  """{name: number} of a config argument "a=1,b=2.5" with every name one of `names`; a ValueError naming what is
  wrong (configs/ import nothing outside configs/)."""
  found = {}
  for item in filter(None, text.split(",")):
    name, _, value = item.partition("=")
    if name not in names:
      raise ValueError(f"--config argument {item!r}: expected NAME=VALUE with NAME one of {', '.join(names)}")
    try:
      found[name] = float(value)
    except ValueError:
      raise ValueError(f"--config argument {item!r}: {value!r} is not a number") from None
  return found
