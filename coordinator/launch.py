"""How a job's command starts in its guest: its environment, its stdin and its inputs' modes are applied by a
short ``sh`` prologue in front of the command, so that the guest side needs nothing beyond what it has (a POSIX
shell and chmod, in the built-in initramfs and in every image).

The prologue's text holds only what the coordinator wrote (modes, validated variable names, quoted input paths);
the variables' values and the command's arguments reach the shell as positional parameters, never parsed as
shell code. A job without environment, stdin or executable inputs runs exactly as submitted.
"""

from __future__ import annotations

import shlex

# The name a job's stdin is staged under in its directory; the prologue opens it as stdin and removes it before
# the command starts, so the job's directory holds only its own files.
STDIN_INPUT = ".conode-stdin"
DEFAULT_MODE = 0o644  # what an input is staged with
SHELL = "/bin/sh"
PROLOGUE_NAME = "conode-job"  # the prologue's $0: how the shell names itself in its error messages


def guest_argv(argv: list[str], env: dict[str, str], modes: dict[str, int], stdin: bool) -> list[str]:
    """The command the guest is given for *argv*, with *env* exported, the inputs' *modes* applied and, if
    *stdin*, the staged stdin file as the command's standard input."""
    modes = {path: mode for path, mode in modes.items() if mode != DEFAULT_MODE}
    if not env and not modes and not stdin:
        return list(argv)
    lines = []
    by_mode: dict[int, list[str]] = {}
    for path, mode in sorted(modes.items()):
        by_mode.setdefault(mode, []).append(path)
    for mode, paths in sorted(by_mode.items()):
        lines.append(f"chmod {mode:o} -- {' '.join(shlex.quote(p) for p in paths)} || exit 126")
    if stdin:
        lines.append(f"exec <{STDIN_INPUT} || exit 126")
        lines.append(f"rm -f {STDIN_INPUT}")
    names = list(env)
    for position, name in enumerate(names, 1):
        lines.append(f'export {name}="${{{position}}}"')
    if names:
        lines.append(f"shift {len(names)}")
    lines.append('exec "$@"')
    return [SHELL, "-c", "\n".join(lines), PROLOGUE_NAME, *(env[name] for name in names), *argv]
