"""From a data path to tokenised examples of the shape the objective needs, validated first."""

from __future__ import annotations

import random
from dataclasses import dataclass

from preftune.losses import TRIPLE_COLUMNS
from preftune.train.config import TrainConfig


@dataclass
class TokenizedSet:
    examples: list  # data.TokenizedExample
    name: str

    def __len__(self) -> int:
        return len(self.examples)

    def lengths(self) -> list[int]:
        return [len(e.prompt_ids) + sum(len(r) for r in e.response_ids) for e in self.examples]


def load_examples(path: str, obj, cfg: TrainConfig, tokenizer, split=None, log=print):
    """Read, validate (every bad record reported with file, line and field) and derive examples of
    the objective's data shape."""
    from preftune import data

    # OREO: every trajectory with its reward; TPO trees: every response with its score and steps (data/trajectories.py)
    if "terminal_reward" in obj.inputs or "step_ids" in obj.inputs:
        from preftune.data.trajectories import load_trajectories

        examples, issues = load_trajectories(path, split=split, skip_invalid=cfg.skip_invalid)
        if issues:
            log(f"skipped {len(issues)} problem(s) in {path} (--skip-invalid); first: {issues[0]}")
        if not examples:
            raise ValueError(f"{path}: no usable trajectories for objective '{obj.name}'")
        return examples
    try:
        records, issues = data.load_and_validate(
            path, objective_shape=obj.shape, split=split, skip_invalid=cfg.skip_invalid,
            min_responses=obj.min_responses, tokenizer=tokenizer, max_prompt_length=cfg.max_prompt_length,
            chat_template=cfg.chat_template,
        )
    except data.DataError as e:
        _hint_needs(e, obj)
        raise
    if issues:
        log(f"skipped {len(issues)} problem(s) in {path} (--skip-invalid); first: {issues[0]}")
    try:
        if obj.columns == TRIPLE_COLUMNS:  # TPO triples: their own column order
            examples = data.to_triples(records)
        elif obj.shape == "listwise":
            examples = data.derive_examples(records, obj.shape)
        else:
            examples = data.derive_examples(records, obj.shape, pair_strategy=cfg.pair_strategy)
    except data.DataError as e:
        _hint_needs(e, obj)
        raise
    if not examples:
        raise ValueError(f"{path}: no usable examples for objective '{obj.name}', which needs {obj.data_needs}")
    if "prompt_tokens" in obj.inputs:  # MAPL: pair_prompts records score each response under its own prompt
        for e in examples:
            e.inputs.setdefault("prompt_tokens", [0.0] * len(e.responses))  # tokenisation counts the own ones
    elif any(getattr(e, "prompts", None) is not None for e in examples):
        e = next(e for e in examples if getattr(e, "prompts", None) is not None)
        raise ValueError(f"{e.source}:{e.line}: pair_prompts: objective '{obj.name}' scores both responses under "
                         "the record's prompt; train records with pair_prompts with --loss mapl_intra or mapl_inter")
    check_inputs(examples, obj, path)
    if "rationale_logps" not in obj.inputs:  # only RDPO / R-ORPO score rationales; others train on the pair alone
        for e in examples:
            e.rationale = None
    return examples


def _hint_needs(e, obj) -> None:
    """The located problems lead; what the objective needs follows, when the data lacks its layout or
    shape (not after an unreadable line or a bad value, where it would only bury the problem)."""
    if e.about_shape:
        e.args = (f"{e}\nobjective '{obj.name}' needs {obj.data_needs}",)


def check_inputs(examples, obj, source: str) -> None:
    """The objective's declared inputs must be present in the data (e.g. win_probs for SPPO)."""
    from preftune.train.inputs import engine_keys

    data_keys = set(examples[0].inputs) if examples else set()
    missing = [k for k in obj.inputs if k not in data_keys and k not in engine_keys()]
    if missing:
        raise ValueError(
            f"{source}: objective '{obj.name}' needs the column(s) {', '.join(missing)} "
            f"({obj.data_needs}); found: {', '.join(sorted(data_keys)) or 'none'}"
        )
    if "rationale_logps" in obj.inputs:  # RDPO / R-ORPO: a rationale per pair (data/rationales.py)
        bare = [e for e in examples if getattr(e, "rationale", None) is None]
        if bare:
            raise ValueError(f"{bare[0].source}:{bare[0].line}: rationales: missing; objective '{obj.name}' needs a "
                             f"rationale per pair ({len(bare)} of {len(examples)} pairs have none)")
    if obj.shape == "listwise":
        too_few = [e for e in examples if len(e.responses) < obj.min_responses]
        if too_few:
            e = too_few[0]
            raise ValueError(f"{e.source}:{e.line}: objective '{obj.name}' needs {obj.data_needs}")


def tokenize_all(examples, tokenizer, cfg: TrainConfig, name: str, log=print) -> TokenizedSet:
    """Token ids of every example. Already-tokenised groups (``TokenizedExample``: the online loop's
    sampled token ids, which a re-tokenisation of their text need not reproduce) are kept as given."""
    from preftune.data import TokenizedExample, tokenize_examples, truncation_counts

    if examples and all(isinstance(e, TokenizedExample) for e in examples):
        toks = list(examples)
        for i, e in enumerate(toks):
            e.index = i
    else:
        toks = tokenize_examples(
            examples, tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
            truncation_mode=cfg.truncation_mode, chat_template=cfg.chat_template,
            rationale_template=getattr(cfg, "rationale_template", None),
            rationale_order=getattr(cfg, "rationale_order", "chosen_first"),
        )
    counts = truncation_counts(toks)
    if any(counts.values()):
        log(f"{name}: truncated {counts} (max_length={cfg.max_length}, "
            f"max_prompt_length={cfg.max_prompt_length}, {cfg.truncation_mode})")
    return TokenizedSet(toks, name)


def prepare(cfg: TrainConfig, obj, tokenizer, train_examples=None, eval_examples=None, log=print):
    if train_examples is None:
        if cfg.data is None:
            raise ValueError("no training data: pass --data PATH (or data: in the config)")
        train_examples = load_examples(cfg.data, obj, cfg, tokenizer, split=cfg.split, log=log)
    if eval_examples is None and cfg.eval_data is not None:
        eval_examples = load_examples(cfg.eval_data, obj, cfg, tokenizer, log=log)
    elif eval_examples is None and cfg.eval_fraction > 0:
        idx = list(range(len(train_examples)))
        random.Random(cfg.seed).shuffle(idx)
        n_eval = max(1, int(round(cfg.eval_fraction * len(idx))))
        held = set(idx[:n_eval])
        eval_examples = [train_examples[i] for i in sorted(held)]
        train_examples = [e for i, e in enumerate(train_examples) if i not in held]
    train_set = tokenize_all(train_examples, tokenizer, cfg, "train", log)
    eval_set = tokenize_all(eval_examples, tokenizer, cfg, "eval", log) if eval_examples else None
    return train_set, eval_set
