"""The package's import graph has no cycle: every import, also those inside functions, is an
edge (a lazy import still ties two modules together). Kernels are leaves: nothing under
skipkernels/triton imports the op layer. No import runs from a lower layer back up
(docs/ARCHITECTURE.md, "Layers"). Only skipkernels/adapters names foreign model classes."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "skipkernels"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from package import submodule` imports the submodule; other names, the module
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
                targets = subs + ([base] if len(subs) < len(node.names) else [])
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_kernels_import_nothing_from_the_op_layer():
    graph = import_graph()
    for name, targets in graph.items():
        if name.startswith("skipkernels.triton"):
            assert not [t for t in targets if t.startswith("skipkernels.ops")], name


def test_the_walk_finds_a_cycle_when_there_is_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


# docs/ARCHITECTURE.md's layer table, bottom up: a module imports only from its own layer and below.
LAYERS = (
    ("skipkernels._build", "skipkernels._compat", "skipkernels._ext", "skipkernels._version", "skipkernels.options",
     "skipkernels.distributed", "skipkernels.errors"),
    ("skipkernels.triton",),
    ("skipkernels.ops",),
    ("skipkernels.adapters", "skipkernels.families", "skipkernels.checks"),
    ("skipkernels.pet",),
    ("skipkernels.skip", "skipkernels.patch"),
    ("skipkernels.models",),  # below train: a run creates its model; creating one never reads a run
    ("skipkernels.data", "skipkernels.train", "skipkernels.plots"),
    ("skipkernels.cli", "skipkernels.flags", "skipkernels.bench", "skipkernels.bench_report", "skipkernels.pretrain_tiny", "skipkernels.prediction", "skipkernels.reproduce",
     "skipkernels.info", "skipkernels.__main__", "skipkernels"),
)


def layer_of(module: str) -> int:
    """The layer of the longest prefix of ``module`` named in LAYERS."""
    best = None
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (level, prefix)
    assert best is not None, f"{module} is in no layer of LAYERS (and of docs/ARCHITECTURE.md)"
    return best[0]


def test_imports_only_go_to_the_same_layer_or_below():
    upward = [f"{name} -> {target}" for name, targets in sorted(import_graph().items())
              for target in sorted(targets) if layer_of(target) > layer_of(name)]
    assert upward == []


def test_the_layer_check_sees_an_upward_import():
    assert layer_of("skipkernels.ops.linear") < layer_of("skipkernels.skip.tuner")
    assert layer_of("skipkernels.cli") == len(LAYERS) - 1 and layer_of("skipkernels") == len(LAYERS) - 1
    assert layer_of("skipkernels.models") < layer_of("skipkernels.train.checkpoint")


# ---------------------------------------------------------------- foreign classes live in adapters
ADAPTERS = PACKAGE / "adapters"
FOREIGN_PACKAGES = ("open_clip", "timm", "transformers")
# Class names of the foreign ecosystems the adapters know: outside adapters no string equals one.
FOREIGN_CLASS_NAMES = {
    "CLIP", "CustomTextCLIP", "CoCa", "VisionTransformer", "TimmModel", "TextTransformer", "ModifiedResNet", "Eva",
    "ResidualAttentionBlock", "CustomResidualAttentionBlock", "QuickGELU", "EvaBlock", "Mlp", "Attention",
    "CLIPModel", "SiglipModel", "Siglip2Model", "CLIPEncoderLayer", "SiglipEncoderLayer", "Siglip2EncoderLayer",
    "CLIPAttention", "SiglipAttention", "Siglip2Attention", "BartEncoderLayer", "BartDecoderLayer",
    "T5Block", "QuickGELUActivation", "GELUActivation", "GELUTanh", "PytorchGELUTanh", "HFTokenizer"}
_CLASS_ATTRIBUTES = ("__name__", "__qualname__", "__module__")


def _names_a_class_attribute(node) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr in _CLASS_ATTRIBUTES for n in ast.walk(node))


def foreign_class_offences(source: str) -> list[str]:
    """Where ``source`` names a foreign model class: a comparison of a class's name or module, a
    string equal to a foreign class name, or an import of a class from a foreign package."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and any(_names_a_class_attribute(n) for n in [node.left, *node.comparators]):
            found.append(f"line {node.lineno}: compares a class name or module")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in ("startswith", "endswith") and _names_a_class_attribute(node.func.value):
            found.append(f"line {node.lineno}: tests a class name or module")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in FOREIGN_CLASS_NAMES:
            found.append(f"line {node.lineno}: names {node.value!r}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FOREIGN_PACKAGES:
            classes = [a.name for a in node.names if a.name[:1].isupper()]
            if classes:
                found.append(f"line {node.lineno}: imports {', '.join(classes)} from {node.module}")
    return found


def test_only_adapters_name_foreign_classes():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if ADAPTERS in path.parents:
            continue
        found = foreign_class_offences(path.read_text())
        if found:
            offenders[str(path.relative_to(ROOT))] = found
    assert not offenders, "only skipkernels/adapters/ may name foreign model classes:\n" + "\n".join(
        f"{path}: {'; '.join(found)}" for path, found in offenders.items())


def test_the_foreign_class_rule_sees_each_kind_of_offence():
    source = (
        "from transformers import CLIPModel\n"
        "import open_clip\n"
        "def f(block):\n"
        "    if type(block).__name__ == 'anything':\n"
        "        return 'ResidualAttentionBlock'\n"
        "    return type(block).__module__.startswith('timm.')\n"
        "message = f'{type(1).__name__} is shown, not compared'\n")
    found = sorted(foreign_class_offences(source))
    assert [line.split(":")[0] for line in found] == ["line 1", "line 4", "line 5", "line 6"], found
