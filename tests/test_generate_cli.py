"""The generation, evaluation, export and harness commands as a user types them: --stop takes the escapes a user
types (\\n, \\t, \\\\); a prompt longer than a learned-position model's window prints one warning line with the
numbers; task evaluation shows a progress bar on stderr; every bad input is one `error:` line and exit status 1.
The model is a tiny GPT-2 built here whose greedy continuation is newlines only (its final norm outputs the
newline token's embedding), so what a stop string does is known.
"""

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_hf import _hf_model, _train_config  # noqa: E402
from test_tokenizers import build_tokenizer  # noqa: E402
from test_train import REPO, TEXT  # noqa: E402
from train import evaluate as evaluate_lib  # noqa: E402
from train.generate import unescape  # noqa: E402
from train.hf import import_hf  # noqa: E402

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def newlines(tmp_path_factory):
  """An imported GPT-2 (48 positions) that greedily writes "\\n" forever; its tokenizer; a local task file."""
  root = tmp_path_factory.mktemp("generate_cli")
  (root / "corpus.txt").write_text(TEXT)
  tokenizer = build_tokenizer("gpt2", str(root / "hf"))
  eot, newline = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "Ċ"])  # Ċ: byte-level BPE's "\n"
  model = _hf_model("gpt2", 512, eot, eot)
  with torch.no_grad():  # logits = embeddings @ ln_f(x) = embeddings @ 3 e_newline: newline is always the largest
    model.transformer.wte.weight[newline] *= 3
    model.transformer.ln_f.weight.zero_()
    model.transformer.ln_f.bias.copy_(model.transformer.wte.weight[newline])
  ids = tokenizer("x")["input_ids"]
  with torch.no_grad():
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=eot)
  assert tokenizer.decode(out[0, len(ids):]) == "\n" * NEW_TOKENS
  model.save_pretrained(root / "hf", safe_serialization=True)
  import_hf(str(root / "hf"), str(root / "run"), _train_config(root))
  (root / "mc.jsonl").write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n"
                                         for i, t in enumerate(["the fox", "a dog", "東京", "café"])))
  (root / "mc.yaml").write_text(json.dumps({"kind": "multiple_choice", "data": str(root / "mc.jsonl"),
                                            "prompt": "{text}:", "choices": ["no", "yes"], "label_field": "label"}))
  return {"root": root, "workdir": str(root / "run"), "tokenizer": tokenizer}


def _start(module, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _finish(process):
  stdout, stderr = process.communicate(timeout=300)
  return process.returncode, stdout, stderr


def test_unescape_makes_the_typed_escapes_characters():
  assert unescape(r"a\nb\tc") == "a\nb\tc"
  assert unescape(r"\\n") == "\\n"  # an escaped backslash, then n
  assert unescape(r"C:\path\x") == r"C:\path\x"  # other backslashes stay as typed


def test_stop_strings_take_escapes_and_a_long_prompt_warns(newlines):
  """--stop='\\n\\n' ends the continuation before the first blank line (nothing: it opens with two newlines), as
  the README's example means; --stop='\\\\n' is a backslash and n, which never comes; a prompt over the 48-token
  window says so once, with the numbers."""
  long_prompt = "the quick brown fox jumps over the lazy dog " * 6
  length = len(newlines["tokenizer"](long_prompt)["input_ids"])  # GPT-2's tokenizer adds nothing: the run neither
  assert length > 48
  common = [f"--workdir={newlines['workdir']}", "--temperature=0", f"--max_new_tokens={NEW_TOKENS}"]
  runs = [_start("train.generate", *common, "--prompt=x", r"--stop=\n\n"),
          _start("train.generate", *common, "--prompt=x", r"--stop=\\n"),
          _start("train.generate", *common, f"--prompt={long_prompt}")]
  (rc1, out1, err1), (rc2, out2, err2), (rc3, out3, err3) = map(_finish, runs)
  assert (rc1, rc2, rc3) == (0, 0, 0), (err1, err2, err3)
  assert out1 == "x\n"
  assert out2 == "x" + "\n" * NEW_TOKENS + "\n"
  assert out3 == long_prompt + "\n" * NEW_TOKENS + "\n"
  warnings = [line for line in err3.splitlines() if "warning" in line]
  assert warnings == [f"ablax: warning: the prompt is {length} tokens, longer than this model's window of 48 "
                      "(learned positions, config.model.max_len): it reads the last 48, then the last 24 as the "
                      "window slides"]
  assert not any("warning" in line for line in (err1 + err2).splitlines())


def test_task_evaluation_shows_progress(newlines, capsys):
  evaluate_lib.run_tasks(newlines["workdir"], [str(newlines["root"] / "mc.yaml")], batch_size=4, progress=True,
                         output=str(newlines["root"] / "mc.json"))
  stderr = capsys.readouterr().err
  assert "100%" in stderr and "8/8 [" in stderr and "requests" in stderr  # 4 examples x 2 choices


def test_user_errors_are_one_line(newlines, tmp_path):
  """Bad inputs of train.generate (silent or a traceback before), train.hf and train.harness: exit status 1 and
  one `error:` line naming the flag or file (all started at once; train.evaluate's are in test_evaluate.py)."""
  run, root = newlines["workdir"], newlines["root"]
  cases = {
      "--max_new_tokens=0": ("train.generate", f"--workdir={run}", "--prompt=x", "--max_new_tokens=0"),
      "--top_p=0.0": ("train.generate", f"--workdir={run}", "--prompt=x", "--top_p=0"),
      "--num_samples=0": ("train.generate", f"--workdir={run}", "--prompt=x", "--num_samples=0"),
      "--temperature=-1.0": ("train.generate", f"--workdir={run}", "--prompt=x", "--temperature=-1"),
      "--stop: an empty stop string": ("train.generate", f"--workdir={run}", "--prompt=x", "--stop="),
      f"--prompts_file={tmp_path / 'none.txt'}: cannot read": (
          "train.generate", f"--workdir={run}", f"--prompts_file={tmp_path / 'none.txt'}"),
      "no Hugging Face architecture fits": (
          "train.hf", "export", f"--workdir={run}", f"--out={tmp_path / 'out'}", "--model_type=bert"),
  }
  harness = "config.json: no such file"
  try:
    import lm_eval  # noqa: F401  the adapter's optional dependency
    cases[harness] = ("train.harness", "--model", "ablax", "--model_args", f"workdir={tmp_path / 'none'}",
                      "--tasks", "mc", "--include_path", str(tmp_path / "tasks"))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mc.yaml").write_text(
        f"task: mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {root / 'mc.jsonl'}\n"
        "validation_split: validation\noutput_type: multiple_choice\ndoc_to_text: '{{text}}'\n"
        "doc_to_target: label\ndoc_to_choice: ['no', 'yes']\n")
  except ImportError:
    pass
  started = {expected: _start(*args) for expected, args in cases.items()}
  for expected, process in started.items():
    rc, _, stderr = _finish(process)
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert rc == 1 and len(lines) == 1 and expected in lines[0], (expected, stderr[-2000:])
    if expected != harness:  # lm_eval logs its own lines before loading the model
      assert stderr.strip() == lines[0], (expected, stderr[-2000:])
  assert not os.path.exists(tmp_path / "out")
