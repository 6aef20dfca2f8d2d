"""The module graph of antidistill_jax, read from the source with `ast` (imports at module level
and inside functions alike): grading is the bottom, data sits below evaluation and traces, and
no module depends on itself through others."""

import ast
import os

import pytest

PACKAGE = "antidistill_jax"
ROOT = os.path.join(os.path.dirname(__file__), "..", PACKAGE)


def module_files(root: str) -> dict[str, str]:
  """Dotted module name -> file, for every .py under the package folder `root`."""
  out = {}
  for folder, dirs, names in os.walk(root):
    dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
    for name in names:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(folder, name), os.path.dirname(root))
        parts = rel[:-len(".py")].split(os.sep)
        if parts[-1] == "__init__":
          parts = parts[:-1]
        out[".".join(parts)] = os.path.join(folder, name)
  return out


def _ancestors(module: str) -> list[str]:
  parts = module.split(".")
  return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(root: str) -> dict[str, set[str]]:
  """module -> the package modules that importing it runs: each imported module, and the
  packages above it (their __init__ runs first) except those above the importer, which are
  running already."""
  modules = module_files(root)
  graph = {}
  for module, path in modules.items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    is_package = os.path.basename(path) == "__init__.py"
    targets = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets.update(alias.name for alias in node.names)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the importer's package, up level - 1 packages
          package = module.split(".") if is_package else module.split(".")[:-1]
          package = package[:len(package) - (node.level - 1)]
          base = ".".join(package + ([base] if base else []))
        targets.add(base)
        targets.update(f"{base}.{alias.name}" for alias in node.names
                       if f"{base}.{alias.name}" in modules)
    deps = set()
    for target in targets:
      if target == PACKAGE or target.startswith(PACKAGE + "."):
        deps.update(m for m in [*_ancestors(target), target] if m in modules)
    graph[module] = deps - set(_ancestors(module)) - {module}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle [a, b, ..., a] of the graph, or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for dep in sorted(graph.get(node, ())):
      if state.get(dep) == "open":
        return stack[stack.index(dep):] + [dep]
      if dep not in state and (cycle := visit(dep)):
        return cycle
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    for dep in graph.get(todo.pop(), ()):
      if dep not in seen:
        seen.add(dep)
        todo.append(dep)
  return seen


@pytest.fixture(scope="module")
def graph():
  return import_graph(ROOT)


def test_grading_is_the_bottom(graph):
  assert f"{PACKAGE}.grading" in graph, "grading.py is missing"
  assert graph[f"{PACKAGE}.grading"] == set()


def test_data_is_below_evaluation_and_traces(graph):
  data = [m for m in graph if m == f"{PACKAGE}.data" or m.startswith(f"{PACKAGE}.data.")]
  assert data
  for module in data:
    above = reachable(graph, module) & {f"{PACKAGE}.evaluation", f"{PACKAGE}.traces"}
    assert not above, f"{module} imports {sorted(above)}"


def test_no_import_cycle(graph):
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_graph_sees_every_kind_of_import(tmp_path):
  """The reader itself: function-level, from-package, relative and dotted imports are edges;
  a sibling's import of its own package is not."""
  pkg = tmp_path / PACKAGE
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("def f():\n  from antidistill_jax import b\n")
  (pkg / "b.py").write_text("from . import c\n")
  (pkg / "c.py").write_text("import antidistill_jax.sub.d\n")
  (pkg / "sub" / "__init__.py").write_text("from antidistill_jax.sub.d import x\n")
  (pkg / "sub" / "d.py").write_text("from antidistill_jax.sub import e\nx = 1\n")
  (pkg / "sub" / "e.py").write_text("from ..a import f\n")
  g = import_graph(str(pkg))
  assert g[f"{PACKAGE}.a"] == {f"{PACKAGE}.b"}
  assert g[f"{PACKAGE}.b"] == {f"{PACKAGE}.c"}
  assert g[f"{PACKAGE}.c"] == {f"{PACKAGE}.sub", f"{PACKAGE}.sub.d"}
  assert g[f"{PACKAGE}.sub"] == {f"{PACKAGE}.sub.d"}
  assert g[f"{PACKAGE}.sub.d"] == {f"{PACKAGE}.sub.e"}
  assert g[f"{PACKAGE}.sub.e"] == {f"{PACKAGE}.a"}
  assert find_cycle(g) == [f"{PACKAGE}.a", f"{PACKAGE}.b", f"{PACKAGE}.c", f"{PACKAGE}.sub",
                           f"{PACKAGE}.sub.d", f"{PACKAGE}.sub.e", f"{PACKAGE}.a"]
  assert reachable(g, f"{PACKAGE}.sub.e") == set(g) - {PACKAGE}
