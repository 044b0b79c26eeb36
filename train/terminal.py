"""What a training run says on the terminal: a line at each evaluation, nanoGPT's `step N: train loss X, val loss
Y` with the eval metrics, learning rate, tokens/s and MFU, and a closing summary of the final metrics and the files
the run wrote.

Offers `peak_flops` (what MFU divides by), `eval_line` and `summary`.
"""

import os

import jax
import jax.numpy as jnp

from train import hardware
from train.metrics import read_metrics

# The files a run writes in its workdir, in the order the summary names them.
RUN_FILES = ("config.json", "run_info.json", "tokenizer.model", "tokenizer.json", "metrics.jsonl", "tensorboard",
             "samples.txt")


def peak_flops(dtype: str) -> float:
  """The matmul peak of the devices a run computes on, in FLOP/s: the datasheet bf16 peak of a known accelerator
  times the device count, else a short matmul measured here in the compute dtype, times the devices (host devices
  share their host's cores: the hosts)."""
  device = jax.devices()[0]
  datasheet = hardware.datasheet_bf16_peak(device.device_kind)
  if datasheet:
    return datasheet * jax.device_count()
  cpu = device.platform == "cpu"
  measured = hardware.matmul_peak_flops(jnp.bfloat16 if dtype == "bfloat16" else jnp.float32,
                                        sizes=(1024,) if cpu else (4096,), reps=2)
  return measured * (jax.process_count() if cpu else jax.device_count())


def _value(key: str, value: float) -> str:
  return f"{value:.4f}" if key.endswith("loss") else f"{value:.3f}" if abs(value) < 100 else f"{value:,.0f}"


def eval_line(metrics: dict, steps: int, step_flops: float, step_tokens: int, peak: float | None) -> str:
  """`step N/M: train loss X, eval loss Y, eval ..., lr Z, T tok/s, MFU P%` of a logged evaluation step."""
  evals = [f"{key.replace('/', ' ')} {_value(key, value)}" for key, value in metrics.items()
           if key.startswith("eval/")]
  tokens_per_sec = metrics["train/tokens_per_sec"]
  parts = [f"train loss {metrics['train/loss']:.4f}", *evals, f"lr {metrics['train/learning_rate']:.2e}",
           f"{tokens_per_sec:,.0f} tok/s"]
  if peak:  # the interval's steps a second times each step's model FLOPs (PaLM's MFU)
    parts.append(f"MFU {100 * tokens_per_sec / step_tokens * step_flops / peak:.1f}%")
  return f"step {metrics['step']}/{steps}: " + ", ".join(parts)


def _duration(seconds: float) -> str:
  hours, rest = divmod(int(round(seconds)), 3600)
  return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


def summary(workdir: str, steps: int) -> str:
  """The closing lines of a run: its last step and time, final train and eval metrics (metrics.jsonl) and the files
  in its workdir, latest checkpoint first."""
  path = os.path.join(workdir, "metrics.jsonl")
  records = read_metrics(path) if os.path.exists(path) else []
  last = records[-1] if records else {"step": 0}
  evaluated = next((r for r in reversed(records) if any(k.startswith("eval/") for k in r)), {})
  metrics = [f"train loss {last['train/loss']:.4f}"] if "train/loss" in last else []
  metrics += [f"{key.replace('/', ' ')} {_value(key, value)}" for key, value in evaluated.items()
              if key.startswith("eval/")]
  lines = [f"ablax: done: step {last['step']}/{steps}" + (f" in {_duration(last['time'])}" if "time" in last else "")
           + (f" (eval at step {evaluated['step']})" if evaluated and evaluated["step"] != last["step"] else "")
           + (": " + ", ".join(metrics) if metrics else "")]
  checkpoints = os.path.join(workdir, "checkpoints")
  saved = sorted((int(n) for n in os.listdir(checkpoints) if n.isdigit()) if os.path.isdir(checkpoints) else [])
  written = [f"checkpoints/{saved[-1]}" + (f" (kept: {', '.join(map(str, saved))})" if len(saved) > 1 else "")] \
      if saved else []
  written += [name + ("/" if os.path.isdir(os.path.join(workdir, name)) else "") for name in RUN_FILES
              if os.path.exists(os.path.join(workdir, name))]
  lines.append(f"ablax: in {workdir}/: " + ", ".join(written))
  if os.path.isdir(os.path.join(workdir, "tensorboard")):
    lines.append(f"ablax: curves: tensorboard --logdir {workdir}")
  return "\n".join(lines)
