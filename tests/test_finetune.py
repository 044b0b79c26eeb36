"""Fine-tuning invariants: frozen leaves stay frozen, adapters are exact transforms of the parameter tree,
the optimizer sees trainable leaves only, the response-only loss mask, adapter checkpoints, accuracy, resume.

One tiny char-level base run (rope positions) is pretrained once per module; every fine-tuning run below
starts from it on a generated, separable sentiment task or a generated instruction task.
"""

import json
import os
import shutil
import subprocess
import sys
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from configs.finetune import common
from data.tokenizer import load_tokenizer
from model.config import ConfigError
from test_train import REPO, SEED, load_parts, logged, tiny_config
from train import finetune as finetune_lib
from train import mesh as mesh_lib
from train import peft
from train import runs
from train import tasks
from train.cli import RunError
from train.pretrain import train_and_evaluate

POSITIVE = ["good", "great", "nice", "fine", "superb", "happy"]
NEGATIVE = ["bad", "awful", "poor", "sad", "ugly", "dull"]
FILLERS = ["the film was", "it is so", "that was", "my dog is", "a very", "quick fox so"]
LORA = dict(lora_rank=2, lora_alpha=4.0)


def _write_jsonl(path, records):
  with open(path, "w") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
  return str(path)


def _sentiment(rng, n):
  records = []
  for _ in range(n):
    label = int(rng.integers(2))
    word = rng.choice(POSITIVE if label else NEGATIVE)
    records.append({"text": f"{rng.choice(FILLERS)} {word}", "label": label})
  return records


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """The pretrained base run's workdir and the task files."""
  root = tmp_path_factory.mktemp("finetune")
  config = tiny_config(root, steps=20, checkpoint_every=20, eval_every=20, decay_steps=20)
  config.model.position = "rope"
  base = str(root / "base")
  train_and_evaluate(config, base)
  rng = np.random.default_rng(0)
  files = {"base": base, "root": root,
           "train": _write_jsonl(root / "train.jsonl", _sentiment(rng, 300)),
           "dev": _write_jsonl(root / "dev.jsonl", _sentiment(rng, 60))}
  pairs = [{"prompt": f"line {i}: {rng.choice(FILLERS)}", "response": f" {rng.choice(POSITIVE + NEGATIVE)}."}
           for i in range(40)]
  files["instruct"] = _write_jsonl(root / "instruct.jsonl", pairs)
  return files


def ft_config(setup, method="lora", task="classify", **train_overrides):
  config = common.get_config()
  config.init_from = setup["base"]
  config.task = task
  if task == "classify":
    config.data.update(train_path=setup["train"], val_path=setup["dev"], text_field="text", label_field="label")
  else:
    config.data.update(train_path=setup["instruct"], val_path="", val_fraction=0.25)
  config.peft.method = method
  config.peft.update(trainable=(r"_bias$",), num_prompt_tokens=4, **LORA)
  config.train.update(steps=12, batch_size=8, seq_len=24, learning_rate=3e-3, min_learning_rate=3e-4,
                      warmup_steps=2, decay_steps=40, eval_every=1000, eval_batches=8, checkpoint_every=1000,
                      log_every=1, num_samples=0, seed=SEED)
  config.train.update(**train_overrides)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  return config


def run(config, workdir):
  """finetune(config, workdir), also returning fit()'s final state and the frozen tree it trained against."""
  seen, fit = {}, finetune_lib.fit

  def spy(*args, **kwargs):
    state, last = fit(*args, **kwargs)
    seen.update(state=state, frozen=args[2].frozen)  # fit(config, workdir, run, ...)
    return state, last

  with mock.patch.object(finetune_lib, "fit", spy):
    last = finetune_lib.finetune(config, workdir)
  return last, seen["state"], seen["frozen"]


LEARNING_RATES = {"full": 3e-3, "freeze": 1e-2, "lora": 3e-2, "ia3": 3e-2, "prompt": 3e-2}
STEPS = 120  # cosine decay over the whole run; with decay_steps 40 and 60 steps LoRA stalled at 0.73-0.85 on
             # two seeds of six
# Dev accuracy after STEPS with ABLAX_TEST_SEED 0..5: full 1.0 on each, LoRA (rank 2) 0.9 to 1.0.
MIN_ACCURACY = {"full": 0.9, "lora": 0.8}


@pytest.fixture(scope="module")
def trained(setup):
  """method -> (config, workdir, last metrics, final state, frozen tree) of a classification run: STEPS steps for
  the methods whose accuracy is tested, 12 for the others (their tests look at which leaves changed, not how far)."""
  cache = {}

  def get(method):
    if method not in cache:
      steps = STEPS if method in MIN_ACCURACY else 12
      config = ft_config(setup, method, steps=steps, decay_steps=steps, learning_rate=LEARNING_RATES[method])
      workdir = str(setup["root"] / f"ft_{method}")
      cache[method] = (config, workdir, *run(config, workdir))
    return cache[method]
  return get


@pytest.fixture(scope="module")
def base_model(setup):
  """(model, pretrained params, a batch of rows from the sentiment task)."""
  config, model, params, tokenizer, _ = load_parts(setup["base"])
  ft = ft_config(setup)
  ft.model.update(dict(config.model))
  rows, _, _ = tasks.build_rows(ft, tokenizer)
  batch = {k: v[:4] for k, v in rows.items() if k != "labels_B"}
  return model, params, batch


def flat(tree) -> dict:
  return {peft.path_str(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def logits(model, params, batch, **extra):
  """Model logits, jitted (tracing happens inside any active nn.intercept_methods)."""
  apply = lambda p: model.apply({"params": p}, batch, method="forward", **extra)
  return np.asarray(jax.jit(apply)(params))


@pytest.mark.parametrize("method", ["freeze", "lora", "ia3", "prompt", "full"])
def test_frozen_parameters_stay_bit_identical(setup, trained, base_model, method):
  config, _, _, state, frozen = trained(method)
  model, pretrained, _ = base_model
  pre, trained_base, frozen_base = flat(pretrained), flat(state.params["base"]), flat(frozen["base"])
  rule = peft.Method(config.peft, model.cfg)
  assert set(trained_base) == {p for p in pre if rule.base_trainable(p)}
  assert set(frozen_base) == set(pre) - set(trained_base)
  for path, value in frozen_base.items():
    assert np.array_equal(value, pre[path]), path
  changed = [p for p, v in trained_base.items() if not np.array_equal(v, pre[p])]
  if method == "freeze":
    # Every bias but the keys' (softmax ignores a shift shared by all keys: zero gradient) trains.
    assert set(changed) >= {p for p in trained_base if not p.endswith("key_bias")} and changed
  elif method == "full":
    assert len(changed) >= 0.9 * len(pre), sorted(set(pre) - set(changed))
  else:
    assert not trained_base
  initial = flat(rule.init_adapters(jax.random.fold_in(jax.random.PRNGKey(config.train.seed), 1), pretrained))
  adapters = flat(state.params["adapters"])
  assert set(adapters) == set(initial) and (method in ("full", "freeze")) == (not adapters)
  for path, value in adapters.items():
    assert not np.array_equal(value, initial[path]), path
  assert not np.array_equal(np.asarray(state.params["head"]["kernel"]),
                            np.asarray(tasks.init_head(jax.random.fold_in(jax.random.PRNGKey(config.train.seed), 2),
                                                       model.cfg.d_model, 2)["kernel"]))


def _method(model, method, **peft_overrides):
  config = common.get_config()
  config.peft.update(method=method, **LORA)
  config.peft.update(**peft_overrides)
  return peft.Method(config.peft, model.cfg)


def test_lora_at_step_0_is_the_base_model(base_model):
  model, params, batch = base_model
  method = _method(model, "lora", lora_targets=(r"attention/(query|key|value|out)$", r"mlp/w"))
  adapters = method.init_adapters(jax.random.PRNGKey(3), params)
  assert len(adapters) == 6 * model.cfg.num_layers
  assert all(np.abs(ab["a"]).min() > 0 and not np.any(ab["b"]) for ab in adapters.values())
  for path, value in flat(method.merge(params, adapters)).items():
    assert np.array_equal(value, flat(params)[path]), path
  variables, extra = method.effective(params, adapters)
  assert extra == {} and variables["params"] is params  # the kernels stay as they are; A and B in variables["lora"]
  unmerged = jax.jit(lambda v: model.apply(v, batch, method="forward"))(variables)
  # x W + (x A) 0: equal up to XLA's fusion of the extra (zero) term.
  np.testing.assert_allclose(np.asarray(unmerged), logits(model, params, batch), atol=1e-6, rtol=0)


def _module_path(context) -> tuple:
  return tuple(context.module.scope.path)


def test_merged_lora_equals_unmerged(base_model):
  model, params, batch = base_model
  method = _method(model, "lora", lora_targets=(r"attention/(query|out)$", r"mlp/wi$"))
  adapters = method.init_adapters(jax.random.PRNGKey(3), params)
  for i, ab in enumerate(adapters.values()):  # a trained-looking, non-zero B
    ab["b"] = 0.5 * jax.random.normal(jax.random.PRNGKey(10 + i), ab["b"].shape)
  s = LORA["lora_alpha"] / LORA["lora_rank"]
  merged = flat(method.merge(params, adapters))
  base = flat(params)
  # Kernels, with hand-written contractions: [D, H, K], [H, K, D] (two input dims) and [D, F].
  spec = {"attention/query": "dr,rhk->dhk", "attention/out": "hkr,rd->hkd", "mlp/wi": "dr,rf->df"}
  x_BxLxD = jax.random.normal(jax.random.PRNGKey(5), (2, 3, model.cfg.d_model))
  x_BxLxHxK = jax.random.normal(jax.random.PRNGKey(6), (2, 3, model.cfg.num_heads, model.cfg.head_dim))
  for name, ab in adapters.items():
    path = name.replace(".", "/")
    kind = path.split("/", 1)[1]
    by_hand = base[path] + s * np.einsum(spec[kind], ab["a"], ab["b"])
    np.testing.assert_allclose(merged[path], by_hand, atol=1e-6, rtol=0, err_msg=path)
    assert np.abs(merged[path] - base[path]).max() > 1e-3, path
    # ... and on activations: x (W + s A B) == x W + s (x A) B.
    if kind == "attention/out":
      y_merged = jnp.einsum("blhk,hkd->bld", x_BxLxHxK, merged[path])
      y_unmerged = jnp.einsum("blhk,hkd->bld", x_BxLxHxK, base[path]) + s * jnp.einsum(
          "blr,rd->bld", jnp.einsum("blhk,hkr->blr", x_BxLxHxK, ab["a"]), ab["b"])
    else:
      w_spec = "bld,dhk->blhk" if kind == "attention/query" else "bld,df->blf"
      y_merged = jnp.einsum(w_spec, x_BxLxD, merged[path])
      out_spec = "blr,rhk->blhk" if kind == "attention/query" else "blr,rf->blf"
      y_unmerged = jnp.einsum(w_spec, x_BxLxD, base[path]) + s * jnp.einsum(
          out_spec, jnp.einsum("bld,dr->blr", x_BxLxD, ab["a"]), ab["b"])
    np.testing.assert_allclose(y_merged, y_unmerged, atol=1e-5, rtol=0, err_msg=path)

  # The whole model, unmerged: the base kernels, with s (x A) B added to each adapted projection's output.
  def lora_branch(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if context.method_name not in ("project", "dense"):
      return y
    name, x = args[0], args[1]
    ab = adapters.get(".".join(_module_path(context) + (name,)))
    if ab is None:
      return y
    if name == "out":
      return y + s * jnp.einsum("blr,rd->bld", jnp.einsum("blhk,hkr->blr", x, ab["a"]), ab["b"])
    out_spec = "blr,rhk->blhk" if name == "query" else "blr,rf->blf"
    return y + s * jnp.einsum(out_spec, jnp.einsum("bld,dr->blr", x, ab["a"]), ab["b"])

  with nn.intercept_methods(lora_branch):
    unmerged_logits = logits(model, params, batch)
  merged_logits = logits(model, traverse_util.unflatten_dict(
      {tuple(k.split("/")): v for k, v in merged.items()}), batch)
  np.testing.assert_allclose(merged_logits, unmerged_logits, atol=1e-5, rtol=0)
  assert np.abs(merged_logits - logits(model, params, batch)).max() > 1e-2  # the adapters do something


def test_ia3_folded_kernels_equal_explicit_scaling(base_model):
  model, params, batch = base_model
  method = _method(model, "ia3")
  ones = method.init_adapters(jax.random.PRNGKey(0), params)
  np.testing.assert_array_equal(logits(model, method.merge(params, ones), batch), logits(model, params, batch))
  scales = jax.tree.map(lambda x: x * (1 + 0.5 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape)), ones)
  assert flat(params)["layer_0/attention/key_bias"].any()  # the biases are scaled too: make them matter

  def rescale(next_fun, args, kwargs, context):
    """Keys and values: the projection outputs times [G, K] scales; the MLP hidden [F] before `wo`."""
    if context.method_name == "project" and args[0] in ("key", "value"):
      return next_fun(*args, **kwargs) * scales[_module_path(context)[0]][args[0]][None, None]
    if context.method_name == "dense" and args[0] == "wo":
      h_BxLxF = args[1] * scales[_module_path(context)[0]]["mlp"][None, None]
      return next_fun(args[0], h_BxLxF, *args[2:], **kwargs)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(rescale):
    explicit = logits(model, params, batch)
  folded = logits(model, method.merge(params, scales), batch)
  np.testing.assert_allclose(folded, explicit, atol=1e-5, rtol=0)
  assert np.abs(folded - logits(model, params, batch)).max() > 1e-2


@pytest.mark.parametrize("method", ["lora", "freeze"])
def test_optimizer_state_covers_trainable_leaves_only(trained, base_model, method):
  _, _, _, state, frozen = trained(method)
  _, pretrained, _ = base_model
  adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)]
  assert len(adam) == 1
  params = flat(state.params)
  frozen_paths = {"base/" + p for p in flat(frozen["base"])}
  for moments in (adam[0].mu, adam[0].nu):
    moments = flat(moments)
    assert set(moments) == set(params) and not set(moments) & frozen_paths
    assert all(moments[p].shape == params[p].shape for p in params)
  opt_size = sum(np.size(x) for x in jax.tree.leaves(state.opt_state))
  base_size = sum(np.size(x) for x in jax.tree.leaves(pretrained))
  assert opt_size < 0.1 * base_size, (opt_size, base_size)


@pytest.mark.parametrize("method", ["lora", "prompt"])  # packed rows; one example per row (prompt tuning)
def test_instruct_loss_is_on_response_tokens_only(setup, method):
  config = ft_config(setup, method, task="instruct", seq_len=64)
  config.data.val_path = setup["instruct"]  # the same records again: no split to mirror here
  tokenizer = load_tokenizer(setup["base"])
  with open(setup["instruct"]) as f:
    records = [json.loads(line) for line in f]
  _, rows, labels = tasks.build_rows(config, tokenizer)
  assert labels is None and set(np.unique(rows["weights_BxL"])) == {0.0, 1.0}
  assert (len(rows["inputs_BxL"]) == len(records)) == (method == "prompt")
  found = []
  for r in range(len(rows["inputs_BxL"])):
    segments = rows["segment_ids_BxL"][r]
    assert not rows["weights_BxL"][r][segments == 0].any()  # padding
    for segment in np.unique(segments[segments > 0]):
      cols = np.flatnonzero(segments == segment)
      weighted = cols[rows["weights_BxL"][r, cols] == 1]
      assert np.array_equal(weighted, cols[len(cols) - len(weighted):])  # the response is the segment's tail
      targets = rows["targets_BxL"][r]
      assert targets[weighted[-1]] == tokenizer.eos_id and tokenizer.eos_id not in targets[weighted[:-1]]
      assert rows["inputs_BxL"][r, cols[0]] == tokenizer.bos_id
      found.append({"prompt": tokenizer.decode(targets[cols[:len(cols) - len(weighted)]]),
                    "response": tokenizer.decode(targets[weighted[:-1]])})
  assert found == records


def test_adapter_checkpoint_plus_base_reloads_to_the_same_logits(setup, trained, base_model):
  config, workdir, _, state, frozen = trained("lora")
  model, pretrained, batch = base_model
  method = peft.Method(config.peft, model.cfg)
  in_memory, _ = method.effective(peft.combine(state.params["base"], frozen["base"]), state.params["adapters"])
  _, reloaded_model, merged, _, step = load_parts(workdir)
  assert step == config.train.steps and reloaded_model.cfg == model.cfg
  expected = np.asarray(jax.jit(lambda v: model.apply(v, batch, method="forward"))(jax.device_get(in_memory)))
  np.testing.assert_allclose(logits(model, merged, batch), expected, atol=1e-6, rtol=0)
  assert np.abs(expected - logits(model, pretrained, batch)).max() > 1e-3

  def size(directory):
    return sum(os.path.getsize(os.path.join(d, name)) for d, _, names in os.walk(directory) for name in names)
  base_step = os.path.join(setup["base"], "checkpoints", "20")
  lora_step = os.path.join(workdir, "checkpoints", str(step))
  assert size(lora_step) < size(base_step) / 3, (size(lora_step), size(base_step))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_separable_task_is_learned(trained, method):
  _, workdir, last, _, _ = trained(method)
  accuracy = logged(workdir, "eval/accuracy")
  assert list(accuracy) == [STEPS] and last["eval/accuracy"] == accuracy[STEPS]
  assert accuracy[STEPS] >= MIN_ACCURACY[method] and last["eval/macro_f1"] >= MIN_ACCURACY[method], last


def test_finetune_resume_is_exact(setup):
  def config(steps):
    config = ft_config(setup, "lora", steps=steps, checkpoint_every=3)
    config.peft.lora_dropout = 0.1  # the step's rng must resume too
    return config
  whole, resumed = str(setup["root"] / "resume_whole"), str(setup["root"] / "resume_part")
  finetune_lib.finetune(config(6), whole)
  finetune_lib.finetune(config(3), resumed)
  assert os.listdir(os.path.join(resumed, "checkpoints")) == ["3"]
  finetune_lib.finetune(config(6), resumed)
  assert sorted(logged(resumed)) == list(range(1, 7))
  assert logged(resumed) == logged(whole)  # bit-exact: adapters, head, optimizer, rng and data position


def test_sharded_finetune_matches_one_device(setup, trained):
  config, workdir, _, _, _ = trained("lora")
  sharded = ft_config(setup, "lora", steps=6, learning_rate=config.train.learning_rate,
                      decay_steps=config.train.decay_steps)  # the same schedule
  sharded.mesh.update(data=2, fsdp=2, tensor=2)
  _, state, frozen = run(sharded, str(setup["root"] / "sharded"))
  one_device = logged(workdir)
  np.testing.assert_allclose(list(logged(str(setup["root"] / "sharded")).values()),
                             [one_device[step] for step in range(1, 7)], atol=1e-5, rtol=0)

  # Restored for generation on the same mesh, every leaf comes back as it was trained, in the same sharding.
  loaded = runs.load_run(str(setup["root"] / "sharded"), mesh=mesh_lib.make_mesh(sharded.mesh))
  assert jax.tree.structure((loaded.state, loaded.run.frozen)) == jax.tree.structure((state, frozen))
  for (path, trained_leaf), (_, loaded_leaf) in zip(*(jax.tree_util.tree_flatten_with_path(t)[0]
                                                       for t in ((state, frozen), (loaded.state, loaded.run.frozen)))):
    assert loaded_leaf.sharding.is_equivalent_to(trained_leaf.sharding, trained_leaf.ndim), path
    np.testing.assert_array_equal(np.asarray(loaded_leaf), np.asarray(trained_leaf), err_msg=str(path))
  # Adapters and the head are sharded by their logical axes where the dims divide (d_model 32 over fsdp=2,
  # 4 query / 2 key-value heads over tensor=2), not replicated.
  adapters = state.params["adapters"]
  assert set(adapters) == {f"layer_{i}.attention.{k}" for i in range(2) for k in ("query", "value")}
  for ab in adapters.values():
    assert tuple(ab["a"].sharding.spec) == ("fsdp", None), ab["a"].sharding
    assert tuple(ab["b"].sharding.spec) == (None, "tensor", None), ab["b"].sharding
  assert tuple(state.params["head"]["kernel"].sharding.spec) == ("fsdp", None)


def test_config_errors(setup, tmp_path):
  config = ft_config(setup)
  config.init_from = ""
  with pytest.raises(ConfigError, match="config.init_from"):
    finetune_lib.finetune(config, str(tmp_path / "a"))
  for task in ("instruct", "classify"):  # a classification head trains anyway: still a typo, not a probe
    config = ft_config(setup, "freeze", task=task)
    config.peft.trainable = (r"_biass$",)
    with pytest.raises(ConfigError, match="config.peft.trainable"):
      finetune_lib.finetune(config, str(tmp_path / task))
  config = ft_config(setup, "adapter")
  with pytest.raises(ConfigError, match="config.peft.method"):
    finetune_lib.finetune(config, str(tmp_path / "c"))


def test_finetuning_computes_as_its_own_config_says(setup, tmp_path):
  """The base's model section is copied, but for how it is computed (dtype, remat, ...): a float32 base fine-tunes
  in bfloat16 compute with float32 parameters."""
  config = ft_config(setup, "lora", steps=2)
  config.model.update(dtype="bfloat16", remat=True, num_layers=99, param_dtype="bfloat16")
  workdir = str(tmp_path / "bf16")
  last = finetune_lib.finetune(config, workdir)
  with open(os.path.join(setup["base"], "config.json")) as f:
    base = json.load(f)["model"]
  with open(os.path.join(workdir, "config.json")) as f:
    model = json.load(f)["model"]
  assert (model["dtype"], model["remat"]) == ("bfloat16", True)
  assert {k: v for k, v in model.items() if k not in ("dtype", "remat")} == \
      {k: v for k, v in base.items() if k not in ("dtype", "remat")}
  assert np.isfinite(last["train/loss"])


def test_evaluate_cli_reports_classification_metrics(setup, trained):
  """train.evaluate on a classification run: accuracy and macro-F1 over every dev record, equal to the
  fine-tuning loop's own eval (which also covers each dev row once)."""
  _, workdir, last, _, _ = trained("lora")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  result = subprocess.run([sys.executable, "-m", "train.evaluate", f"--workdir={workdir}", f"--data={setup['dev']}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  with open(os.path.join(workdir, "eval_dev_classify.json")) as f:
    record = json.load(f)
  assert record["examples"] == 60
  assert record["accuracy"] == pytest.approx(last["eval/accuracy"], abs=1e-6)
  assert record["macro_f1"] == pytest.approx(last["eval/macro_f1"], abs=1e-6)


def test_the_base_keeps_a_pinned_step_and_a_changed_base_is_refused(setup, tmp_path):
  base = str(tmp_path / "base")
  shutil.copytree(setup["base"], base)
  shutil.rmtree(os.path.join(base, "pins"), ignore_errors=True)
  config = ft_config(setup, "lora", steps=2)
  config.init_from = base
  workdir = str(tmp_path / "ft")
  finetune_lib.finetune(config, workdir)
  assert config.init_step == 20
  with open(os.path.join(workdir, "run_info.json")) as f:
    assert len(json.load(f)["base_fingerprint"]) == 64

  # The base run goes on keeping one checkpoint: its rotation spares the pinned step 20.
  train_and_evaluate(_base_config(setup["root"], steps=30, keep_checkpoints=1, checkpoint_every=5), base)
  assert sorted(os.listdir(os.path.join(base, "checkpoints"))) == ["20", "30"]
  runs.load_run(workdir)

  # Another model of the same shape in the base's place: refused, not merged.
  other = str(tmp_path / "other")
  train_and_evaluate(_base_config(setup["root"], steps=20, seed=SEED + 1), other)
  shutil.rmtree(os.path.join(base, "checkpoints", "20"))
  shutil.copytree(os.path.join(other, "checkpoints", "20"), os.path.join(base, "checkpoints", "20"))
  with pytest.raises(RunError, match="its parameters are not those this run was built on"):
    runs.load_run(workdir)
  resumed = ft_config(setup, "lora", steps=4)
  resumed.init_from = base
  with pytest.raises(RunError, match="its parameters are not those this run was built on"):
    finetune_lib.finetune(resumed, workdir)


def _base_config(root, **train_overrides):
  """The config of setup's base run (rope positions), for going on with it or making another like it."""
  config = tiny_config(root, **{"checkpoint_every": 20, "eval_every": 20, "decay_steps": 20, **train_overrides})
  config.model.position = "rope"
  return config
