"""The README's d2kernels example runs as written."""
import pathlib
import re

import torch


def test_readme_example_runs():
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert torch.isfinite(scope["loss"]).item()
    assert scope["hidden"].grad is not None
    assert scope["o"].shape == scope["q"].shape and scope["x"].shape[-1] == scope["H"]
