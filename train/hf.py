"""Hugging Face checkpoints <-> ablax runs: the import and export entrypoint.

  python -m train.hf import --hf_dir=PATH --workdir=DIR [--config=configs/X.py --config.data.train_path=...]
  python -m train.hf export --workdir=DIR --out=PATH [--step=N] [--model_type=llama]

Import makes a run at step 0: its model section comes from the checkpoint, the rest (data, train) from
--config (default configs/base.py). It is an ordinary workdir: train.generate, train.evaluate,
train.finetune --config.init_from=DIR and continued pretraining (--config=configs/from_run.py:DIR) read it.
Import records how the Hugging Face tokenizer frames a text (config.data.framing, e.g. "$A" for GPT-2, which adds
nothing, "<s> $A" for Llama): the run generates, scores and fine-tunes on texts framed so, where ablax's own runs
read [bos] + text. Export writes config.json and model.safetensors (float32) that transformers'
AutoModelForCausalLM / AutoModel load, or a classification run's `...ForSequenceClassification` (GPT-2, Llama,
BERT; an encoder-decoder's head has no Hugging Face class). The tokenizer travels both ways: a Hugging Face
tokenizer.json with its tokenizer_config.json (data.tokenizer "huggingface"), else a sentencepiece model
(tokenizer.model / spiece.model, "sentencepiece"), and a directory with neither gives a run of token ids only
("none"); export writes a tokenizer.json (data/hf_tokenizers.py: sentencepiece and char tokenizers converted) that
transformers' AutoTokenizer loads to ablax's ids and text, framing texts as the run does. The converters
(model/hf/) map names and layouts only; this module reads and writes runs.
"""

import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from configs import base
from data.hf_tokenizers import hf_files, hf_framing
from data.tokenizer import (HF_CONFIG_FILE, HF_FILE, HuggingFaceTokenizer, SentencePieceTokenizer, load_huggingface,
                            load_sentencepiece)
from model.families import FAMILIES
from model.hf import common
from train.cli import fail, parse_flags, run_reporting_errors
from train.runs import load_run, write_initial_checkpoint
from train.workdir import prepare_workdir

SPM_NAMES = ("tokenizer.model", "spiece.model")  # Llama's and T5's sentencepiece files


def _check_new_dir(path: str, flag: str) -> None:
  if not path:
    raise common.ConversionError(f"--{flag} is required")
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise common.ConversionError(f"{path}: already exists and is not empty; give a new --{flag}")


def _sentencepiece(hf_dir: str, vocab_size: int) -> SentencePieceTokenizer | None:
  """The HF directory's sentencepiece model if it has one whose size matches the model's vocabulary."""
  for name in SPM_NAMES:
    path = os.path.join(hf_dir, name)
    if os.path.isfile(path):
      tokenizer = load_sentencepiece(path)
      if tokenizer.vocab_size == vocab_size:
        return tokenizer
      print(f"ablax: {path} has {tokenizer.vocab_size} pieces but the model {vocab_size} tokens; not copied",
            file=sys.stderr)
  return None


def _huggingface(hf_dir: str, hf_config: dict, vocab_size: int) -> HuggingFaceTokenizer | None:
  """The HF directory's tokenizer.json (special tokens resolved, see load_huggingface) if it has one that fits
  the model's vocabulary, which may be larger (an embedding padded past the tokenizer's tokens)."""
  if not os.path.isfile(os.path.join(hf_dir, HF_FILE)):
    return None
  tokenizer = load_huggingface(hf_dir, hf_config)
  if tokenizer.num_tokens > vocab_size:
    print(f"ablax: {os.path.join(hf_dir, HF_FILE)} has {tokenizer.num_tokens} tokens but the model {vocab_size}; "
          "not copied", file=sys.stderr)
    return None
  tokenizer.set_model_vocab_size(vocab_size)
  return tokenizer


def run_config(section: dict, vocab_size: int, tokenizer: str, config=None, framing: str = ""):
  """A full run config: `config` (default configs/base.py) with the checkpoint's model section and vocabulary,
  `tokenizer` ("huggingface", "sentencepiece" or "none") as data.tokenizer and `framing` as data.framing."""
  config = base.get_config() if config is None else config
  config.model.update(section)
  config.objective = FAMILIES[config.model.family].objective
  # No tokenizer: the vocabulary size is recorded for the loaders (train/runs.py run_tokenizer).
  config.data.update(tokenizer=tokenizer, vocab_size=vocab_size, framing=framing)
  if config.model.position == "learned":
    config.train.seq_len = min(config.train.seq_len, config.model.max_len)
  return config


def import_hf(hf_dir: str, workdir: str, config=None) -> str:
  """Converts a Hugging Face directory into a new ablax workdir holding a step-0 checkpoint; `config` gives
  the run's data and train sections."""
  if not hf_dir:
    raise common.ConversionError("--hf_dir is required")
  _check_new_dir(workdir, "workdir")
  hf_config, section, cfg, params = common.import_params(hf_dir)
  # tokenizer.json first: it is what transformers reads when a directory has both (Llama 2, T5).
  tokenizer = _huggingface(hf_dir, hf_config, cfg.vocab_size) or _sentencepiece(hf_dir, cfg.vocab_size)
  kind = {HuggingFaceTokenizer: "huggingface", SentencePieceTokenizer: "sentencepiece"}.get(type(tokenizer), "none")
  framing = hf_framing(hf_dir, tokenizer, hf_config.get("model_type")) if tokenizer is not None else ""
  if tokenizer is not None:
    tokenizer.set_framing(framing)  # checks that the template's tokens are the tokenizer's
  config = run_config(section, cfg.vocab_size, kind, config, framing)
  prepare_workdir(config, workdir)
  if tokenizer is not None:
    tokenizer.save(workdir)
  write_initial_checkpoint(workdir, config, params)
  framed = f", texts framed as {framing!r}" if tokenizer is not None else ""
  return (f"ablax: {hf_config['model_type']} from {hf_dir} -> {workdir} (step 0, {cfg.num_layers} layers, "
          f"d_model {cfg.d_model}, vocab {cfg.vocab_size}, {'no' if kind == 'none' else kind} tokenizer{framed})")


def export_hf(workdir: str, out: str, step: int | None = None, model_type: str | None = None) -> str:
  """Writes a run's checkpoint as a Hugging Face directory: config.json, model.safetensors (a classification run's
  as `...ForSequenceClassification`) and its tokenizer as tokenizer.json + tokenizer_config.json (hf_files). Every
  refusal comes before anything is written."""
  if not workdir:
    raise common.ConversionError("--workdir is required")
  _check_new_dir(out, "out")
  loaded = load_run(workdir, step, require_tokenizer=False)
  hf_config, tensors = common.export_tensors(loaded.run.model.cfg, jax.device_get(loaded.params), model_type)
  if loaded.run.labels is not None:
    head = jax.device_get(loaded.trainable["head"])
    hf_config, tensors = common.export_classifier(hf_config, tensors, head, loaded.run.labels)
  tokenizer = loaded.run.tokenizer  # a fine-tuning run's is its base run's
  files = hf_files(tokenizer, workdir) if tokenizer is not None else None
  for key in ("bos_token_id", "eos_token_id"):  # transformers' generate stops at eos as ablax does
    if tokenizer is not None and key in hf_config and hf_config[key] is None:
      hf_config[key] = getattr(tokenizer, key.replace("_token", ""))
  if tokenizer is not None and loaded.run.labels is not None and hf_config.get("pad_token_id") is None:
    hf_config["pad_token_id"] = tokenizer.pad_id  # a decoder's classifier reads the last token before padding
  os.makedirs(out, exist_ok=True)
  common.write_json(hf_config, os.path.join(out, "config.json"))
  common.write_safetensors(tensors, os.path.join(out, "model.safetensors"))
  if files is not None:
    with open(os.path.join(out, HF_FILE), "w", encoding="utf-8") as f:
      f.write(files[0])
    common.write_json(files[1], os.path.join(out, HF_CONFIG_FILE))
  return (f"ablax: {workdir} step {loaded.step} -> {out} ({hf_config['architectures'][0]}, {len(tensors)} tensors"
          f"{'' if files is not None else ', no tokenizer'})")


def main(argv):
  f = flags.FLAGS
  commands = {"import": lambda: import_hf(f.hf_dir, f.workdir, f.config),
              "export": lambda: export_hf(f.workdir, f.out, f.step, f.model_type)}
  if len(argv) != 2 or argv[1] not in commands:
    fail(f"expected one command, import or export (got {' '.join(argv[1:]) or 'none'})")
  try:
    print(run_reporting_errors(commands[argv[1]]), file=sys.stderr)
  except common.ConversionError as e:
    fail(str(e))


if __name__ == "__main__":  # flags only here: tests import this module beside other entrypoints
  config_flags.DEFINE_config_file("config", None, "import: config file for the data and train sections "
                                  "(default configs/base.py).", lock_config=True)
  flags.DEFINE_string("hf_dir", None, "import: Hugging Face model directory (config.json, *.safetensors).")
  flags.DEFINE_string("workdir", None, "import: the new run directory; export: the run to export.")
  flags.DEFINE_string("out", None, "export: the new Hugging Face model directory.")
  flags.DEFINE_integer("step", None, "export: checkpoint step (default: the latest).")
  flags.DEFINE_string("model_type", None, "export: HF model_type (default: the first that fits).")
  app.run(main, flags_parser=parse_flags)
