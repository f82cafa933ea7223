"""The code's shape: no import cycles, no family names outside families/, short modules."""

import ast
import os
import re

from pdmd_jax import families

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "pdmd_jax")


def _modules() -> dict[str, str]:
  out = {}
  for d, _, files in os.walk(PKG):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(d, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[name.removesuffix(".__init__")] = path
  return out


def _imports(path: str, modules) -> set[str]:
  """pdmd_jax modules imported anywhere in the file (module level or inside functions)."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    out.update(n for n in names if n in modules)
  return out


def test_no_import_cycles():
  modules = _modules()
  graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
  # A package's __init__ is imported by its submodules' imports; that edge is not a cycle.
  for m in graph:
    graph[m] = {d for d in graph[m] if not m.startswith(d + ".")}
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for d in graph[m]:
      if state.get(d) == "open":
        raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
      if d not in state:
        visit(d)
    stack.pop()
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m)


def test_no_family_names_outside_the_families():
  """The engine, trainer, planner and evaluation drivers never branch on a family."""
  names = families.names()
  pattern = re.compile(r"""["'](%s|wan|mlp|image|video|latent)["']""" % "|".join(names))
  for rel in ("trainer.py", "aot.py", "assembly.py", "validation.py", "train_step.py",
              "checkpointing.py", "sampling.py", "health.py"):
    text = open(os.path.join(PKG, rel)).read()
    assert not pattern.findall(text), (rel, pattern.findall(text))


def test_modules_stay_short():
  long = {m: n for m, p in _modules().items() if (n := sum(1 for _ in open(p))) > 450}
  assert not long, long
