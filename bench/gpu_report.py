"""The Python half of bench/gpu.sh: what the machine brings, the HLO files of the train step, and the summary.

  python bench/gpu_report.py env JSON                  # versions, device, setup.py's requirements met or not
  python bench/gpu_report.py hlo DUMP_DIR TARBALL      # the train step's modules of an XLA dump, as one tar.gz
  python bench/gpu_report.py summary WORK_DIR JSON     # every part's outcome and figures: one table, one JSON

gpu.sh writes each part's outcome to WORK_DIR/results.tsv (part, item, status, seconds, detail) and its figures
beside it (env.json, smoke_*.xml from pytest, throughput_*.json, attention_probe.json); `summary` gathers them,
prints the tables and exits 1 when anything failed.
"""

import ast
import glob
import importlib.metadata
import json
import os
import platform
import re
import sys
import tarfile
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def install_requires() -> list[str]:
  """setup.py's install_requires, read without running it."""
  with open(os.path.join(ROOT, "setup.py")) as f:
    tree = ast.parse(f.read())
  for node in ast.walk(tree):
    if isinstance(node, ast.keyword) and node.arg == "install_requires":
      return ast.literal_eval(node.value)
  raise SystemExit("error: setup.py: no install_requires found")


def requirement_status(text: str) -> dict:
  """One requirement against the installed distribution: its version and whether it satisfies the specifier."""
  from packaging.requirements import Requirement
  req = Requirement(text)
  try:
    version = importlib.metadata.version(req.name)
  except importlib.metadata.PackageNotFoundError:
    return {"requirement": text, "installed": None, "ok": False}
  return {"requirement": text, "installed": version, "ok": req.specifier.contains(version, prereleases=True)}


def env(json_out: str) -> int:
  """Prints and writes the versions, the device and the requirements check; 1 when one is unmet."""
  requirements = [requirement_status(r) for r in install_requires()]
  jax_plugins = {d.metadata["Name"]: d.version for d in importlib.metadata.distributions()
                 if d.metadata["Name"] and d.metadata["Name"].lower().replace("_", "-").startswith("jax-cuda")}
  info = {"python": platform.python_version(), "requirements": requirements, "jax_plugins": jax_plugins}
  try:
    import jax
    import jaxlib

    from train import hardware
    device = jax.devices()[0]
    info.update(jax=jax.__version__, jaxlib=jaxlib.__version__, backend=jax.default_backend(),
                device_count=jax.device_count(), device_kind=device.device_kind,
                datasheet_bf16_tflops_per_s=(hardware.datasheet_bf16_peak(device.device_kind) or 0) / 1e12 or None)
  except Exception as e:  # noqa: BLE001  (a jax that cannot start is the finding this part reports)
    info["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
  plugins = ", ".join(f"{name} {version}" for name, version in sorted(jax_plugins.items())) or "no CUDA plugin"
  print(f"python {info['python']}; jax {info.get('jax')}, jaxlib {info.get('jaxlib')}, {plugins}")
  if "error" in info:
    print(f"FAILED: jax does not start: {info['error']}")
  else:
    peak = info["datasheet_bf16_tflops_per_s"]
    print(f"{info['device_count']} x {info['device_kind']} ({info['backend']}); datasheet dense bf16 peak: "
          + (f"{peak:g} TFLOP/s" if peak else "none in train/hardware.py (MFU against the measured matmul peak)"))
  jax_req = next(r for r in requirements if r["requirement"].replace(" ", "").startswith("jax>"))
  print(f"jax {jax_req['installed']} " + ("meets" if jax_req["ok"] else "FAILED: does not meet")
        + f" setup.py's {jax_req['requirement']}")
  for r in requirements:
    mark = "ok" if r["ok"] else "UNMET"
    print(f"  {mark:<6}{r['requirement']:<28} installed: {r['installed'] or 'missing'}")
  with open(json_out, "w") as f:
    json.dump(info, f, indent=2)
  return 0 if "error" not in info and all(r["ok"] for r in requirements) else 1


def train_step_module(dump_dir: str) -> str | None:
  """The module name (module_NNNN.jit_NAME) of the train step in an XLA dump: one named for it, else the largest
  optimized module that aliases outputs to inputs (the step donates its state; init, peaks and casts do not)."""
  optimized = [n for n in os.listdir(dump_dir) if n.endswith("_after_optimizations.txt")]
  named = [n for n in optimized if "train_step" in n]
  if not named:
    for name in optimized:
      with open(os.path.join(dump_dir, name)) as f:
        if "input_output_alias" in f.readline():
          named.append(name)
  if not named:
    return None
  return ".".join(max(named, key=lambda n: os.path.getsize(os.path.join(dump_dir, n))).split(".")[:2])


def custom_calls(dump_dir: str) -> dict[str, int] | None:
  """How often the train step's optimized HLO calls each custom-call target (cuDNN's fused attention, Triton
  kernels, cuBLAS GEMMs), from an XLA dump; None without one."""
  module = train_step_module(dump_dir) if os.path.isdir(dump_dir) else None
  if module is None:
    return None
  counts = {}
  for name in os.listdir(dump_dir):
    if name.startswith(module + ".") and name.endswith("_after_optimizations.txt"):
      with open(os.path.join(dump_dir, name)) as f:
        for target in re.findall(r'custom_call_target="([^"]+)"', f.read()):
          counts[target] = counts.get(target, 0) + 1
  return dict(sorted(counts.items()))


def pack_hlo(dump_dir: str, tarball: str) -> int:
  """The train step's optimized HLO, buffer assignment and memory report from an XLA dump, as one tar.gz."""
  module = train_step_module(dump_dir)
  if module is None:
    print(f"FAILED: no module in {dump_dir} looks like the train step (named so, or donating its inputs)")
    return 1
  wanted = ("after_optimizations.txt", "buffer-assignment.txt", "memory-usage-report.txt")
  names = sorted(n for n in os.listdir(dump_dir) if n.startswith(module + ".") and n.endswith(wanted))
  with tarfile.open(tarball, "w:gz") as tar:
    for name in names:
      tar.add(os.path.join(dump_dir, name), arcname=name)
  print(f"{len(names)} files of the train step -> {tarball} ({os.path.getsize(tarball) / 2**20:.1f} MiB): "
        + ", ".join(names))
  return 0


def smoke_tests(work: str) -> list[dict]:
  """Each test case of the smoke groups' JUnit files: group, test, outcome."""
  cases = []
  for path in sorted(glob.glob(os.path.join(work, "smoke_*.xml"))):
    group = os.path.basename(path)[len("smoke_"):-len(".xml")]
    for case in ET.parse(path).getroot().iter("testcase"):
      outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
      cases.append({"group": group, "test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome})
  return cases


def read_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def throughput_rows(work: str, parts: list[dict]) -> dict:
  """Each variant that ran, in the order it ran, with its MFU against the datasheet peak of its device (None on
  CPU or for a kind train/hardware.py does not know)."""
  from train import hardware
  variants = {}
  for p in parts:
    figures = read_json(os.path.join(work, f"throughput_{p['item']}.json")) if p["part"] == "throughput" else None
    if figures:
      kind, backend = figures["config"]["device_kind"], figures["config"]["backend"]
      peak = hardware.datasheet_bf16_peak(kind) if backend != "cpu" else None
      figures["mfu_datasheet_bf16"] = figures["model_tflops_per_s"] * 1e12 / peak if peak else None
      figures["custom_calls"] = custom_calls(os.path.join(work, f"hlo_{p['item']}"))
      variants[p["item"]] = figures
  return variants


def summary(work: str, json_out: str) -> int:
  """Prints every part's outcome and the figures; writes them all to json_out; 1 when anything failed."""
  parts = []
  with open(os.path.join(work, "results.tsv")) as f:
    for line in f:
      part, item, status, seconds, detail = line.rstrip("\n").split("\t")
      parts.append({"part": part, "item": item, "status": status, "seconds": float(seconds), "detail": detail})
  info = read_json(os.path.join(work, "env.json")) or {}
  smoke = smoke_tests(work)
  variants = throughput_rows(work, parts)
  probe = read_json(os.path.join(work, "attention_probe.json"))
  failed = [f"{p['part']}/{p['item']}" for p in parts if p["status"] == "failed"]

  versions = [f"jax {info.get('jax')}", f"jaxlib {info.get('jaxlib')}"]
  versions += [f"{name} {version}" for name, version in sorted(info.get("jax_plugins", {}).items())]
  print(f"\n== summary: {info.get('device_kind')} ({info.get('backend')}), {', '.join(versions)}")
  print(f"{'part':<12}{'item':<16}{'status':<9}{'s':>6}  detail")
  for p in parts:
    print(f"{p['part']:<12}{p['item']:<16}{p['status']:<9}{p['seconds']:>6.0f}  {p['detail']}")
  counts = {o: sum(c["outcome"] == o for c in smoke) for o in ("passed", "failure", "error", "skipped")}
  print(f"\n== smoke tests: {counts['passed']} passed, {counts['failure'] + counts['error']} failed, "
        f"{counts['skipped']} skipped")
  for c in smoke:
    if c["outcome"] != "passed":
      print(f"  {c['outcome']:<8}{c['test']}")
  if variants:
    first = next(iter(variants.values()))["config"]
    print(f"\n== throughput: {first['num_layers']} layers, d_model {first['d_model']}, batch {first['batch_size']} x "
          f"{first['seq_len']}, {first['dtype']}, on {first['device_kind']}")
    print(f"{'variant':<14}{'ms/step':>9}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU sheet':>10}{'MFU meas':>9}"
          f"{'step GiB':>9}{'compile s':>10}")
    for name, v in variants.items():
      sheet = f"{v['mfu_datasheet_bf16']:.1%}" if v["mfu_datasheet_bf16"] else "n/a"
      print(f"{name:<14}{v['ms_per_step_median']:>9.1f}{v['tokens_per_s']:>11,.0f}{v['model_tflops_per_s']:>9.3g}"
            f"{sheet:>10}{v['mfu_bf16']:>9.1%}{v['step_memory_mib'] / 1024:>9.2f}{v['compile_s']:>10.1f}")
    for name, v in variants.items():
      calls = ", ".join(f"{target} x{n}" for target, n in (v["custom_calls"] or {}).items())
      print(f"  {name} calls: {calls or 'no custom calls'}")
    print("MFU sheet: model FLOP/s over the datasheet dense bf16 peak (train/hardware.py); MFU meas: over the bf16 "
          "matmul peak measured on this device")
  if probe:
    print("\n== attention probe (causal bf16; error: max |x - ref| / max |ref| against float32 XLA)")
    for r in probe["results"]:
      status = r.get("skipped") and f"skipped: {r['skipped']}" or r.get("error") and f"FAILED: {r['error']}"
      head = f"{r['impl']:<6} B={r['batch']} T={r['seq_len']:<5}"
      print(f"{head} {status}" if status else
            f"{head} fwd {r['fwd_ms']:.3f} ms, fwd+bwd {r['fwd_bwd_ms']:.3f} ms; error out "
            f"{r['out_error']['max_rel']:.1e}, grads {r['grad_max_rel_error']:.1e}")
  figures = {"env": info, "parts": parts, "smoke_tests": smoke, "throughput": variants, "attention_probe": probe,
             "failed": failed}
  with open(json_out, "w") as f:
    json.dump(figures, f, indent=2)
  skipped = sum(p["status"] == "skipped" for p in parts)
  print(f"\n== {sum(p['status'] == 'passed' for p in parts)} parts passed, {len(failed)} failed, {skipped} skipped"
        + (": " + "; ".join(failed) if failed else "") + f"; all figures in {json_out}")
  return 1 if failed else 0


def main(argv: list[str]) -> int:
  commands = {"env": (env, 1), "hlo": (pack_hlo, 2), "summary": (summary, 2)}
  if len(argv) < 2 or argv[1] not in commands:
    raise SystemExit(f"error: expected one of {', '.join(commands)} as the first argument")
  fn, nargs = commands[argv[1]]
  args = argv[2:]
  if len(args) != nargs:
    raise SystemExit(f"error: {argv[1]} takes {nargs} argument(s), got {len(args)}")
  return fn(*args)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
