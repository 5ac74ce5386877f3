"""The import graph: no cycles anywhere (the layering rule itself is .importlinter's, run by `make test`)."""

import grimp

PACKAGES = ("kcp", "pipeline", "trainer", "tuning", "deploy")


def strongly_connected(graph) -> list[set]:
    """Tarjan's algorithm over the module graph; returns the components with more than one module."""
    index, lowlink, on_stack, stack, found = {}, {}, set(), [], []

    def visit(module):
        index[module] = lowlink[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                lowlink[module] = min(lowlink[module], lowlink[imported])
            elif imported in on_stack:
                lowlink[module] = min(lowlink[module], index[imported])
        if lowlink[module] == index[module]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(component)

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_the_module_graph_has_no_cycle():
    graph = grimp.build_graph(*PACKAGES)
    assert len(graph.modules) > 40  # the whole project was read
    assert strongly_connected(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for module in ("a", "b", "c"):
        graph.add_module(module)
    graph.add_import(importer="a", imported="b")
    graph.add_import(importer="b", imported="c")
    graph.add_import(importer="c", imported="a")
    assert strongly_connected(graph) == [{"a", "b", "c"}]


def test_the_wheel_that_workers_install_holds_every_module(tmp_path):
    """Dataflow (`--setup_file ./setup.py`) and Vertex AI workers install the package that setup.py
    builds, not this source tree: a folder that find_packages skips (one without __init__.py) would
    import here and fail there. Every module under the packages is in the wheel, and the wheel
    installed alone (outside this tree) runs a command."""
    import os
    import subprocess
    import sys
    import zipfile

    import shutil

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    source = tmp_path / "source"  # a copy: setuptools builds in the tree it is given (build/, *.egg-info)
    shutil.copytree(root, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "test-artifacts",
                                                                "runs", "__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            str(source), "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next(path for path in os.listdir(tmp_path) if path.endswith(".whl"))
    inside = {name for name in zipfile.ZipFile(tmp_path / wheel).namelist() if name.endswith(".py")}
    here = {os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
            for package in PACKAGES for folder, _, names in os.walk(os.path.join(root, package))
            if "__pycache__" not in folder for name in names if name.endswith(".py")}
    assert here and here <= inside, sorted(here - inside)
    target = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    str(tmp_path / wheel)], check=True, timeout=300)
    described = subprocess.run(
        [sys.executable, "-c", "import kcp, sys; from kcp.cli import main; print(kcp.__file__); "
         "sys.exit(main(['describe-model', '--model', 'resnet', '--set', 'model.depth=8', '--input-shape', '8,8,1', "
         "'--num-classes', '10']))"],
        env={**os.environ, "PYTHONPATH": str(target)}, cwd=str(tmp_path), capture_output=True, text=True,
        timeout=300)
    assert described.returncode == 0, described.stderr[-2000:]
    assert described.stdout.startswith(str(target / "kcp" / "__init__.py"))  # the wheel's, not this tree's
