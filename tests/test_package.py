"""Packaging contract: d2kernels imports without transformers and without d2sd."""
import subprocess
import sys
import textwrap


def test_d2kernels_imports_without_transformers_or_d2sd():
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('transformers', 'd2sd'):
                    raise ImportError('blocked: ' + name)
                return None
        sys.meta_path.insert(0, Block())
        import d2kernels
        assert callable(d2kernels.varprefix_attention)
        from d2kernels.modules import VarPrefixAttention, hf_attention_forward
        assert 'transformers' not in sys.modules and 'd2sd' not in sys.modules
        print('ok')
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
