"""Developer tools run from a checkout (``python -m preftune.tools.<name>``); no product module imports them."""
