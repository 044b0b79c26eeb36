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
from ablate import scaling, sequential, stats


def test_paired_t_by_hand_and_as_scipy():
  variant, baseline = {0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.0, 1: 0.0, 2: 1.0}
  result = stats.compare(variant, baseline)
  # differences 1, 2, 2: mean 5/3, sd 1/sqrt(3), t = (5/3) / (1/3) = 5 with 2 degrees of freedom
  assert result.test == "paired t" and result.n == 3 and result.difference == pytest.approx(5 / 3)
  assert result.p == pytest.approx(2 * scipy_stats.t.sf(5.0, 2)) == pytest.approx(0.03775, abs=1e-5)
  assert result.p == pytest.approx(scipy_stats.ttest_rel([1, 2, 3], [0, 0, 1]).pvalue)
  half = 4.302653 * (1 / np.sqrt(3)) / np.sqrt(3)  # t(0.975, 2) x the standard error
  assert result.interval == (pytest.approx(5 / 3 - half, abs=1e-5), pytest.approx(5 / 3 + half, abs=1e-5))
  assert result.effect == pytest.approx((5 / 3) / (1 / np.sqrt(3)))  # d = mean / sd of the differences
  assert (result.variant_mean, result.baseline_mean, result.seeds) == (2.0, pytest.approx(1 / 3), (0, 1, 2))


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
  half = scipy_stats.t.isf(0.025, df) * np.sqrt(se2_a + se2_b)
  assert result.interval == (pytest.approx(-1.5 - half), pytest.approx(-1.5 + half))
  assert result.effect == pytest.approx(-1.5 / np.sqrt((5 / 3 + 4) / 2))


def test_the_interval_of_a_difference_agrees_with_its_test():
  """Excludes 0 exactly when p < 0.05: paired and Welch, n = 2 to 6, under and away from the null."""
  rng, checked = np.random.default_rng(3), 0
  for trial in range(300):
    n, shift = 2 + trial % 5, rng.choice([0.0, 0.5, 2.0])
    a, b = rng.normal(shift, 1, n), rng.normal(0, 1, n)
    variant = dict(enumerate(a))
    for baseline in (dict(enumerate(b)), {k + 100: v for k, v in enumerate(b)}):  # paired, then Welch
      result = stats.compare(variant, baseline)
      low, high = result.interval
      if abs(result.p - 0.05) > 1e-9:
        assert (not low <= 0 <= high) == (result.p < 0.05), (n, result)
        checked += 1
  assert checked == 600


def test_too_few_runs_and_deterministic_differences_get_no_test():
  assert stats.compare({0: 1.0}, {0: 2.0}).p is None and stats.t_interval([3.0]) is None
  for variant, baseline in (({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0}),       # differences 1, 1
                            ({0: 2.0, 1: 3.0}, {0: 2.0, 1: 3.0}),       # differences 0, 0
                            ({0: 1.0 + 1e-12, 1: 5.0 + 1e-12}, {0: 1.0, 1: 5.0}),  # a 1e-12 shift is not "p = 0"
                            ({0: 7.0, 1: 7.0}, {5: 3.0, 6: 3.0})):      # two constant samples, unpaired
    result = stats.compare(variant, baseline)
    assert result.test == "deterministic" and result.p is None and result.interval is None, result
  assert stats.compare({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0}).difference == 1.0


def test_only_paired_seeds_are_compared_and_the_others_are_named():
  variant, baseline = {0: 1.0, 1: 2.0, 2: 4.0, 3: 10.0}, {0: 0.5, 1: 1.0, 2: 3.0, 7: -4.0}
  result = stats.compare(variant, baseline)
  assert result.seeds == (0, 1, 2) and result.dropped == (("variant", 3), ("baseline", 7))
  assert result.variant_mean == pytest.approx(7 / 3) and result.baseline_mean == pytest.approx(1.5)
  assert result.difference == pytest.approx(7 / 3 - 1.5)  # the means compared, not those of every run (4.25, 0.125)


def test_mean_intervals_are_t_and_the_bootstrap_only_from_20_values():
  values = [1.0, 2.0, 4.0]
  interval, method = stats.mean_interval(values, 0.95, "bootstrap")
  assert method == "t" and interval == pytest.approx(scipy_stats.t.interval(0.95, 2, np.mean(values),
                                                                            scipy_stats.sem(values)))
  many = list(np.random.default_rng(0).normal(size=20))
  assert stats.mean_interval(many, 0.95, "bootstrap") == (stats.bootstrap_interval(many, 0.95), "bootstrap")
  assert stats.mean_interval(many, 0.95)[1] == "t"


def test_equivalence_is_two_one_sided_tests():
  """TOST p < alpha exactly when the (1 - 2 alpha) t interval lies inside ±margin."""
  rng = np.random.default_rng(5)
  for trial in range(200):
    n, margin = 3 + trial % 6, 0.5
    a, b = rng.normal(rng.uniform(-0.6, 0.6), 0.2, n), rng.normal(0, 0.2, n)
    p = stats.tost(a, b, margin)
    low, high = stats.t_interval(a - b, 0.90)
    if abs(p - 0.05) > 1e-9:
      assert (p < 0.05) == (-margin < low and high < margin)
    lower = scipy_stats.ttest_1samp(a - b, -margin, alternative="greater").pvalue
    upper = scipy_stats.ttest_1samp(a - b, margin, alternative="less").pvalue
    assert p == pytest.approx(max(lower, upper))
  result = stats.compare({0: 1.0, 1: 1.1, 2: 0.9}, {0: 1.0, 1: 1.05, 2: 0.92}, min_effect=0.2)
  assert result.p > 0.05 and result.p_equivalent < 0.05  # not different, and within ±0.2


def test_holm_by_hand_and_untested_p_values_do_not_count():
  assert stats.holm([0.01, 0.04, 0.03, None]) == [pytest.approx(0.03), pytest.approx(0.06), pytest.approx(0.06),
                                                  None]
  assert stats.holm([0.5, 0.6]) == [pytest.approx(1.0), pytest.approx(1.0)]
  assert stats.holm([0.01, float("nan"), 0.02, 0.03]) == [pytest.approx(0.03), None, pytest.approx(0.04),
                                                          pytest.approx(0.04)]


def test_power_by_the_noncentral_t_and_by_simulation():
  # The figures: at n = 3, 80% power needs a difference of 3.3 sd of the differences (6.6 with 4 tests).
  assert stats.power_seeds(3.3, 1.0) == 3 and stats.power_seeds(3.2, 1.0) == 4
  assert stats.power_seeds(6.6, 1.0, comparisons=4) == 3
  n = stats.power_seeds(1.0, 1.0)
  assert n == 10  # d = 1: ten seeds
  d_SxN = np.random.default_rng(7).normal(1.0, 1.0, (20_000, n))
  simulated = (scipy_stats.ttest_1samp(d_SxN, 0.0, axis=1).pvalue < 0.05).mean()
  assert simulated == pytest.approx(float(stats.paired_power(n, 1.0, 1.0)), abs=4 * np.sqrt(0.8 * 0.2 / 20_000))
  assert stats.paired_power(n - 1, 1.0, 1.0) < 0.8 <= stats.paired_power(n, 1.0, 1.0)
  # Finite and rising in n and in the effect, also far in the tails (scipy's nct.cdf gives NaN there).
  n_N = np.arange(2, 60)
  powers = np.array([stats.paired_power(n_N, effect, 1.0, comparisons=4) for effect in np.linspace(0.2, 8, 40)])
  assert np.all(np.isfinite(powers)) and np.all(np.diff(powers, axis=1) >= -1e-12)
  assert np.all(np.diff(powers, axis=0) >= -1e-12)


def _fake_ablation(workdir, effects: dict, seeds=(0, 1, 2), noise=0.05, **keys):
  """An ablation workdir whose runs are written, not trained: eval/loss = 2 + effect + seed noise (paired: the
  seed's noise is shared, as a shared data order would be) + small run noise."""
  config = plan.load_ablation(ml_collections.ConfigDict(dict(
      config="experiment.py", variants={name: (f"model.d_model={16 + i}",) for i, name in enumerate(effects)},
      seeds=seeds, metrics=("eval/loss", "max:eval/accuracy"), **keys)))
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
  assert "**eval/loss** (lower is better; primary; baseline base)" in text
  assert "**max:eval/accuracy** (higher is better; exploratory; baseline base)" in text
  rows = {(r["metric"], r["variant"]): r for r in csv.DictReader(open(os.path.join(workdir, "results.csv")))}
  better, same = rows[("eval/loss", "better")], rows[("eval/loss", "same")]
  assert better["significant"] == "True" and same["significant"] == "False" and same["verdict"] == "inconclusive"
  assert float(better["difference"]) == pytest.approx(-0.2, abs=0.02) and better["test"] == "paired t"
  assert float(better["difference_low"]) < float(better["difference"]) < float(better["difference_high"]) < 0
  losses = {v: [json.loads(open(os.path.join(workdir, "runs", f"{v}_seed{s}", "metrics.jsonl")).read())["eval/loss"]
                for s in range(5)] for v in ("base", "better", "same")}
  raw = [scipy_stats.ttest_rel(losses[v], losses["base"]).pvalue for v in ("better", "same")]
  assert float(better["p"]) == pytest.approx(raw[0], rel=1e-5)  # the CSV holds 6 digits
  assert float(better["p_holm"]) == pytest.approx(stats.holm(raw)[0], rel=1e-5)
  differences = np.subtract(losses["better"], losses["base"])
  assert float(better["effect"]) == pytest.approx(differences.mean() / differences.std(ddof=1), rel=1e-5)
  assert "significant, better" in text.split("**max:eval/accuracy**")[0]
  accuracy = text.split("**max:eval/accuracy**")[1]  # accuracy 1/loss: higher is better, but not a primary metric
  assert "exploratory (unadjusted p < 0.05: better)" in accuracy and "significant" not in accuracy
  assert rows[("max:eval/accuracy", "better")]["p_holm"] == ""
  assert "no effect" not in text and "no difference\"" not in text.replace("is not \"no difference\"", "")
  assert os.path.getsize(os.path.join(workdir, "bars.png")) > 1000


def test_holm_runs_over_variants_times_primary_metrics(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  config, execute = _fake_ablation(workdir, {"base": 0.0, "better": -0.01, "same": 0.0}, seeds=(0, 1, 2),
                                   primary=("eval/loss", "max:eval/accuracy"))
  monkeypatch.setattr(runner, "execute", execute)
  assert runner.run_ablation(config, workdir) == 0
  rows = list(csv.DictReader(open(os.path.join(workdir, "results.csv"))))
  tested = [r for r in rows if r["p"]]
  assert len(tested) == 4 and all(r["primary"] == "True" for r in tested)
  family = stats.holm([float(r["p"]) for r in tested])  # one family of 2 variants x 2 metrics, not one per metric
  assert [float(r["p_holm"]) for r in tested] == [pytest.approx(p, rel=1e-4) for p in family]


def test_costs_directions_equivalence_nan_and_dropped_runs_in_the_report(tmp_path):
  """final:train/flops: a cost counter, lower is better, no test; eval/error_rate: lower is better (no substring
  guess); a min_effect turns a non-significant difference into "equivalent" only when the TOST says so; a NaN
  metric is "n/a" and leaves the others' Holm p alone; a run without a partner seed is named."""
  workdir = str(tmp_path)
  config = plan.load_ablation(ml_collections.ConfigDict(dict(
      config="experiment.py", variants={"base": ("x=0",), "costly": ("x=1",), "tiny": ("x=2",), "broken": ("x=3",)},
      seeds=(0, 1, 2, 3), metrics=("eval/error_rate", "final:train/flops", "eval/odd"),
      primary=("eval/error_rate", "eval/odd"), directions={"eval/odd": "lower"}, curve="eval/odd",
      min_effect={"eval/error_rate": 0.05})))
  os.makedirs(os.path.join(workdir, "status"))
  with open(os.path.join(workdir, "ablation.json"), "w") as f:
    json.dump(config.to_dict(), f)
  noise = [0.0, 0.01, -0.01, 0.005]
  values = {"base": lambda s: (0.30 + noise[s], 1e12, 1.0 + noise[s]),
            "costly": lambda s: (0.20 + noise[s] + 0.002 * s, 1.5e12, 1.0 + noise[s] + 0.01 * (s % 2)),
            "tiny": lambda s: (0.30 + noise[s] + 0.001 * (-1) ** s, 1e12, 1.1 + noise[s] + 0.003 * s),
            "broken": lambda s: (float("nan"), 1e12, 1.0 + noise[s] + 0.001 * s)}
  for run in plan.expand(config):
    if run["name"] == "tiny_seed3":
      continue  # never finished: its baseline run is left out of tiny's comparison
    error_rate, flops, odd = values[run["variant"]](run["seed"])
    os.makedirs(os.path.join(workdir, "runs", run["name"]))
    with open(os.path.join(workdir, "runs", run["name"], "metrics.jsonl"), "w") as f:
      f.write(json.dumps({"step": 1, "eval/error_rate": error_rate, "train/flops": flops, "eval/odd": odd}) + "\n")
    with open(plan.status_path(workdir, run["name"]), "w") as f:
      json.dump({"status": "done", "wall_s": 1.0}, f)
  text = report.write_report(workdir)
  rows = {(r["metric"], r["variant"]): r for r in csv.DictReader(open(os.path.join(workdir, "results.csv")))}
  flops = rows[("final:train/flops", "costly")]
  assert flops["p"] == "" and flops["test"] == "cost counter" and flops["verdict"] == "cost counter, no test: worse"
  assert rows[("final:train/flops", "tiny")]["verdict"] == "cost counter, no test: equal"
  assert rows[("eval/error_rate", "costly")]["verdict"] == "significant, better"  # lower error rate
  tiny = rows[("eval/error_rate", "tiny")]
  assert tiny["verdict"] == "equivalent within ±0.05" and float(tiny["p_equivalent_holm"]) < 0.05
  assert tiny["seeds"] == "0 1 2" and tiny["dropped"] == "baseline:3"
  assert "Left out of Δ and the means compared (no run of the same seed to pair with): tiny vs base: base seed 3." \
      in text
  assert rows[("eval/error_rate", "broken")]["p"] == "" and rows[("eval/error_rate", "broken")]["verdict"] == \
      "n/a (not finite)"
  family = [(m, v) for m in ("eval/error_rate", "eval/odd") for v in ("costly", "tiny", "broken")
            if rows[(m, v)]["p"]]
  assert len(family) == 5  # broken's NaN is not in the family
  assert [float(rows[k]["p_holm"]) for k in family] == \
      [pytest.approx(p, rel=1e-4) for p in stats.holm([float(rows[k]["p"]) for k in family])]
  assert "no effect" not in text


def test_until_significant_looks_with_adjusted_thresholds_and_says_so(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  config, execute = _fake_ablation(workdir, {"base": 0.0, "clear": -0.5, "small": -0.02, "same": 0.0},
                                   seeds=(0, 1, 2), noise=0.03, max_seeds=6)
  monkeypatch.setattr(runner, "execute", execute)
  still = runner.run_until_significant(config, workdir, max_runs=30, max_hours=1.0)
  extra = plan.extra_seeds(workdir)
  assert json.load(open(os.path.join(workdir, "sequential.json"))) == {"first": 3, "last": 6}
  assert "clear" not in extra and "small" in extra  # the clear difference needed no more seeds
  assert len(extra["base"]) == max(len(seeds) for seeds in extra.values()) <= 3  # at most max_seeds in all
  rows = {(r["metric"], r["variant"]): r for r in csv.DictReader(open(os.path.join(workdir, "results.csv")))}
  looks = sequential.calibrate(3, 6)
  for variant in ("clear", "small", "same"):
    row = rows[("eval/loss", variant)]
    naive = scipy_stats.ttest_rel(*[[json.loads(open(os.path.join(workdir, "runs", f"{v}_seed{s}", "metrics.jsonl"))
                                                .read())["eval/loss"] for s in map(int, row["seeds"].split())]
                                    for v in (variant, "base")]).pvalue
    assert float(row["p"]) == pytest.approx(looks.p(naive), rel=1e-4)  # adjusted for the looks
    assert float(row["difference_level"]) == pytest.approx(looks.level(0.95))
  assert rows[("eval/loss", "clear")]["verdict"] == "significant, better"
  assert set(still) <= {"small", "same"}
  text = open(os.path.join(workdir, "results.md")).read()
  assert "the number of seeds depended on the data" in text and "and added" in text
  assert f"small_seed{extra['small'][-1]}" not in text.split("Not finished")[-1]  # every added run finished


def test_equal_cost_comparisons_take_every_metric_at_the_same_flops(tmp_path):
  workdir = str(tmp_path)
  config = plan.load_ablation(ml_collections.ConfigDict(dict(
      config="experiment.py", variants={"cheap": ("model.d_model=16",), "costly": ("model.d_model=32",)},
      seeds=(0, 1), metrics=("eval/loss", "min:eval/loss", "loss@8"), eval_lengths=(8,), x_axis="train/flops")))
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
    with open(os.path.join(run_dir, "eval_validation_L8.json"), "w") as f:
      json.dump({"loss": 2.0 + run["seed"] * 0.01}, f)  # train.evaluate's, of the final checkpoint
    with open(plan.status_path(workdir, run["name"]), "w") as f:
      json.dump({"status": "done", "wall_s": 1.0}, f)
  _, rows, curves, budget = report.collect(workdir)
  assert budget == {"cheap": 4e9, "costly": 4e9}  # the cheap runs end there
  costly = [row for row in rows if row["variant"] == "costly"]
  assert [row["eval/loss"] for row in costly] == [pytest.approx(2.4), pytest.approx(2.41)]  # step 2, not 4
  assert curves["costly"][0][-1] == (4e9, pytest.approx(2.4))
  text = report.write_report(workdir)
  assert "Compared at equal cost: every metric as logged up to train/flops = 4e+09" in text
  assert "loss@8: evaluations of the final checkpoint, not equal cost." in text
  assert "| loss@8 (final checkpoint, not equal cost) |" in text.splitlines()[4]  # the summary table's header
  assert "**loss@8 (final checkpoint, not equal cost)**" in text
  at_steps = report.write_report(workdir, out=os.path.join(workdir, "at_steps"), x_axis="step")
  assert "equal cost" not in at_steps and "| costly | 1.8050 ± 0.0071 (n=2)" in at_steps  # step 4 of each
  assert "**loss@8** (lower is better; exploratory; baseline cheap)" in at_steps
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


def test_below_five_sizes_the_floor_is_held_and_the_report_says_so():
  found = scaling.fit([1e12, 1e12, 8e12, 8e12], [3.0, 3.02, 2.5, 2.51], project_to=8e13)
  assert found.form == "a*C^-b+c, c fixed" and found.fixed_floor == 0.0 and found.params["c"] == 0.0
  assert set(found.intervals) == {"a", "b"} and found.projection < 2.5
  compute = np.repeat([1e12, 4e12, 1.6e13, 6.4e13], 3)
  loss = scaling.power_law(compute, 400.0, 0.2, 1.5) + np.random.default_rng(0).normal(0, 0.005, 12)
  held = scaling.fit(compute, loss, project_to=1e15, resamples=100, floor=1.5)  # a floor known from elsewhere
  assert held.fixed_floor == 1.5 and held.params["b"] == pytest.approx(0.2, abs=0.03)
  assert held.projection == pytest.approx(scaling.power_law(1e15, 400.0, 0.2, 1.5), abs=0.03)
  table = report.scaling_table({"g": held}, "eval/loss", 0.95, "g")
  assert "the floor c held at 1.5: 4 sizes, fewer than the 5 a fitted floor needs" in table
  assert "Exponents are not compared between groups" in table


def test_failed_resamples_are_counted_and_bounds_are_flagged():
  compute = np.repeat([1e12, 4e12, 1.6e13, 6.4e13, 2.56e14], 2)
  no_floor = scaling.power_law(compute, 30.0, 0.1, -0.05)  # bends the other way: the best floor is below 0
  found = scaling.fit(compute, no_floor, project_to=2.56e15, resamples=200)
  assert found.form == "a*C^-b+c" and "c at its bound 0" in found.warnings
  # Resampling 5 sizes draws fewer than 3 distinct in 10% of resamples (1/625 + 300/3125): counted, not hidden.
  assert 0.04 < found.failed < 0.2 and np.isnan(found.projection_samples).mean() == pytest.approx(found.failed)


def test_projections_are_compared_pairing_the_resamples():
  """Two groups with the same seed noise and a 5% lower law: the projections' difference is tight (paired), much
  tighter than either projection's own interval."""
  compute = np.repeat([1e12, 4e12, 1.6e13, 6.4e13, 2.56e14], 3)
  rng = np.random.default_rng(2)
  noise = rng.normal(0, 0.02, 15)  # a seed's noise, shared by both groups, and each run's own, smaller
  fits = {name: scaling.fit(compute, scaling.power_law(compute, 400.0 * gain, 0.2, 1.5) + noise
                            + rng.normal(0, 0.002, 15), 2.56e15, size_N=np.repeat(np.arange(5), 3), resamples=200)
          for name, gain in (("base", 1.0), ("better", 0.95))}
  delta, (low, high) = scaling.projection_differences(fits, "base")["better"]
  truth = scaling.power_law(2.56e15, 400.0 * 0.95, 0.2, 1.5) - scaling.power_law(2.56e15, 400.0, 0.2, 1.5)
  assert low < delta < high < 0 and low < truth < high
  own = fits["better"].projection_interval
  assert high - low < (own[1] - own[0]) / 3


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
    loss = (scaling.power_law(flops, 300.0 * gain, 0.2, 1.8) + 0.005 * run["seed"]
            + np.random.default_rng([run["seed"], size, gain == 1.0]).normal(0, 0.001))
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
  assert "| act=gelu | a*C^-b+c, c fixed |" in text and "| act=swiglu | a*C^-b+c, c fixed |" in text
  assert "the floor c held at 0: 4 sizes" in text
  swiglu_fit = [line for line in text.splitlines() if line.startswith("| act=swiglu | a*C^-b+c, c fixed |")][0]
  low, high = map(float, swiglu_fit.split(" | ")[6].split(" ", 1)[1].strip("[]").split(", "))
  assert high < 0  # the projections' difference, with its interval
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
