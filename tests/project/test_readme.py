"""Every ```python block in README.md runs as written, each in a fresh interpreter, on the CPU."""

import os
import re
import subprocess
import sys

import pytest
from helpers.paths import ROOT

README = ROOT / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_python_blocks():
    # The regex finding none would make the test below vacuous.
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs_as_written(index, tmp_path):
    code = BLOCKS[index]
    env = dict(os.environ)
    env.pop("FASTSAE_BACKEND", None)  # as a reader runs it: the default backend
    done = subprocess.run(
        [sys.executable, "-c", code + "\nprint('README block finished')"],
        cwd=tmp_path,  # blocks write files (my_sae/, acts/, runs/) into the working folder
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"README python block {index} failed:\n{code}\n--- stderr:\n{done.stderr[-3000:]}"
    assert "README block finished" in done.stdout
