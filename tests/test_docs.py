"""The README states what the code does: its key table is generated from the config models."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_key_table_is_current():
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "config_table.py"),
            "--check",
            str(ROOT / "README.md"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_commands_exist():
    text = (ROOT / "README.md").read_text()
    for script in ("launch/demo.sh", "scripts/test.sh"):
        assert f"bash {script}" in text
        assert (ROOT / script).exists(), script
