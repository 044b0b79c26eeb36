"""The ablation runner: expansion, skip / resume / failure handling, aggregation and the report."""

import glob
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys

import ml_collections
import pytest

import ablate.plan
import ablate.report
import ablate.runner
import ablate.speedup
from model.config import ConfigError
from test_train import REPO, TEXT

TINY_CONFIG = """
from configs import base

def get_config():
  config = base.get_config()
  config.data.train_path = {corpus!r}
  config.data.tokenizer = "char"
  config.model.update(num_layers=1, d_model=16, num_heads=2, max_len=32)
  config.train.update(steps=4, batch_size=8, seq_len=16, warmup_steps=1, eval_every=2, eval_batches=2,
                      checkpoint_every=2, log_every=1, num_samples=0)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  return config
"""


def ablation_config(**overrides):
  config = dict(config="experiment.py", variants={"a": ("model.d_model=16",)})
  config.update(overrides)
  return ablate.plan.load_ablation(ml_collections.ConfigDict(config))


def test_named_variants_then_grid_product_interleaved_over_seeds():
  config = ablation_config(overrides=("train.steps=4",), seeds=(0, 1),
                           grid={"heads": ("model.num_heads", (1, 2)), "pos": ("model.position", ("rope", "alibi"))})
  runs = ablate.plan.expand(config)
  variants = ["a", "heads=1,pos=rope", "heads=1,pos=alibi", "heads=2,pos=rope", "heads=2,pos=alibi"]
  assert [r["name"] for r in runs] == [f"{v}_seed{s}" for s in (0, 1) for v in variants]  # every variant per seed
  assert ablate.plan.baseline(config) == "a"
  assert runs[0]["overrides"] == ("train.steps=4", "model.d_model=16", "train.seed=0")
  assert runs[7]["overrides"] == ("train.steps=4", "model.num_heads=1", "model.position=alibi", "train.seed=1")
  extra = ablate.plan.expand(config, {"a": [7], "heads=2,pos=rope": [7]})
  assert [r["name"] for r in extra[10:]] == ["a_seed7", "heads=2,pos=rope_seed7"]
  command = ablate.runner.commands(runs[7], config, "/abl")[0]
  assert command[1:5] == ["-m", "train.pretrain", "--config=experiment.py", "--workdir=/abl/runs/heads=1,pos=alibi_seed1"]
  assert command[5:] == ["--config.train.steps=4", "--config.model.num_heads=1", "--config.model.position=alibi",
                         "--config.train.seed=1"]


def test_seed_placeholder_names_the_same_seed_run_of_another_ablation():
  config = ablation_config(variants={"branch": ("train.branch_from=runs/stable/runs/constant_seed{seed}",)}, seeds=(3, 4))
  assert [r["overrides"] for r in ablate.plan.expand(config)] == [
      ("train.branch_from=runs/stable/runs/constant_seed3", "train.seed=3"),
      ("train.branch_from=runs/stable/runs/constant_seed4", "train.seed=4")]


def test_tuple_values_are_written_as_python_literals():
  config = ablation_config(variants={}, grid={"t": ("peft.trainable", (("_bias$",), ()))}, seeds=(0,))
  assert [r["overrides"][0] for r in ablate.plan.expand(config)] == ["peft.trainable=('_bias$',)", "peft.trainable=()"]


@pytest.mark.parametrize("overrides, expected", [
    ({"sweeps": 1}, "config.sweeps: not an ablation key"),
    ({"sweep": ("lr", "width")}, r"config.sweep: expected two grid axes \(\), got \('lr', 'width'\)"),
    ({"entrypoint": "train"}, "config.entrypoint: expected pretrain or finetune"),
    ({"variants": {}}, "the ablation has no variants"),
    ({"variants": {"lr=R/2": ("train.learning_rate=0.1",)}}, "variant name 'lr=R/2' cannot name a run directory"),
    ({"metrics": ("loss@128",)}, "needs 128 in config.eval_lengths"),
    ({"metrics": ("best:eval/loss",)}, "expected one of final, min, max, mean, median"),
    ({"baseline": "b"}, "config.baseline: 'b' is not a variant"),
    ({"alpha": 1.5}, r"config.alpha: expected a number in \(0, 1\)"),
])
def test_bad_ablation_configs_name_the_key(overrides, expected):
  with pytest.raises(ConfigError, match=expected):
    ablation_config(**overrides)


def test_mean_and_std_by_hand():
  rows = [{"variant": "a", "x": 1.0, "y": 2.0}, {"variant": "a", "x": 2.0, "y": None},
          {"variant": "a", "x": 6.0, "y": 4.0}, {"variant": "b", "x": 5.0, "y": 1.0}]
  summary = ablate.report.summarize(rows, ["x", "y"])
  mean, std, n = summary["a"]["x"]
  assert (mean, n) == (3.0, 3)
  assert std == pytest.approx(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) ** 0.5 / (3 - 1) ** 0.5)
  assert summary["a"]["y"] == (3.0, pytest.approx(2 ** 0.5), 2)
  assert summary["b"]["x"] == (5.0, 0.0, 1)
  table = ablate.report.markdown_table(summary, ["x", "y"])  # higher is better for both
  assert "| a | 3.0000 ± 2.6458 (n=3) | **3.0000 ± 1.4142 (n=2)** |" in table
  assert "| b | **5.0000 ± 0.0000 (n=1)** | 1.0000 ± 0.0000 (n=1) |" in table
  # The best is the smallest for losses and the largest for accuracies, whatever the aggregate.
  rows = [{"variant": "a", "min:eval/loss": 2.0, "min:eval/accuracy": 0.6},
          {"variant": "b", "min:eval/loss": 3.0, "min:eval/accuracy": 0.7}]
  table = ablate.report.markdown_table(ablate.report.summarize(rows, ["min:eval/loss", "min:eval/accuracy"]),
                                       ["min:eval/loss", "min:eval/accuracy"])
  assert "| a | **2.0000 ± 0.0000 (n=1)** | 0.6000 ± 0.0000 (n=1) |" in table
  assert "| b | 3.0000 ± 0.0000 (n=1) | **0.7000 ± 0.0000 (n=1)** |" in table


def test_run_metrics_read_from_the_run_files(tmp_path):
  records = [{"step": 1, "train/loss": 3.0}, {"step": 2, "train/loss": 2.0, "eval/loss": 2.5},
             {"step": 3, "train/loss": 2.2}, {"step": 4, "train/loss": 1.0, "eval/loss": 2.75}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  (tmp_path / "eval_validation_L64.json").write_text(json.dumps({"perplexity": 7.5}))
  (tmp_path / "eval_data.json").write_text(json.dumps({"accuracy": 0.8, "perplexity": 9.0}))
  specs = ["eval/loss", "min:eval/loss", "mean:train/loss", "median:train/loss", "perplexity@64", "perplexity@128",
           "accuracy@data"]
  values, curve = ablate.report.run_metrics(str(tmp_path), specs, "eval/loss")
  assert values == {"eval/loss": 2.75, "min:eval/loss": 2.5, "mean:train/loss": 2.05,
                    "median:train/loss": statistics.median([3.0, 2.0, 2.2, 1.0]), "perplexity@64": 7.5,
                    "perplexity@128": None, "accuracy@data": 0.8}
  assert curve == [(2, 2.5), (4, 2.75)]
  os.remove(tmp_path / "eval_data.json")
  assert ablate.report.run_metrics(str(tmp_path), ["accuracy@data"], "eval/loss")[0] == {"accuracy@data": None}


def test_data_metrics_evaluate_the_final_checkpoint_on_eval_data(tmp_path):
  """`key@data` adds one train.evaluate command on eval_data writing RUN/eval_data.json, after the lengths' one."""
  config = _tiny_ablation(tmp_path, eval_data="dev.jsonl", metrics=("accuracy@data", "loss@8"), eval_lengths=(8,))
  run = ablate.plan.expand(config)[0]
  train, lengths, data = ablate.runner.commands(run, config, "W")
  assert "--seq_len=8" in lengths and not any(a.startswith("--seq_len") for a in data)
  assert data[2:5] == ["train.evaluate", f"--workdir={os.path.join('W', 'runs', run['name'])}", "--data=dev.jsonl"]
  assert data[-1] == f"--output={os.path.join('W', 'runs', run['name'], 'eval_data.json')}"
  config = _tiny_ablation(tmp_path, metrics=("eval/loss",), eval_lengths=())
  assert len(ablate.runner.commands(run, config, "W")) == 1


def _tiny_ablation(tmp_path, **overrides):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text(TEXT)
  experiment = tmp_path / "experiment.py"
  experiment.write_text(TINY_CONFIG.format(corpus=str(corpus)))
  config = dict(config=str(experiment), variants={"rope": ("model.position=rope",), "broken": ("model.num_heads=3",)},
                seeds=(0, 1), eval_lengths=(8, 32), parallel=2,
                metrics=("eval/loss", "min:eval/loss", "loss@8", "loss@32"))
  config.update(overrides)
  return ablate.plan.load_ablation(ml_collections.ConfigDict(config))


def _read(workdir, name):
  with open(os.path.join(workdir, name)) as f:
    return f.read()


def test_runs_skips_finished_resumes_interrupted_reports_failures(tmp_path):
  workdir = str(tmp_path / "ablation")
  config = _tiny_ablation(tmp_path)
  runs = {r["name"]: r for r in ablate.plan.expand(config)}
  # An interrupted run: its training command stopped at step 2 (a checkpoint, no status file).
  interrupted = ablate.runner.commands(runs["rope_seed1"], config, workdir)[0]
  subprocess.run(interrupted + ["--config.train.steps=2"], check=True, capture_output=True, cwd=REPO)

  assert ablate.runner.run_ablation(config, workdir) == 2  # broken_seed0 and broken_seed1
  for name in runs:
    status = ablate.plan.read_status(workdir, name)["status"]
    assert status == ("failed" if name.startswith("broken") else "done"), name
  assert "num_heads" in ablate.plan.read_status(workdir, "broken_seed0")["last_line"]
  with open(os.path.join(workdir, "runs", "rope_seed1", "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == [1, 2, 3, 4]  # steps 1-2 from the first process, 3-4 resumed
  rows = list(ablate.report.collect(workdir)[1])
  rope = {row["seed"]: row for row in rows if row["variant"] == "rope"}
  assert rope[1]["eval/loss"] != rope[0]["eval/loss"]  # seeds differ
  assert all(isinstance(row["loss@32"], float) for row in rows if row["status"] == "done")

  report = _read(workdir, "results.md")
  assert "2 of 4 runs finished" in report and "broken_seed0 (failed)" in report
  for figure in ("curves.png", "bars.png", "lengths_loss.png"):
    assert os.path.getsize(os.path.join(workdir, figure)) > 1000

  # Finished runs are skipped: nothing runs again but the failed ones.
  logs = {name: _read(workdir, f"logs/{name}.log") for name in runs}
  assert ablate.runner.run_ablation(config, workdir) == 2
  for name in runs:
    again = _read(workdir, f"logs/{name}.log")
    assert (again == logs[name]) == (not name.startswith("broken")), name

  # The report rebuilt from disk equals the one written at the end of the run.
  csv_text = _read(workdir, "results.csv")
  os.remove(os.path.join(workdir, "results.md"))
  os.remove(os.path.join(workdir, "results.csv"))
  result = subprocess.run([sys.executable, "-m", "ablate", "report", workdir], cwd=REPO,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  assert _read(workdir, "results.md") == report and _read(workdir, "results.csv") == csv_text


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "ablations", "*.py"))))
def test_every_ablation_config_loads_and_expands(path):
  if path.endswith("__init__.py"):
    return
  spec = importlib.util.spec_from_file_location("ablation_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  ablation = ablate.plan.load_ablation(module.get_config())  # its baseline is one of its variants, ...
  assert ablate.plan.expand(ablation) and ablate.plan.baseline(ablation) in dict(ablate.plan.variants(ablation))


def test_cli_dry_run_lists_runs_and_runs_nothing(tmp_path):
  config_file = tmp_path / "ablation.py"
  config_file.write_text(
      "import ml_collections\n\ndef get_config():\n"
      "  return ml_collections.ConfigDict(dict(config='configs/quickstart.py', seeds=(0, 1),\n"
      "                                        grid={'heads': ('model.num_heads', (1, 2, 4))}))\n")
  workdir = tmp_path / "ablation"
  result = subprocess.run([sys.executable, "-m", "ablate", f"--config={config_file}", f"--workdir={workdir}",
                           "--dry_run"], cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  assert "heads=4_seed1: model.num_heads=4 train.seed=1" in result.stdout
  # quickstart: 400 steps x 16 x 128 tokens a run; FLOPs and time from the run's model (6 runs of three sizes)
  assert "6 runs: 2,400 steps, 4.9M tokens, " in result.stdout and " TFLOP (ModelConfig.train_flops" in result.stdout
  assert re.search(r"time: about \d+m\d\ds of training, one run after another \(train/estimate.py: [\d.]+ ms a step "
                   r"of heads=1_seed0", result.stdout), result.stdout
  assert not workdir.exists()
  bad = subprocess.run([sys.executable, "-m", "ablate", "report", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True)
  assert bad.returncode == 1 and bad.stderr.strip() == f"error: {tmp_path}: no ablation.json; not an ablation workdir"


def test_speedup_to_the_baselines_final_value_seed_by_seed():
  from scipy import stats as scipy_stats
  assert ablate.speedup.first_reach([(0, 10.0), (100, 4.5), (200, 3.0)], 4.0) == pytest.approx(100 + 100 * 0.5 / 1.5)
  assert ablate.speedup.first_reach([(0, 0.2), (50, 0.9)], 0.5, lower_is_better=False) == pytest.approx(50 * 0.3 / 0.7)
  assert ablate.speedup.first_reach([(0, 10.0), (100, 6.0)], 4.0) is None
  curves = {"base": {0: [(0, 10.0), (100, 5.0), (200, 4.0)], 1: [(0, 10.0), (100, 5.0), (200, 4.5)],
                     2: [(0, 10.0), (200, 4.0)]},
            "fast": {0: [(0, 10.0), (100, 4.5), (200, 3.0)], 1: [(0, 10.0), (100, 4.5), (200, 4.0)],
                     2: [(0, 10.0), (200, 5.0)]}}
  found = ablate.speedup.speedups(curves, "base")["fast"]
  assert found["ratios"] == {0: pytest.approx(1.5), 1: pytest.approx(2.0), 2: None}  # seed 2 never gets to 4.0
  assert (found["reached"], found["n"]) == (2, 3) and found["mean"] == pytest.approx(math.sqrt(3.0))
  logs = [math.log(1.5), math.log(2.0)]
  low, high = scipy_stats.t.interval(0.95, 1, loc=sum(logs) / 2, scale=scipy_stats.sem(logs))
  assert found["interval"] == pytest.approx((math.exp(low), math.exp(high)))
  text = ablate.speedup.table({"fast": found}, "base", "eval/loss", "step", 0.95)
  assert "| fast | 1.732 |" in text and "2: not reached" in text


def test_optimizer_ablation_stages_and_bad_rates():
  from configs.ablations import optimizers
  main = ablate.plan.load_ablation(optimizers.get_config("adamw=0.004,muon=0.008,lion=0.001,adafactor=0.004"))
  runs = {r["name"]: r["overrides"] for r in ablate.plan.expand(main)}
  assert len(runs) == 18 and "train.learning_rate=0.008" in runs["muon_seed1"] and main.speedup
  assert "train.decay_shape=sqrt" in runs["adamw_wsd_sqrt_seed3"] and "train.learning_rate=0.004" in runs["adamw_wsd_sqrt_seed3"]
  for bad, message in (("adamw=0.004", "give a rate for each of"), ("sgd=1", "expected NAME=VALUE"),
                       ("adamw=x,muon=1,lion=1,adafactor=1", "'x' is not a number")):
    with pytest.raises(ValueError, match=message):
      optimizers.get_config(bad)


def test_sweep_lines_of_a_tied_axis_read_back_from_json():
  import ablate.sweep
  grid = {"width": ("model.d_model", (64, 128)), "stab": (("model.qk_norm", "train.z_loss"), ((False, 0.0), (True, 0.0))),
          "lr": ("train.learning_rate", (0.001, 0.01))}
  config = ablation_config(variants={}, grid=json.loads(json.dumps(grid)), sweep=("lr", "stab"))  # tuples -> lists
  loss = {(64, False, 0.001): 3.0, (64, False, 0.01): 2.0, (64, True, 0.001): 2.5, (64, True, 0.01): 2.6,
          (128, False, 0.001): 2.9, (128, False, 0.01): 2.2, (128, True, 0.001): 2.4, (128, True, 0.01): 1.9}
  summary = {variant: {"eval/loss": (loss[(cell["width"], cell["stab"][0], cell["lr"])], 0.0, 1)}
             for variant, cell in ablate.plan.grid_cells(config).items()}
  found = ablate.sweep.points(config, summary, "eval/loss")
  assert found["width=64"] == {"Falsex0.0": [(0.001, 3.0), (0.01, 2.0)], "Truex0.0": [(0.001, 2.5), (0.01, 2.6)]}
  text = ablate.sweep.table(config, summary, "eval/loss", lower_is_better=True)
  assert "| width=64 | Truex0.0 | 0.001 | 2.5000 | 2.6000 | +0.1000 |" in text  # the first line's best lr costs it 0.1


def test_the_curves_band_interpolates_seeds_logged_at_different_seconds():
  import ablate.figures
  # Seeds share their steps: the band is at those steps, the plain mean and population std.
  x_T, mean_T, std_T = ablate.figures.seed_band([[(10, 1.0), (20, 3.0)], [(10, 3.0), (20, 5.0)]])
  assert x_T.tolist() == [10, 20] and mean_T.tolist() == [2.0, 4.0] and std_T.tolist() == [1.0, 1.0]
  # Seconds differ between seeds: every logged x within the range both cover, each curve interpolated there.
  x_T, mean_T, _ = ablate.figures.seed_band([[(0.0, 1.0), (10.0, 3.0)], [(1.0, 2.0), (5.0, 3.0), (12.0, 4.0)]])
  assert x_T.tolist() == [1.0, 5.0, 10.0]
  assert mean_T.tolist() == pytest.approx([(1.2 + 2.0) / 2, (2.0 + 3.0) / 2, (3.0 + (3.0 + 5 / 7)) / 2])
