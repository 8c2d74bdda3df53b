"""The package's layout rules, read from the source (an AST walk, nothing imported):
imports go one way (data -> models -> training / inference / evaluation -> entry points),
there are no import cycles, and no module is over 400 lines."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).parents[1] / "avllm_jax"
MAX_LINES = 400

# Lower layers never import higher ones; modules of one layer may import each other only
# within their own package. `avllm_jax/__init__.py` (the public `load_model`, imported lazily)
# is the package's front door and stands outside the layers.
LAYERS = {
    "errors": -1,  # the user-error base class and exit statuses: below everything that raises them
    "modality": 0,
    "runtime": 0,
    "cli": 1,  # the command-line convention: errors and runtime below it, every command above
    "data": 1,
    "models": 2,
    "checkpoint": 3,
    "curation": 3,
    "training": 4,
    "inference": 4,
    "evaluation": 4,
    "convert": 4,
    "export": 4,
    "train": 5,
    "chat": 5,
    "evaluate": 5,
    "plan": 5,
    "web_app": 5,  # the Gradio page and the OpenAI app: web and serve import them once the flags are checked
    "serve_app": 5,
    "web": 6,
    "serve": 6,
    "cache_features": 6,  # an entry point on top of train's: it resolves the model as a run does
}


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name != "avllm_jax":
            found[name] = path
    return found


def imported_modules(path: pathlib.Path, known: set[str]) -> set[str]:
    """Every avllm_jax module `path` imports, at module level or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from avllm_jax.models import llama` imports the module avllm_jax.models.llama.
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
            names.add(node.module)
    resolved = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            resolved.add(name)
    return resolved


def layer_of(module: str) -> tuple[str, int]:
    top = module.split(".")[1]
    if top not in LAYERS:
        raise AssertionError(f"{module}: add its top-level name {top!r} to LAYERS in {__file__}")
    return top, LAYERS[top]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported_modules(path, set(found)) - {name} for name, path in found.items()}


def test_imports_go_one_way(graph):
    wrong = []
    for module, imports in graph.items():
        top, layer = layer_of(module)
        for target in imports:
            target_top, target_layer = layer_of(target)
            if target_layer > layer or (target_layer == layer and target_top != top):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_models_import_only_models_modality_and_errors(graph):
    for module, imports in graph.items():
        if module.startswith("avllm_jax.models"):
            outside = {
                t for t in imports if not t.startswith(("avllm_jax.models", "avllm_jax.modality", "avllm_jax.errors"))
            }
            assert not outside, f"{module} imports {sorted(outside)}"


def test_inference_evaluation_chat_evaluate_do_not_import_training(graph):
    for module, imports in graph.items():
        if module.split(".")[1] in ("inference", "evaluation", "chat", "evaluate"):
            assert not {t for t in imports if t.startswith("avllm_jax.training")}, module


def test_no_import_cycles(graph):
    state: dict[str, str] = {}

    def visit(module, stack):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycle = stack[stack.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_module_over_400_lines():
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_rules_catch_a_violation(tmp_path):
    """The walk sees function-local imports and `from package import module` forms."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from avllm_jax.training import step\n")
    known = {"avllm_jax.training", "avllm_jax.training.step"}
    assert imported_modules(source, known) == known
