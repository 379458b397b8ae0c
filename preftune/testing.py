"""Tiny offline models, tokenizers and data files for tests, examples and CI (no download, built in
milliseconds). The model and tokenizer builders live in ``preftune.model.tiny`` (the demo's ``--quick``
run uses them too); they are re-exported here so tests import everything from one place.
"""

from __future__ import annotations

from pathlib import Path

from preftune.model.tiny import (  # noqa: F401  (re-exported for tests)
    ARCHES,
    CHATML_TEMPLATE,
    _tokenizer_json,
    tiny_config,
    tiny_model,
    tiny_tokenizer,
)


def save_tiny_model(path: str | Path, arch: str = "llama", seed: int = 0, **kwargs) -> Path:
    """Write a tiny model and its tokenizer to ``path`` as a plain HF folder (what a user would pass)."""
    path = Path(path)
    model = tiny_model(arch, seed=seed, **kwargs)
    model.save_pretrained(path)
    tiny_tokenizer(kwargs.get("vocab_size", 320)).save_pretrained(path)
    return path


def write_pairs_jsonl(path: str | Path, n: int = 16, seed: int = 0) -> Path:
    """A small ``prompt/chosen/rejected`` JSONL file of plain-text pairs."""
    import json
    import random

    rng = random.Random(seed)
    words = "the quick brown fox jumps over lazy dog answer question helpful sea haiku".split()
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            prompt = f"Question {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 8)))
            chosen = " ".join(rng.choice(words) for _ in range(rng.randint(2, 6))) + "."
            rejected = " ".join(rng.choice(words) for _ in range(rng.randint(2, 9))) + "!"
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    return path


# ---------------------------------------------------------------- built-in data of every shape
_WORDS = "the quick brown fox jumps over lazy dog answer question helpful sea haiku".split()


def _text(rng, lo: int, hi: int, end: str = ".") -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi))) + end


def _write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    import json

    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_unpaired_jsonl(path: str | Path, n: int = 16, seed: int = 0) -> Path:
    """KTO-style ``prompt/completion/label`` rows, desirable and undesirable alternating."""
    import random

    rng = random.Random(seed)
    rows = [{"prompt": f"Question {i}: " + _text(rng, 3, 8, "?"), "completion": _text(rng, 2, 7),
             "label": i % 2 == 0}
            for i in range(n)]
    return _write_jsonl(path, rows)


def write_scored_lists_jsonl(
    path: str | Path, n: int = 16, k: int = 4, seed: int = 0, sample_logps: bool = False
) -> Path:
    """``prompt/responses/scores`` rows with ``k`` responses and distinct scores in [0, 1]; with ``sample_logps``
    also BRAIn's ``proposal_logps`` and ``prior_logps`` (made-up sequence log-probs in [−30, −5])."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        scores = rng.sample(range(1, 100), k)
        rows.append({"prompt": f"Question {i}: " + _text(rng, 3, 8, "?"),
                     "responses": [_text(rng, 2, 7, f" {j}.") for j in range(k)],
                     "scores": [s / 100 for s in scores]})
        if sample_logps:
            rows[-1]["proposal_logps"] = [-rng.uniform(5, 30) for _ in range(k)]
            rows[-1]["prior_logps"] = [-rng.uniform(5, 30) for _ in range(k)]
    return _write_jsonl(path, rows)


def write_rationale_pairs_jsonl(path: str | Path, n: int = 16, seed: int = 0) -> Path:
    """``prompt/chosen/rejected/rationale`` rows (RDPO / R-ORPO: a rationale per pair)."""
    import random

    rng = random.Random(seed)
    rows = [{"prompt": f"Question {i}: " + _text(rng, 3, 8, "?"), "chosen": _text(rng, 2, 6),
             "rejected": _text(rng, 2, 9, "!"), "rationale": "The first answer is better: " + _text(rng, 3, 8)}
            for i in range(n)]
    return _write_jsonl(path, rows)


def write_pairs_with_inputs_jsonl(
    path: str | Path, n: int = 16, seed: int = 0, prev_logps: bool = False
) -> Path:
    """``prompt/chosen/rejected`` pairs with the numeric columns self-play and weighted objectives read:
    ``win_probs`` (one per response, SPPO), ``pair_win_prob`` (SPPO single), ``rm_margin`` (MADPO),
    ``semantic_distance`` (Sem-DPO) and, with ``prev_logps=True``, π_t's summed log-probs (INPO)."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        p = rng.uniform(0.55, 0.95)
        row = {"prompt": f"Question {i}: " + _text(rng, 3, 8, "?"), "chosen": _text(rng, 2, 6),
               "rejected": _text(rng, 2, 9, "!"), "win_probs": [p, 1 - p], "pair_win_prob": p,
               "rm_margin": rng.uniform(0.1, 3.0), "semantic_distance": rng.uniform(0.0, 1.0)}
        if prev_logps:
            row["prev_logps"] = [-rng.uniform(5, 30), -rng.uniform(5, 30)]
        rows.append(row)
    return _write_jsonl(path, rows)


def write_triples_jsonl(path: str | Path, n: int = 16, seed: int = 0) -> Path:
    """TRL's TPO layout: ``prompt/chosen/rejected/reference`` (the reference is the gold response)."""
    import random

    rng = random.Random(seed)
    rows = [{"prompt": f"Question {i}: " + _text(rng, 3, 8, "?"), "chosen": _text(rng, 2, 6),
             "rejected": _text(rng, 2, 9, "!"), "reference": "Gold: " + _text(rng, 2, 6)} for i in range(n)]
    return _write_jsonl(path, rows)


# Numeric columns of write_pairs_with_inputs_jsonl (objectives reading one of them get that file).
PAIR_INPUT_COLUMNS = ("win_probs", "pair_win_prob", "rm_margin", "semantic_distance")


def write_data_for(name: str, folder: str | Path, n: int = 16, seed: int = 0) -> Path:
    """Built-in data of the shape objective ``name`` trains on, written into ``folder``."""
    from preftune.losses import get

    obj, folder = get(name), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if obj.columns:
        return write_triples_jsonl(folder / "triples.jsonl", n, seed)
    if obj.shape == "unpaired":
        return write_unpaired_jsonl(folder / "unpaired.jsonl", n, seed)
    if obj.shape == "listwise":
        return write_scored_lists_jsonl(folder / "lists.jsonl", n, max(4, obj.min_responses), seed,
                                        sample_logps="proposal_logps" in obj.inputs)
    if "rationale_logps" in obj.inputs:
        return write_rationale_pairs_jsonl(folder / "rationale_pairs.jsonl", n, seed)
    if set(obj.inputs) & set(PAIR_INPUT_COLUMNS):
        return write_pairs_with_inputs_jsonl(folder / "pairs_inputs.jsonl", n, seed)
    return write_pairs_jsonl(folder / "pairs.jsonl", n, seed)


def save_tiny_value_model(path: str | Path, seed: int = 0, **kwargs) -> Path:
    """A tiny token-classification Llama with one label: an OREO critic V(s_t) (``value_model``)."""
    import torch
    from transformers import AutoModelForTokenClassification

    cfg = tiny_config("llama", **kwargs)
    cfg.num_labels = 1
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForTokenClassification.from_config(cfg)
    path = Path(path)
    model.save_pretrained(path)
    tiny_tokenizer(kwargs.get("vocab_size", 320)).save_pretrained(path)
    return path


def online_run_killed_after(full_run: str | Path, dest: str | Path, done: tuple[str, ...], t: int = 2) -> Path:
    """A copy of a finished ``preftune online`` run as if killed in iteration ``t`` after the phases ``done``:
    the manifest lists only those, and the next phase's file and ``iterations.jsonl`` are half written (a
    resume must trust neither)."""
    import json
    import shutil

    dest = Path(dest)
    shutil.copytree(full_run, dest)
    it = dest / f"iter_{t:02d}"
    m = json.loads((it / "manifest.json").read_text())
    m["phases"] = {k: v for k, v in m["phases"].items() if k in done}
    (it / "manifest.json").write_text(json.dumps(m))
    (it / ("train_input.jsonl" if "build" not in done else "heldout.jsonl")).write_text('{"half": ')
    (dest / "iterations.jsonl").write_text('{"iter/t": 1, "half')
    return dest


def train_interrupted_after(cfg, step: int) -> None:
    """Run ``preftune train`` on ``cfg`` as if the job were killed once ``step`` optimizer steps are done (after
    that step's checkpoint, when ``save_steps`` divides it): the resume tests' first half."""
    from preftune.train import loop
    from preftune.train.trainer import train

    real_step = loop.Runner.train_step

    def crash_after(self):
        if self.step == step:
            raise KeyboardInterrupt("simulated crash")
        return real_step(self)

    loop.Runner.train_step = crash_after
    try:
        train(cfg)
    except KeyboardInterrupt:
        return
    finally:
        loop.Runner.train_step = real_step
    raise AssertionError(f"the run ended before step {step}: nothing was interrupted")
