"""Forces 8 host CPU devices before jax is imported, so mesh tests run anywhere."""

import os

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
  """The workdir of an uninterrupted 8-step tiny run (test_train.tiny_config, checkpoints every 3 steps), which the
  resumed runs of test_train and test_faults must equal: trained once for both."""
  from test_train import tiny_config
  from train.pretrain import train_and_evaluate
  root = tmp_path_factory.mktemp("uninterrupted")
  workdir = str(root / "whole")
  train_and_evaluate(tiny_config(root, steps=8, checkpoint_every=3), workdir)
  return workdir
