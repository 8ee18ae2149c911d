#!/usr/bin/env python3
"""Write kdsr's shell completion scripts (click's own), for the Debian package.

    scripts/completion.py OUT_DIR     # OUT_DIR/kdsr.bash, OUT_DIR/_kdsr (zsh)

What ``_KDSR_COMPLETE=bash_source kdsr`` prints on an installed kdsr; made
here from the checkout, at package build, where no kdsr is installed yet.
The scripts call ``kdsr`` with ``_KDSR_COMPLETE=bash_complete`` (or
``zsh_complete``) at each <Tab>, so what they offer is always the installed
CLI's commands, options and choices.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from click.shell_completion import get_completion_class  # noqa: E402

from kdsr import cli  # noqa: E402

PROG, VAR = "kdsr", "_KDSR_COMPLETE"
FILES = {"bash": "kdsr.bash", "zsh": "_kdsr"}


def source(shell: str) -> str:
    return get_completion_class(shell)(cli.main, {}, PROG, VAR).source()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for shell, name in FILES.items():
        (out / name).write_text(source(shell))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
