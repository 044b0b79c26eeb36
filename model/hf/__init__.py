"""Hugging Face interop: tensor-name and layout maps between HF checkpoints (safetensors) and ablax parameters.

model/hf/common.py holds the shared machinery and the interface every architecture module implements; the
command line that reads and writes runs is train/hf.py (`python -m train.hf import|export`).
"""
