"""Static checks of the Slicer module (no Slicer application here): the panel's code, its .ui file,
its parameter node, its imports and its packaging files agree with each other."""

from __future__ import annotations

import ast
import json
import py_compile
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "LiverLesionAI"
MODULE_FILE = MODULE_DIR / "LiverLesionAI.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "LiverLesionAI.ui"
LOGIC_DIR = MODULE_DIR / "Logic"
QT_MODULES = {"qt", "ctk", "PythonQt", "PyQt5", "PyQt6", "PySide2", "PySide6", "slicer.qSlicerBaseQTCore"}


@pytest.fixture(scope="module")
def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"), filename=str(MODULE_FILE))


@pytest.fixture(scope="module")
def ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ET.parse(UI_FILE).getroot().iter("widget")}


def test_module_file_compiles(tmp_path):
    py_compile.compile(str(MODULE_FILE), cfile=str(tmp_path / "module.pyc"), doraise=True)


def test_every_widget_the_code_uses_exists_in_the_ui(module_tree, ui_widgets):
    used = {node.attr for node in ast.walk(module_tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}
    assert used, "the widget uses no self.ui.<widget>: the check would be empty"
    assert sorted(used - set(ui_widgets)) == []


def _parameter_fields(tree: ast.Module) -> set[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(
                (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list):
            return {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in the module")


def test_every_slicer_parameter_name_is_a_parameter_node_field(module_tree, ui_widgets):
    fields = _parameter_fields(module_tree)
    bound = {}
    for name, widget in ui_widgets.items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[name] = prop.find("string").text
    assert bound, "no widget is bound to the parameter node"
    assert {w: p for w, p in bound.items() if p not in fields} == {}
    # The CT and the result are saved with the scene through the parameter node.
    assert {"inputVolume", "segmentation", "device"} <= set(bound.values())


def _imported_modules(tree: ast.Module, package: str | None = None) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level and package is not None:
                base = f"{package}.{node.module}" if node.module else package
                names.add(base)
                names |= {f"{base}.{alias.name}" for alias in node.names}
            elif node.module:
                names.add(node.module)
                names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _logic_file(module_name: str) -> Path | None:
    parts = module_name.split(".")
    if parts[0] != "liverlesionai":
        return None
    path = LOGIC_DIR.joinpath(*parts[1:]).with_suffix(".py") if len(parts) > 1 else LOGIC_DIR / "__init__.py"
    return path if path.is_file() else None


def _qt_imports_reachable_from(start: list[str]) -> dict[str, set[str]]:
    """Qt modules imported (at any depth) by the Logic modules reachable from ``start``."""
    seen: set[Path] = set()
    found: dict[str, set[str]] = {}
    todo = [p for p in (_logic_file(m) for m in start) if p is not None]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        imports = _imported_modules(ast.parse(path.read_text(encoding="utf-8")), package="liverlesionai")
        qt = {m for m in imports if m.split(".")[0] in QT_MODULES or m in QT_MODULES}
        if qt:
            found[path.name] = qt
        todo += [p for p in (_logic_file(m) for m in imports) if p is not None]
    return found


def test_module_imports_nothing_from_logic_that_imports_qt(module_tree):
    from_logic = sorted(m for m in _imported_modules(module_tree) if m.startswith("liverlesionai"))
    assert from_logic, "the module imports nothing from liverlesionai: the check would be empty"
    assert _qt_imports_reachable_from(from_logic) == {}
    # No module of the Qt-free layer imports Qt, whoever imports it.
    assert _qt_imports_reachable_from([f"liverlesionai.{p.stem}" for p in LOGIC_DIR.glob("*.py")]) == {}


def test_module_never_imports_logic_by_folder_name_nor_torch_at_import(module_tree):
    statements = [n for n in module_tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    top_level = _imported_modules(ast.Module(body=statements, type_ignores=[]))
    assert not any(m == "Logic" or m.startswith("Logic.") for m in _imported_modules(module_tree))
    assert not any(m.split(".")[0] == "torch" for m in top_level)
    assert "liverlesionai.engine" not in top_level  # the engine imports torch: only on use


def test_module_classes_follow_slicer_conventions(module_tree):
    classes = {node.name: [getattr(b, "id", getattr(b, "attr", "")) for b in node.bases]
               for node in module_tree.body if isinstance(node, ast.ClassDef)}
    assert "ScriptedLoadableModule" in classes["LiverLesionAI"]
    assert "ScriptedLoadableModuleWidget" in classes["LiverLesionAIWidget"]
    assert "ScriptedLoadableModuleLogic" in classes["LiverLesionAILogic"]
    assert "ScriptedLoadableModuleTest" in classes["LiverLesionAITest"]
    source = MODULE_FILE.read_text(encoding="utf-8")
    for required in ("slicer.util.loadUI", "tryWithErrorDisplay", "helpText", "acknowledgementText",
                     "registerCustomSampleDataSource", "run_review_scenario"):
        assert required in source, required


def test_packaging_files_name_existing_resources():
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in cmake
    for resource in re.findall(r"^\s*(Resources/\S+)$", cmake, flags=re.MULTILINE):
        assert (MODULE_DIR / resource.replace("${MODULE_NAME}", "LiverLesionAI")).is_file(), resource
    assert "add_subdirectory(LiverLesionAI)" in (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    catalog = json.loads((ROOT / "LiverLesionAI.json").read_text(encoding="utf-8"))
    assert {"scm_url", "scm_revision", "category", "build_dependencies"} <= set(catalog)
    s4ext = dict(line.split(" ", 1) for line in (ROOT / "LiverLesionAI.s4ext").read_text().splitlines()
                 if line.strip() and not line.startswith("#") and " " in line)
    assert s4ext["scm"] == "git" and s4ext["scmurl"] == catalog["scm_url"]
    from PIL import Image

    with Image.open(MODULE_DIR / "Resources" / "Icons" / "LiverLesionAI.png") as icon:
        assert icon.size == (128, 128)


HEAVY = {"torch", "scipy", "SimpleITK", "safetensors", "skimage"}


def _top_level_imports(path: Path, package: str | None) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    statements = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    return _imported_modules(ast.Module(body=statements, type_ignores=[]), package)


def test_module_import_needs_no_package_the_user_has_not_agreed_to_install():
    """Loading the module (Slicer start-up) must not import torch, scipy...: they are installed on first
    use, after asking. Follows the Logic modules the module file imports at top level, transitively."""
    heavy_found = {}
    todo = [(MODULE_FILE, None)]
    seen = set()
    while todo:
        path, package = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        imports = _top_level_imports(path, package)
        heavy = {m for m in imports if m.split(".")[0] in HEAVY}
        if heavy:
            heavy_found[path.name] = heavy
        todo += [(p, "liverlesionai") for p in (_logic_file(m) for m in imports) if p is not None]
    assert len(seen) > 2, "the walk reached no Logic module: the check would be empty"
    assert heavy_found == {}


def test_module_shipped_version_name_matches_the_registry(module_tree):
    from liverlesionai.registry import SHIPPED_VERSION

    assigned = {node.targets[0].id: node.value.value for node in module_tree.body
                if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Constant)}
    assert assigned["SHIPPED_VERSION"] == SHIPPED_VERSION
