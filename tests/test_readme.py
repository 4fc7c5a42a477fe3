"""The README's Python examples run as they stand, so they cannot rot."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_maml_on_a_custom_model_with_tensors_runs(capsys):
    blocks = [b for b in python_blocks() if "fa.ClassPool.from_labels(" in b and "fa.MAML(" in b]
    assert len(blocks) == 1, "the README's 'From Python' section lost its MAML-on-your-own-tensors example"
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(blocks[0], f"{README}:maml-example", "exec"), namespace)
    import fastadapt as fa

    assert isinstance(namespace["learner"], fa.MAML)
    assert 0.0 <= namespace["result"]["accuracy"] <= 100.0 and namespace["result"]["episodes"] == 20
    assert "accuracy:" in capsys.readouterr().out
    # the model given to MAML is the one meta-trained
    assert all(torch.equal(a, b) for a, b in zip(namespace["model"].parameters(), namespace["learner"].model.parameters()))
