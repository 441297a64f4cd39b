"""The package's shape (docs/architecture.md), checked from the source alone (AST, no import).

Module-level imports among wa_tf modules form no cycle and only go down the layers;
few imports sit inside functions; every ``wa_tf`` module named by an import exists in
this tree; no source file is over 450 lines.
"""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "wa_tf")
MAX_LINES = 450
MAX_FUNCTION_IMPORTS = 10

# Each top-level module or package of wa_tf and its layer, lowest first; a module
# imports only from its own layer or below.
LAYERS = {
    "transforms": 0, "choices": 0, "machine": 0, "plotting": 0,
    "kernels": 1,
    "layers": 2,
    "quantization": 3,
    "models": 4,
    "data": 5,
    "training": 6,
    "search": 7, "deploy": 7, "evaluation": 7, "sweep": 7,
}


def _modules():
    """{module name: path} of every Python file of wa_tf."""
    modules = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, REPO)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules[".".join(parts)] = path
    return modules


def _imports(tree, module, is_package, modules):
    """(wa_tf modules imported at module level, function-local import nodes) of one module.

    ``from a import b`` imports the module ``a.b`` when there is one, else ``a``.
    """
    top, local = [], []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (local if in_function else top).append(child)
            visit(child, inside)

    visit(tree, False)
    names = set()
    for node in top:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:  # relative: from the module's package
            package = module.split(".") if is_package else module.split(".")[:-1]
            package = package[:len(package) - node.level + 1]
            base = ".".join(package + ([node.module] if node.module else []))
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            names.add(sub if sub in modules else base)
    return {n for n in names if n in modules} - {module}, local


def _graph():
    modules = _modules()
    graph, local = {}, {}
    for module, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        graph[module], local[module] = _imports(tree, module, path.endswith("__init__.py"),
                                                modules)
    return modules, graph, local


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, stack)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def test_module_level_imports_form_no_cycle():
    _, graph, _ = _graph()
    assert _cycle(graph) is None


def test_imports_go_down_the_layers():
    _, graph, _ = _graph()
    upward = []
    for module, targets in graph.items():
        parts = module.split(".")
        if len(parts) < 2:  # wa_tf itself
            continue
        for target in targets:
            tparts = target.split(".")
            if len(tparts) >= 2 and LAYERS[tparts[1]] > LAYERS[parts[1]]:
                upward.append(f"{module} -> {target}")
    assert not upward


def test_few_function_local_imports_each_with_a_reason():
    modules, _, local = _graph()
    found = []
    for module, nodes in local.items():
        with open(modules[module]) as f:
            lines = f.read().splitlines()
        for node in nodes:
            # The reason: a comment on the line above, or the enclosing function's docstring.
            context = "\n".join(lines[max(0, node.lineno - 4):node.lineno])
            found.append((module, node.lineno, "#" in context or '"""' in context))
    assert len(found) <= MAX_FUNCTION_IMPORTS, found
    assert all(reason for _, _, reason in found), found


def _source_files():
    for top in ("wa_tf", "bin", "bench", "tests"):
        for folder, _, files in os.walk(os.path.join(REPO, top)):
            for name in sorted(files):
                if name.endswith(".py"):
                    yield os.path.join(folder, name)


@pytest.mark.parametrize("path", list(_source_files()), ids=lambda p: os.path.relpath(p, REPO))
def test_source_files_are_short_and_name_existing_modules(path):
    modules = _modules()
    with open(path) as f:
        text = f.read()
    lines = len(text.splitlines())
    assert lines <= MAX_LINES, f"{os.path.relpath(path, REPO)} has {lines} lines"
    for node in ast.walk(ast.parse(text, path)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "wa_tf":
                assert name in modules, f"{os.path.relpath(path, REPO)} imports {name}"
