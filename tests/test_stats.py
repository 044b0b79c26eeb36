"""Ablation statistics (ablate/stats.py) by hand and against scipy, and the report and --until_significant on
fake runs whose metrics are drawn from known distributions."""

import csv
import json
import os

import ml_collections
import numpy as np
import pytest
from scipy import stats as scipy_stats

from ablate import plan, report, runner
from ablate import scaling, stats


def test_paired_t_by_hand_and_as_scipy():
  variant, baseline = {0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.0, 1: 0.0, 2: 1.0}
  result = stats.compare(variant, baseline)
  # differences 1, 2, 2: mean 5/3, sd 1/sqrt(3), t = (5/3) / (1/3) = 5 with 2 degrees of freedom
  assert result.test == "paired t" and result.n == 3 and result.difference == pytest.approx(5 / 3)
  assert result.p == pytest.approx(2 * scipy_stats.t.sf(5.0, 2)) == pytest.approx(0.03775, abs=1e-5)
  assert result.p == pytest.approx(scipy_stats.ttest_rel([1, 2, 3], [0, 0, 1]).pvalue)
  low, high = result.interval
  assert 1.0 <= low <= 5 / 3 <= high <= 2.0  # bootstrap means of {1, 2, 2} lie in [1, 2]


def test_welch_when_the_runs_do_not_pair():
  variant, baseline = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}, {10: 2.0, 11: 4.0, 12: 6.0}
  result = stats.compare(variant, baseline)
  # means 2.5 and 4, variances 5/3 and 4: t = -1.5 / sqrt(5/12 + 4/3), Welch-Satterthwaite degrees of freedom
  se2_a, se2_b = (5 / 3) / 4, 4 / 3
  t = -1.5 / np.sqrt(se2_a + se2_b)
  df = (se2_a + se2_b) ** 2 / (se2_a ** 2 / 3 + se2_b ** 2 / 2)
  assert result.test == "Welch t" and result.difference == pytest.approx(-1.5)
  assert result.p == pytest.approx(2 * scipy_stats.t.sf(abs(t), df))
  assert result.p == pytest.approx(scipy_stats.ttest_ind([1, 2, 3, 4], [2, 4, 6], equal_var=False).pvalue)


def test_too_few_runs_give_no_p_value_and_constant_differences_are_decided():
  assert stats.compare({0: 1.0}, {0: 2.0}).p is None and stats.bootstrap_interval([3.0]) is None
  assert stats.compare({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0}).p == 0.0  # differences 1, 1: no variance
  assert stats.compare({0: 2.0, 1: 3.0}, {0: 2.0, 1: 3.0}).p == 1.0


def test_bootstrap_interval_covers_the_mean_at_the_stated_rate():
  rng, covered = np.random.default_rng(0), 0
  for trial in range(200):
    sample = rng.normal(1.0, 1.0, 30)
    low, high = stats.bootstrap_interval(sample, 0.9, resamples=2000, seed=trial)
    covered += low <= 1.0 <= high
  assert 0.82 <= covered / 200 <= 0.96  # nominal 0.9; the percentile bootstrap is a little narrow at n = 30


def test_holm_by_hand():
  assert stats.holm([0.01, 0.04, 0.03, None]) == [pytest.approx(0.03), pytest.approx(0.06), pytest.approx(0.06),
                                                  None]
  assert stats.holm([0.5, 0.6]) == [pytest.approx(1.0), pytest.approx(1.0)]


def _fake_ablation(workdir, effects: dict, seeds=(0, 1, 2), noise=0.05):
  """An ablation workdir whose runs are written, not trained: eval/loss = 2 + effect + seed noise (paired: the
  seed's noise is shared, as a shared data order would be) + small run noise."""
  config = plan.load_ablation(ml_collections.ConfigDict(dict(
      config="experiment.py", variants={name: (f"model.d_model={16 + i}",) for i, name in enumerate(effects)},
      seeds=seeds, metrics=("eval/loss", "max:eval/accuracy"))))
  os.makedirs(os.path.join(workdir, "status"), exist_ok=True)
  with open(os.path.join(workdir, "ablation.json"), "w") as f:
    json.dump(config.to_dict(), f)

  def execute(run, ablation, directory):
    rng = np.random.default_rng([run["seed"], sorted(effects).index(run["variant"]), 2])  # same vs base: p 0.64
    shared = np.random.default_rng(run["seed"]).normal(0, noise)
    loss = 2.0 + effects[run["variant"]] + shared + rng.normal(0, noise / 10)
    run_dir = os.path.join(directory, "runs", run["name"])
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
      f.write(json.dumps({"step": 1, "eval/loss": loss, "eval/accuracy": 1 / loss}) + "\n")
    status = {"status": "done", "wall_s": 1.0, "last_line": ""}
    with open(plan.status_path(directory, run["name"]), "w") as f:
      json.dump(status, f)
    return status
  return config, execute


def test_the_report_carries_intervals_differences_and_significance(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  config, execute = _fake_ablation(workdir, {"base": 0.0, "better": -0.2, "same": 0.0}, seeds=(0, 1, 2, 3, 4))
  monkeypatch.setattr(runner, "execute", execute)
  assert runner.run_ablation(config, workdir) == 0
  text = open(os.path.join(workdir, "results.md")).read()
  assert "**eval/loss** (lower is better; baseline base)" in text
  assert "**max:eval/accuracy** (higher is better; baseline base)" in text
  rows = {(r["metric"], r["variant"]): r for r in csv.DictReader(open(os.path.join(workdir, "results.csv")))}
  better, same = rows[("eval/loss", "better")], rows[("eval/loss", "same")]
  assert better["significant"] == "True" and same["significant"] == "False"
  assert float(better["difference"]) == pytest.approx(-0.2, abs=0.02) and better["test"] == "paired t"
  assert float(better["difference_low"]) < float(better["difference"]) < float(better["difference_high"]) < 0
  losses = {v: [json.loads(open(os.path.join(workdir, "runs", f"{v}_seed{s}", "metrics.jsonl")).read())["eval/loss"]
                for s in range(5)] for v in ("base", "better", "same")}
  raw = [scipy_stats.ttest_rel(losses[v], losses["base"]).pvalue for v in ("better", "same")]
  assert float(better["p"]) == pytest.approx(raw[0], rel=1e-5)  # the CSV holds 6 digits
  assert float(better["p_holm"]) == pytest.approx(stats.holm(raw)[0], rel=1e-5)
  assert "significant, better" in text.split("**max:eval/accuracy**")[0]
  assert "significant, better" in text.split("**max:eval/accuracy**")[1]  # accuracy 1/loss: higher is better
  assert os.path.getsize(os.path.join(workdir, "bars.png")) > 1000


def test_until_significant_adds_seeds_to_the_undecided_only(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  config, execute = _fake_ablation(workdir, {"base": 0.0, "clear": -0.5, "small": -0.02}, seeds=(0, 1), noise=0.03)
  monkeypatch.setattr(runner, "execute", execute)
  still = runner.run_until_significant(config, workdir, max_runs=12, max_hours=1.0)
  extra = plan.extra_seeds(workdir)
  assert "clear" not in extra and set(extra) == {"base", "small"}  # the clear difference needed no more seeds
  assert len(extra["small"]) == len(extra["base"]) >= 2 and still in ([], ["small"])
  assert 2 * len(extra["small"]) <= 12
  text = open(os.path.join(workdir, "results.md")).read()
  assert "and added" in text and f"small_seed{extra['small'][-1]}" not in text  # every added run finished


def test_equal_cost_comparisons_take_every_metric_at_the_same_flops(tmp_path):
  workdir = str(tmp_path)
  config = plan.load_ablation(ml_collections.ConfigDict(dict(
      config="experiment.py", variants={"cheap": ("model.d_model=16",), "costly": ("model.d_model=32",)},
      seeds=(0, 1), metrics=("eval/loss", "min:eval/loss"), x_axis="train/flops")))
  os.makedirs(os.path.join(workdir, "status"), exist_ok=True)
  with open(os.path.join(workdir, "ablation.json"), "w") as f:
    json.dump(config.to_dict(), f)
  for run in plan.expand(config):
    cost = 1e9 if run["variant"] == "cheap" else 2e9  # per step: the costly variant reaches 4e9 at step 2
    run_dir = os.path.join(workdir, "runs", run["name"])
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
      for step in range(1, 5):
        loss = 3.0 - step * (0.2 if run["variant"] == "cheap" else 0.3) + run["seed"] * 0.01
        f.write(json.dumps({"step": step, "train/flops": step * cost, "eval/loss": loss}) + "\n")
    with open(plan.status_path(workdir, run["name"]), "w") as f:
      json.dump({"status": "done", "wall_s": 1.0}, f)
  _, rows, curves, budget = report.collect(workdir)
  assert budget == {"cheap": 4e9, "costly": 4e9}  # the cheap runs end there
  costly = [row for row in rows if row["variant"] == "costly"]
  assert [row["eval/loss"] for row in costly] == [pytest.approx(2.4), pytest.approx(2.41)]  # step 2, not 4
  assert curves["costly"][0][-1] == (4e9, pytest.approx(2.4))
  text = report.write_report(workdir)
  assert "Compared at equal cost: every metric as logged up to train/flops = 4e+09" in text
  at_steps = report.write_report(workdir, out=os.path.join(workdir, "at_steps"), x_axis="step")
  assert "equal cost" not in at_steps and "| costly | 1.8050 ± 0.0071 (n=2)" in at_steps  # step 4 of each
  assert os.path.exists(os.path.join(workdir, "at_steps", "results.csv"))


def test_the_power_law_fit_recovers_known_parameters_and_its_intervals_cover_them():
  compute, truth = np.repeat([1e12, 4e12, 1.6e13, 6.4e13, 2.56e14], 3), scaling.power_law(2.56e15, 400.0, 0.2, 1.5)
  exact = scaling.fit(compute, scaling.power_law(compute, 400.0, 0.2, 1.5), project_to=2.56e15, resamples=50)
  assert exact.form == "a*C^-b+c" and exact.points == 15
  assert (exact.params["b"], exact.params["c"], exact.projection) == (pytest.approx(0.2, abs=1e-3),
                                                                       pytest.approx(1.5, abs=1e-3),
                                                                       pytest.approx(truth, abs=1e-3))
  covered = {"b": 0, "c": 0, "projection": 0}
  for trial in range(8):  # noise 0.01 nats: the 95% intervals should cover the truth most of the time
    noisy = scaling.power_law(compute, 400.0, 0.2, 1.5) + np.random.default_rng(trial).normal(0, 0.01, 15)
    found = scaling.fit(compute, noisy, project_to=2.56e15, resamples=200, seed=trial)
    assert found.params["b"] == pytest.approx(0.2, abs=0.06) and found.params["c"] == pytest.approx(1.5, abs=0.15)
    for name, value in (("b", 0.2), ("c", 1.5)):
      covered[name] += found.intervals[name][0] <= value <= found.intervals[name][1]
    covered["projection"] += found.projection_interval[0] <= truth <= found.projection_interval[1]
  assert min(covered.values()) >= 6, covered  # 10 to 11 of 12 in a longer check


def test_two_sizes_fit_the_simpler_law():
  found = scaling.fit([1e12, 1e12, 8e12, 8e12], [3.0, 3.02, 2.5, 2.51], project_to=8e13)
  assert found.form == "a*C^-b" and set(found.params) == {"a", "b"}
  assert found.projection < 2.5


def test_a_ladder_report_fits_each_group(tmp_path):
  workdir = str(tmp_path)
  config = plan.load_ablation(ml_collections.ConfigDict(dict(
      config="experiment.py", seeds=(0, 1), ladder="size",
      grid={"size": (("model.num_layers", "model.d_model"), ((1, 32), (2, 64), (3, 96), (4, 128))),
            "act": ("model.activation", ("gelu", "swiglu"))})))
  runs = plan.expand(config)
  assert runs[0]["overrides"][:3] == ("model.activation=gelu", "model.num_layers=1", "model.d_model=32")
  assert plan.ladder_groups(config)["act=swiglu,size=2x64"] == "act=swiglu"  # the config orders axes by name
  references = plan.references(config)  # a ladder compares within each size
  assert references["act=swiglu,size=2x64"] == "act=gelu,size=2x64" and references["act=gelu,size=3x96"] is None
  os.makedirs(os.path.join(workdir, "status"))
  with open(os.path.join(workdir, "ablation.json"), "w") as f:
    json.dump(config.to_dict(), f)
  for run in runs:
    size = int(run["variant"].split("size=")[1].split("x")[0])
    flops = 1e12 * 4 ** size
    gain = 0.95 if "swiglu" in run["variant"] else 1.0
    loss = scaling.power_law(flops, 300.0 * gain, 0.2, 1.8) + 0.005 * run["seed"]
    os.makedirs(os.path.join(workdir, "runs", run["name"]))
    with open(os.path.join(workdir, "runs", run["name"], "metrics.jsonl"), "w") as f:
      f.write(json.dumps({"step": 1, "train/flops": flops, "eval/loss": loss}) + "\n")
    with open(plan.status_path(workdir, run["name"]), "w") as f:
      json.dump({"status": "done", "wall_s": 1.0}, f)
  budget = report.collect(workdir, x_axis="train/flops")[3]  # equal cost within each size, not across sizes
  assert budget["act=swiglu,size=1x32"] == budget["act=gelu,size=1x32"] == 4e12
  assert budget["act=swiglu,size=4x128"] == 1e12 * 4 ** 4
  text = report.write_report(workdir)
  assert "**Scaling of eval/loss with training compute C (FLOPs)**" in text
  assert "| act=gelu | a*C^-b+c |" in text and "| act=swiglu | a*C^-b+c |" in text
  assert "baseline act=gelu at each size" in text
  swiglu = [line for line in text.splitlines() if line.startswith("| act=swiglu,size=4x128 |") and "paired t" in line][0]
  assert "significant, better" in swiglu  # 5% below gelu at the same size, seed noise shared
  assert os.path.getsize(os.path.join(workdir, "scaling.png")) > 1000


def test_a_sweep_report_finds_each_lines_best_x_and_the_cost_of_transferring_the_first(tmp_path):
  # Written runs: loss = 2 + (log2 lr - log2 best)^2 / 10, the best rate 2^-6 at width 32 and 2^-7 at width 64
  # under "sp", 2^-6 at both under "mup".
  workdir = str(tmp_path)
  config = plan.load_ablation(ml_collections.ConfigDict(dict(
      config="experiment.py", seeds=(0,), sweep=("lr", "width"),
      grid={"param": ("model.parametrization", ("sp", "mup")), "width": ("model.d_model", (32, 64)),
            "lr": ("train.learning_rate", tuple(2.0 ** k for k in range(-9, -3)))})))
  os.makedirs(os.path.join(workdir, "status"))
  with open(os.path.join(workdir, "ablation.json"), "w") as f:
    json.dump(config.to_dict(), f)
  for run in plan.expand(config):
    cell = plan.grid_cells(config)[run["variant"]]
    best = -7 if cell["param"] == "sp" and cell["width"] == 64 else -6
    loss = 2.0 + (np.log2(cell["lr"]) - best) ** 2 / 10
    os.makedirs(os.path.join(workdir, "runs", run["name"]))
    with open(os.path.join(workdir, "runs", run["name"], "metrics.jsonl"), "w") as f:
      f.write(json.dumps({"step": 1, "eval/loss": loss}) + "\n")
    with open(plan.status_path(workdir, run["name"]), "w") as f:
      json.dump({"status": "done", "wall_s": 1.0}, f)
  text = report.write_report(workdir)
  assert "| param=sp | 32 | 0.01562 | 2.0000 | 2.0000 | +0.0000 |" in text
  assert "| param=sp | 64 | 0.007812 | 2.0000 | 2.1000 | +0.1000 |" in text  # 2^-6: one factor of 2 off, +1/10
  assert "| param=mup | 64 | 0.01562 | 2.0000 | 2.0000 | +0.0000 |" in text
  assert os.path.getsize(os.path.join(workdir, "sweep.png")) > 1000
