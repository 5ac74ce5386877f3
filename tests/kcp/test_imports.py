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
