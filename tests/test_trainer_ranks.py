"""Rank function that runs launch/pretrain_gpt.py's main() (module-level for spawned ranks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.scripts import load_script


def load_trainer():
    return load_script("launch/pretrain_gpt.py")


def run_trainer(argv: list[str]) -> dict[str, Any]:
    return load_trainer().main(argv)


def run_trainer_sigterm(argv: list[str], log_dir: str, after_lines: int) -> dict[str, Any]:
    """Run the trainer; rank 0 sends itself SIGTERM once ``after_lines`` steps are logged."""
    import os
    import signal
    import threading
    import time

    def killer() -> None:
        path = Path(log_dir) / "metrics.jsonl"
        while True:
            if path.is_file() and len(path.read_text().splitlines()) >= after_lines:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    if int(os.environ["RANK"]) == 0:
        threading.Thread(target=killer, daemon=True).start()
    return load_trainer().main(argv)
