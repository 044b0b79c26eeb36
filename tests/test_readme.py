"""The README's commands work as written: every command of its ```bash blocks runs, shortened where the README's
run is long, in a scratch directory that stands where the repository root is (configs/ linked, and ../shared/data
when this checkout has it). A README command that breaks fails this test.

The rules, each named where it applies (nothing is dropped silently):
- SKIP: `pip install ...` (the package is installed; the rest of its line runs), the test suite itself
  (`python -m pytest`), multi-host launchers (`srun`, `gcloud`): they need a cluster.
- OPTIONAL: `[...]` in a command is an optional part and is left out.
- SHORTEN: overrides appended per entrypoint (a few steps on a one-layer model, little data, few examples; an
  ablation's two variants and one seed); a `--flag=value` the README gives is replaced, never added twice.
- FIXTURES: `prompts.txt` and `path/to/TinyLlama` (a tiny Llama saved by transformers, with a sentencepiece
  tokenizer) are made here; commands that read ../shared/data skip (with their dependents) when it is absent.
Commands that share a path (workdir, base run, prepared corpus) run in README order; the others side by side.
"""

import concurrent.futures
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from test_train import REPO, TEXT

SHARED = os.path.join(os.path.dirname(REPO), "shared")
SKIP = {  # a rule: (what it matches, why)
    "pip": (lambda argv: argv[:2] == ["pip", "install"], "pip install: the package is installed"),
    "tests": (lambda argv: argv[1:3] == ["-m", "pytest"], "the test suite itself"),
    "cluster": (lambda argv: argv[0] in ("srun", "gcloud"), "a multi-host launcher: needs a cluster"),
}
if importlib.util.find_spec("libtpu") is None:  # a rule only where it applies: every rule must be used
  SKIP["libtpu"] = (lambda argv: _module(argv) == "train.compile",
                    "train.compile needs libtpu (the tpu extra), not installed here")
ENVIRONMENT_RULES = {"libtpu"}  # rules that skip only on some machines
TINY_RUN = ["train.steps=2", "train.eval_every=2", "train.eval_batches=1", "train.checkpoint_every=2",
            "train.num_samples=1", "train.sample_tokens=8"]
SHORTEN = {  # module -> its overrides (--config.k=v or --flag=v)
    "train.pretrain": [*TINY_RUN, "train.batch_size=4", "model.num_layers=1", "data.max_bytes=300000",
                       "data.vocab_size=512", "train.branch_step=-1"],  # a branch: from the shortened run's last
    "train.finetune": [*TINY_RUN, "train.batch_size=4", "data.max_records=64"],
    "data.prepare": ["data.max_bytes=300000", "data.vocab_size=512", "--workers=2"],
    "train.generate": ["--max_new_tokens=8"],
    "train.evaluate": ["--limit=4", "--max_bytes=4000"],
    "train.hf": ["--config=configs/quickstart.py", "data.max_bytes=300000"],  # the README's optional --config
    "train.compile": ["model.num_layers=1", "model.d_model=128", "model.num_heads=2", "train.batch_size=8",
                      "train.seq_len=128", "data.vocab_size=1024"],
    "ablate": ["seeds=(0,)",  # two of the variants, one seed
               "variants=(('learned', ('model.position=learned',)), ('rope', ('model.position=rope',)))",
               "overrides=('train.steps=2', 'train.eval_every=2', "
               "'train.checkpoint_every=2', 'train.eval_batches=1', 'train.num_samples=0', 'model.max_len=512', "
               "'model.num_layers=1', 'train.batch_size=4')"],
}
RESUMABLE_ONLY = [*TINY_RUN]  # a run continued from an imported checkpoint keeps its other settings
PATH_FLAGS = ("--workdir", "--out", "--config.init_from", "--config.data.prepared", "--hf_dir",
              "--config.train.branch_from")


def readme_commands() -> list[str]:
  """Every command of the README's ```bash blocks (indented ones too), continuation lines joined."""
  with open(os.path.join(REPO, "README.md")) as f:
    text = f.read()
  commands = []
  for block in re.findall(r"^[ \t]*```bash\n(.*?)^[ \t]*```", text, re.S | re.M):
    joined = re.sub(r"\\\n", " ", block)
    commands += [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]
  return commands


def _drop_optional(argv: list[str]) -> list[str]:
  kept, depth = [], 0
  for token in argv:
    depth += token.startswith("[")
    if not depth:
      kept.append(token)
    depth -= token.endswith("]")
  return kept


def _module(argv):
  return argv[2] if argv[:2] == ["python", "-m"] and len(argv) > 2 else None


def _shorten(argv: list[str]) -> list[str]:
  """argv with its entrypoint's SHORTEN overrides: a flag the README gives is replaced."""
  module = _module(argv)
  overrides = SHORTEN.get(module, [])
  if module == "train.pretrain" and any("from_run.py:" in a for a in argv):
    overrides = RESUMABLE_ONLY
  if module == "ablate" and "report" in argv or module == "train.hf" and "export" in argv:
    overrides = []
  flagged = [o if o.startswith("--") else f"--config.{o}" for o in overrides]
  names = {o.split("=")[0] for o in flagged}
  return [a for a in argv if a.split("=")[0] not in names] + flagged


def _paths(argv) -> set[str]:
  """The run directories and corpora a command reads or writes: what orders it after another."""
  found = {a.split("=", 1)[1].rstrip("/") for a in argv if a.split("=")[0] in PATH_FLAGS and "=" in a}
  found |= {a.split("from_run.py:", 1)[1] for a in argv if "from_run.py:" in a}
  if "report" in argv:
    found.add(argv[argv.index("report") + 1].rstrip("/"))
  return found


def _config_text(path: str) -> str:
  """A config file's values as text, with those of the experiment config an ablation config names."""
  spec = importlib.util.spec_from_file_location("readme_config", os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  values = module.get_config().to_dict()
  inner = values.get("config")
  return json.dumps(values, default=str) + (_config_text(inner) if str(inner).endswith(".py") else "")


def _reads_shared_data(argv) -> bool:
  """Whether the command reads ../shared/data: in its arguments, its config file or its evaluation task."""
  for arg in argv:
    if "shared/data" in arg:
      return True
    name, _, value = arg.partition("=")
    if name == "--config" and ":" not in value and "shared/data" in _config_text(value):
      return True
    if name == "--task" and "shared/data" in _config_text(f"configs/eval/{value}.py"):
      return True
  return False


def plan() -> list[dict]:
  """The README's commands as {line, argv (None: skipped), why, after (indices it waits for)}."""
  steps, last_of = [], {}
  for line in readme_commands():
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    tokens, parts = list(lexer), [[]]
    for token in tokens:  # `a && b`: two commands
      parts.append([]) if token == "&&" else parts[-1].append(token)
    for part in map(shlex.join, parts):
      argv = _drop_optional(shlex.split(part))
      rule = next((name for name, (match, _) in SKIP.items() if match(argv)), None)
      if rule:
        steps.append({"line": part, "argv": None, "why": SKIP[rule][1], "after": set()})
        continue
      paths = _paths(argv)
      steps.append({"line": part, "argv": _shorten(argv), "why": None, "shared": _reads_shared_data(argv),
                    "after": {last_of[p] for p in paths if p in last_of}})
      for p in paths:
        last_of[p] = len(steps) - 1
  return steps


def _hf_fixture(directory: str) -> None:
  """path/to/TinyLlama: a tiny Llama (safetensors) with a sentencepiece tokenizer.model."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from data.tokenizer import train_tokenizer
  tokenizer = train_tokenizer([TEXT * 4], "sentencepiece", vocab_size=300)
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=128, bos_token_id=tokenizer.bos_id,
                                    eos_token_id=tokenizer.eos_id)
  transformers.LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
  tokenizer.save(directory)


def _scratch(root) -> str:
  """A directory that stands where the repository root is: configs/ linked, ../shared beside it if present."""
  cwd = root / "ablax"
  cwd.mkdir()
  os.symlink(os.path.join(REPO, "configs"), cwd / "configs")
  if os.path.isdir(os.path.join(SHARED, "data")):
    os.symlink(SHARED, root / "shared")
  (cwd / "prompts.txt").write_text("def main(\nclass Dataset:\n")
  _hf_fixture(str(cwd / "path" / "to" / "TinyLlama"))
  return str(cwd)


def test_the_readme_parses_into_commands_and_every_skip_is_a_listed_rule():
  steps = plan()
  run = [s["line"] for s in steps if s["argv"] is not None]
  assert len(run) >= 20 and any("ablate" in line and "--dry_run" in line for line in run)
  skipped = {s["why"] for s in steps if s["argv"] is None}
  always = {why for name, (_, why) in SKIP.items() if name not in ENVIRONMENT_RULES}
  assert always <= skipped <= {why for _, why in SKIP.values()}, skipped  # every rule is used: none is stale
  for step in steps:
    if step["argv"] is not None:
      assert step["argv"][:2] == ["python", "-m"] and not any(a.startswith("[") for a in step["argv"]), step


def test_every_readme_command_runs(tmp_path):
  cwd = _scratch(tmp_path)
  shared = os.path.isdir(os.path.join(tmp_path, "shared", "data"))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  steps = plan()
  outcome = {}  # index -> "ok" | "skipped: why" | "failed: ..."

  def run(i):
    step = steps[i]
    for j in step["after"]:
      futures[j].result()
      if outcome[j] != "ok":
        outcome[i] = f"skipped: after {steps[j]['line'][:60]!r} ({outcome[j].split(':')[0]})"
        return
    if step["argv"] is None or (step["shared"] and not shared):
      outcome[i] = f"skipped: {step['why'] or '../shared/data is absent'}"
      return
    argv = [sys.executable, *step["argv"][1:]]
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    outcome[i] = "ok" if result.returncode == 0 else \
        f"failed: exit {result.returncode}: {shlex.join(step['argv'])}\n{result.stderr[-2000:]}"

  with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
    futures = {}
    for i in range(len(steps)):
      futures[i] = pool.submit(run, i)
    concurrent.futures.wait(list(futures.values()))
  failed = [f"{steps[i]['line']}\n  {outcome[i]}" for i in sorted(outcome) if outcome[i].startswith("failed")]
  assert not failed, "\n\n".join(failed)
  skipped = [outcome[i] for i in outcome if outcome[i].startswith("skipped: after")]
  assert not skipped or not shared, skipped
  if shutil.which("tensorboard"):  # the README's `tensorboard --logdir runs/` reads what the runs wrote
    result = subprocess.run(["tensorboard", "--inspect", "--logdir", "runs/"], cwd=cwd, capture_output=True,
                            text=True, timeout=120)
    assert "eval/loss" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]


def test_the_commands_list_names_every_entrypoint():
  with open(os.path.join(REPO, "README.md")) as f:
    listed = set(re.findall(r"^\| `python -m ([\w.]+)`", f.read(), re.M))
  entrypoints = {"ablate"}
  for package in ("train", "data"):
    for name in os.listdir(os.path.join(REPO, package)):
      if name.endswith(".py") and 'if __name__ == "__main__"' in open(os.path.join(REPO, package, name)).read():
        entrypoints.add(f"{package}.{name[:-3]}")
  assert listed == entrypoints
