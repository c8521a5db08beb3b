"""``python -m ggspeed.run script.py [args]``: run an unchanged script with ggspeed registered.

For interpreters that do not process site-packages' ``.pth`` files (``python -S``, some embedded
or frozen set-ups) or a checkout used without installing: this arms the same registration the
installed ``ggspeed-registration.pth`` arms, then runs the script as ``__main__``. Through the
DeepSpeed launcher: ``deepspeed --module ggspeed.run script.py [args]`` (the launcher's
``--local_rank=N`` is handed on to the script). ``-m package.module`` runs a module instead of a
file. ``GGSPEED_DISABLE=1`` still switches registration off.
"""

from __future__ import annotations

import os
import runpy
import sys

from .registration import arm

USAGE = "usage: python -m ggspeed.run [--local_rank=N] (script.py | -m module) [args ...]"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    launcher = []
    while argv and argv[0].startswith("--local_rank"):
        launcher.append(argv.pop(0))  # added by the DeepSpeed launcher before the script
    if not argv or argv[0] in ("-h", "--help") or (argv[0] == "-m" and len(argv) < 2):
        print(USAGE, file=sys.stderr)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    arm()
    if argv[0] == "-m":
        module = argv[1]
        sys.argv = [module, *launcher, *argv[2:]]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return
    script = argv[0]
    if not os.path.isfile(script):
        print(f"ggspeed.run: no such script {script!r}\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    sys.argv = [script, *launcher, *argv[1:]]
    # As `python script.py` would: the script's folder first on sys.path (not the cwd).
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
