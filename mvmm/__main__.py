"""``python -m mvmm`` and the ``mvmm`` command.

The command line's own module is imported here, inside the guard, so that Ctrl-C while it loads is
reported as an interruption, like Ctrl-C during a command, not as a traceback.
"""

import sys


def run() -> None:
    """Start the command line (the ``mvmm`` console script)."""
    try:
        from mvmm.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("mvmm: interrupted\n")
        raise SystemExit(130) from None
    main()


if __name__ == "__main__":
    run()
