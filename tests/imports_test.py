"""Import rules: no circles in mar/, no library module imports the CLIs in mar/tools, and no test
imports another test (shared helpers live in tests/testutil.py).

Reads every module's imports with `ast` (function-level imports included: a lazy import
still ties two modules together), so the check needs no import side effects.
"""

import ast
import os

from absl.testing import absltest

MAR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mar")


def module_name(path: str) -> str:
  rel = os.path.relpath(path, os.path.dirname(MAR))[:-len(".py")].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def library_modules() -> dict[str, str]:
  """{dotted module name: file path} for every module under mar/."""
  out = {}
  for root, _, files in os.walk(MAR):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(root, f)
        out[module_name(path)] = path
  return out


def imported_modules(path: str, known: set[str]) -> set[str]:
  """The mar modules `path` imports (`from mar.x import y` counts mar.x.y when y is a module)."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name in known)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        if sub in known:
          found.add(sub)
        elif node.module in known:
          found.add(node.module)
  return found


def import_graph() -> dict[str, set[str]]:
  mods = library_modules()
  known = set(mods)
  return {m: imported_modules(p, known) - {m} for m, p in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


class ImportGraphTest(absltest.TestCase):

  def test_no_import_circles(self):
    graph = import_graph()
    # Package __init__ files re-export their modules: an edge into a package's own modules is
    # not a circle between modules, so it is left out.
    for m, deps in graph.items():
      graph[m] = {d for d in deps if not d.startswith(m + ".")}
    self.assertEqual(cycles(graph), [])

  def test_library_does_not_import_the_clis(self):
    offenders = {m: sorted(d for d in deps if d.startswith("mar.tools"))
                 for m, deps in import_graph().items() if not m.startswith("mar.tools")}
    self.assertEqual({m: d for m, d in offenders.items() if d}, {})

  def test_the_engine_knows_no_method(self):
    """A hint reaches the rollout engine as data (a feedback-text function), not as an import."""
    engine = ("mar.rollout", "mar.sampling")
    offenders = {m: sorted(d for d in deps if d.startswith("mar.lte"))
                 for m, deps in import_graph().items() if m.startswith(engine)}
    self.assertEqual({m: d for m, d in offenders.items() if d}, {})

  def test_no_test_imports_another_test(self):
    tests = os.path.dirname(os.path.abspath(__file__))
    names = {f[:-3] for f in os.listdir(tests) if f.endswith("_test.py")}
    offenders = {}
    for name in sorted(names):
      imported = imported_modules(os.path.join(tests, name + ".py"), names)
      if imported:
        offenders[name] = sorted(imported)
    self.assertEqual(offenders, {})

  def test_the_checker_sees_a_circle(self):
    self.assertEqual(cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}), [["a", "b", "c"]])


if __name__ == "__main__":
  absltest.main()
