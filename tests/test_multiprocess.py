"""Two processes on localhost, 4 CPU devices each, as one job on a (data=2, fsdp=2, tensor=2) mesh: the same
losses as one process with 8 devices, through a kill of both and a resume."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from test_faults import CONFIG
from test_train import REPO, TEXT, logged

MESH = ("--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2")


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
  root = tmp_path_factory.mktemp("multiprocess")
  (root / "corpus.txt").write_text(TEXT)
  (root / "experiment.py").write_text(CONFIG.format(corpus=str(root / "corpus.txt")))
  return root


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(root, workdir, devices: int, *args, log: str):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  with open(root / log, "w") as out:
    return subprocess.Popen([sys.executable, "-m", "train.pretrain", f"--config={root / 'experiment.py'}",
                             f"--workdir={workdir}", *MESH, *args], cwd=REPO, env=env, stdout=out,
                            stderr=subprocess.STDOUT)


def _job(root, workdir):
  """Both processes of a 2-process job."""
  port = _free_port()
  return [_run(root, workdir, 4, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
               f"--process_id={i}", log=f"{os.path.basename(workdir)}_{i}.log") for i in range(2)]


def _wait(processes, root, workdir):
  for i, process in enumerate(processes):
    assert process.wait(timeout=600) == 0, open(root / f"{os.path.basename(workdir)}_{i}.log").read()[-3000:]


def test_two_processes_equal_one_and_resume_after_both_are_killed(experiment):
  root = experiment
  reference = str(root / "one_process")
  one_process = _run(root, reference, 8, log="one_process.log")  # runs beside the job, its kill and its resume

  workdir = str(root / "two_processes")
  job = _job(root, workdir)
  while all(p.poll() is None for p in job) and not os.path.isdir(os.path.join(workdir, "checkpoints", "4")):
    time.sleep(0.01)
  for process in job:
    process.send_signal(signal.SIGKILL)
    process.wait()
  assert max(logged(workdir)) < 24  # killed before the end
  _wait(_job(root, workdir), root, workdir)
  assert one_process.wait(timeout=600) == 0, open(root / "one_process.log").read()[-3000:]

  whole, resumed = logged(reference), logged(workdir)
  assert sorted(resumed) == list(range(1, 25))
  np.testing.assert_allclose([resumed[s] for s in sorted(whole)], [whole[s] for s in sorted(whole)], atol=1e-5,
                             rtol=0)
  eval_loss = lambda w: [r["eval/loss"] for r in map(json.loads, open(os.path.join(w, "metrics.jsonl")))
                         if "eval/loss" in r]
  np.testing.assert_allclose(eval_loss(workdir), eval_loss(reference), atol=1e-5, rtol=0)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["22", "24"]
