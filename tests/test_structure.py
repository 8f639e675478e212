"""The code's floors: what may import what, and one home for the coordinate frame."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PACKAGES = ("models", "preprocessing", "pipeline")
FRAME = REPO_ROOT / "models" / "frame.py"
# A package may import only the packages below it.
FORBIDDEN_IMPORTS = {"models": ("preprocessing", "pipeline"), "preprocessing": ("pipeline",)}
# Names that only the frame defines: the crop size, input normalisation, NME, the convention.
FRAME_NAMES = {"CROP_SIZE", "INPUT_SIZE", "INPUT_MEAN", "INPUT_SCALE", "COORDINATES", "nme", "nme_torch",
               "landmark_nme", "normalise_input", "images_to_input", "crops_to_tensor", "reflect",
               "param_frame_to_crop", "param_frame_to_crop_torch"}


def modules(*packages: str) -> list[Path]:
    return sorted(path for package in packages for path in (REPO_ROOT / package).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def module_names(path: Path) -> set[str]:
    """Names a file assigns at module level."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) else []
        names.update(target.id for target in targets if isinstance(target, ast.Name))
    return names


def docstring_free_nodes(path: Path) -> list[ast.AST]:
    """The file's AST nodes, docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [node for node in ast.walk(tree) if id(node) not in docstrings]


def is_reflection(node: ast.AST) -> bool:
    """``n + 1 - x``: a 1-based coordinate reflected across n pixels."""
    return (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Sub)
            and isinstance(node.left, ast.BinOp) and isinstance(node.left.op, ast.Add)
            and isinstance(node.left.right, ast.Constant) and node.left.right.value == 1)


def is_crop_side(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is int and node.value in (120, 121)


@pytest.mark.parametrize("package", sorted(FORBIDDEN_IMPORTS))
def test_lower_floors_do_not_import_upper_ones(package):
    offending = [f"{path.relative_to(REPO_ROOT)} imports {name}" for path in modules(package)
                 for name in sorted(imported_modules(path))
                 if name.split(".")[0] in FORBIDDEN_IMPORTS[package]]
    assert not offending, "\n".join(offending)


def test_only_the_frame_defines_the_frame():
    offending = []
    for path in modules(*PACKAGES, "benchmarks"):
        if path == FRAME:
            continue
        offending += [f"{path.relative_to(REPO_ROOT)} assigns {name}" for name in module_names(path)
                      if name in FRAME_NAMES]
        for node in docstring_free_nodes(path):
            where = f"{path.relative_to(REPO_ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in FRAME_NAMES:
                offending.append(f"{where} defines {node.name}")
            elif isinstance(node, ast.Constant) and type(node.value) is float and node.value == 127.5:
                offending.append(f"{where}: the input normalisation's 127.5")
            elif is_reflection(node):
                offending.append(f"{where}: a reflection 'n + 1 - x' (use models.frame.reflect)")
    assert not offending, "\n".join(offending)


def test_no_crop_size_literal_outside_the_frame():
    """120 (the crop side) and 121 (its reflection) appear as numbers only in the frame."""
    offending = []
    for path in modules(*PACKAGES):
        if path == FRAME:
            continue
        tree = ast.parse(path.read_text())
        # A figure's dpi and a duration in seconds (NAME_S = 120) are other 120s.
        dpi = {id(keyword.value) for keyword in ast.walk(tree)
               if isinstance(keyword, ast.keyword) and keyword.arg == "dpi"}
        dpi |= {id(node.value) for node in tree.body if isinstance(node, ast.Assign)
                and all(isinstance(t, ast.Name) and t.id.endswith("_S") for t in node.targets)}
        offending += [f"{path.relative_to(REPO_ROOT)}:{node.lineno}: {node.value}" for node in ast.walk(tree)
                      if is_crop_side(node) and id(node) not in dpi]
    assert not offending, "\n".join(offending)


def test_the_checks_see_a_planted_copy(tmp_path):
    """The walkers above find what they look for: a planted import, constant, reflection, size."""
    planted = tmp_path / "planted.py"
    planted.write_text('"""Mentions 120 + 1 - y in prose only."""\nCROP_SIZE = 120\n\n\n'
                       "def f(y):\n    from pipeline.training import run\n    return 120 + 1 - y\n")
    assert "pipeline.training" in imported_modules(planted)
    assert "CROP_SIZE" in module_names(planted)
    assert sum(is_reflection(node) for node in docstring_free_nodes(planted)) == 1
    assert sum(is_crop_side(node) for node in docstring_free_nodes(planted)) == 2


def test_a_served_model_ships_every_module_it_imports_and_no_other_package():
    """The code logged with a registered model (models.served.MODULES) is closed under its own
    imports and needs only the standard library, torch, numpy and OpenCV; and MLflow in
    ``served`` alone, whose pyfunc entry runs only where MLflow is loading the model."""
    import sys

    from models.served import MODULES

    allowed = {"torch", "numpy", "cv2", "__future__"} | set(sys.stdlib_module_names)
    for module in MODULES:
        for name in imported_modules(REPO_ROOT / "models" / f"{module}.py"):
            top, _, rest = name.partition(".")
            if top == "models":
                assert rest in MODULES, f"models/{module}.py imports {name}, which a served model lacks"
            else:
                assert top in allowed | ({"mlflow"} if module == "served" else set()), \
                    f"models/{module}.py imports {name}: not shipped with a served model"


# The commands users run: ``frnet STAGE`` is ``python pipeline/STAGE.py``; ``cli`` is ``frnet`` itself.
STAGE_SCRIPTS = {"cli", "synth", "preprocess", "train", "tune", "evaluate", "register", "predict", "export",
                 "info", "demo"}


def test_the_pipeline_top_level_holds_the_stage_scripts_only():
    from pipeline.cli import STAGES

    top = {path.stem for path in (REPO_ROOT / "pipeline").glob("*.py")} - {"__init__"}
    assert top == STAGE_SCRIPTS, f"pipeline/ holds {sorted(top - STAGE_SCRIPTS)} beside the stage scripts " \
        f"(libraries go in a sub-package) or lacks {sorted(STAGE_SCRIPTS - top)}"
    assert set(STAGES) | {"cli"} == STAGE_SCRIPTS, "every stage script is a frnet command"


def test_no_stage_script_imports_another_but_the_demo():
    """Stages hand work on through the libraries; only the demo chains the stages themselves."""
    offending = []
    for path in modules("pipeline"):
        if path.stem == "demo" and path.parent.name == "pipeline":
            continue
        tree = ast.parse(path.read_text())
        named = {name for name in imported_modules(path) if name.count(".") == 1}
        named |= {f"pipeline.{alias.name}" for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom) and node.module == "pipeline" for alias in node.names}
        offending += [f"{path.relative_to(REPO_ROOT)} imports the stage script {name}"
                      for name in sorted(named)
                      if name.split(".")[0] == "pipeline" and name.split(".")[1] in STAGE_SCRIPTS]
    assert not offending, "\n".join(offending)


def test_the_layout_page_names_every_module():
    """docs/layout.md has one line for every module of the three packages."""
    layout = (REPO_ROOT / "docs" / "layout.md").read_text()
    missing = [str(path.relative_to(REPO_ROOT)) for path in modules(*PACKAGES)
               if path.name != "__init__.py" and f"`{path.relative_to(REPO_ROOT)}`" not in layout]
    assert not missing, "docs/layout.md does not name: " + ", ".join(missing)
