"""Every entrypoint that takes a directory answers a bad one (a file, or a directory that is not a run) with one
`error:` line and exit status 1, no traceback: each is started as a user would (a subprocess), all at once."""

import os
import subprocess
import sys

from test_train import REPO


def _commands(root) -> dict:
  """{name: argv} of every entrypoint given a file where it expects a directory, or a directory without a run."""
  file, empty = str(root / "a_file"), str(root / "empty_dir")
  source = str(root / "records.jsonl")
  return {
      "train.pretrain --workdir=FILE": ["train.pretrain", "--config=configs/quickstart.py", f"--workdir={file}"],
      "train.finetune --workdir=FILE": ["train.finetune", "--config=configs/finetune/sst2_lora.py",
                                        f"--workdir={file}", f"--config.init_from={empty}"],
      "train.finetune init_from=DIR": ["train.finetune", "--config=configs/finetune/sst2_lora.py",
                                       f"--workdir={root / 'ft'}", f"--config.init_from={empty}"],
      "data.prepare --out=FILE": ["data.prepare", "--config=configs/quickstart.py", f"--out={file}"],
      "data.holdout --out=FILE": ["data.holdout", source, f"--out={file}", "--n=1"],
      "train.generate --workdir=FILE": ["train.generate", f"--workdir={file}", "--prompt=x"],
      "train.generate --workdir=DIR": ["train.generate", f"--workdir={empty}", "--prompt=x"],
      "train.evaluate --workdir=FILE": ["train.evaluate", f"--workdir={file}", "--data=run:validation"],
      "train.estimate --workdir=FILE": ["train.estimate", "--config=configs/quickstart.py", f"--workdir={file}"],
      "train.hf export --workdir=FILE": ["train.hf", "export", f"--workdir={file}", f"--out={root / 'hf_out'}"],
      "train.hf import --workdir=FILE": ["train.hf", "import", f"--hf_dir={empty}", f"--workdir={file}"],
      "ablate --workdir=FILE": ["ablate", "--config=configs/ablations/heads.py", f"--workdir={file}"],
      "ablate --dry_run --workdir=FILE": ["ablate", "--config=configs/ablations/heads.py", f"--workdir={file}",
                                          "--dry_run"],
      "ablate report FILE": ["ablate", "report", file],
  }


def test_every_entrypoint_answers_a_bad_directory_with_one_error_line(tmp_path):
  (tmp_path / "a_file").write_text("not a directory\n")
  (tmp_path / "empty_dir").mkdir()
  (tmp_path / "records.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n')
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  processes = {name: subprocess.Popen([sys.executable, "-m", *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
               for name, argv in _commands(tmp_path).items()}
  failures = []
  for name, process in processes.items():
    _, stderr = process.communicate(timeout=300)
    lines = [line for line in stderr.splitlines() if line.strip()]
    said = "=FILE" not in name or "a file" in stderr or name == "train.hf import --workdir=FILE"  # "not empty"
    if process.returncode != 1 or len(lines) != 1 or not lines[0].startswith("error: ") or not said:
      failures.append(f"{name}: exit {process.returncode}, stderr:\n{stderr[-1500:]}")
  assert not failures, "\n\n".join(failures)
  assert sorted(os.listdir(tmp_path)) == ["a_file", "empty_dir", "records.jsonl"]  # nothing was written
