"""Hugging Face parity for BERT (BertForMaskedLM) and T5 (T5ForConditionalGeneration, v1.0 ReLU with a tied
and scaled head, v1.1 gated GELU with an untied head): tiny randomly initialised transformers models saved with
save_pretrained and imported with `python -m train.hf import`'s function give the same logits on padded
batches, T5 the same greedy continuations; export -> import is bit-exact and loads in transformers without
missing or unexpected weights; a wrong checkpoint names the tensor; BERT's WordPiece and T5's tokenizer.json
come with the import, serve masked LM and span corruption, and go back with the export.
"""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from configs import base, from_run  # noqa: E402
from model.decode import Sampling, generate  # noqa: E402
from model.hf import common  # noqa: E402
from model.hf.common import ConversionError  # noqa: E402
from test_hf import _flat  # noqa: E402
from test_tokenizers import TEXT, build_tokenizer, corpus_lines  # noqa: E402
from test_train import load_parts  # noqa: E402
from train.hf import export_hf, import_hf  # noqa: E402
from train.pretrain import train_and_evaluate  # noqa: E402

ARCHS = ("bert", "t5_v1_0", "t5_v1_1")
TOLERANCE = 1e-4
VOCAB = 120
MEASURED = {}  # arch -> max |logit difference|, printed at the end of the module


def _hf_model(arch, vocab=VOCAB):
  """A tiny transformers model with every weight perturbed away from its init (norm scales, biases too)."""
  torch.manual_seed(0)
  if arch == "bert":
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=40, hidden_act="gelu")
    model = transformers.BertForMaskedLM(config)
  else:  # head_dim 12 != d_model / heads; few buckets and a short max distance so every bucket kind is used
    v1_0 = arch == "t5_v1_0"
    config = transformers.T5Config(vocab_size=vocab, d_model=40, d_kv=12, d_ff=64, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, relative_attention_max_distance=12,
                                   feed_forward_proj="relu" if v1_0 else "gated-gelu", tie_word_embeddings=v1_0,
                                   decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(config)
    if not v1_0:  # transformers 5 ties lm_head at init even for v1.1; an untied head is a separate matrix
      model.lm_head.weight = torch.nn.Parameter(torch.randn(vocab, 40) * 40 ** -0.5)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
    if arch != "bert":  # T5 embeddings are N(0, 1) and would drown the blocks: greedy would repeat the input
      model.shared.weight.mul_(0.1)
  return model.eval()


def _train_config(root):
  """data and train sections of the imported runs (only written to their config.json here)."""
  config = base.get_config()
  config.data.train_path = str(root / "corpus.txt")
  config.train.update(steps=2, batch_size=4, seq_len=32)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  return config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """arch -> {hf_dir, workdir, hf model}: saved with save_pretrained (safetensors), imported with import_hf."""
  root = tmp_path_factory.mktemp("hf_encoders")
  (root / "corpus.txt").write_text("a tiny corpus\n")
  out = {"root": root}
  for arch in ARCHS:
    model = _hf_model(arch)
    hf_dir, workdir = root / f"hf_{arch}", root / f"run_{arch}"
    model.save_pretrained(hf_dir, safe_serialization=True)
    import_hf(str(hf_dir), str(workdir), _train_config(root))
    out[arch] = {"hf_dir": str(hf_dir), "workdir": str(workdir), "model": model}
  yield out
  print("\nmax |logits ablax - transformers|: " + ", ".join(f"{k} {v:.2e}" for k, v in MEASURED.items()))


def _padded(lengths, width, seed, start=None):
  """Right-padded rows: tokens, mask / segment ids, positions [B, width]; `start` opens every row (T5's
  decoder start token)."""
  tokens = np.random.default_rng(seed).integers(2, VOCAB, (len(lengths), width))
  mask = np.zeros(tokens.shape, np.int32)
  for row, length in enumerate(lengths):
    mask[row, :length] = 1
  if start is not None:
    tokens[:, 0] = start
  positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape) * mask
  return np.where(mask == 1, tokens, 0).astype(np.int32), mask, positions


def _max_diff(model, params, hf_model):
  inputs, mask, positions = _padded((12, 7, 3), 12, seed=1)
  apply = jax.jit(model.apply)
  with torch.no_grad():
    if model.cfg.family == "encoder":
      expected = hf_model(input_ids=torch.tensor(inputs), attention_mask=torch.tensor(mask)).logits.numpy()
      logits = apply({"params": params}, inputs, positions, mask)
      return float(np.abs(np.asarray(logits) - expected)[mask == 1].max())
    decoder, decoder_mask, decoder_positions = _padded((9, 5, 2), 9, seed=2, start=0)
    expected = hf_model(input_ids=torch.tensor(inputs), attention_mask=torch.tensor(mask),
                        decoder_input_ids=torch.tensor(decoder),
                        decoder_attention_mask=torch.tensor(decoder_mask)).logits.numpy()
  logits = apply({"params": params}, inputs, positions, mask, decoder, decoder_positions, decoder_mask)
  return float(np.abs(np.asarray(logits) - expected)[decoder_mask == 1].max())


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(setup, arch):
  _, model, params, _, step = load_parts(setup[arch]["workdir"], require_tokenizer=False)
  assert step == 0
  for name, value in _flat(params).items():  # the comparison is not between near-zero weights
    assert np.abs(value).max() > 0.05, name
  diff = _max_diff(model, params, setup[arch]["model"])
  MEASURED[arch] = diff
  assert diff <= TOLERANCE, f"{arch}: max |logits ablax - transformers| = {diff:.3e}"


@pytest.mark.parametrize("arch", ["t5_v1_0", "t5_v1_1"])
def test_t5_greedy_decoding_matches_transformers(setup, arch):
  _, model, params, _, _ = load_parts(setup[arch]["workdir"], require_tokenizer=False)
  prompts = [[5, 17, 9, 33, 2, 41, 8, 70, 11, 3, 64, 90, 23, 7], [12, 60, 7]]
  ours = generate(model, params, prompts, max_new_tokens=20, sampling=Sampling(temperature=0.0))
  width = max(map(len, prompts))
  ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
  mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
  hf_model = setup[arch]["model"]
  hf_model.generation_config.eos_token_id = None  # ablax decodes 20 tokens whatever they are
  with torch.no_grad():
    theirs = hf_model.generate(ids, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=20)
  assert theirs[:, 0].tolist() == [0, 0]  # decoder_start_token_id = pad = 0, as ablax's encoder-decoders
  assert ours == theirs[:, 1:].tolist()
  assert len(set(ours[0] + ours[1])) > 3  # not a degenerate repetition of one token


@pytest.mark.parametrize("arch", ARCHS)
def test_export_import_round_trip_is_exact(setup, arch):
  root, run = setup["root"], setup[arch]
  out = str(root / f"export_{arch}")
  export_hf(run["workdir"], out)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["model_type"] == arch.split("_")[0]
  auto = transformers.AutoModelForMaskedLM if arch == "bert" else transformers.AutoModelForSeq2SeqLM
  hf_model, info = auto.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  original = run["model"].state_dict()
  folded = ("bert.embeddings.position_embeddings.weight", "bert.embeddings.token_type_embeddings.weight")
  for name, tensor in hf_model.state_dict().items():
    if name not in folded:  # BERT's token type 0 lives in the position table: checked by the logits below
      assert torch.equal(original[name], tensor), name
  np.testing.assert_allclose(_max_diff(*load_parts(run["workdir"], require_tokenizer=False)[1:3], hf_model),
                             0.0, atol=TOLERANCE)
  _, _, _, params = common.import_params(out)
  before = _flat(load_parts(run["workdir"], require_tokenizer=False)[2])
  after = _flat(params)
  assert before.keys() == after.keys()
  for key in before:
    assert np.array_equal(before[key], after[key]), key


def _import_changed(setup, arch, tmp_path, change):
  """import_params of the arch's checkpoint after `change(tensors)` edits its {name: array} in place."""
  hf_dir = str(tmp_path / arch)
  shutil.copytree(setup[arch]["hf_dir"], hf_dir)
  path = os.path.join(hf_dir, "model.safetensors")
  tensors = load_file(path)
  change(tensors)
  save_file(tensors, path, metadata={"format": "pt"})
  return common.import_params(hf_dir)


@pytest.mark.parametrize("arch, name", [("bert", "bert.encoder.layer.1.attention.self.value.bias"),
                                        ("bert", "cls.predictions.transform.dense.weight"),
                                        ("t5_v1_0", "decoder.block.1.layer.1.EncDecAttention.k.weight"),
                                        ("t5_v1_1", "encoder.block.0.layer.1.DenseReluDense.wi_1.weight")])
def test_missing_tensor_is_named(setup, tmp_path, arch, name):
  with pytest.raises(ConversionError, match=f"missing tensor '{name}'"):
    _import_changed(setup, arch, tmp_path, lambda t: t.pop(name))


@pytest.mark.parametrize("arch, name", [("bert", "bert.encoder.layer.2.output.dense.bias"),
                                        ("t5_v1_1", "encoder.block.0.layer.2.DenseReluDense.wi.weight")])
def test_unexpected_tensor_is_named(setup, tmp_path, arch, name):
  with pytest.raises(ConversionError, match=f"unexpected tensor '{name}'"):
    _import_changed(setup, arch, tmp_path, lambda t: t.update({name: np.zeros(3, np.float32)}))


@pytest.mark.parametrize("arch, name", [
    ("bert", "bert.embeddings.token_type_embeddings.weight"),
    ("t5_v1_0", "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")])
def test_wrong_shape_is_named(setup, tmp_path, arch, name):
  with pytest.raises(ConversionError, match=f"tensor '{name}' has shape"):
    _import_changed(setup, arch, tmp_path, lambda t: t.update({name: t[name][:, :-1]}))


def test_known_unused_and_tied_copies_are_accepted(setup, tmp_path):
  """BERT's pooler and next-sentence head are skipped; T5's tied aliases may be stored (equal) or not."""
  def add_bert_extras(tensors):
    tensors.update({"bert.pooler.dense.weight": np.ones((32, 32), np.float32),
                    "bert.pooler.dense.bias": np.ones(32, np.float32),
                    "cls.seq_relationship.weight": np.ones((2, 32), np.float32)})
  reference = _flat(common.import_params(setup["bert"]["hf_dir"])[3])
  changed = _flat(_import_changed(setup, "bert", tmp_path, add_bert_extras)[3])
  assert all(np.array_equal(reference[k], changed[k]) for k in reference)

  def add_t5_aliases(tensors):
    for name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
      tensors[name] = tensors["shared.weight"]
  _import_changed(setup, "t5_v1_0", tmp_path / "aliases", add_t5_aliases)
  # v1.1 saved while lm_head was still tied to the embedding in torch (transformers 5 ties it at init)
  untied = _import_changed(setup, "t5_v1_1", tmp_path / "untied", lambda t: t.pop("lm_head.weight"))[3]
  assert np.array_equal(untied["decoder"]["lm_head"], untied["embed"]["embedding"].T)

  def differing_alias(tensors):
    tensors["decoder.embed_tokens.weight"] = tensors["shared.weight"] + 1.0
  with pytest.raises(ConversionError, match="'decoder.embed_tokens.weight' differs from 'shared.weight'"):
    _import_changed(setup, "t5_v1_0", tmp_path / "differing", differing_alias)


def test_models_t5_cannot_express_are_not_exported(setup):
  _, model, params, _, _ = load_parts(setup["t5_v1_0"]["workdir"], require_tokenizer=False)
  for changes, key in ((dict(scale_tied_logits=False), "scale_tied_logits"),
                       (dict(scale_attention=True), "scale_attention")):
    with pytest.raises(ConversionError, match=f"t5: config.model.{key}"):
      common.export_tensors(dataclasses.replace(model.cfg, **changes), params)


@pytest.mark.parametrize("arch", ["bert", "t5_v1_1"])
def test_imported_tokenizers_serve_the_pretraining_objectives(tmp_path, arch):
  """A BERT WordPiece or T5 tokenizer.json is imported with the model ("<mask>" is [MASK], T5's 100 sentinels are
  its own; T5's embedding has more rows than its tokenizer has tokens, as real T5's), pretraining continues with
  masked LM or span corruption through it, and export writes a tokenizer transformers reads with the same ids."""
  kind = arch.split("_")[0]
  hf_dir, workdir, out = str(tmp_path / "hf"), str(tmp_path / "run"), str(tmp_path / "export")
  theirs = build_tokenizer(kind, hf_dir)
  vocab = len(theirs) + (28 if kind == "t5" else 0)
  _hf_model(arch, vocab).save_pretrained(hf_dir, safe_serialization=True)
  (tmp_path / "corpus.txt").write_text("\n".join(corpus_lines()))
  config = _train_config(tmp_path)
  config.train.update(warmup_steps=1, eval_every=2, eval_batches=1, checkpoint_every=2, log_every=1, num_samples=0)
  assert "huggingface tokenizer" in import_hf(hf_dir, workdir, config)
  run_config, model, _, tokenizer, _ = load_parts(workdir)
  assert run_config.data.tokenizer == "huggingface" and tokenizer.vocab_size == model.cfg.vocab_size == vocab
  ids = theirs(TEXT, add_special_tokens=False)["input_ids"]
  assert tokenizer.encode(TEXT) == ids
  if kind == "bert":
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.token_id("<mask>")) == (
        theirs.cls_token_id, theirs.sep_token_id, theirs.pad_token_id, theirs.mask_token_id)
  else:
    sentinels = [f"<extra_id_{i}>" for i in range(100)]
    assert [tokenizer.token_id(t) for t in sentinels] == theirs.convert_tokens_to_ids(sentinels)
  last = train_and_evaluate(from_run.get_config(workdir), workdir)
  assert last["step"] == 2 and np.isfinite(last["train/loss"]) and np.isfinite(last["eval/loss"])
  export_hf(workdir, out)
  assert transformers.AutoTokenizer.from_pretrained(out)(TEXT, add_special_tokens=False)["input_ids"] == ids
