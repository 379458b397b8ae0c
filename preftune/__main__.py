"""``python -m preftune``: the command line, for launchers that start a module (``accelerate launch -m preftune``)."""

from preftune.cli import main

if __name__ == "__main__":
    main()
