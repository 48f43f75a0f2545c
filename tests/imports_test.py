"""Import rules: no circles in mar/, imports run down WORKSPACE.md's floors, no library module
imports the CLIs in mar/tools, `config.method` is read in one module, and no test imports
another test (shared helpers live in tests/testutil.py).

Reads every module's imports with `ast` (function-level imports included: a lazy import
still ties two modules together), so the check needs no import side effects.
"""

import ast
import os
import re

from absl.testing import absltest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAR = os.path.join(ROOT, "mar")


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


def floors() -> list[list[str]]:
  """WORKSPACE.md's floors, top first: each a list of module prefixes ("mar.rollout")."""
  text = open(os.path.join(ROOT, "WORKSPACE.md"), encoding="utf-8").read()
  block = text.split("## Floors", 1)[1].split("```")[1]
  out = []
  for line in block.splitlines():
    paths = []
    for token in line.split():
      if not token.startswith("mar/"):
        break
      paths.append(token.rstrip("/").removesuffix(".py").replace("/", "."))
    if paths:
      out.append(paths)
  return out


def floor_of(module: str, levels: list[list[str]]) -> int | None:
  """The floor whose longest prefix names `module` (None: on no floor)."""
  best, index = -1, None
  for i, prefixes in enumerate(levels):
    for p in prefixes:
      if (module == p or module.startswith(p + ".")) and len(p) > best:
        best, index = len(p), i
  return index


class ImportGraphTest(absltest.TestCase):

  def test_no_import_circles(self):
    graph = import_graph()
    # Package __init__ files re-export their modules: an edge into a package's own modules is
    # not a circle between modules, so it is left out.
    for m, deps in graph.items():
      graph[m] = {d for d in deps if not d.startswith(m + ".")}
    self.assertEqual(cycles(graph), [])

  def test_imports_run_down_the_floors(self):
    levels = floors()
    self.assertGreater(len(levels), 10)
    graph = import_graph()
    unplaced = sorted(m for m in graph if m != "mar" and floor_of(m, levels) is None)
    self.assertEqual(unplaced, [], "modules on no floor of WORKSPACE.md")
    climbs = {}
    for m, deps in graph.items():
      here = floor_of(m, levels)
      up = sorted(d for d in deps
                  if here is not None and floor_of(d, levels) is not None
                  and floor_of(d, levels) < here)
      if up:
        climbs[m] = up
    self.assertEqual(climbs, {})

  def test_floors_catch_a_climb(self):
    levels = [["mar.train"], ["mar.rollout"], ["mar.models"]]
    self.assertEqual(floor_of("mar.rollout.runner", levels), 1)
    self.assertLess(floor_of("mar.train", levels), floor_of("mar.models.model", levels))
    self.assertIsNone(floor_of("mar.rolloutx", levels))

  def test_config_method_is_read_in_one_module(self):
    pattern = re.compile(r"\.method\s*(==|!=|\bin\b)|METHODS\[")
    readers = sorted(m for m, path in library_modules().items()
                     if pattern.search(open(path, encoding="utf-8").read()))
    self.assertEqual(readers, ["mar.methods"])

  def test_one_rollout_engine(self):
    """No engine switch: the defaults have no rollout.engine and the runner takes none."""
    from mar import defaults  # pylint: disable=g-import-not-at-top
    from mar.rollout import runner  # pylint: disable=g-import-not-at-top
    import inspect  # pylint: disable=g-import-not-at-top
    self.assertNotIn("engine", defaults.base_config().rollout)
    self.assertNotIn("engine", inspect.signature(runner.RolloutRunner).parameters)
    self.assertFalse(os.path.exists(os.path.join(MAR, "rollout", "multi_attempt.py")))

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
