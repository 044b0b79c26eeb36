"""A start that fails on its data leaves a workdir the corrected command can use. Every check that can fail on a
fresh workdir runs before anything is written in it, the data's included (paths, opening, the first bytes of each
file); a failure found later (a bad byte deep in a file) leaves a run that never reached a checkpoint, which starts
over with other settings, saying so in one line. For pretraining, fine-tuning and data.prepare, each case is the
error, then the corrected command in the same workdir; the run then says what happened (eval lines, summary)."""

import json
import re
import os

import pytest

from configs.finetune import common
from data.prepare import prepare
from data.sources import PROBE_BYTES, DataError
from test_train import SEED, TEXT, logged, tiny_config
from train.finetune import finetune
from train.pretrain import train_and_evaluate

NON_UTF8 = b"caf\xe9 au lait\n"


def _bad_files(root) -> dict:
  """{case: (path, the error's words)}: a missing file, an empty one, a non-UTF-8 byte early and one past the probe."""
  (root / "empty.txt").write_text(" \n\n")
  (root / "early.txt").write_bytes(NON_UTF8 + TEXT.encode())
  late = TEXT.encode() * (PROBE_BYTES // len(TEXT) + 2)
  (root / "late.txt").write_bytes(late + NON_UTF8)
  return {"no such path": (str(root / "nosuch.txt"), "no files match"),
          "empty corpus": (str(root / "empty.txt"), "the corpus is empty"),
          "non-UTF-8 bytes": (str(root / "early.txt"), "is not UTF-8 (0xe9)"),
          "non-UTF-8 bytes past the first chunk": (str(root / "late.txt"), f"byte {len(late) + 3} ")}


@pytest.mark.parametrize("case", ["no such path", "empty corpus", "non-UTF-8 bytes",
                                  "non-UTF-8 bytes past the first chunk"])
def test_pretraining_after_a_data_error_runs_in_the_same_workdir(tmp_path, capsys, case):
  path, words = _bad_files(tmp_path)[case]
  workdir = str(tmp_path / "run")
  config = tiny_config(tmp_path, steps=2, eval_every=2, checkpoint_every=2)
  config.data.train_path = path
  with pytest.raises(DataError, match=re.escape(words)):
    train_and_evaluate(config, workdir)
  late = case.endswith("past the first chunk")
  assert os.path.exists(os.path.join(workdir, "config.json")) == late  # only what the probe cannot see gets in
  capsys.readouterr()
  config = tiny_config(tmp_path, steps=2, eval_every=2, checkpoint_every=2)  # the corpus of the first config
  if case.startswith("non-UTF-8"):  # the command the error asks for
    config.data.update(train_path=path, encoding_errors="replace")
  train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert list(logged(workdir)) == [1, 2]
  assert ("never reached a checkpoint; starting over with config.data.encoding_errors='replace' (was 'strict')"
          in out) == late
  assert "step 2/2: train loss " in out and ", eval loss " in out and " tok/s, MFU " in out
  assert "ablax: done: step 2/2" in out and f"ablax: in {workdir}/: checkpoints/2, config.json" in out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  root = tmp_path_factory.mktemp("fresh_base")
  workdir = str(root / "base")
  train_and_evaluate(tiny_config(root, steps=2, checkpoint_every=2, eval_every=2), workdir)
  return root, workdir


def _finetune_config(root, base_workdir, train_path):
  records = [{"text": f"the film was {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(40)]
  (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  config = common.get_config()
  config.init_from, config.task = base_workdir, "classify"
  config.data.update(train_path=train_path, val_path=str(root / "train.jsonl"), text_field="text",
                     label_field="label")
  config.peft.update(method="lora", lora_rank=2, lora_alpha=4.0)
  config.train.update(steps=2, batch_size=8, seq_len=16, warmup_steps=1, eval_every=2, eval_batches=1,
                      checkpoint_every=2, log_every=1, num_samples=0, seed=SEED)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  return config


@pytest.mark.parametrize("case", ["no such path", "non-UTF-8 bytes"])
def test_finetuning_after_a_data_error_runs_in_the_same_workdir(tmp_path, base, capsys, case):
  root, base_workdir = base
  bad = {"no such path": str(tmp_path / "nosuch.jsonl"), "non-UTF-8 bytes": str(tmp_path / "bad.jsonl")}[case]
  (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok", "label": 1}\n{"text": "' + NON_UTF8.strip() +
                                       b'", "label": 0}\n')
  workdir = str(tmp_path / "run")
  with pytest.raises(DataError, match="no files match" if case == "no such path" else "is not UTF-8"):
    finetune(_finetune_config(tmp_path, base_workdir, bad), workdir)
  assert not os.path.exists(os.path.join(workdir, "config.json"))
  config = _finetune_config(tmp_path, base_workdir, str(tmp_path / "train.jsonl") if case == "no such path" else bad)
  if case == "non-UTF-8 bytes":  # ignore, not replace: the base run's char vocabulary has no U+FFFD
    config.data.encoding_errors = "ignore"
  finetune(config, workdir)
  out = capsys.readouterr().out
  assert list(logged(workdir)) == [1, 2] and "step 2/2: train loss " in out and "eval macro_f1 " in out
  assert "ablax: done: step 2/2" in out and "run_info.json" in out


@pytest.mark.parametrize("case", ["empty corpus", "non-UTF-8 bytes"])
def test_prepare_after_a_data_error_runs_in_the_same_directory(tmp_path, case):
  path, words = _bad_files(tmp_path)[case]
  data = tiny_config(tmp_path).data
  good, data.train_path = data.train_path, path
  out = str(tmp_path / "prepared")
  with pytest.raises(DataError, match=re.escape(words)):
    prepare(data, out, workers=1)
  assert not os.path.exists(out)
  if case == "empty corpus":
    data.train_path = good
  else:
    data.encoding_errors = "replace"
  manifest = prepare(data, out, workers=1)
  assert manifest["splits"]["train"]["tokens"] > 0 and os.path.exists(os.path.join(out, "manifest.json"))
