"""Hugging Face interop: import HF checkpoints (safetensors) into ablax workdirs and export them back.

  python -m model.hf import --hf_dir=PATH --workdir=DIR
  python -m model.hf export --workdir=DIR --out=PATH [--step=N]

model/hf/common.py holds the shared machinery and the interface every architecture module implements.
"""
