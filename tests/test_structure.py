"""The floor plan of code/: no import cycle, modules and functions of a readable size, short front pages.

The graph is read statically from the source (``ast``), with every ``import`` and ``from ... import``
of a module of code/, those inside functions (lazy imports) included, so a cycle cannot hide behind a
deferred import. Each module must be understandable and testable apart from the modules that use it.
"""
import ast
import os

from conftest import CODE


def local_modules():
    """Name -> path of every module of code/ (``archs.lenet`` for code/archs/lenet.py)."""
    modules = {}
    for folder, _, files in os.walk(CODE):
        for name in files:
            if name.endswith(".py"):
                relative = os.path.relpath(os.path.join(folder, name), CODE)[:-3].replace(os.sep, ".")
                modules[relative[:-len(".__init__")] if relative.endswith(".__init__") else relative] = \
                    os.path.join(folder, name)
    return modules


def imported(path, package, modules):
    """The modules of ``modules`` that the file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: from the package of the file
                parts = package.split(".") if package else []
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" if base else alias.name for alias in node.names]
        else:
            continue
        for name in names:
            # "archs.lenet.LeNet" imports archs.lenet (and the package archs)
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph():
    modules = local_modules()
    return {name: imported(path, name.rpartition(".")[0], modules) - {name} for name, path in modules.items()}


def cycles(graph):
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_lazy_and_long_cycles(tmp_path):
    # the checker itself, on a made-up tree: a lazy import closing a loop of three, and a clean pair
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("from c import thing\n")
    (tmp_path / "c.py").write_text("def f():\n    import a\n")
    (tmp_path / "d.py").write_text("from a import x\n")
    modules = {name: str(tmp_path / f"{name}.py") for name in "abcd"}
    graph = {name: imported(path, "", modules) - {name} for name, path in modules.items()}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_module_of_code_is_in_an_import_cycle():
    graph = import_graph()
    assert {"core", "sequential", "analyze", "comparison"} <= set(graph)
    assert cycles(graph) == []


def design_tables():
    """The modules that docs/DESIGN.md lists as entry scripts and as library (the backticked names)."""
    import re
    text = open(os.path.join(os.path.dirname(CODE), "docs", "DESIGN.md")).read()
    section = text[text.index("## Modules"):text.index("\n## ", text.index("## Modules") + 1)]
    entry, library = section.split("Library:")
    names = lambda part: {name[:-3] for row in part.splitlines() if row.startswith("| `")  # noqa: E731
                          for name in re.findall(r"`([\w/]+\.py)`", row.split(" | ")[0])}
    return names(entry), names(library)


def test_design_lists_entry_scripts_and_library_as_they_are():
    # an entry script is a top-level file of code/ with a __main__ block; every other module is library
    modules = {name: path for name, path in local_modules().items() if os.path.dirname(path) == CODE}
    scripts = {name for name, path in modules.items() if '__name__ == "__main__"' in open(path).read()}
    entry, library = design_tables()
    assert entry == scripts
    assert library == set(modules) - scripts


# --------------------------------------------------------------------------- sizes a reader can take in

MODULE_LINES = 500     # a module read in one sitting
FUNCTION_LINES = 60    # a function seen whole on one screen
README_LINES = 170
BENCHMARKS_LINES = 300


def too_long(paths, module_lines=MODULE_LINES, function_lines=FUNCTION_LINES):
    """'path: N lines' for each module over the limit, 'path:line name: N lines' for each function."""
    found = []
    for path in paths:
        source = open(path).read()
        lines = source.count("\n")
        if lines > module_lines:
            found.append(f"{path}: {lines} lines")
        for node in ast.walk(ast.parse(source, path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1   # decorators excluded, docstring included
                if length > function_lines:
                    found.append(f"{path}:{node.lineno} {node.name}: {length} lines")
    return found


def test_size_checker_finds_long_modules_and_functions(tmp_path):
    (tmp_path / "long.py").write_text("def f():\n" + "    x = 1\n" * 4 + "\n" * 3)
    (tmp_path / "short.py").write_text("def g():\n    return 1\n")
    found = too_long([str(tmp_path / "long.py"), str(tmp_path / "short.py")], module_lines=6, function_lines=4)
    assert found == [f"{tmp_path / 'long.py'}: 8 lines", f"{tmp_path / 'long.py'}:1 f: 5 lines"]


def test_no_module_of_code_over_500_lines_nor_function_over_60():
    assert too_long(sorted(local_modules().values())) == []


def test_readme_and_benchmarks_stay_short():
    root = os.path.dirname(CODE)
    for name, limit in (("README.md", README_LINES), (os.path.join("docs", "BENCHMARKS.md"), BENCHMARKS_LINES)):
        with open(os.path.join(root, name)) as handle:
            lines = handle.read().count("\n")
        assert lines <= limit, f"{name}: {lines} lines, at most {limit}"
