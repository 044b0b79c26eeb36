"""bench/gpu.sh --dry: the GPU machine's one check, run on CPU with a tiny model, as a real subprocess."""

import json
import math
import os
import subprocess
import sys
import tarfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_wheel(folder, name: str, source: str) -> None:
  """A pure-Python wheel of one module, as pip would install it from the GPU machine's .whl/."""
  dist = f"{name}-0.1.dist-info"
  files = {f"{name}.py": source, f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
           f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
  folder.mkdir()
  with zipfile.ZipFile(folder / f"{name}-0.1-py3-none-any.whl", "w") as whl:
    for path, text in files.items():
      whl.writestr(path, text)
    whl.writestr(f"{dist}/RECORD", "".join(f"{path},,\n" for path in [*files, f"{dist}/RECORD"]))


def run_script(tmp_path, **env):
  clean = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "PYTHONPATH")}
  return subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh"), "--dry"], capture_output=True, text=True,
                        env={**clean, "OUT": str(tmp_path / "out"), **env}, timeout=600)


def test_dry_run_reports_every_part_and_goes_on_after_a_failure(tmp_path):
  make_wheel(tmp_path / "wheels", "ablax_wheel_probe", "ANSWER = 42\n")
  smoke = tmp_path / "test_injected.py"
  smoke.write_text("def test_wheel_installed_for_later_parts():\n"
                   "  import ablax_wheel_probe\n  assert ablax_wheel_probe.ANSWER == 42\n\n"
                   "def test_injected_failure():\n  assert 1 + 1 == 3\n")
  done = run_script(tmp_path, WHEELS=str(tmp_path / "wheels"), SMOKE_EXTRA=str(smoke))
  out = tmp_path / "out"
  assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # the injected failure, and only it
  # What comes back from the device machine: at most 8 files.
  assert sorted(os.listdir(out)) == ["gpu.log", "gpu_summary.json", "hlo_train_step.tar.gz"]
  summary = json.loads((out / "gpu_summary.json").read_text())
  status = {f"{p['part']}/{p['item']}": p["status"] for p in summary["parts"]}
  assert status == {"setup/wheels": "passed", "setup/versions": "passed", "smoke/model": "passed",
                    "smoke/extra": "failed", "throughput/einsum": "passed", "hlo/train_step": "passed",
                    "throughput/cudnn": "skipped", "throughput/remat_dots": "passed",
                    "throughput/remat_full": "passed", "attention/probe": "passed"}, summary["parts"]
  assert summary["failed"] == ["smoke/extra"]
  cudnn = next(p for p in summary["parts"] if p["item"] == "cudnn")
  assert "no GPU" in cudnn["detail"]
  outcomes = {c["test"].split("::")[-1]: c["outcome"] for c in summary["smoke_tests"]}
  assert outcomes == {"test_decoder_matches_numpy_reference": "passed",
                      "test_wheel_installed_for_later_parts": "passed", "test_injected_failure": "failure"}

  assert summary["env"]["backend"] == "cpu" and summary["env"]["jax"]
  assert all(r["ok"] for r in summary["env"]["requirements"])
  variants = summary["throughput"]
  assert list(variants) == ["einsum", "remat_dots", "remat_full"]
  assert [v["config"]["remat"] for v in variants.values()] == [False, True, True]
  for v in variants.values():
    assert math.isfinite(v["final_loss"]) and v["tokens_per_s"] > 0 and v["mfu_datasheet_bf16"] is None
    assert v["peak_bf16_matmul_gflops_per_s"] == 2.0  # the first variant's peaks handed to the others
  probe = {r["impl"]: r for r in summary["attention_probe"]["results"]}
  assert probe["cudnn"]["skipped"].startswith("no GPU")
  assert probe["xla"]["grad_max_rel_error"] < 0.05 and probe["xla"]["fwd_bwd_ms"] > 0

  with tarfile.open(out / "hlo_train_step.tar.gz") as tar:
    names = tar.getnames()
    hlo = next(n for n in names if n.endswith("_after_optimizations.txt"))
    assert "input_output_alias" in tar.extractfile(hlo).readline().decode()  # the step donates its state
  log = (out / "gpu.log").read_text()
  assert "assert (1 + 1) == 3" in log and "== summary" in log and "1 failed" in log


def test_parts_that_could_overrun_the_time_budget_are_skipped(tmp_path):
  done = run_script(tmp_path, WHEELS=str(tmp_path / "none"), TOTAL_S="30")
  summary = json.loads((tmp_path / "out" / "gpu_summary.json").read_text())
  assert done.returncode == 0, done.stdout[-3000:]
  reasons = {f"{p['part']}/{p['item']}": p["detail"] for p in summary["parts"] if p["status"] == "skipped"}
  assert len(reasons) == len(summary["parts"]) == 9
  assert reasons.pop("setup/wheels").startswith("no ") and reasons.pop("hlo/train_step").startswith("no XLA dump")
  assert reasons.pop("throughput/cudnn").startswith("no GPU")
  assert all(detail.startswith("time budget") for detail in reasons.values()), reasons


def test_the_train_step_and_its_custom_calls_are_found_in_an_xla_dump(tmp_path):
  """The step is the module that donates its inputs (input_output_alias), not the larger init beside it."""
  sys.path.insert(0, os.path.join(ROOT, "bench"))
  import gpu_report
  head = "HloModule jit_{}, is_scheduled=true{}\n"
  call = '  %c{0} = bf16[8]{{0}} custom-call(%p), custom_call_target="{1}"\n'
  (tmp_path / "module_0006.jit_init.sm_9.0_gpu_after_optimizations.txt").write_text(
      head.format("init", "") + call.format(0, "__cublas$gemm") * 50)
  (tmp_path / "module_0008.jit_traced.sm_9.0_gpu_after_optimizations.txt").write_text(
      head.format("traced", ", input_output_alias={ {0}: (0, {}, may-alias) }")
      + call.format(1, "__cudnn$fmhaSoftmax") + call.format(2, "__cublas$gemm") * 2)
  (tmp_path / "module_0008.jit_traced.sm_9.0_gpu_before_optimizations.txt").write_text(call.format(3, "unused"))
  assert gpu_report.train_step_module(str(tmp_path)) == "module_0008.jit_traced"
  assert gpu_report.custom_calls(str(tmp_path)) == {"__cublas$gemm": 2, "__cudnn$fmhaSoftmax": 1}
  assert gpu_report.pack_hlo(str(tmp_path), str(tmp_path / "step.tar.gz")) == 0
  with tarfile.open(tmp_path / "step.tar.gz") as tar:
    assert tar.getnames() == ["module_0008.jit_traced.sm_9.0_gpu_after_optimizations.txt"]
