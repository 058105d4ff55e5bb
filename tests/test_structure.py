"""The package's shape, read from its source (nothing is imported): one subpackage per layer of the
README's code map (which lists every module, in its folder), no import cycles between cfmjax modules,
no upward imports between the layers,
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


def _packages():
  return {".".join(p.relative_to(PACKAGE.parent).parts[:-1]) for p in PACKAGE.rglob("__init__.py")}


def _imported(node, module: str, is_package: bool, modules=frozenset()) -> list[str]:
  """Absolute names an import statement brings in: for `from a import b`, the module a.b if there is
  one (importing a submodule does not make a module depend on its package's __init__), else a."""
  if isinstance(node, ast.Import):
    return [alias.name for alias in node.names]
  base = node.module or ""
  if node.level:
    parts = module.split(".")
    parts = parts if is_package else parts[:-1]
    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
  return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]


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
        deps |= {n for n in _imported(node, name, path.name == "__init__.py", modules) if n in modules and n != name}
    graph[name] = deps
  assert len(graph) > 40 and "cfmjax.training.train" in graph["cfmjax.cli"]  # the walk sees the package
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
      layer_of[path[:-3].replace("/", ".").removesuffix(".__init__")] = len(names) - 1
  return names, layer_of


def test_every_module_is_in_the_code_map_and_no_import_points_down_the_layers():
  """A module imports from its own layer or the layers listed before it, never from a later one."""
  names, layer_of = _code_map_layers()
  graph = _import_graph()
  packages = _packages()
  unlisted = sorted(m for m in graph if m not in layer_of and not m.endswith("__main__") and m not in packages)
  assert not unlisted, f"modules missing from the README's code map: {unlisted}"
  stale = sorted(m for m in layer_of if m not in graph)
  assert not stale, f"the README's code map lists modules that do not exist: {stale}"
  upward = [f"{m} ({names[layer_of[m]]}) imports {d} ({names[layer_of[d]]})"
            for m in sorted(graph) if m in layer_of for d in sorted(graph[m])
            if d in layer_of and layer_of[d] > layer_of[m]]
  assert len(names) >= 8 and not upward, "imports against the code map's layers: " + "; ".join(upward)


def test_each_subpackage_is_one_layer_and_each_layer_one_folder():
  """The folders are the layers: a package's modules share one code-map layer, and a layer's modules
  share one folder (the command line's is the package root)."""
  names, layer_of = _code_map_layers()
  packages = _packages()
  folder_of = {m: m if m in packages else m.rsplit(".", 1)[0] for m in layer_of}
  layers_per_folder, folders_per_layer = {}, {}
  for m, layer in layer_of.items():
    layers_per_folder.setdefault(folder_of[m], set()).add(names[layer])
    folders_per_layer.setdefault(names[layer], set()).add(folder_of[m])
  mixed = {f: sorted(l) for f, l in layers_per_folder.items() if len(l) > 1}
  split = {l: sorted(f) for l, f in folders_per_layer.items() if len(f) > 1}
  assert not mixed and not split, f"folders holding several layers: {mixed}; layers over several folders: {split}"
  assert len(folders_per_layer) == len(names) >= 9 and "cfmjax.models" in layers_per_folder


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
