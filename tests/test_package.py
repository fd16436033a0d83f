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
