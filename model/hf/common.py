"""Shared parts of the Hugging Face converters: errors, the tensor bag, safetensors I/O, the registry.

An architecture module model/hf/<arch>.py defines
  MODEL_TYPES                        HF `model_type` values it handles
  model_section(hf_config) -> dict   the ablax `config.model` keys
  vocab_size(hf_config) -> int
  to_ablax(hf_config, tensors, cfg) -> dict        plain nested numpy param tree (as init_params, unboxed)
  hf_config(cfg) -> dict                           HF config.json contents (ConversionError if cfg does not fit)
  to_hf(cfg, params) -> dict[str, np.ndarray]      HF tensor names -> arrays
Offers `ConversionError`, `Tensors`, `read_hf_dir`, `write_safetensors`, `architecture`, `architecture_for`,
`write_json`, `import_params` and `export_tensors`.
"""

import importlib
import json
import os

import ml_dtypes
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from model.config import ModelConfig
from model.parametrization import standard_forward

ARCHITECTURES = ("gpt2", "llama", "qwen3", "mixtral", "bert", "t5")  # model/hf/<name>.py, tried in this order on export
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Options of config.model that GPT-2 and Llama do not have: an exported decoder keeps them at these values.
PLAIN_DECODER = {"scale_attention": True, "embed_norm": False, "scale_tied_logits": False, "head_transform": False,
                 "head_bias": False, "qk_norm": False, "mlp": "dense"}
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")


class ConversionError(ValueError):
  """A checkpoint that does not match what the converter expects; the message names the tensor and file."""


def config_value(hf_config: dict, key: str, default=None):
  """hf_config[key] (or `default`); a ConversionError naming the key when neither is there."""
  value = hf_config.get(key, default)
  if value is None:
    raise ConversionError(f"config.json: '{key}' is required for model_type {hf_config.get('model_type')}")
  return value


def check_settings(hf_config: dict, required: dict) -> None:
  """ConversionError naming the first config.json key whose value ablax cannot express (absent = fine)."""
  for key, expected in required.items():
    if hf_config.get(key, expected) != expected:
      raise ConversionError(f"config.json: {key}={hf_config[key]!r} is not supported (ablax needs {expected!r})")


def choice(hf_config: dict, key: str, default: str, supported: dict):
  """supported[hf_config[key]] (key absent: `default`); a ConversionError listing what is supported."""
  value = hf_config.get(key, default)
  if value not in supported:
    raise ConversionError(f"config.json: {key} {value!r} is not supported (supported: {', '.join(supported)})")
  return supported[value]


class Tensors:
  """The tensors of a checkpoint by name; each one is taken exactly once, with the shape the config implies."""

  def __init__(self, arrays: dict, source: str, files: dict | None = None):
    self.arrays = dict(arrays)
    self.source = source          # file or directory, for messages
    self.files = files or {}      # tensor name -> the file holding it (sharded checkpoints)

  def where(self, name: str) -> str:
    return self.files.get(name, self.source)

  def __contains__(self, name: str) -> bool:
    return name in self.arrays

  def take(self, name: str, shape: tuple) -> np.ndarray:
    """Removes and returns tensor `name` as float32; ConversionError if it is missing or has another shape."""
    if name not in self.arrays:
      raise ConversionError(f"{self.source}: missing tensor '{name}' (expected shape {tuple(shape)})")
    array = self.arrays.pop(name)
    if tuple(array.shape) != tuple(shape):
      raise ConversionError(f"{self.where(name)}: tensor '{name}' has shape {tuple(array.shape)}, "
                            f"the config implies {tuple(shape)}")
    return np.asarray(array, np.float32)

  def discard(self, name: str) -> None:
    """Drops tensor `name` if present (buffers some versions save, such as attention masks)."""
    self.arrays.pop(name, None)

  def finish(self) -> None:
    """ConversionError naming the first tensor nobody took."""
    if self.arrays:
      name = sorted(self.arrays)[0]
      more = f" (and {len(self.arrays) - 1} more)" if len(self.arrays) > 1 else ""
      raise ConversionError(f"{self.where(name)}: unexpected tensor '{name}'{more}")


def _load_safetensors(path: str) -> dict:
  """{name: array} of one .safetensors file; bfloat16 (which safetensors.numpy cannot read) via ml_dtypes."""
  try:
    return load_file(path)
  except TypeError:  # "data type 'bfloat16' not understood"
    pass
  except SafetensorError as e:
    raise ConversionError(f"{path}: not a safetensors file, truncated or corrupt ({e})") from None
  with open(path, "rb") as f:
    header_len = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(header_len))
    data = f.read()
  dtypes = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64,
            "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
  arrays = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in dtypes:
      raise ConversionError(f"{path}: tensor '{name}' has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    arrays[name] = np.frombuffer(data[start:end], dtypes[info["dtype"]]).reshape(info["shape"])
  return arrays


def _weight_map(index_path: str) -> dict:
  """{tensor name: shard file name} of a sharded checkpoint's index file."""
  try:
    with open(index_path, encoding="utf-8") as f:
      index = json.load(f)
  except ValueError as e:
    raise ConversionError(f"{index_path}: not valid JSON ({e})") from None
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
    raise ConversionError(f"{index_path}: expected a \"weight_map\" of tensor names to shard file names")
  return weight_map


def _shard_path(hf_dir: str, index_path: str, shard: str) -> str:
  """The file of `shard` in hf_dir; ConversionError if the name leads outside hf_dir or the file is missing."""
  path = os.path.join(hf_dir, shard)
  root = os.path.realpath(hf_dir)
  # realpath resolves "..", an absolute name and symlinks, so a shard cannot read a file outside the directory.
  if os.path.isabs(shard) or os.path.commonpath([root, os.path.realpath(path)]) != root:
    raise ConversionError(f"{index_path}: shard '{shard}' is outside the model directory")
  if not os.path.isfile(path):
    raise ConversionError(f"{index_path}: shard '{shard}' is missing")
  return path


def read_hf_dir(hf_dir: str) -> tuple[dict, Tensors]:
  """(config.json contents, Tensors) of a Hugging Face model directory; only safetensors weights are read."""
  config_path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(config_path):
    raise ConversionError(f"{config_path}: no such file; --hf_dir must be a Hugging Face model directory")
  try:
    with open(config_path) as f:
      hf_config = json.load(f)
  except ValueError as e:
    raise ConversionError(f"{config_path}: not valid JSON ({e})") from None
  if not isinstance(hf_config, dict):
    raise ConversionError(f"{config_path}: expected a JSON object, got {type(hf_config).__name__}")
  index_path = os.path.join(hf_dir, SAFETENSORS_INDEX)
  single = os.path.join(hf_dir, "model.safetensors")
  if os.path.isfile(single):
    return hf_config, Tensors(_load_safetensors(single), single)
  if os.path.isfile(index_path):
    arrays, files = {}, {}
    for shard in sorted(set(_weight_map(index_path).values())):
      path = _shard_path(hf_dir, index_path, shard)
      for name, array in _load_safetensors(path).items():
        arrays[name], files[name] = array, path
    return hf_config, Tensors(arrays, hf_dir, files)
  pickles = [name for name in PICKLE_FILES if os.path.isfile(os.path.join(hf_dir, name))]
  if pickles:
    raise ConversionError(f"{os.path.join(hf_dir, pickles[0])}: only pickle weights found; convert to safetensors")
  raise ConversionError(f"{hf_dir}: no model.safetensors or {SAFETENSORS_INDEX}")


def write_json(data: dict, path: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, ensure_ascii=False)
    f.write("\n")


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def write_safetensors(tensors: dict, path: str) -> None:
  """Writes {name: array} as one float32 .safetensors file with the {"format": "pt"} metadata torch expects,
  readable as any new file is (safetensors itself creates it 0600)."""
  arrays = {name: np.ascontiguousarray(np.asarray(a, np.float32)) for name, a in tensors.items()}
  save_file(arrays, path, metadata={"format": "pt"})
  os.chmod(path, 0o666 & ~_umask())


def architecture(name: str):
  """The converter module model/hf/<name>.py; None if it does not exist (yet)."""
  try:
    return importlib.import_module(f"model.hf.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"model.hf.{name}":
      raise
    return None


def architecture_for(hf_config: dict, source: str):
  """The converter module whose MODEL_TYPES holds hf_config["model_type"]."""
  model_type = hf_config.get("model_type")
  supported = []
  for name in ARCHITECTURES:
    module = architecture(name)
    if module is None:
      continue
    if model_type in module.MODEL_TYPES:
      return module
    supported += list(module.MODEL_TYPES)
  raise ConversionError(f"{source}: model_type {model_type!r} is not supported (supported: {', '.join(supported)})")


def import_params(hf_dir: str) -> tuple[dict, dict, ModelConfig, dict]:
  """(HF config, ablax config.model section, ModelConfig, numpy param tree) of a Hugging Face directory."""
  hf_config, tensors = read_hf_dir(hf_dir)
  module = architecture_for(hf_config, os.path.join(hf_dir, "config.json"))
  section = module.model_section(hf_config)
  cfg = ModelConfig.from_config(section, module.vocab_size(hf_config))
  params = module.to_ablax(hf_config, tensors, cfg)
  tensors.finish()
  return hf_config, section, cfg, params


def export_classifier(hf_config: dict, tensors: dict, head: dict, labels: list) -> tuple[dict, dict]:
  """(config.json contents, tensors) of the `...ForSequenceClassification` model of an exported model with a
  classification head (kernel [D, C], bias [C]) over `labels`; ConversionError where its architecture's class
  computes another function of the hidden states than ablax's head."""
  module = architecture_for(hf_config, "config.json")
  architecture, tensors = module.to_classifier(tensors, np.asarray(head["kernel"], np.float32),
                                               np.asarray(head["bias"], np.float32))
  names = [str(label) for label in labels]
  hf_config = {**hf_config, "architectures": [architecture], "id2label": dict(enumerate(names)),
               "label2id": {name: i for i, name in enumerate(names)}, "problem_type": "single_label_classification"}
  return hf_config, tensors


def unbiased_score(bias_C: np.ndarray, architecture: str) -> None:
  """ConversionError if a decoder's head has a bias, which the bias-free score layer of `architecture` lacks."""
  if np.any(bias_C != 0):
    raise ConversionError(f"the classification head has a bias (max |b| = {float(np.abs(bias_C).max()):.3g}) and "
                          f"{architecture}'s score layer has none; runs fine-tuned since ablax keeps a decoder's "
                          "head bias at zero export exactly")


def export_tensors(cfg: ModelConfig, params: dict, model_type: str | None = None) -> tuple[dict, dict]:
  """(HF config.json contents, {name: array}) of an ablax model: the first architecture that fits `cfg`,
  or the one handling `model_type`."""
  if cfg.width_mult != 1.0:
    raise ConversionError(f"config.model.parametrization: a µP model of d_model {cfg.d_model} over base_width "
                          f"{cfg.base_width} has multipliers no Hugging Face architecture holds")
  if not standard_forward(cfg):
    raise ConversionError(f"config.model.mup_output_mult / mup_attn_mult: multipliers {cfg.mup_output_mult} / "
                          f"{cfg.mup_attn_mult} on the logits and attention, which no Hugging Face architecture holds")
  reasons = []
  for name in ARCHITECTURES:
    module = architecture(name)
    if module is None or (model_type and model_type not in module.MODEL_TYPES):
      continue
    try:
      hf_config = module.hf_config(cfg)
    except ConversionError as e:
      reasons.append(f"{name}: {e}")
      continue
    return hf_config, module.to_hf(cfg, params)
  detail = "; ".join(reasons) or f"no converter handles model_type {model_type!r}"
  raise ConversionError(f"config.model: no Hugging Face architecture fits this model ({detail})")
