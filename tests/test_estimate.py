"""train/estimate.py: its parameter count is the model's for every family, its memory figures hang together (AdamW
state twice the parameters, remat keeps less, fsdp shards), loops are costed in full, the command line prints, fails
in one line and warns when a step cannot fit, and a finished run's measurements are read back."""

import json
import os
import subprocess
import sys

import pytest

from data.sources import DataError
from model.config import ModelConfig
from test_train import REPO, tiny_config
from train import estimate as estimate_lib
from train.pretrain import train_and_evaluate

GIVEN = {"peak_flops": 1e11, "bandwidth": 1e10}  # nothing is measured: the tests stay fast
VOCAB = 50


def _config(tmp_path, **model):
  config = tiny_config(tmp_path)
  config.model.update(dropout=0.0, **model)
  return config


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
  """The estimate of the tiny decoder's config (causal_lm, the defaults), which several tests read."""
  return estimate_lib.estimate(_config(tmp_path_factory.mktemp("plain")), VOCAB, **GIVEN)


@pytest.mark.parametrize("family, objective", [("decoder", "causal_lm"), ("encoder", "masked_lm"),
                                               ("encoder_decoder", "span_corruption")])
def test_the_parameter_count_is_the_models_and_flops_follow_the_batch(tmp_path, request, family, objective):
  config = _config(tmp_path, family=family)
  config.objective = objective
  # The decoder's config is plain's: its estimate is shared.
  figures = request.getfixturevalue("plain") if family == "decoder" else estimate_lib.estimate(config, VOCAB, **GIVEN)
  assert figures["parameters"]["analytic"] == figures["parameters"]["model"] > 0
  lengths = (16, 8) if family == "encoder_decoder" else (16,)  # span corruption: seq_len / 4 rounded up to 8
  cfg = ModelConfig.from_config(config.model, VOCAB)
  assert figures["config"]["lengths"] == list(lengths)
  assert figures["flops"]["per_step"] == pytest.approx(8 * cfg.train_flops(*lengths))


def test_memory_figures_hang_together(tmp_path, plain):
  memory = plain["memory"]
  # AdamW keeps two float32 moments per parameter; its step counts are scalars.
  assert 0 <= memory["optimizer"] - 2 * memory["params"] <= 64
  assert memory["gradients"] == memory["params"]
  assert memory["activations_remat"] < memory["activations_no_remat"] == memory["activations"]
  assert memory["step"] >= memory["params"] + memory["optimizer"] and memory["fits"]

  # (XLA's plan for the CPU is not smaller with remat, even at shakespeare_char's size: the test cannot ask that.)
  remat = estimate_lib.estimate(_config(tmp_path, remat=True), VOCAB, **GIVEN)["memory"]
  assert remat["activations"] == memory["activations_remat"]

  sharded_config = _config(tmp_path)
  sharded_config.mesh.update(data=4, fsdp=2)
  sharded = estimate_lib.estimate(sharded_config, VOCAB, **GIVEN)["memory"]
  assert sharded["params"] < 0.6 * memory["params"] and sharded["optimizer"] < 0.6 * memory["optimizer"]
  assert sharded["activations"] == pytest.approx(memory["activations"] / 8)  # 8 rows over 8 devices


def test_accumulated_microbatches_are_costed_in_full(tmp_path, plain):
  # XLA's cost analysis counts a loop's body once; the estimate costs a flat microbatch grad_accum times.
  config = _config(tmp_path)
  config.train.grad_accum = 2
  accumulated = estimate_lib.estimate(config, VOCAB, **GIVEN)
  # (the optimizer update, counted twice, is a few per cent of a tiny model's step; a body counted once is half)
  assert accumulated["flops"]["xla_per_step"] == pytest.approx(plain["flops"]["xla_per_step"], rel=0.1)
  assert accumulated["memory"]["gradients"] == 2 * plain["memory"]["gradients"]
  assert accumulated["memory"]["activations"] == pytest.approx(plain["memory"]["activations"] / 2)


def test_the_activation_count_by_hand():
  cfg = ModelConfig(vocab_size=10, num_layers=2, d_model=8, num_heads=2, num_kv_heads=2, head_dim=4, mlp_dim=32)
  # Per token and layer: 4 D + (2 H + 2 G) K + 2 F floats and H x L float32 softmax; per token: a mask byte per key,
  # 2 D for the final norm, 2 V float32 logits.
  layer = (4 * 8 + 8 * 4 + 2 * 32) * 4 + 4 * 2 * 3
  per_token = 2 * layer + 3 + 2 * 8 * 4 + 2 * 10 * 4
  assert estimate_lib.activation_bytes(cfg, rows=5, length=3) == 5 * 3 * per_token
  remat_per_token = 2 * 8 * 4 + layer + 3 + 2 * 8 * 4 + 2 * 10 * 4
  assert estimate_lib.activation_bytes(cfg, rows=5, length=3, remat=True) == 5 * 3 * remat_per_token


def test_measured_reads_a_finished_run(tmp_path, plain):
  workdir = tmp_path / "run"
  train_and_evaluate(tiny_config(tmp_path, steps=3), str(workdir))
  measured = estimate_lib.measured(str(workdir))
  assert measured["intervals"] == 2 and measured["tokens_per_s"] > 0 and measured["peak_memory"] > 2**20
  assert measured["step_s"] == pytest.approx(8 * 16 / measured["tokens_per_s"])
  table = estimate_lib.report(plain, measured).splitlines()
  assert any(line.startswith("step time (ms)") for line in table) and "ratio" in "".join(table)

  with open(workdir / "metrics.jsonl", "w") as f:
    f.write(json.dumps({"step": 1, "train/tokens_per_sec": 5.0}) + "\n")
  with pytest.raises(DataError, match="none after the first 1"):
    estimate_lib.measured(str(workdir))


def _start(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen([sys.executable, "-m", "train.estimate", "--config=configs/shakespeare_char.py",
                           "--peak_tflops=0.2", "--bandwidth_gbs=10", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finished(process):
  stdout, stderr = process.communicate(timeout=300)
  return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _cli(*args):
  return _finished(_start(*args))


def test_cli_prints_the_prediction_and_warns_in_one_line():
  fits, tight = _start(), _start("--device_memory_gib=0.01")  # the two commands run side by side
  result, tight = _finished(fits), _finished(tight)
  assert result.returncode == 0 and not result.stderr.strip(), result.stderr
  for name in ("parameters", "FLOPs", "memory / device", "step time"):
    assert any(line.startswith(name) for line in result.stdout.splitlines()), result.stdout
  assert "810,240" in result.stdout and ": fits" in result.stdout

  lines = [line for line in tight.stderr.splitlines() if line.strip()]
  assert tight.returncode == 0 and len(lines) == 1, tight.stderr
  assert lines[0].startswith("warning: a train step needs about") and "does NOT fit" in tight.stdout


def test_cli_errors_are_one_line():
  result = _cli("--config.model.nlayers=3")
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 1 and len(lines) == 1 and "unknown config key 'nlayers'" in lines[0], result.stderr
