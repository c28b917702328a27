"""The layout rules of README's "Layout" section, checked on every module's syntax tree (as torchtune's tests keep
its recipes unimportable):

1. a stage (pipeline/stages/*.py) imports only the library: never another stage, never the CLI;
2. the library (pipeline/ outside stages/, cli.py and orchestrate.py) never imports a stage or the CLI;
3. no `_private` name is imported from another module;
4. every module opens with a docstring saying what it is for, and keeps under MAX_LINES lines (LONGER: exceptions).

Imports inside functions count as much as those at the top: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = {"pipeline.cli", "pipeline.orchestrate"}  # the command table and `llmpipe run`: they may import stages
MAX_LINES = 400
LONGER = {
    "pipeline/stages/pretrain.py": "the whole pretraining loop (data, model, optimizer, train, evaluate, checkpoint, "
    "save) in one readable file, as nanochat's base_train.py; its shared helpers live in the library (~430 lines)",
}


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, module: str, package: bool = False) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) for every import in the tree; relative imports resolved against `module` (an
    __init__.py when `package`), and `from pipeline.stages import sft` counted as importing pipeline.stages.sft."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                parent = parts[: len(parts) - node.level + (1 if package else 0)]
                base = ".".join([*parent, *([base] if base else [])])
            names = [alias.name for alias in node.names]
            found.append((node.lineno, base, names))
            found += [(node.lineno, f"{base}.{name}", []) for name in names if base in ("pipeline", "pipeline.stages")]
    return found


def kind(module: str) -> str:
    if module.startswith("pipeline.stages.") or module == "pipeline.stages":
        return "stage" if module != "pipeline.stages" else "library"
    return "cli" if module in CLI else "library"


def layout_problems(root: Path) -> list[str]:
    """Every broken rule under root/pipeline, as 'path:line: problem'."""
    problems = []
    for path in sorted((root / "pipeline").rglob("*.py")):
        rel, module = path.relative_to(root).as_posix(), module_name(root, path)
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        if ast.get_docstring(tree) is None:
            problems.append(f"{rel}:1: no module docstring saying what the module is for")
        lines = source.count("\n")
        if lines > MAX_LINES and rel not in LONGER:
            problems.append(f"{rel}: {lines} lines, over {MAX_LINES}: split it by responsibility")
        for line, target, names in imported(tree, module, path.name == "__init__.py"):
            if not target.startswith("pipeline"):
                continue
            where, what = kind(module), kind(target)
            if where == "stage" and what == "stage" and target != module:
                problems.append(f"{rel}:{line}: stage imports another stage ({target}); move the helper down")
            if where != "cli" and what == "cli":
                problems.append(f"{rel}:{line}: {where} imports the CLI ({target})")
            if where == "library" and what == "stage":
                problems.append(f"{rel}:{line}: library imports a stage ({target})")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                problems.append(f"{rel}:{line}: imports private name(s) {private} from {target}")
    return problems


def test_the_project_keeps_the_layout_rules():
    assert layout_problems(REPO) == []


def test_every_exception_to_the_size_rule_is_still_needed():
    for rel, why in LONGER.items():
        assert why and (REPO / rel).read_text().count("\n") > MAX_LINES, f"{rel} is short again: drop it from LONGER"


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_stage_importing_another_stage_fails_the_check(tmp_path):
    """The real tree, copied, with one deliberate bad import added to a real stage: exactly that is reported."""
    shutil.copytree(REPO / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    assert layout_problems(tmp_path) == []
    sft = tmp_path / "pipeline/stages/sft.py"
    sft.write_text(sft.read_text() + "\n\ndef _borrowed():\n    from pipeline.stages.pretrain import learning_rate\n")
    problems = layout_problems(tmp_path)
    assert len(problems) == 1 and problems[0].startswith("pipeline/stages/sft.py:")
    assert "stage imports another stage (pipeline.stages.pretrain)" in problems[0]


def test_each_rule_is_caught(tmp_path):
    doc = '"""What this module is for."""\n'
    _write(tmp_path, "pipeline/__init__.py", doc)
    _write(tmp_path, "pipeline/cli.py", doc + "from pipeline.stages import a\n")  # the CLI may import stages
    _write(tmp_path, "pipeline/stages/__init__.py", doc)
    _write(tmp_path, "pipeline/stages/a.py", doc + "from pipeline import helpers\nfrom .b import run\n")
    _write(tmp_path, "pipeline/stages/b.py", doc + "def run():\n    from pipeline.stages import a\n")
    _write(tmp_path, "pipeline/stages/c.py", doc + "import pipeline.orchestrate\n")
    _write(tmp_path, "pipeline/helpers.py", doc + "from pipeline.cli import main\nfrom pipeline.stages.a import x\n")
    _write(tmp_path, "pipeline/other.py", doc + "from pipeline.helpers import _hidden, __version__\n")
    _write(tmp_path, "pipeline/nodoc.py", "import os\n")
    _write(tmp_path, "pipeline/big.py", doc + "x = 1\n" * MAX_LINES)
    problems = "\n".join(layout_problems(tmp_path))
    expected = [
        "pipeline/stages/a.py:3: stage imports another stage (pipeline.stages.b)",
        "pipeline/stages/b.py:3: stage imports another stage (pipeline.stages.a)",
        "pipeline/stages/c.py:2: stage imports the CLI (pipeline.orchestrate)",
        "pipeline/helpers.py:2: library imports the CLI (pipeline.cli)",
        "pipeline/helpers.py:3: library imports a stage (pipeline.stages.a)",
        "pipeline/other.py:2: imports private name(s) ['_hidden'] from pipeline.helpers",
        "pipeline/nodoc.py:1: no module docstring",
        f"pipeline/big.py: {MAX_LINES + 1} lines, over {MAX_LINES}",
    ]
    for line in expected:
        assert line in problems, f"not reported: {line}\n{problems}"
    assert "pipeline/cli.py" not in problems and "pipeline/stages/a.py:2" not in problems
    assert len(problems.splitlines()) == len(expected), problems


def test_readme_layout_names_every_module():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout") :].split("\n## ")[0]
    missing = [
        path.relative_to(REPO).as_posix()
        for path in (REPO / "pipeline").rglob("*.py")
        if path.name != "__init__.py" and path.stem not in layout
    ]
    packages = [p.name for p in (REPO / "pipeline").iterdir() if (p / "__init__.py").is_file()]
    missing += [f"pipeline/{name}/" for name in packages if f"{name}/" not in layout]
    assert not missing, f"README's Layout section does not name {missing}"
