"""Packaging contract: d2kernels imports with the core dependencies alone (torch, triton).

``pip install d2sd`` installs only those; the trainer's dependencies come with ``d2sd[train]``.
"""
import subprocess
import sys
import textwrap

# What the [train] extra adds (numpy stays: torch itself imports it) and the trainer package itself.
TRAINER_ONLY = ("transformers", "d2sd", "matplotlib", "tqdm", "safetensors", "yaml")


def test_d2kernels_imports_without_the_trainer_dependencies():
    code = textwrap.dedent(
        f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in {TRAINER_ONLY!r}:
                    raise ImportError('blocked: ' + name)
                return None
        sys.meta_path.insert(0, Block())
        import d2kernels
        import d2kernels.attention.triton, d2kernels.cross_entropy.triton, d2kernels.embedding.triton, d2kernels.cuda
        assert callable(d2kernels.varprefix_attention)
        from d2kernels.modules import VarPrefixAttention, hf_attention_forward
        assert not [m for m in sys.modules if m.split('.')[0] in {TRAINER_ONLY!r}]
        print('ok')
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def _import_graph():
    """Module -> the d2sd / d2kernels modules it imports at its top level (parent packages included),
    and the ``from x import _private`` lines that cross modules."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = {}
    for pkg in ("d2sd", "d2kernels"):
        for f in (root / pkg).rglob("*.py"):
            parts = list(f.relative_to(root).with_suffix("").parts)
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph, private = {}, []
    for mod, f in files.items():
        pkg = mod.split(".") if f.name == "__init__.py" else mod.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(pkg[: len(pkg) - node.level + 1] + [node.module or ""]).strip(".") if node.level else node.module
                names = [(base, a.name) for a in node.names]
            else:
                continue
            for m, name in names:
                full = f"{m}.{name}" if name and f"{m}.{name}" in files else m
                if full.split(".")[0] not in files:
                    continue
                if name and name.startswith("_") and not name.startswith("__") and m != mod:
                    private.append(f"{mod}: from {m} import {name}")
                if node.col_offset == 0:  # module level (imports inside functions / TYPE_CHECKING do not count)
                    parts = full.split(".")
                    deps |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} - {mod}
        graph[mod] = {d for d in deps if d in files and not mod.startswith(d + ".")}
    return graph, private


def test_packages_import_as_a_tree():
    """No import cycle among the modules of d2sd and d2kernels, no private helper imported across modules."""
    graph, private = _import_graph()
    assert not private, private
    state = {}

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            assert state.get(d) != "open", "import cycle: " + " -> ".join(path + [m, d])
            if d not in state:
                visit(d, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
