"""The import graph of prefalign/ and data_builders/ flows one way: no circles, no layer reaching up.

Every import is read from the source (ast), including imports inside functions (lazy imports are dependencies all
the same). The one exception is the front door, prefalign/__init__.py, whose lazy ``_EXPORTS`` map names
everything and imports nothing at load time. Layers, lowest first (a module may import its own layer or lower):
"""

import ast
from pathlib import Path

from conftest import REPO

LAYERS = [
    ("ground floor", ["prefalign.losses", "prefalign.mining", "prefalign.messages", "prefalign.templates",
                      "prefalign.files"]),
    ("plumbing", ["prefalign.logprobs", "prefalign.data", "prefalign.models", "prefalign.reward_models",
                  "prefalign.generation", "prefalign.phrases"]),
    ("judges", ["prefalign.judges"]),
    ("trainers", ["prefalign.trainers", "prefalign.diagnostics", "prefalign.evaluation"]),
    ("edge", ["prefalign.recipe_args", "prefalign.cli"]),
    ("builders", ["data_builders"]),
]
FRONT_DOOR = "prefalign"
NEVER_IMPORTED = ("tests", "recipes", "conftest", "benchmarks")
__doc__ += "\n".join(f"{number}. {name}: {', '.join(prefixes)}" for number, (name, prefixes) in enumerate(LAYERS))


def layer_of(module: str) -> int | None:
    """Index of the layer holding ``module`` (longest matching prefix), None when no layer names it."""
    matches = [(len(prefix), number) for number, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    return max(matches)[1] if matches else None


def module_name(path: Path) -> str:
    """``prefalign/judges/judge.py`` → ``prefalign.judges.judge``; a package's ``__init__.py`` → the package."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Every module ``source`` imports (at any depth of the code): ``from a import b`` is ``a.b`` when that is a
    module of ``known``, else ``a``; relative imports are resolved against ``module``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found


def ours(module: str) -> bool:
    """Whether ``module`` belongs to this repository (package, builders, tests, recipes)."""
    return module.split(".")[0] in ("prefalign", "data_builders", *NEVER_IMPORTED)


def import_graph() -> dict[str, set[str]]:
    """Module → the repository modules it imports, for every module of prefalign/ and data_builders/."""
    paths = [p for root in ("prefalign", "data_builders") for p in sorted((REPO / root).rglob("*.py"))]
    known = {module_name(p) for p in paths}
    graph = {}
    for path in paths:
        module = module_name(path)
        if module == FRONT_DOOR:
            continue  # the front door: its lazy _EXPORTS map names every public class on purpose
        imports = imported_modules(path.read_text(), module, path.name == "__init__.py", known)
        graph[module] = {m for m in imports if ours(m) and m != module}
    return graph


def layer_problems(graph: dict[str, set[str]]) -> list[str]:
    """Each import that reaches up a layer, into the front door, tests or recipes, or from an unplaced module."""
    problems = []
    for module, imports in sorted(graph.items()):
        own = layer_of(module)
        if own is None:
            problems.append(f"{module}: in no layer; add it to LAYERS in tests/test_import_graph.py")
            continue
        for target in sorted(imports):
            if target.split(".")[0] in NEVER_IMPORTED:
                problems.append(f"{module} imports {target}: the package never imports tests, recipes or benchmarks")
            elif target == FRONT_DOOR and module.startswith("prefalign."):
                problems.append(f"{module} imports the front door 'prefalign': import the module that holds the name")
            elif target != FRONT_DOOR and (layer_of(target) or 0) > own:
                problems.append(f"{module} ({LAYERS[own][0]}) imports {target} ({LAYERS[layer_of(target)][0]}): "
                                "an upward import")
    return problems


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, each as the path of modules around it (first module repeated at the end)."""
    found, state = [], {}  # state: 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_no_import_circle():
    assert circles(import_graph()) == []


def test_no_upward_import():
    assert layer_problems(import_graph()) == []


def test_the_checks_catch_a_circle_an_upward_import_and_a_lazy_one():
    """The checkers on a made-up graph, and the reader on a lazy import inside a function."""
    source = "import os\n\ndef f():\n    from prefalign.trainers.rrpo import RRPOTrainer\n    from . import files\n"
    known = {"prefalign.files", "prefalign.trainers.rrpo"}
    assert imported_modules(source, "prefalign.data", False, known) == {"os", "prefalign.trainers.rrpo",
                                                                         "prefalign.files"}
    graph = {"prefalign.data": {"prefalign.trainers.rrpo", "prefalign.files"},
             "prefalign.trainers.rrpo": {"prefalign.data", "tests.tiny_models"},
             "prefalign.files": set(), "prefalign.extra": set()}
    assert circles(graph) == [["prefalign.data", "prefalign.trainers.rrpo", "prefalign.data"]]
    assert layer_problems(graph) == [
        "prefalign.data (plumbing) imports prefalign.trainers.rrpo (trainers): an upward import",
        "prefalign.extra: in no layer; add it to LAYERS in tests/test_import_graph.py",
        "prefalign.trainers.rrpo imports tests.tiny_models: the package never imports tests, recipes or benchmarks",
    ]
