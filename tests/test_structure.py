"""The package's shape, read from its source (nothing is imported): no import cycles between cfmjax
modules, no upward imports between the layers of the README's code map (which lists every module),
no imports inside functions (they hide layering problems) except of a few heavy or optional
dependencies, and no function with more than 8 parameters (self excluded: group them in a small
NamedTuple, as likelihood.BoundSettings or inference.Sampling do)."""

import ast
import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "cfmjax"
README = PACKAGE.parent / "README.md"
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


def _import_graph():
  """{module: the cfmjax modules it imports at module level}."""
  modules = {name: (path, tree) for name, path, tree in _modules()}
  graph = {}
  for name, (path, tree) in modules.items():
    deps = set()
    for node in tree.body:  # module level (imports inside functions are refused below)
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        deps |= {n for n in _imported(node, name, path.name == "__init__.py") if n in modules and n != name}
    graph[name] = deps
  assert len(graph) > 40 and "cfmjax.train" in graph["cfmjax.cli"]  # the walk sees the package
  return graph


def _code_map_layers():
  """(layer names in README order, {module: layer index}) from the README's code map table."""
  text = README.read_text()
  section = text[text.index("## Code map"):]
  section = section[:section.index("\n## ", 1)]
  names, layer_of = [], {}
  for line in section.splitlines():
    heading = re.match(r"\| \*\*(.+?)\*\* \|", line)
    if heading:
      names.append(heading.group(1))
    for path in re.findall(r"`(cfmjax/[\w/]+\.py)`", line):
      assert names, f"{path} is listed before the code map's first layer heading"
      layer_of[path[:-3].replace("/", ".")] = len(names) - 1
  return names, layer_of


def test_every_module_is_in_the_code_map_and_no_import_points_down_the_layers():
  """A module imports from its own layer or the layers listed before it, never from a later one."""
  names, layer_of = _code_map_layers()
  graph = _import_graph()
  unlisted = sorted(m for m in graph if m not in layer_of and not m.endswith("__main__") and m.count(".") < 2
                    and m not in ("cfmjax", "cfmjax.data"))
  unlisted += sorted(m for m in graph if m.startswith("cfmjax.data.") and m not in layer_of)
  assert not unlisted, f"modules missing from the README's code map: {unlisted}"
  stale = sorted(m for m in layer_of if m not in graph)
  assert not stale, f"the README's code map lists modules that do not exist: {stale}"
  upward = [f"{m} ({names[layer_of[m]]}) imports {d} ({names[layer_of[d]]})"
            for m in sorted(graph) if m in layer_of for d in sorted(graph[m])
            if d in layer_of and layer_of[d] > layer_of[m]]
  assert len(names) >= 8 and not upward, "imports against the code map's layers: " + "; ".join(upward)


def test_no_import_cycles_between_modules():
  graph = _import_graph()

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
