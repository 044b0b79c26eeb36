from setuptools import setup

setup(
    name="ablax",
    version="0.1.0",
    description="Pretrain, fine-tune and ablate transformer language models in JAX/Flax.",
    packages=["model", "model.hf", "data", "train", "ablate", "configs", "configs.finetune", "configs.ablations"],
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.0",
        "flax>=0.12.0",
        "optax>=0.2.8",  # optax.contrib.scale_by_muon with MuonDimensionNumbers; 0.2.7 fails to import on jax 0.10
        "orbax-checkpoint>=0.11.0",
        "sentencepiece>=0.2.0",
        "tokenizers>=0.20",  # Hugging Face tokenizer.json files of imported models
        "protobuf>=3.20",  # a sentencepiece model's settings, to write it as a tokenizer.json (train.hf export)
        "ml-collections>=1.0.0",
        "absl-py>=2.0",
        "numpy>=1.26",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
        "tensorboard>=2.16",  # the `tensorboard --logdir runs/` command that reads what tensorboardX writes
        "safetensors>=0.4",
        "ml-dtypes>=0.4",  # bfloat16 safetensors (also a jax dependency)
        "rouge-score>=0.1.2",  # Google's ROUGE (T5 / seqio's), train/scores.py
        "pyyaml>=6.0",  # evaluation task files in YAML (train/eval_tasks.py)
    ],
    # torch and transformers only build reference models in tests/test_hf.py (tested with transformers 5.24);
    # lm-eval (EleutherAI's harness) is needed only by train/harness.py, its adapter; accelerate by lm-eval's own
    # Hugging Face model, which tests/test_framing.py compares the adapter with.
    # tpu: libtpu, the TPU compiler, which `python -m train.compile` runs on any host (a CPU one included); pinned to
    # the jax this project is tested with, as jax[tpu] must match jax (another jax: pip install "jax[tpu]==<its version>").
    extras_require={"test": ["pytest>=8.0", "hypothesis>=6.100", "torch==2.13.0",
                             "transformers>=5.0", "lm-eval>=0.4.13", "accelerate>=0.26"],
                    "tpu": ["jax[tpu]==0.10.2"]},
)
