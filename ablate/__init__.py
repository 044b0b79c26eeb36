"""Ablations: plan.py (config, runs, status files), runner.py (the runs as subprocesses), report.py (table, figures).

  python -m ablate --config=configs/ablations/heads.py --workdir=runs/ablate_heads   (more in __main__.py)
"""
