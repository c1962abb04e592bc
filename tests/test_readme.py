"""The README's library examples run as written (in a temporary working directory)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _library_blocks() -> list[str]:
    text = README.read_text()
    section = text.split("## Library", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_library_section_has_examples():
    assert len(_library_blocks()) >= 3


@pytest.mark.parametrize("index", range(3))
def test_library_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _library_blocks()[index]
    exec(compile(code, f"README.md library example {index}", "exec"), {"__name__": "readme_example"})


def test_adding_a_method_example_runs(tmp_path, monkeypatch):
    """The README's worked example of a new method registers it and runs it through the skeleton."""
    import methods.registry as reg

    text = README.read_text()
    section = text.split("### Adding a method", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(reg, "_REGISTRY", dict(reg._REGISTRY))
    exec(compile(code, "README.md adding a method", "exec"), {"__name__": "readme_example"})
    assert reg.get_method("sds-anneal").name == "sds-anneal"
    assert (tmp_path / "outputs" / "a-red-cube" / "model.ply").exists()
