"""The package's shape, read from its source (nothing is imported): no import cycles between cfmjax
modules, no imports inside functions (they hide layering problems) except of a few heavy or optional
dependencies, and no function with more than 8 parameters (self excluded: group them in a small
NamedTuple, as likelihood.BoundSettings or inference.Sampling do)."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "cfmjax"
# Imported where they are used: heavy (TFDS, matplotlib), optional (lm-eval is the `eval` extra),
# or guarded by a fallback (TensorBoard, SentencePiece's protobuf schema).
LAZY_ALLOWED = {"lm_eval", "tensorflow_datasets", "matplotlib", "tensorboardX", "sentencepiece"}


def _modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    yield name.removesuffix(".__init__"), path, ast.parse(path.read_text(), str(path))


def _imported(node, module: str, is_package: bool) -> list[str]:
  """Absolute names an import statement brings in (for `from a import b`: a.b and a)."""
  if isinstance(node, ast.Import):
    return [alias.name for alias in node.names]
  base = node.module or ""
  if node.level:
    parts = module.split(".")
    parts = parts if is_package else parts[:-1]
    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
  return [base] + [f"{base}.{alias.name}" for alias in node.names]


def _function_imports(tree):
  for fn in ast.walk(tree):
    if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
      for node in ast.walk(fn):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
          yield fn.name, node


def test_no_import_cycles_between_modules():
  modules = {name: (path, tree) for name, path, tree in _modules()}
  graph = {}
  for name, (path, tree) in modules.items():
    deps = set()
    for node in tree.body:  # module level (imports inside functions are refused below)
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        deps |= {n for n in _imported(node, name, path.name == "__init__.py") if n in modules and n != name}
    graph[name] = deps
  assert len(graph) > 40 and "cfmjax.train" in graph["cfmjax.cli"]  # the walk sees the package

  state, stack = {}, []

  def visit(node):  # depth-first; a node met again while on the stack closes a cycle
    state[node] = "open"
    stack.append(node)
    for dep in sorted(graph[node]):
      if state.get(dep) == "open":
        raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
      if dep not in state:
        visit(dep)
    stack.pop()
    state[node] = "done"

  for name in sorted(graph):
    if name not in state:
      visit(name)


def test_no_imports_inside_functions_but_the_allowed_lazy_ones():
  found = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} in {fn}()"
           for name, path, tree in _modules() for fn, node in _function_imports(tree)
           if {n.split(".")[0] for n in _imported(node, name, path.name == "__init__.py")} - LAZY_ALLOWED]
  assert not found, ("imports inside functions (move them to the top of the module, or add a heavy optional "
                     "dependency to LAZY_ALLOWED): " + "; ".join(found))


def test_no_function_takes_more_than_8_parameters():
  wide = set()
  for name, _, tree in _modules():
    for fn in ast.walk(tree):
      if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        a = fn.args
        params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs] + [p.arg for p in (a.vararg, a.kwarg) if p]
        if len([p for p in params if p not in ("self", "cls")]) > 8:
          wide.add(f"{name.removeprefix('cfmjax.')}.{fn.name}")
  assert not wide, f"functions with more than 8 parameters: {sorted(wide)}; group them"
