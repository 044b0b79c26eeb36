"""Evaluation tasks: task files, few-shot prompts fixed by their seed, log-likelihoods independent of the batch and
its padding, multiple-choice log-likelihoods of an imported GPT-2 equal to transformers', the lm-evaluation-harness
adapter equal to the built-in tasks (and to transformers for rolling log-likelihoods and generation), the families
that have no next-token likelihood refused, and classification tasks through a trained head."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from data.tokenizer import CharTokenizer
from model.config import ConfigError, ModelConfig
from model.families import build_model, init_params
from test_families import pretraining_config
from test_finetune import _sentiment, _write_jsonl, ft_config
from test_train import TEXT, tiny_config
from train import eval_tasks, likelihood
from train import evaluate as evaluate_lib
from train import finetune as finetune_lib
from train.hf import import_hf
from train.likelihood import Scorer, rolling_windows
from train.pretrain import train_and_evaluate
from train.runs import load_run

PROMPT = "{text}\nAnswer:"


def _mc_task(tmp_path, records, **keys):
  """A multiple-choice task file (YAML) over `records`; returns the loaded Task."""
  data = _write_jsonl(tmp_path / "mc.jsonl", records)
  definition = dict(kind="multiple_choice", data=data, prompt=PROMPT, choices=["bad", "good"], label_field="label",
                    **keys)
  (tmp_path / "mc.yaml").write_text(json.dumps(definition))  # JSON is YAML
  return eval_tasks.load_task(str(tmp_path / "mc.yaml"))


# Task files and prompts


def test_builtin_and_user_task_files(tmp_path):
  assert {"sst2", "gsm8k", "scitldr", "sst2_classify"} <= set(eval_tasks.builtin_tasks())
  sst2 = eval_tasks.load_task("sst2")
  assert (sst2.kind, sst2.choices, sst2.fewshot) == ("multiple_choice", ("negative", "positive"), 0)
  first = eval_tasks.examples(sst2, limit=2)[0]
  assert first.context == "it 's a charming and often affecting journey .\nQuestion: Is this sentence positive or " \
                          "negative?\nAnswer:" and first.gold == 1
  assert eval_tasks.load_task("gsm8k", fewshot=2).fewshot == 2
  (tmp_path / "mine.py").write_text("def get_config():\n  return {'kind': 'generation', 'data': 'x.jsonl', "
                                    "'prompt': '{q}', 'target': '{a}', 'until': ['\\n']}\n")
  mine = eval_tasks.load_task(str(tmp_path / "mine.py"))
  assert (mine.name, mine.until, mine.beam) == ("mine", ("\n",), 1)


@pytest.mark.parametrize("definition, message", [
    ({"kind": "multiple_choice", "data": "x", "prompt": "p", "choices": ["a"], "label_field": "l", "shots": 2},
     "unknown task key 'shots'"),
    ({"kind": "ranking", "data": "x"}, "kind 'ranking'"),
    ({"kind": "generation", "data": "x", "prompt": "p", "target": "t", "name": "../up"}, "name '../up'"),
    ({"kind": "generation", "data": "x", "prompt": "p"}, "one of target / references_field"),
    ({"kind": "generation", "data": "x", "prompt": "p", "target": "t", "fewshot": "5"}, "key 'fewshot' is '5'"),
    ({"kind": "generation", "data": "x", "prompt": "p", "target": "t", "metrics": ["bleu"]}, "metrics ['bleu']"),
])
def test_task_file_errors_are_one_line(tmp_path, definition, message):
  (tmp_path / "bad.yaml").write_text(json.dumps(definition))
  with pytest.raises(ConfigError, match="^--task=.*bad.yaml: ") as error:
    eval_tasks.load_task(str(tmp_path / "bad.yaml"))
  assert message in str(error.value) and "\n" not in str(error.value)
  with pytest.raises(ConfigError, match="not a built-in task"):
    eval_tasks.load_task("no_such_task")


def test_fewshot_prompts_are_fixed_by_the_seed(tmp_path):
  records = [{"text": f"sentence number {i}", "label": i % 2} for i in range(30)]
  task = _mc_task(tmp_path, records, fewshot=3)
  again = eval_tasks.examples(task)
  first = eval_tasks.examples(task)
  other = eval_tasks.examples(eval_tasks.load_task(str(tmp_path / "mc.yaml"), fewshot_seed=7))
  assert [e.context for e in first] == [e.context for e in again]
  assert sum(a.context != b.context for a, b in zip(first, other)) > 20
  assert [e.context for e in eval_tasks.examples(task, limit=5)] == [e.context for e in first[:5]]  # --limit
  for i, example in enumerate(first):
    shots = example.context.split("\n\n")
    assert len(shots) == 4 and shots[-1] == PROMPT.format(text=f"sentence number {i}")
    assert f"sentence number {i}\n" not in "\n\n".join(shots[:-1])  # never its own shot
    for shot in shots[:-1]:  # each shot answered with its gold choice after the target delimiter
      number = int(shot.split("\n")[0].split()[-1])
      assert shot.endswith("Answer: " + ("bad", "good")[number % 2])


def test_generation_scores_answers_and_references(tmp_path):
  data = _write_jsonl(tmp_path / "g.jsonl", [{"q": "1+1", "a": "so\n#### 2"}, {"q": "2+2", "a": "#### 4"}])
  task = eval_tasks.Task(name="g", kind="generation", data=data, prompt="Q: {q}\nA:", target="{a}",
                         answer_regex=r"#### (\-?[0-9\.\,]+)")

  class Fixed:  # a Scorer's generate, with answers of our choosing
    def generate(self, prompts, **settings):
      assert prompts == ["Q: 1+1\nA:", "Q: 2+2\nA:"] and settings["strip"]
      return ["it is 2\n#### 2.", "#### 5"]

  means, per_example = eval_tasks.evaluate_generation(task, Fixed(), eval_tasks.examples(task))
  assert means == {"exact_match": 0.5} and per_example[0]["prediction"] == "it is 2\n#### 2."


# Log-likelihoods


def _random_scorer(family, batch_size, prefix=False):
  tokenizer = CharTokenizer(TEXT)
  model = build_model(ModelConfig(vocab_size=tokenizer.vocab_size, num_layers=2, d_model=32, num_heads=4,
                                  num_kv_heads=2, max_len=128, position="rope", family=family))
  params = nn.meta.unbox(init_params(model, jax.random.PRNGKey(0), 8))
  return Scorer(model, params, tokenizer, batch_size=batch_size, prefix=prefix)


def _pairs(n=40):
  rng = np.random.default_rng(0)
  starts, lengths = rng.integers(0, len(TEXT) - 200, n), rng.integers(0, 90, n)
  return [(TEXT[s:s + c], " " + TEXT[s + c:s + c + rng.integers(1, 20)]) for s, c in zip(starts, lengths)]


@pytest.mark.parametrize("family, prefix", [("decoder", False), ("decoder", True), ("encoder_decoder", False)])
def test_loglikelihoods_do_not_depend_on_batch_size_or_padding(family, prefix, monkeypatch):
  """Each pair is its own right-padded row: 1, 7 or 32 rows per batch, rows of any length, the same scores (a prefix
  LM's contexts read bidirectionally, which changes them)."""
  pairs = _pairs()
  one = _random_scorer(family, 1, prefix).loglikelihood(pairs)
  assert len({round(ll, 3) for ll, _ in one}) > 30 and all(ll < 0 for ll, _ in one)
  if prefix:
    causal = _random_scorer(family, 1).loglikelihood(pairs)
    assert sum(abs(a - b) > 1e-3 for (a, _), (b, _) in zip(one, causal)) > 30
  runs = {size: _random_scorer(family, size, prefix).loglikelihood(pairs) for size in (7, 32)}
  monkeypatch.setattr(likelihood, "_bucket", lambda length: length + 45)  # more padding, other shapes
  runs["padded"] = _random_scorer(family, 7, prefix).loglikelihood(pairs)
  for name, result in runs.items():
    assert [greedy for _, greedy in result] == [greedy for _, greedy in one], name
    np.testing.assert_allclose([ll for ll, _ in result], [ll for ll, _ in one], rtol=1e-6, atol=0, err_msg=name)


@pytest.mark.parametrize("num_targets, window", [(1, 4), (10, 4), (8, 4), (37, 16), (5, 16)])
def test_rolling_windows_score_every_target_once_with_full_context(num_targets, window):
  windows = list(rolling_windows(num_targets, window))
  assert [t for _, end, first in windows for t in range(first, end)] == list(range(num_targets))
  for begin, end, first in windows:
    assert end - begin == min(window, num_targets) and begin <= first


def test_families_without_a_next_token_likelihood_are_refused(tmp_path):
  with pytest.raises(ConfigError, match="encoder run predicts no next token"):
    _random_scorer("encoder", 4)
  with pytest.raises(ConfigError, match="encoder_decoder run scores continuations"):
    _random_scorer("encoder_decoder", 4).loglikelihood_rolling(["text"])
  for family, objective in (("encoder", "masked_lm"), ("encoder_decoder", "span_corruption")):
    workdir = str(tmp_path / family)
    train_and_evaluate(pretraining_config(tmp_path, family, objective, steps=1, eval_every=1, checkpoint_every=1),
                       workdir)
    with pytest.raises(ConfigError, match=f"--data scores a decoder's next-token loss; .* is a {family} run"):
      evaluate_lib.run(workdir, str(tmp_path / "corpus.txt"))


# Against transformers and the harness


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
  """A tiny GPT-2 built with transformers (byte-level BPE tokenizer), imported; its Scorer and an SST-2-like task."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from test_hf import _hf_model, _train_config  # torch and transformers are test-only
  from test_tokenizers import build_tokenizer
  root = tmp_path_factory.mktemp("gpt2")
  (root / "corpus.txt").write_text(TEXT)
  hf_tokenizer = build_tokenizer("gpt2", str(root / "hf"))
  eot = hf_tokenizer.convert_tokens_to_ids("<|endoftext|>")
  hf_model = _hf_model("gpt2", 512, eot, eot)
  hf_model.save_pretrained(root / "hf", safe_serialization=True)
  import_hf(str(root / "hf"), str(root / "run"), _train_config(root))
  loaded = load_run(str(root / "run"))
  scorer = Scorer(loaded.run.model, loaded.params, loaded.run.tokenizer, batch_size=4)
  records = [{"text": t, "label": i % 2} for i, t in enumerate(
      ["the quick fox", "lazy dogs sleep all day", "a red fox jumps", "slow line", "over the dogs, quickly!"])]
  task = _mc_task(root, records)
  return {"root": root, "torch": torch, "hf_model": hf_model, "hf_tokenizer": hf_tokenizer, "eot": eot,
          "scorer": scorer, "task": task}


def _hf_logprob(gpt2, context, continuation):
  """log p(continuation | context) by transformers, the tokens split as the harness does (GPT-2's tokenizer adds
  no bos to the non-empty context)."""
  torch, tok = gpt2["torch"], gpt2["hf_tokenizer"]
  context_ids, ids = tok.encode(context), tok.encode(context + continuation)
  assert context_ids and len(ids) <= 48  # the model's positions: nothing cut
  with torch.no_grad():
    log_probs = gpt2["hf_model"](torch.tensor([ids])).logits[0].double().log_softmax(-1)
  return sum(float(log_probs[t - 1, ids[t]]) for t in range(len(context_ids), len(ids)))


def test_multiple_choice_loglikelihoods_equal_transformers(gpt2):
  items = eval_tasks.examples(gpt2["task"])
  means, per_example = eval_tasks.evaluate_multiple_choice(gpt2["task"], gpt2["scorer"], items)
  for example, result in zip(items, per_example):
    expected = [_hf_logprob(gpt2, example.context, " " + choice) for choice in example.choices]
    np.testing.assert_allclose(result["loglikelihoods"], expected, rtol=0, atol=1e-4)
  assert set(means) == {"acc", "acc_norm", "acc_bytes"}


def test_the_harness_adapter_gives_the_builtin_numbers(gpt2, monkeypatch):
  """A local YAML task run by lm_eval.simple_evaluate through AblaxLM: the same log-likelihoods, acc and acc_norm."""
  pytest.importorskip("lm_eval")
  for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    monkeypatch.setenv(name, "1")
  import lm_eval  # optional: the adapter's own dependency
  from lm_eval.tasks import TaskManager
  from train.harness import AblaxLM
  task, root = gpt2["task"], gpt2["root"]
  (root / "harness").mkdir(exist_ok=True)
  prompt = json.dumps(PROMPT.replace("{text}", "{{text}}"))  # a jinja template, as a YAML string
  (root / "harness" / "local_mc.yaml").write_text(
      f"task: local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {task.data}\n"
      f"validation_split: validation\noutput_type: multiple_choice\ndoc_to_text: {prompt}\n"
      "doc_to_target: label\ndoc_to_choice: ['bad', 'good']\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
  results = lm_eval.simple_evaluate(model=AblaxLM(scorer=gpt2["scorer"]), tasks=["local_mc"], log_samples=True,
                                    task_manager=TaskManager(include_path=str(root / "harness")))
  means, per_example = eval_tasks.evaluate_multiple_choice(task, gpt2["scorer"], eval_tasks.examples(task))
  samples = sorted(results["samples"]["local_mc"], key=lambda s: s["doc_id"])
  np.testing.assert_allclose([[float(r[0]) for r in s["filtered_resps"]] for s in samples],
                             [e["loglikelihoods"] for e in per_example], rtol=1e-6, atol=0)  # batches may differ
  assert results["results"]["local_mc"]["acc,none"] == means["acc"]
  assert results["results"]["local_mc"]["acc_norm,none"] == means["acc_norm"]


def test_the_harness_adapter_rolls_and_generates_as_transformers(gpt2):
  pytest.importorskip("lm_eval")
  from lm_eval.api.instance import Instance
  from train.harness import AblaxLM
  torch, tok, eot = gpt2["torch"], gpt2["hf_tokenizer"], gpt2["eot"]
  adapter = AblaxLM(scorer=gpt2["scorer"])
  # Rolling: a text longer than the 48-token window is every token once, the last window read with full context.
  text = "the quick brown fox jumps over 3 lazy dogs. " * 4
  ids = [eot] + tok.encode(text)
  expected = 0.0
  for begin, end, first in rolling_windows(len(ids) - 1, 48):
    with torch.no_grad():
      log_probs = gpt2["hf_model"](torch.tensor([ids[begin:end]])).logits[0].double().log_softmax(-1)
    expected += sum(float(log_probs[t - begin, ids[t + 1]]) for t in range(first, end))
  assert len(ids) - 1 > 48
  (ours,) = adapter.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
  assert abs(ours - expected) / (len(ids) - 1) < 1e-4, (ours, expected)  # test_hf's tolerance on a mean loss
  # generate_until: greedy, cut before the stop string.
  prompt = "the lazy dog"
  prompt_ids = tok.encode(prompt)  # the imported run frames a prompt as GPT-2's tokenizer does: no bos
  with torch.no_grad():
    greedy = gpt2["hf_model"].generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=12,
                                       pad_token_id=eot)
  full = tok.decode(greedy[0, len(prompt_ids):].tolist(), skip_special_tokens=True)  # both stop at eot
  stop = full[3:5] if len(full) > 5 else "never"
  requests = [Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 12}), 0),
              Instance("generate_until", {}, (prompt, {"until": "never", "max_gen_toks": 12}), 1)]
  assert adapter.generate_until(requests) == [full.split(stop)[0], full]


# Classification through a trained head


def test_a_classification_task_scores_a_classification_run(tmp_path):
  config = tiny_config(tmp_path, steps=4, checkpoint_every=4, eval_every=4, decay_steps=4)
  train_and_evaluate(config, str(tmp_path / "base"))
  rng = np.random.default_rng(0)
  setup = {"base": str(tmp_path / "base"), "train": _write_jsonl(tmp_path / "train.jsonl", _sentiment(rng, 40)),
           "dev": _write_jsonl(tmp_path / "dev.jsonl", _sentiment(rng, 20))}
  workdir = str(tmp_path / "ft")
  finetune_lib.finetune(ft_config(setup, "lora", steps=2), workdir)
  (tmp_path / "cls.yaml").write_text(f"kind: classification\ndata: {setup['dev']}\n")
  (record,) = evaluate_lib.run_tasks(workdir, [str(tmp_path / "cls.yaml")], limit=15)
  direct = evaluate_lib.evaluate_classifier(workdir, setup["dev"], max_records=15)
  assert record["examples"] == 15 and record["metrics"]["accuracy"] == direct["accuracy"]
  assert record["metrics"]["macro_f1"] == direct["macro_f1"]
  assert os.path.exists(os.path.join(workdir, "eval_cls.json"))
  with pytest.raises(ConfigError, match="a classification task needs a classification run"):
    evaluate_lib.run_tasks(setup["base"], [str(tmp_path / "cls.yaml")])
