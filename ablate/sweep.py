"""Hyperparameter sweeps across another axis ("does the best learning rate transfer across widths?"): for an
ablation with `sweep = (x axis, line axis)`, the first metric's mean at every x of every line, in a panel per value
of the other grid axes; each line's best x; and what taking the first line's best x costs every other line.

Offers `points` and `table`.
"""

from ablate.plan import grid_cells, value_name


def points(ablation, summary: dict, spec: str) -> dict:
  """{panel: {line value's name: [(x value, mean of spec)]}} sorted by x; a panel names the other axes' values."""
  x_axis, line_axis = ablation.sweep
  out = {}
  for variant, cell in grid_cells(ablation).items():
    mean = summary.get(variant, {}).get(spec, (None,))[0]
    if mean is None:
      continue
    panel = ",".join(f"{axis}={value_name(value)}" for axis, value in cell.items()
                     if axis not in (x_axis, line_axis)) or "all"
    line = value_name(cell[line_axis])  # a tied axis's values are tuples (lists once read back from ablation.json)
    out.setdefault(panel, {}).setdefault(line, []).append((cell[x_axis], mean))
  return {panel: {line: sorted(xs) for line, xs in lines.items()} for panel, lines in out.items()}


def table(ablation, summary: dict, spec: str, lower_is_better: bool) -> str:
  """Markdown: per panel and line, the best x with its value, and the value at the first line's best x (the
  difference to the line's own best is what transferring that x costs)."""
  x_axis, line_axis = ablation.sweep
  pick = min if lower_is_better else max
  lines_md = [f"**Sweep of {x_axis} across {line_axis}** ({spec}; a line's best {x_axis}, and its {spec} at the "
              f"first {line_axis}'s best {x_axis}, with the difference to its own best)\n",
              f"| panel | {line_axis} | best {x_axis} | {spec} there | {spec} at the first's best | difference |",
              "|---|---|---|---|---|---|"]
  for panel, lines in points(ablation, summary, spec).items():
    first_best = None
    for line, xs in lines.items():
      best_x, best = pick(xs, key=lambda point: point[1])
      first_best = best_x if first_best is None else first_best
      at_first = dict(xs).get(first_best)
      transfer = "" if at_first is None else f"{at_first:.4f} | {at_first - best:+.4f}"
      lines_md.append(f"| {panel} | {line} | {best_x:.4g} | {best:.4f} | {transfer or ' | '} |")
  return "\n".join(lines_md) + "\n"
