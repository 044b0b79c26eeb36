"""train.hf export, checked with transformers: ablax's own sentencepiece (BPE, unigram) and char tokenizers become a
tokenizer.json that AutoTokenizer loads to ablax's ids, its decoded text and its framing ([bos] + text) on
unicode-heavy text, or a one-line refusal naming the setting that has no such form; a native run exports whole
(model.safetensors and tokenizer files readable as any new file, 0644 under umask 022) and transformers computes its
logits on the tokenizer's ids; a classification run exports as GPT2-, Llama- or BertForSequenceClassification with
the same logits, and an encoder-decoder's or a decoder head with a bias is refused in one line.
"""

import io
import json
import os

import jax
import numpy as np
import pytest
import sentencepiece as spm
from flax import linen as nn

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from configs import base  # noqa: E402
from configs.finetune import common as ft_common  # noqa: E402
from data.finetuning import classify_rows  # noqa: E402
from data.hf_tokenizers import hf_files  # noqa: E402
from data.sources import DataError  # noqa: E402
from data.tokenizer import SentencePieceTokenizer, train_tokenizer  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.families import build_model, family, init_params  # noqa: E402
from model.hf import common as hf_common  # noqa: E402
from model.hf.common import ConversionError  # noqa: E402
from test_hf import _hf_model, _train_config  # noqa: E402
from test_hf_encoders import _hf_model as _hf_encoder  # noqa: E402
from test_tokenizers import TEXTS, build_tokenizer, corpus_lines  # noqa: E402
from test_train import TEXT  # noqa: E402
from train import finetune as finetune_lib  # noqa: E402
from train import tasks  # noqa: E402
from train.hf import export_hf, import_hf  # noqa: E402
from train.runs import load_run, write_initial_checkpoint  # noqa: E402
from train.workdir import prepare_workdir  # noqa: E402

# Accents, CJK, emoji with modifiers and ZWJ, tabs, runs of spaces, digits, code, and special tokens' names typed
# as text (a user-defined symbol is text-matched, as in sentencepiece; a control token's name is plain text).
UNICODE = TEXTS + ("<mask> is a symbol; <s> and </s> are text", "x_1 = 12345\t# 🙂 Ölçü Ångström  ",
                   "日本語を話す、你好。 👨‍👩‍👧 ﬁne — 123.45\n\n\tend ")


def _spm(model_type):
  return train_tokenizer(corpus_lines(), "sentencepiece", vocab_size=380, model_type=model_type,
                         special_tokens=["<mask>"])


def _write_files(tokenizer, directory):
  tokenizer_json, config = hf_files(tokenizer, "run")
  os.makedirs(directory)
  with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
    f.write(tokenizer_json)
  with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f)
  return transformers.AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("kind", ["sentencepiece_bpe", "sentencepiece_unigram", "char"])
def test_exported_tokenizers_give_ablax_ids_text_and_framing(kind, tmp_path):
  if kind == "char":
    ours = train_tokenizer(["".join(UNICODE) + TEXT], "char", vocab_size=0, special_tokens=["<mask>"])
    texts = UNICODE
  else:
    ours = _spm(kind.split("_")[1])
    # A Unigram model matches every vocabulary string, where sentencepiece never matches a control or byte
    # piece's name: a text that spells one with characters the model lacks ("<s>" here) encodes otherwise.
    texts = UNICODE if kind.endswith("bpe") else [t for t in UNICODE if "<s>" not in t]
  theirs = _write_files(ours, str(tmp_path / kind))
  assert type(theirs).__name__ != "GPT2Tokenizer" and theirs.bos_token_id == ours.bos_id < ours.vocab_size
  for text in texts:
    ids = ours.encode(text)
    assert theirs(text, add_special_tokens=False)["input_ids"] == ids, (kind, text)
    assert theirs(text)["input_ids"] == [ours.bos_id] + ids  # ablax's own framing
    assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids) == text, (kind, text)


def test_a_sentencepiece_setting_without_a_tokenizer_json_form_is_refused(tmp_path):
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus_lines()), model_writer=model, vocab_size=250,
                                 treat_whitespace_as_suffix=True, minloglevel=2)
  with pytest.raises(DataError) as excinfo:
    hf_files(SentencePieceTokenizer(model.getvalue()), str(tmp_path))
  assert str(excinfo.value) == (f"{tmp_path}/tokenizer.model: the sentencepiece treat_whitespace_as_suffix has no "
                                "tokenizer.json form; export the weights without it or convert the tokenizer by hand")


# A native run, exported whole


def _native_run(root, tokenizer_kind):
  """A step-0 run of ablax's own (Llama-shaped, so it exports), its tokenizer trained here; no training."""
  config = base.get_config()
  config.data.update(tokenizer=tokenizer_kind, train_path=str(root / "corpus.txt"))
  config.model.update(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64, max_len=64,
                      position="rope", norm="rmsnorm", activation="swiglu", use_bias=False, tie_embeddings=False)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  tokenizer = (_spm("bpe") if tokenizer_kind == "sentencepiece" else
               train_tokenizer(["".join(UNICODE)], "char", vocab_size=0))
  config.data.vocab_size = tokenizer.vocab_size
  model = build_model(ModelConfig.from_config(config.model, tokenizer.vocab_size))
  params = jax.device_get(jax.jit(lambda rng: nn.meta.unbox(init_params(model, rng)))(jax.random.PRNGKey(3)))
  workdir = str(root / f"run_{tokenizer_kind}")
  prepare_workdir(config, workdir)
  tokenizer.save(workdir)
  write_initial_checkpoint(workdir, config, params)
  return workdir


@pytest.mark.parametrize("tokenizer_kind", ["sentencepiece", "char"])
def test_a_native_run_exports_its_model_and_tokenizer(tmp_path, tokenizer_kind):
  (tmp_path / "corpus.txt").write_text(TEXT)
  workdir, out = _native_run(tmp_path, tokenizer_kind), str(tmp_path / "hf")
  old_umask = os.umask(0o022)
  try:
    export_hf(workdir, out)
  finally:
    os.umask(old_umask)
  assert {name: os.stat(os.path.join(out, name)).st_mode & 0o777 for name in os.listdir(out)} == {
      "config.json": 0o644, "model.safetensors": 0o644, "tokenizer.json": 0o644, "tokenizer_config.json": 0o644}
  loaded = load_run(workdir)
  theirs = transformers.AutoTokenizer.from_pretrained(out)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  text = "Héllo  wörld\t東京 🙂 x_1 = 12"
  ids = theirs(text)["input_ids"]
  assert ids == loaded.run.tokenizer.frame(loaded.run.tokenizer.encode(text))
  tokens = np.asarray([ids], np.int32)
  ours = jax.jit(loaded.run.model.apply)({"params": loaded.params}, tokens, np.arange(len(ids))[None],
                                          np.ones_like(tokens))
  with torch.no_grad():
    expected = hf_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  assert float(np.abs(np.asarray(ours) - expected).max()) < 1e-4


# Classification runs


LABELS = ["neg", "pos"]


def _classification_run(root, arch):
  """A tiny Hugging Face `arch` with its tokenizer, imported, then fine-tuned 2 steps (LoRA) on classification."""
  tokenizer = build_tokenizer({"gpt2": "gpt2", "llama": "llama3", "bert": "bert"}[arch], str(root / f"hf_{arch}"))
  if arch == "bert":
    model = _hf_encoder("bert", len(tokenizer))
  else:
    model = _hf_model(arch, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
  model.save_pretrained(root / f"hf_{arch}", safe_serialization=True)
  import_hf(str(root / f"hf_{arch}"), str(root / f"base_{arch}"), _train_config(root))
  rng = np.random.default_rng(0)
  data = root / "cls.jsonl"
  data.write_text("".join(json.dumps({"text": f"the {w} fox", "label": LABELS[int(rng.integers(2))]}) + "\n"
                          for w in ("quick", "lazy", "red", "東京", "café", "slow", "old", "new") * 2))
  config = ft_common.get_config()
  config.init_from, config.task = str(root / f"base_{arch}"), "classify"
  config.data.update(train_path=str(data), val_path=str(data), text_field="text", label_field="label")
  config.peft.update(method="lora", lora_rank=2, lora_alpha=4.0)
  config.train.update(steps=2, batch_size=4, seq_len=16, learning_rate=1e-2, warmup_steps=1, decay_steps=2,
                      eval_every=1000, eval_batches=1, checkpoint_every=2, log_every=1, num_samples=0)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  workdir = str(root / f"cls_{arch}")
  finetune_lib.finetune(config, workdir)
  return workdir


@pytest.mark.parametrize("arch, architecture", [("gpt2", "GPT2ForSequenceClassification"),
                                                ("llama", "LlamaForSequenceClassification"),
                                                ("bert", "BertForSequenceClassification")])
def test_a_classification_run_exports_its_head(tmp_path, arch, architecture):
  (tmp_path / "corpus.txt").write_text(TEXT)
  workdir, out = _classification_run(tmp_path, arch), str(tmp_path / "hf_cls")
  export_hf(workdir, out)
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  assert config["architectures"] == [architecture] and config["id2label"] == {"0": "neg", "1": "pos"}
  hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
  loaded = load_run(workdir)
  head = jax.device_get(loaded.state.params["head"])
  assert np.any(head["kernel"] != 0) and (arch == "bert" or not np.any(head["bias"]))  # a decoder's stays 0
  texts = ["the quick fox", "東京 café", "a much longer text about the lazy red fox"]
  rows = classify_rows(loaded.run.tokenizer, texts, [0, 1, 0], seq_len=16)
  theirs = transformers.AutoTokenizer.from_pretrained(out)
  for row, text in zip(rows["inputs_BxL"], texts):  # the rows are what the exported tokenizer gives
    ids = theirs(text, truncation=True, max_length=16)["input_ids"]
    assert row[:len(ids)].tolist() == ids and (len(ids) == 16 or row[len(ids)] == loaded.run.tokenizer.pad_id)
  variables = {"params": loaded.params}
  hidden = jax.jit(lambda v, b: loaded.run.model.apply(v, b, True, method="features"))(variables, rows)
  pooled = tasks.pool(hidden, rows["segment_ids_BxL"], family(loaded.run.model.cfg).pooling)
  ours = np.asarray(tasks.head_logits(head, pooled, loaded.run.model.cfg.family))
  with torch.no_grad():
    expected = hf_model(input_ids=torch.tensor(rows["inputs_BxL"], dtype=torch.long),
                        attention_mask=torch.tensor(rows["segment_ids_BxL"] > 0, dtype=torch.long)).logits.numpy()
  assert float(np.abs(ours - expected).max()) < 1e-4, (ours, expected)


def test_classifiers_without_a_hugging_face_form_are_refused():
  head = {"kernel": np.ones((8, 2), np.float32), "bias": np.zeros(2, np.float32)}
  with pytest.raises(ConversionError, match="a T5 classification run: T5ForSequenceClassification classifies"):
    hf_common.export_classifier({"model_type": "t5"}, {}, head, LABELS)
  with pytest.raises(ConversionError, match=r"the classification head has a bias \(max \|b\| = 0.5\) and "
                                            "LlamaForSequenceClassification's score layer has none"):
    hf_common.export_classifier({"model_type": "llama"}, {}, dict(head, bias=np.array([0.5, 0.0])), LABELS)
