"""preftune: learning from preferences for Hugging Face causal language models.

``import preftune`` is cheap: heavy modules (transformers, accelerate, datasets) load only when a
function that needs them is called.
"""

__version__ = "0.1.0"
