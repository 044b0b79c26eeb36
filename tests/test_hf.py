"""Hugging Face interop: tiny random GPT-2 and Llama (grouped-query) models built with transformers give the
same logits (padded batch) and greedy continuations in ablax after import; export -> import is bit-exact and
loads in transformers without missing or unexpected weights; a wrong checkpoint names the tensor; an imported
Llama fine-tunes with LoRA, continues pretraining and generates from the command line. The GPT-2 directory
carries a byte-level BPE tokenizer.json: the imported run generates from the command line what transformers
generates, scores text as transformers does, fine-tunes with LoRA on text, and exports its tokenizer back.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from configs import base, from_run  # noqa: E402
from configs.finetune import common as ft_common  # noqa: E402
from data.sources import DataError  # noqa: E402
from data.tokenizer import train_tokenizer  # noqa: E402
from model.decode import Sampling, generate  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.hf import common as hf_common  # noqa: E402
from model.hf.common import ConversionError  # noqa: E402
from test_tokenizers import build_tokenizer  # noqa: E402
from test_train import REPO, TEXT, load_parts  # noqa: E402
from train import finetune as finetune_lib  # noqa: E402
from train.hf import export_hf, import_hf  # noqa: E402
from train.pretrain import train_and_evaluate  # noqa: E402

ARCHS = ("gpt2", "llama")
TOLERANCE = 1e-4
MEASURED = {}  # arch -> max |logit difference|, printed at the end of the module


def _hf_model(arch, vocab_size, bos_id, eos_id):
  """A tiny transformers model with every weight perturbed away from its init (norm scales, biases too)."""
  torch.manual_seed(0)
  if arch == "gpt2":
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=48, n_embd=32, n_layer=2, n_head=4,
                                     activation_function="gelu_new", layer_norm_epsilon=1e-5,
                                     bos_token_id=bos_id, eos_token_id=eos_id)
    model = transformers.GPT2LMHeadModel(config)
  else:  # grouped-query attention, head_dim != d_model / heads, untied head, non-default RoPE base
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=48, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-5,
                                      rope_theta=500.0, tie_word_embeddings=False, bos_token_id=bos_id,
                                      eos_token_id=eos_id)
    model = transformers.LlamaForCausalLM(config)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _train_config(root):
  """data and train sections of the imported runs: a tiny corpus, a few steps, one device."""
  config = base.get_config()
  config.data.train_path = str(root / "corpus.txt")
  config.train.update(steps=2, batch_size=4, seq_len=32, learning_rate=1e-3, min_learning_rate=1e-4,
                      warmup_steps=1, eval_every=2, eval_batches=1, checkpoint_every=2, log_every=1,
                      num_samples=0)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  return config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """arch -> {hf_dir, workdir, hf model}: saved with save_pretrained (safetensors), imported with import_hf.
  The Llama directory carries a sentencepiece tokenizer.model; the GPT-2 one a byte-level BPE tokenizer.json
  (GPT2Tokenizer, hf_tokenizer) whose 500 tokens the model's embedding pads to 512, as real checkpoints pad."""
  root = tmp_path_factory.mktemp("hf")
  (root / "corpus.txt").write_text(TEXT)
  tokenizer = train_tokenizer([TEXT], "sentencepiece", vocab_size=300)
  hf_tokenizer = build_tokenizer("gpt2", str(root / "hf_gpt2"))
  eot = hf_tokenizer.convert_tokens_to_ids("<|endoftext|>")
  out = {"root": root, "hf_tokenizer": hf_tokenizer}
  for arch, vocab, ids in (("gpt2", 512, (eot, eot)), ("llama", tokenizer.vocab_size,
                                                        (tokenizer.bos_id, tokenizer.eos_id))):
    model = _hf_model(arch, vocab, *ids)
    hf_dir, workdir = root / f"hf_{arch}", root / f"run_{arch}"
    model.save_pretrained(hf_dir, safe_serialization=True)
    if arch == "llama":
      tokenizer.save(str(hf_dir))
    import_hf(str(hf_dir), str(workdir), _train_config(root))
    out[arch] = {"hf_dir": str(hf_dir), "workdir": str(workdir), "model": model}
  yield out
  print("\nmax |logits ablax - transformers|: " + ", ".join(f"{k} {v:.2e}" for k, v in MEASURED.items()))


def _padded_batch(vocab_size):
  """Three left-padded rows (lengths 12, 8, 3): tokens, attention mask / segment ids, positions [3, 12]."""
  tokens = np.random.default_rng(1).integers(1, vocab_size, (3, 12))
  mask = np.zeros((3, 12), np.int64)
  positions = np.zeros((3, 12), np.int64)
  for row, length in enumerate((12, 8, 3)):
    mask[row, 12 - length:] = 1
    positions[row, 12 - length:] = np.arange(length)
  return tokens, mask, positions


def _max_diff(model, params, hf_model):
  tokens, mask, positions = _padded_batch(model.cfg.vocab_size)
  with torch.no_grad():
    expected = hf_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                        position_ids=torch.tensor(positions)).logits.numpy()
  logits = jax.jit(lambda p: model.apply({"params": p}, tokens, positions, mask.astype(np.int32)))(params)
  return float(np.abs(np.asarray(logits) - expected)[mask == 1].max())


def _flat(params):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(params)).items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(setup, arch):
  _, model, params, _, step = load_parts(setup[arch]["workdir"], require_tokenizer=False)
  diff = _max_diff(model, params, setup[arch]["model"])
  MEASURED[arch] = diff
  assert step == 0
  assert diff <= TOLERANCE, f"{arch}: max |logits ablax - transformers| = {diff:.3e}"


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_decoding_matches_transformers(setup, arch):
  _, model, params, _, _ = load_parts(setup[arch]["workdir"], require_tokenizer=False)
  prompts = [[5, 17, 9, 33, 2, 41, 8], [12, 60, 7]]
  ours = generate(model, params, prompts, max_new_tokens=20, sampling=Sampling(temperature=0.0))
  width = max(map(len, prompts))
  ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
  hf_model = setup[arch]["model"]
  hf_model.generation_config.eos_token_id = None  # ablax decodes 20 tokens whatever they are
  with torch.no_grad():
    theirs = hf_model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20, pad_token_id=0)
  assert ours == theirs[:, width:].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_export_import_round_trip_is_exact(setup, arch):
  root, run = setup["root"], setup[arch]
  out, again = str(root / f"export_{arch}"), str(root / f"reimport_{arch}")
  export_hf(run["workdir"], out)
  with open(os.path.join(out, "config.json")) as f:
    exported = json.load(f)
  assert exported["model_type"] == arch and exported["torch_dtype"] == "float32" and exported["architectures"]
  assert not os.path.exists(os.path.join(out, "tokenizer.model"))  # sentencepiece too: as a tokenizer.json
  assert os.path.exists(os.path.join(out, "tokenizer.json"))
  hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  for name, tensor in run["model"].state_dict().items():
    assert torch.equal(hf_model.state_dict()[name], tensor), name
  import_hf(out, again, _train_config(root))
  before = _flat(load_parts(run["workdir"], require_tokenizer=False)[2])
  after = _flat(load_parts(again, require_tokenizer=False)[2])
  assert before.keys() == after.keys()
  for key in before:
    assert np.array_equal(before[key], after[key]), key


def test_export_import_round_trips_the_tokenizer(setup):
  """The exported tokenizer.json loads in transformers with the original's ids and special tokens; re-imported,
  it gives the first run's ids, special ids and (padded) vocabulary."""
  root, theirs = setup["root"], setup["hf_tokenizer"]
  out, again = str(root / "export_gpt2_tokenizer"), str(root / "reimport_gpt2_tokenizer")
  export_hf(setup["gpt2"]["workdir"], out)
  import_hf(out, again, _train_config(root))
  text = "Héllo  wörld\tcafé 東京 🙂👍🏽\n\tdef f(x):  return  x"
  exported = transformers.AutoTokenizer.from_pretrained(out)
  ids = theirs(text, add_special_tokens=False)["input_ids"]
  assert exported(text, add_special_tokens=False)["input_ids"] == ids
  assert (exported.bos_token, exported.eos_token, exported.pad_token) == ("<|endoftext|>", "<|endoftext|>", None)
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  eot = theirs.convert_tokens_to_ids("<|endoftext|>")
  assert (config["bos_token_id"], config["eos_token_id"]) == (eot, eot)
  first, second = load_parts(setup["gpt2"]["workdir"])[3], load_parts(again)[3]
  assert first.encode(text) == second.encode(text) == ids and second.decode(ids) == text
  assert (second.bos_id, second.eos_id, second.pad_id, second.vocab_size) == (eot, eot, eot, 512)
  assert (first.bos_id, first.eos_id, first.pad_id, first.vocab_size) == (eot, eot, eot, 512)


def test_continued_pretraining_exports_exactly(setup):
  """Pretraining continues from the imported weights; the trained run exports to the same logits and
  re-imports bit-exactly."""
  root, workdir = setup["root"], str(setup["root"] / "continued")
  shutil.copytree(setup["llama"]["workdir"], workdir)
  last = train_and_evaluate(from_run.get_config(workdir), workdir)
  assert last["step"] == 2 and np.isfinite(last["train/loss"])
  imported = _flat(load_parts(setup["llama"]["workdir"])[2])
  _, model, params, _, step = load_parts(workdir)
  trained = _flat(params)
  moved = max(float(np.abs(trained[k] - imported[k]).max()) for k in trained)
  assert step == 2 and 0 < moved < 0.01, moved  # a few small AdamW steps away from the import, not a fresh init

  out = str(root / "export_continued")
  export_hf(workdir, out)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  diff = _max_diff(model, params, hf_model)
  assert diff <= TOLERANCE, f"llama (trained): max |logits ablax - transformers| = {diff:.3e}"
  import_hf(out, str(root / "reimport_continued"), _train_config(root))
  again = _flat(load_parts(str(root / "reimport_continued"))[2])
  assert all(np.array_equal(trained[k], again[k]) for k in trained)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_finetuning_of_an_imported_run(setup, arch):
  """LoRA on text (task lm) through the imported tokenizer: GPT-2's tokenizer.json, Llama's sentencepiece."""
  config = ft_common.get_config()
  config.init_from = setup[arch]["workdir"]
  config.task = "lm"
  config.data.update(train_path=str(setup["root"] / "corpus.txt"), val_fraction=0.1)
  config.peft.update(method="lora", lora_rank=2, lora_alpha=4.0)
  config.train.update(steps=2, batch_size=4, seq_len=32, warmup_steps=1, eval_every=2, eval_batches=1,
                      checkpoint_every=2, log_every=1)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  workdir = str(setup["root"] / f"lora_{arch}")
  last = finetune_lib.finetune(config, workdir)
  assert last["step"] == 2 and np.isfinite(last["train/loss"])
  _, model, merged, tokenizer, _ = load_parts(workdir)
  assert model.cfg.activation == {"gpt2": "gelu_tanh", "llama": "swiglu"}[arch]
  assert tokenizer.vocab_size == model.cfg.vocab_size
  base = _flat(load_parts(setup[arch]["workdir"])[2])
  assert any(not np.array_equal(v, base[k]) for k, v in _flat(merged).items())  # the merged adapters moved it


def _cli(module, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=120)


def test_generate_cli_on_an_imported_run(setup):
  result = _cli("train.generate", f"--workdir={setup['llama']['workdir']}", "--prompt=line 3: the",
                "--max_new_tokens=8", "--temperature=0")
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("line 3: the") and "step 0" in result.stderr


def _hf_greedy(setup, prompt, max_new_tokens):
  """transformers' greedy continuation of `prompt` by the GPT-2 model, decoded: of tokenizer(prompt), which adds
  no bos (the imported run frames prompts as its tokenizer does); generation ends at eos in both."""
  theirs, hf_model = setup["hf_tokenizer"], setup["gpt2"]["model"]
  eot = theirs.convert_tokens_to_ids("<|endoftext|>")
  ids = theirs(prompt)["input_ids"]
  with torch.no_grad():
    out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eot, pad_token_id=eot)
  return theirs.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


@pytest.mark.parametrize("prompts", [["Héllo 東京 🙂 the fox"], ["Héllo 東京 🙂 the fox", "\tdef f(x):  return"]],
                         ids=["streamed", "batched"])
def test_generate_cli_on_an_imported_gpt2_matches_transformers(setup, tmp_path, prompts):
  """python -m train.generate --temperature=0 prints transformers' greedy continuation: one prompt streamed as it
  is decoded, two left-padded into one batch."""
  (tmp_path / "prompts.txt").write_text("".join(p + "\n" for p in prompts))
  result = _cli("train.generate", f"--workdir={setup['gpt2']['workdir']}", f"--prompts_file={tmp_path / 'prompts.txt'}",
                "--max_new_tokens=20", "--temperature=0")
  assert result.returncode == 0, result.stderr
  expected = [p + _hf_greedy(setup, p, 20) for p in prompts]
  if len(prompts) == 1:
    assert result.stdout == expected[0] + "\n"
  else:
    assert result.stdout == "".join(f"--- sample {i}\n{text}\n" for i, text in enumerate(expected))


def test_evaluate_cli_on_an_imported_gpt2_matches_transformers(setup, tmp_path):
  """python -m train.evaluate scores [bos] + the text's tokens: its loss is transformers' on the same ids."""
  text = "Héllo wörld, café 東京 🙂 the quick fox"
  (tmp_path / "doc.txt").write_text(text)
  output = tmp_path / "eval.json"
  result = _cli("train.evaluate", f"--workdir={setup['gpt2']['workdir']}", f"--data={tmp_path / 'doc.txt'}",
                "--seq_len=40", "--stride=0", f"--output={output}")
  assert result.returncode == 0, result.stderr
  record = json.loads(output.read_text())
  theirs = setup["hf_tokenizer"]
  ids = [theirs.convert_tokens_to_ids("<|endoftext|>")] + theirs(text, add_special_tokens=False)["input_ids"]
  assert record["tokens"] == len(ids) - 1 <= 40 and record["bytes"] == len(text.encode())
  with torch.no_grad():
    loss = setup["gpt2"]["model"](input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
  assert abs(record["loss"] - loss) < 1e-4, (record["loss"], loss)


def test_a_run_without_tokenizer_says_so(setup, tmp_path):
  """A directory with neither tokenizer.json nor a sentencepiece model imports as a run of token ids."""
  hf_dir = tmp_path / "no_tokenizer"
  hf_dir.mkdir()
  for name in ("config.json", "model.safetensors"):
    shutil.copy(os.path.join(setup["gpt2"]["hf_dir"], name), hf_dir)
  assert "no tokenizer" in import_hf(str(hf_dir), str(tmp_path / "run"), _train_config(setup["root"]))
  with pytest.raises(DataError, match="no tokenizer"):
    load_parts(str(tmp_path / "run"))


def _broken_copy(setup, tmp_path, edit):
  """A copy of the Llama HF directory whose tensors went through `edit(dict)`."""
  hf_dir = str(tmp_path / "broken")
  shutil.copytree(setup["llama"]["hf_dir"], hf_dir)
  path = os.path.join(hf_dir, "model.safetensors")
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path, metadata={"format": "pt"})
  return hf_dir


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing tensor 'model.layers.1.mlp.up_proj.weight'"),
    (lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}),
     "model.safetensors: unexpected tensor 'model.layers.0.extra.weight'"),
    (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 48), np.float32)}),
     r"model.safetensors: tensor 'model.layers.0.self_attn.k_proj.weight' has shape \(64, 48\), "
     r"the config implies \(32, 48\)"),
], ids=["missing", "unexpected", "shape"])
def test_conversion_errors_name_the_tensor(setup, tmp_path, edit, message):
  hf_dir = _broken_copy(setup, tmp_path, edit)
  with pytest.raises(ConversionError, match=message):
    import_hf(hf_dir, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")  # nothing written before the checkpoint converted


def test_cli_errors_are_one_line(setup, tmp_path):
  pickled = tmp_path / "pickled"
  pickled.mkdir()
  shutil.copy(os.path.join(setup["gpt2"]["hf_dir"], "config.json"), pickled)
  (pickled / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(ConversionError, match="pytorch_model.bin: only pickle weights found; convert to safetensors"):
    import_hf(str(pickled), str(tmp_path / "run"))
  with pytest.raises(ConversionError, match="already exists and is not empty"):
    import_hf(setup["gpt2"]["hf_dir"], setup["gpt2"]["workdir"])
  result = _cli("train.hf", "import", f"--hf_dir={pickled}", f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 1
  assert result.stderr.strip() == (f"error: {pickled / 'pytorch_model.bin'}: only pickle weights found; "
                                   "convert to safetensors")


def test_sharded_checkpoints_import_alike(setup, tmp_path):
  tensors = load_file(os.path.join(setup["llama"]["hf_dir"], "model.safetensors"))
  sharded = tmp_path / "sharded"
  sharded.mkdir()
  shutil.copy(os.path.join(setup["llama"]["hf_dir"], "config.json"), sharded)
  names = sorted(tensors)
  weight_map = {}
  for i, part in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
    shard = f"model-0000{i + 1}-of-00002.safetensors"
    save_file({n: tensors[n] for n in part}, str(sharded / shard), metadata={"format": "pt"})
    weight_map.update({n: shard for n in part})
  (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  expected = _flat(hf_common.import_params(setup["llama"]["hf_dir"])[3])
  got = _flat(hf_common.import_params(str(sharded))[3])
  assert expected.keys() == got.keys() and all(np.array_equal(expected[k], got[k]) for k in expected)


def test_export_needs_an_architecture_that_fits():
  cfg = ModelConfig(vocab_size=50, num_layers=1, d_model=16, num_heads=2, head_dim=8, mlp_dim=32, position="alibi")
  with pytest.raises(ConversionError, match="no Hugging Face architecture fits.*position='alibi'"):
    hf_common.export_tensors(cfg, {})
