"""The package's shape: imports run one way between its parts, the plain core imports without luigi, and
`luigi --module pipeline` still finds every task."""

import ast
import subprocess
import sys
from pathlib import Path

from tests.support.cli import REPO

# Module names from the files (pkgutil.walk_packages would import pipeline.tasks to look inside it).
_IMPORT_CORE = """
import importlib, pathlib, sys
shell = ("pipeline.tasks", "pipeline.cli", "pipeline.__main__")
files = sorted(pathlib.Path("pipeline").rglob("*.py"))
names = [".".join(f.with_suffix("").parts).removesuffix(".__init__") for f in files]
core = [n for n in names if not n.startswith(shell)]
for name in core:
    importlib.import_module(name)
assert "luigi" not in sys.modules, [m for m in sys.modules if m.startswith("luigi")]
print(len(core))
"""


def _python(code: str) -> str:
    """What a fresh interpreter running code in the repository root prints; it must exit 0."""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


# As `luigi --module pipeline` loads the package: luigi first.
_WITH_LUIGI = "import luigi, importlib; importlib.import_module('pipeline'); from luigi.task_register import Register;"


def test_every_core_module_imports_without_luigi() -> None:
    assert int(_python(_IMPORT_CORE)) >= 30  # the walk found the core's modules, not an empty package


def test_luigi_module_pipeline_registers_every_entry_point() -> None:
    code = (
        _WITH_LUIGI
        + " print(sorted(n for n in ('CommitImage', 'PushImage', 'SnapshotAll') if Register.get_task_cls(n)))"
    )
    assert _python(code) == "['CommitImage', 'PushImage', 'SnapshotAll']"


def test_only_tasks_one_can_run_add_flags_to_luigis_command_line() -> None:
    """luigi builds its parser, one flag per parameter of every registered class, nine times per run: the abstract
    bases (HostTask, StorageTask, _LayerTask, _CommitTask, _DerivedFile) stay out of the registry, and every task
    and config class that can be named on the command line stays in it."""
    code = (
        _WITH_LUIGI
        + " print(*sorted(n for n, c in Register._get_reg().items() if c.__module__.startswith('pipeline')))"
    )
    registered = _python(code).split()
    concrete = "CommitImage PackContainerLayer PackImageLayer PackSquashedLayer PushImage ReuseSnapshots SnapshotAll"
    concrete += " SnapshotContainer WriteIidFile WriteImageArchive WriteImageConfig WriteManifest WriteRepositories"
    assert registered == sorted([*concrete.split(), "commit", "registry", "schedule", "storage"])


def test_tasks_load_on_attribute_access_without_luigi_preloaded() -> None:
    code = "import sys, pipeline; assert 'luigi' not in sys.modules; print(pipeline.CommitImage.__name__)"
    assert _python(code) == "CommitImage"


# Highest first: a part may import itself and any part below it, never one above.
LAYERS = (
    ("tasks", "cli", "__main__", "demo"),
    ("snapshots",),
    ("plan", "packing", "assembly"),
    ("registry",),
    ("image",),
    ("store",),
    ("engines",),
    ("layer",),
    ("host",),
    ("jsoncheck", "logformat"),
    ("errors",),
)


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def _rank(part: str) -> int:
    return next(i for i, parts in enumerate(LAYERS) if part in parts)


def test_imports_run_one_way_between_the_parts_of_the_package() -> None:
    package = Path(REPO) / "pipeline"
    wrong = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "__init__.py" and path.parent == package:
            continue  # the package itself registers the tasks for luigi
        part = path.relative_to(package).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
                targets = [node.module] if node.module != "pipeline" else [f"pipeline.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("pipeline.")]
            else:
                continue
            for target in targets:
                if _rank(_part(target)) < _rank(part):
                    wrong.append(f"{path.relative_to(REPO)} imports {target}")
    assert wrong == []
