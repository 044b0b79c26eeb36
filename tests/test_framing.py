"""How a run frames a text (config.data.framing), against transformers: ablax's own runs read [bos] + text; a run
imported from Hugging Face reads a text as its tokenizer frames it, recorded at import. On tiny models built here
(GPT-2 layout: byte-level BPE that adds nothing; Llama layout: a Llama 3 tokenizer.json that adds its bos):
train.generate's greedy output is transformers' model.generate(do_sample=False) on prompts with unicode, tabs and
trailing spaces; the log-likelihoods of train.evaluate --task and the rolling ones equal a direct computation that
follows lm-evaluation-harness's Hugging Face model; the harness adapter equals lm_eval's own `hf` model (where
lm-eval is installed). The recorded framing is what AutoTokenizer adds for GPT-2, Llama 3, BERT, T5 and sentencepiece
directories; fine-tuning rows use it; a run without the record keeps [bos] + text.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from configs import base  # noqa: E402
from data.finetuning import classify_rows, instruct_rows, seq2seq_rows  # noqa: E402
from data.hf_tokenizers import hf_framing  # noqa: E402
from data.tokenizer import load_huggingface, load_sentencepiece, train_tokenizer  # noqa: E402
from test_hf import _hf_model, _train_config  # noqa: E402
from test_tokenizers import build_tokenizer, corpus_lines, spm_t5_dir  # noqa: E402
from test_train import REPO, TEXT  # noqa: E402
from train import eval_tasks  # noqa: E402
from train import evaluate as evaluate_lib  # noqa: E402
from train.hf import import_hf  # noqa: E402
from train.likelihood import Scorer  # noqa: E402
from train.runs import load_run, run_tokenizer  # noqa: E402

# arch: (tokenizer, recorded framing)
LAYOUTS = {"gpt2": ("gpt2", "$A"), "llama": ("llama3", "<|begin_of_text|> $A")}
PROMPTS = ["Héllo 東京 🙂 the fox", "\tdef f(x):  return", "the lazy dog   ", "naïve café\t"]
# Contexts with trailing spaces and tabs (moved into the continuation) and an empty one (bos alone before it).
RECORDS = [{"text": "the quick fox", "label": 0}, {"text": "lazy dogs sleep ", "label": 1},
           {"text": "Ölçü\tÅngström  ", "label": 2}, {"text": "", "label": 1}, {"text": "東京 🙂\t", "label": 0}]
CHOICES = ["bad", " good", "\tmeh"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
  """arch -> {hf_dir, workdir, model, tokenizer}: a tiny transformers model with its tokenizer, imported."""
  root = tmp_path_factory.mktemp("framing")
  (root / "corpus.txt").write_text(TEXT)
  out = {"root": root}
  for arch, (kind, _) in LAYOUTS.items():
    hf_dir = str(root / f"hf_{arch}")
    tokenizer = build_tokenizer(kind, hf_dir)
    vocab = 512 if arch == "gpt2" else len(tokenizer)  # GPT-2's embedding padded past its 500 tokens
    model = _hf_model(arch, vocab, tokenizer.bos_token_id, tokenizer.eos_token_id)
    model.save_pretrained(hf_dir, safe_serialization=True)
    workdir = str(root / f"run_{arch}")
    import_hf(hf_dir, workdir, _train_config(root))
    out[arch] = {"hf_dir": hf_dir, "workdir": workdir, "model": model, "tokenizer": tokenizer,
                 "window": model.config.max_position_embeddings}
  return out


def _cli(module, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)


# The recorded framing


def _spm_dir(root, name, tokenizer_config=None, model_type="llama"):
  """A directory with a sentencepiece tokenizer.model alone (and a tokenizer_config.json if given)."""
  directory = os.path.join(root, name)
  train_tokenizer(corpus_lines(), "sentencepiece", vocab_size=400).save(directory)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump({"model_type": model_type}, f)
  if tokenizer_config is not None:
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
      json.dump(tokenizer_config, f)
  return directory


@pytest.mark.parametrize("case, expected", [
    ("gpt2", "$A"), ("llama3", "<|begin_of_text|> $A"), ("bert", "[CLS] $A [SEP]"), ("t5", "$A </s>"),
    ("t5_spiece", "$A </s>"), ("spm", "$A"), ("spm_bos", "<s> $A"), ("spm_bos_eos", "<s> $A </s>")])
def test_the_recorded_framing_is_what_autotokenizer_adds(tmp_path, case, expected):
  """hf_framing of a directory, applied by ablax, gives the ids of transformers' tokenizer(text)."""
  if case in ("gpt2", "llama3", "bert", "t5"):
    directory = str(tmp_path / case)
    build_tokenizer(case, directory)
    ours = load_huggingface(directory)
  elif case == "t5_spiece":
    directory = spm_t5_dir(str(tmp_path / case))
    ours = load_sentencepiece(os.path.join(directory, "spiece.model"))
  else:
    flags = {"spm": None, "spm_bos": {"add_bos_token": True}, "spm_bos_eos": {"add_bos_token": True,
                                                                              "add_eos_token": True}}[case]
    directory = _spm_dir(str(tmp_path), case, flags)
    ours = load_sentencepiece(os.path.join(directory, "tokenizer.model"))
  framing = hf_framing(directory, ours, "t5" if case.startswith("t5") else None)
  assert framing == expected
  ours.set_framing(framing)
  theirs = transformers.AutoTokenizer.from_pretrained(directory)
  for text in ["the fox", "Héllo\t東京  ", "", " "]:
    assert ours.frame(ours.encode(text)) == theirs(text)["input_ids"], (case, text)


def test_import_records_the_framing_and_old_runs_keep_bos(layouts):
  """config.json holds the framing; a run whose config.json has none (made before the record) reads [bos] + text."""
  for arch, (_, framing) in LAYOUTS.items():
    with open(os.path.join(layouts[arch]["workdir"], "config.json")) as f:
      saved = json.load(f)
    assert saved["data"]["framing"] == framing
    del saved["data"]["framing"]
    tokenizer, _ = run_tokenizer(layouts[arch]["workdir"], base.with_defaults(saved))
    ids = tokenizer.encode("the fox")
    assert tokenizer.frame(ids) == [tokenizer.bos_id] + ids and tokenizer.framing == ""


# Generation, log-likelihoods and rolling log-likelihoods against transformers


def _hf_greedy(layout, prompt):
  """prompt + transformers' greedy continuation of tokenizer(prompt), decoded without special tokens."""
  tok, model = layout["tokenizer"], layout["model"]
  ids = tok(prompt)["input_ids"]
  with torch.no_grad():
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=tok.eos_token_id)
  return prompt + tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


@pytest.mark.parametrize("arch", LAYOUTS)
def test_greedy_generation_equals_transformers(layouts, arch, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("".join(p + "\n" for p in PROMPTS), encoding="utf-8")
  result = _cli("train.generate", f"--workdir={layouts[arch]['workdir']}", f"--prompts_file={prompts}",
                "--temperature=0", f"--max_new_tokens={NEW_TOKENS}")
  assert result.returncode == 0, result.stderr
  expected = "".join(f"--- sample {i}\n{_hf_greedy(layouts[arch], p)}\n" for i, p in enumerate(PROMPTS))
  assert result.stdout == expected


def _log_probs(model, ids):
  with torch.no_grad():
    return model(torch.tensor([ids])).logits[0].double().log_softmax(-1)


def _lm_eval_loglikelihood(layout, context, continuation):
  """log p(continuation | context) as lm-evaluation-harness's HF model computes it: an empty context is its prefix
  token; otherwise trailing spaces join the continuation, whose ids are those of tokenizer(context + continuation)
  after tokenizer(context)'s."""
  tok, model = layout["tokenizer"], layout["model"]
  if not context:
    context_ids = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
    continuation_ids = tok(continuation, add_special_tokens=False)["input_ids"]
  else:
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tok(context)["input_ids"]
    continuation_ids = tok(context + continuation)["input_ids"][len(context_ids):]
  ids = context_ids + continuation_ids
  assert len(ids) <= layout["window"]
  log_probs = _log_probs(model, ids[:-1])
  return sum(float(log_probs[len(context_ids) - 1 + j, t]) for j, t in enumerate(continuation_ids))


def _mc_task(root):
  data = root / "mc.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
  (root / "mc.yaml").write_text(json.dumps(dict(kind="multiple_choice", data=str(data), prompt="{text}",
                                                choices=CHOICES, label_field="label", target_delimiter="")))
  return str(root / "mc.yaml")


@pytest.mark.parametrize("arch", LAYOUTS)
def test_task_loglikelihoods_follow_the_harness_hf_model(layouts, arch, tmp_path):
  """train.evaluate --task (run_tasks): every request's log-likelihood within 1e-4 of the direct computation."""
  (record,) = evaluate_lib.run_tasks(layouts[arch]["workdir"], [_mc_task(tmp_path)], batch_size=4,
                                     output=str(tmp_path / "out.json"))
  ours = [e["loglikelihoods"] for e in record["per_example"]]
  expected = [[_lm_eval_loglikelihood(layouts[arch], r["text"], c) for c in CHOICES] for r in RECORDS]
  np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)


def _lm_eval_rolling(layout, text):
  """log p of tokenizer(text)'s ids after the prefix token, each predicted once from as much context as the window
  holds (lm-evaluation-harness's rolling windows), summed."""
  tok, model, window = layout["tokenizer"], layout["model"], layout["window"]
  targets = tok(text)["input_ids"]
  stream = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id] + targets
  total = 0.0
  for first in range(0, len(targets), window):
    end = min(first + window, len(targets))
    begin = max(0, end - window)  # stream[begin:end] predicts targets[begin:end]
    log_probs = _log_probs(model, stream[begin:end])
    total += sum(float(log_probs[j - begin, targets[j]]) for j in range(first, end))
  return total, len(targets)


@pytest.mark.parametrize("arch", LAYOUTS)
def test_rolling_loglikelihoods_follow_the_harness_hf_model(layouts, arch):
  loaded = load_run(layouts[arch]["workdir"])
  scorer = Scorer(loaded.run.model, loaded.params, loaded.run.tokenizer, batch_size=4)
  texts = ["the quick brown fox jumps over 3 lazy dogs.\t" * 14, "Héllo wörld 東京 🙂  ", "x"]
  expected = [_lm_eval_rolling(layouts[arch], t) for t in texts]
  assert expected[0][1] > layouts[arch]["window"]  # several windows
  np.testing.assert_allclose(scorer.loglikelihood_rolling(texts), [e[0] for e in expected], rtol=1e-6, atol=1e-4)


# The harness adapter against lm_eval's own Hugging Face model


@pytest.mark.parametrize("arch", LAYOUTS)
def test_the_harness_adapter_equals_lm_evals_hf_model(layouts, arch, tmp_path, monkeypatch):
  pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[test]')")
  for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    monkeypatch.setenv(name, "1")
  import lm_eval  # the adapter's optional dependency
  from lm_eval.api.instance import Instance
  from lm_eval.models.huggingface import HFLM
  from lm_eval.tasks import TaskManager
  from train.harness import AblaxLM
  data = tmp_path / "mc.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
  (tmp_path / "tasks").mkdir()
  (tmp_path / "tasks" / "local_mc.yaml").write_text(
      f"task: local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {data}\n"
      "validation_split: validation\noutput_type: multiple_choice\ndoc_to_text: '{{text}}'\ntarget_delimiter: ''\n"
      f"doc_to_target: label\ndoc_to_choice: {json.dumps(CHOICES)}\nmetric_list:\n  - metric: acc\n"
      "  - metric: acc_norm\n")
  models = {"hf": HFLM(pretrained=layouts[arch]["hf_dir"], device="cpu", batch_size=4),
            "ablax": AblaxLM(workdir=layouts[arch]["workdir"], batch_size=4)}
  results = {name: lm_eval.simple_evaluate(model=model, tasks=["local_mc"], log_samples=True,
                                           task_manager=TaskManager(include_path=str(tmp_path / "tasks"),
                                                                       include_defaults=False))
             for name, model in models.items()}
  lls = {name: [[float(r[0]) for r in s["filtered_resps"]]
                for s in sorted(result["samples"]["local_mc"], key=lambda s: s["doc_id"])]
         for name, result in results.items()}
  np.testing.assert_allclose(lls["ablax"], lls["hf"], rtol=0, atol=1e-4)
  for metric in ("acc,none", "acc_norm,none"):
    assert results["ablax"]["results"]["local_mc"][metric] == results["hf"]["results"]["local_mc"][metric]
  texts = ["the quick brown fox jumps over 3 lazy dogs.\t" * 14, "Héllo wörld 東京 🙂  "]
  rolling = {name: model.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i)
                                                for i, t in enumerate(texts)]) for name, model in models.items()}
  np.testing.assert_allclose(rolling["ablax"], rolling["hf"], rtol=1e-6, atol=1e-4)


# Fine-tuning rows


def test_fine_tuning_rows_frame_texts_as_the_tokenizer(layouts, tmp_path):
  """instruct rows open with the framing's own tokens (none for GPT-2, bos for Llama); classification rows of an
  imported BERT are [CLS] text [SEP]; an imported T5's encoder reads text </s>; all as transformers' tokenizer(text)."""
  for arch in LAYOUTS:
    tokenizer, theirs = load_run(layouts[arch]["workdir"]).run.tokenizer, layouts[arch]["tokenizer"]
    rows = instruct_rows(tokenizer, [("Q: 東京?", " A\tyes")], seq_len=32, pack=False)
    prompt = theirs("Q: 東京?")["input_ids"]
    response = tokenizer.encode(" A\tyes") + [tokenizer.eos_id]
    assert rows["inputs_BxL"][0, :len(prompt)].tolist() == prompt
    scored = rows["weights_BxL"][0] > 0
    assert rows["targets_BxL"][0][scored].tolist() == response
  for kind, rows_of in (("bert", lambda t, texts: classify_rows(t, texts, [0] * len(texts), 24)["inputs_BxL"]),
                        ("t5", lambda t, texts: seq2seq_rows(t, [(x, "y") for x in texts], 24, 8)["inputs_BxL"])):
    directory = str(tmp_path / kind)
    theirs = build_tokenizer(kind, directory)
    ours = load_huggingface(directory)
    ours.set_framing(hf_framing(directory, ours))
    texts = ["the fox", "Héllo\t東京  "]
    for row, text in zip(rows_of(ours, texts), texts):
      ids = theirs(text)["input_ids"]
      assert row[:len(ids)].tolist() == ids and not row[len(ids):].any(), (kind, text)


def test_a_framing_naming_no_token_is_one_line(layouts, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(layouts["gpt2"]["workdir"], workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  saved["data"]["framing"] = "<nope> $A"
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(saved, f)
  result = _cli("train.generate", f"--workdir={workdir}", "--prompt=x", "--max_new_tokens=2")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith("error: config.data.framing '<nope> $A': ")
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr
