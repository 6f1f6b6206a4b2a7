"""The import rules of the project's layout, read from the source (no module is imported), for what a
module loads when it is imported:

- the scripts (run_*.py) import clmlab and callbacks, never each other;
- clmlab never imports a script or callbacks (callbacks build on clmlab, not the reverse);
- data code (clmlab.data, clmlab.eval_sets, clmlab.tokenizer, clmlab.templates, clmlab.prepared, clmlab.prepare, clmlab.sft.formats,
  clmlab.sft.encoding) never imports model or Trainer code, directly or through another clmlab module.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

DATA_CODE = {"clmlab.data", "clmlab.eval_sets", "clmlab.tokenizer", "clmlab.templates", "clmlab.prepared", "clmlab.prepare", "clmlab.sft.formats",
             "clmlab.sft.encoding"}
# Model, Trainer and training-run code, in clmlab and in the libraries.
MODEL_OR_TRAINER = {"clmlab.modeling", "clmlab.run", "clmlab.checkpoints", "clmlab.generation", "clmlab.evaluation",
                    "clmlab.sft.training", "clmlab.args", "peft", "accelerate", "transformers.trainer", "transformers.training_args",
                    "transformers.modeling_utils", "transformers.models", "torch.nn", "torch.optim"}
MODEL_OR_TRAINER_NAMES = ("Trainer", "TrainingArguments", "TrainerCallback", "AutoModel", "PreTrainedModel", "GPT2LMHeadModel",
                          "GPT2Model", "AutoConfig", "set_seed")


PACKAGES: set[str] = set()  # module names that are packages (their __init__.py), for relative imports


def project_sources(root: Path = REPO) -> dict[str, str]:
    """Module name -> source, for the scripts, clmlab and callbacks."""
    sources = {path.stem: path.read_text() for path in root.glob("run_*.py")}
    for package in ("clmlab", "callbacks"):
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
                PACKAGES.add(".".join(parts))
            sources[".".join(parts)] = path.read_text()
    return sources


def load_time_nodes(tree: ast.AST):
    """The statements that run when a module is imported: not function bodies (a command's main, an
    optional dependency imported where it is used), which run only when called."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        yield node
        yield from load_time_nodes(node)


def imports_of(module: str, source: str, is_package: bool) -> set[str]:
    """Absolute names a module imports when it is loaded: modules, and `module.Name` for each name taken
    from one."""
    found = set()
    for node in load_time_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_violations(sources: dict[str, str]) -> list[str]:
    scripts = {name for name in sources if name.startswith("run_")}
    direct = {name: imports_of(name, source, name in PACKAGES) for name, source in sources.items()}

    def project_modules(names: set[str]) -> set[str]:
        """The project modules a set of imported names loads, with the packages above them."""
        loaded = set()
        for imported in names:
            parts = imported.split(".")
            for i in range(1, len(parts) + 1):
                if ".".join(parts[:i]) in sources:
                    loaded.add(".".join(parts[:i]))
        return loaded

    problems = []
    for name, imported in sorted(direct.items()):
        others = {m for m in project_modules(imported) if m != name}
        if name in scripts:
            problems += [f"{name} imports the script {m}" for m in sorted(others & scripts)]
            continue
        problems += [f"{name} imports the script {m}" for m in sorted(others & scripts)]
        if name.startswith("clmlab"):
            problems += [f"{name} imports {m} (clmlab never imports callbacks)" for m in sorted(others) if m.startswith("callbacks")]
    for name in sorted(DATA_CODE & set(sources)):
        seen, todo = set(), [name]
        while todo:  # every clmlab module this data module loads, directly or through others
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            for imported in sorted(direct[current]):
                forbidden = any(imported == m or imported.startswith(m + ".") for m in MODEL_OR_TRAINER) or \
                    imported.rsplit(".", 1)[-1].startswith(MODEL_OR_TRAINER_NAMES) and imported.startswith("transformers.")
                if forbidden:
                    via = "" if current == name else f" (through {current})"
                    problems.append(f"data code {name} imports model or Trainer code {imported}{via}")
            todo += [m for m in project_modules(direct[current]) if m not in seen and m.startswith("clmlab")]
    return problems


def test_the_project_keeps_its_import_rules():
    assert import_violations(project_sources()) == []


def test_a_forbidden_import_is_caught():
    sources = project_sources()
    for module, line, expected in [
        ("clmlab.data", "from clmlab.modeling import context_length", "data code clmlab.data imports model or Trainer code clmlab.modeling"),
        ("clmlab.sft.encoding", "from transformers import Trainer", "imports model or Trainer code transformers.Trainer"),
        ("clmlab.templates", "import clmlab.evaluation", "imports model or Trainer code clmlab.evaluation"),
        ("clmlab.cli", "import peft", "data code clmlab.data imports model or Trainer code peft (through clmlab.cli)"),
        ("clmlab.run", "from callbacks import LossPlotCallback", "clmlab.run imports callbacks"),
        ("clmlab.evaluation", "import run_eval", "clmlab.evaluation imports the script run_eval"),
        ("run_sft", "from run_clm import describe_data", "run_sft imports the script run_clm"),
    ]:
        changed = {**sources, module: sources[module] + f"\n{line}\n"}
        assert any(expected in problem for problem in import_violations(changed)), (module, line, import_violations(changed))
