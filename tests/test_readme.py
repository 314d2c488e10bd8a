"""The README's example is part of the product: it must run as printed."""

import re
import runpy
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_15_line_example_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    section = text.split("## The engine in 15 lines", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code)
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(script), run_name="__main__")
    loss = float(re.search(r"loss ([0-9.]+)", capsys.readouterr().out).group(1))
    assert loss < 0.5  # 100 Adam steps fit 32 random points
    assert (tmp_path / "model.safetensors").stat().st_size > 0
