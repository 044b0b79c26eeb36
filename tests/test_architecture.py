"""The import map of README.md: imports run one way (ablate -> train -> model -> data), no module imports one
above it, no project import hides inside a function, and the modules form no circle."""

import ast
import os

from test_train import REPO

# What each package may import from the project (configs: the experiment files; train/hf.py reads base.py).
ALLOWED = {"data": {"data"}, "model": {"model", "data"}, "train": {"train", "model", "data", "configs"},
           "ablate": {"ablate", "train", "model"}, "configs": {"configs"}}


def _modules() -> dict:
  """module name -> parsed file, for every .py file of the project's packages."""
  modules = {}
  for package in ALLOWED:
    for directory, _, files in os.walk(os.path.join(REPO, package)):
      for name in files:
        if name.endswith(".py"):
          path = os.path.join(directory, name)
          module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__")
          with open(path) as f:
            modules[module] = ast.parse(f.read(), path)
  return modules


def _imports(tree) -> list[tuple[str, bool]]:
  """(imported project module, whether the import sits inside a function) for every import statement."""
  found = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, ast.Import):
        found.extend((alias.name, nested) for alias in child.names)
      elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
        found.extend((f"{child.module}.{alias.name}", nested) for alias in child.names)
      visit(child, nested)

  visit(tree, False)
  return [(name, nested) for name, nested in found if name.split(".")[0] in ALLOWED]


def _resolve(name: str, modules: dict) -> str:
  """The project module an import names ("train.mesh.make_mesh" -> "train.mesh")."""
  while name not in modules:
    name = name.rpartition(".")[0]
  return name


def test_the_map_covers_the_packages():
  modules = _modules()
  assert {"data.batch", "model.families", "train.runs", "train.hf", "ablate.report"} <= set(modules)
  assert not any(name.startswith("model.hf.__main__") for name in modules)


def test_imports_run_one_way_and_at_the_top():
  for module, tree in _modules().items():
    package = module.split(".")[0]
    for name, nested in _imports(tree):
      assert name.split(".")[0] in ALLOWED[package], f"{module} imports {name}: {package}/ may import only " \
                                                    f"{sorted(ALLOWED[package])}"
      assert not nested, f"{module} imports {name} inside a function"


def test_no_import_circles():
  modules = _modules()
  graph = {m: {_resolve(name, modules) for name, _ in _imports(tree)} - {m} for m, tree in modules.items()}
  state = {}  # module -> "open" while on the DFS path, "done" after

  def visit(module, path):
    state[module] = "open"
    for target in sorted(graph[module]):
      assert state.get(target) != "open", "import circle: " + " -> ".join(path + [module, target])
      if target not in state:
        visit(target, path + [module])
    state[module] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [])
