"""Every Python example in the README and docs/ runs as written."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
EXAMPLES = [(path.name, i, block) for path in DOCS
            for i, block in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), re.S))]


@pytest.mark.parametrize("name, index, code", EXAMPLES,
                         ids=[f"{name}-{index}" for name, index, _ in EXAMPLES])
def test_example_runs(name, index, code):
    namespace = {}
    exec(compile(code, f"{name} example {index}", "exec"), namespace)
