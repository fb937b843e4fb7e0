"""The import graph: shared code below the stages, stages beside each other, no stage script imported.

Layers (the README's "Layout"): `common/` (the DP mechanism in `common/dp/`, data loading, models, stage
plumbing) imports nothing above it; `data_selection/`, `pretraining/` and `dp_finetuning/` import `common/` and
their own library modules, never each other; no module imports a stage script (a module outside `common/` run as
`__main__`; a library in `common/` may have a command line too), except a benchmark the stage it measures."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("common", "data_selection", "pretraining", "dp_finetuning")


def project_modules():
    """{module name: path} of every module in the project's packages and in scripts/."""
    modules = {}
    for folder in PACKAGES + ("scripts",):
        for root, _, names in os.walk(os.path.join(ROOT, folder)):
            for name in names:
                if name.endswith(".py"):
                    relative = os.path.relpath(os.path.join(root, name), ROOT)[:-3].replace(os.sep, ".")
                    modules[relative.removesuffix(".__init__")] = os.path.join(root, name)
    return modules


def imports_of(path, modules):
    """The project modules imported anywhere in the file (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def is_script(module, path):
    return not module.startswith("common") and 'if __name__ == "__main__":' in open(path).read()


def graph():
    modules = project_modules()
    return modules, {name: imports_of(path, modules) for name, path in modules.items()}


def test_no_import_runs_back_up_and_no_stage_package_imports_another():
    _, edges = graph()
    wrong = []
    for module, imported in edges.items():
        package = module.split(".")[0]
        for target in imported:
            target_package = target.split(".")[0]
            if package == "common" and target_package != "common":
                wrong.append(f"{module} -> {target} (common imports only common)")
            elif package in PACKAGES[1:] and target_package not in ("common", package):
                wrong.append(f"{module} -> {target} (a stage package imports common and itself only)")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_a_stage_script():
    modules, edges = graph()
    wrong = [f"{module} -> {target}" for module, imported in edges.items() for target in imported
             if is_script(target, modules[target]) and not module.startswith("scripts.benchmark_")]
    assert not wrong, "\n".join(wrong)


def test_the_import_graph_has_no_cycle():
    _, edges = graph()
    state = {}

    def visit(module, path):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", "import cycle: " + " -> ".join(path + [module])
        state[module] = "open"
        for target in sorted(edges[module]):
            # a package's __init__ importing its own submodules is how a package exports them
            if not target.startswith(module + "."):
                visit(target, path + [module])
        state[module] = "done"
    for module in sorted(edges):
        visit(module, [])


def test_the_checks_see_a_violation(tmp_path):
    """The oracle itself: an import of a stage script from common is found."""
    modules = project_modules()
    bad = tmp_path / "bad.py"
    bad.write_text("from dp_finetuning import dp_finetune\nimport common.stage\n")
    assert imports_of(str(bad), modules) == {"dp_finetuning", "dp_finetuning.dp_finetune", "common.stage"}
    assert is_script("dp_finetuning.dp_finetune", modules["dp_finetuning.dp_finetune"])
    assert not is_script("dp_finetuning.tasks", modules["dp_finetuning.tasks"])
