"""preftune.data: records, readers, validation, derivation, tokenisation and collation.

Read → validate → derive → tokenise → collate::

    records, issues = load_and_validate("prefs.jsonl", objective_shape="paired", skip_invalid=True)
    examples = derive_examples(records, "paired")
    tokenized = tokenize_examples(examples, tokenizer, max_length=1024, max_prompt_length=512)
    batch = collate([tokenized[i] for i in order[:8]])

Importing this package loads neither torch, datasets nor pyarrow; they load when first needed.
"""

from .collate import GroupBatch, collate, length_grouped_order, padding_tokens, shuffled_order
from .derive import (
    PAIR_STRATEGIES,
    Example,
    derive_examples,
    group_by_prompt,
    preference_scores,
    record_pairs,
    to_lists,
    to_pairs,
    to_triples,
    to_unpaired,
)
from .readers import LAYOUTS, detect_layout, jsonl_rows, load_records, split_conversations
from .schema import DataError, DataIssue, PreferenceRecord, format_issues
from .tokenize import (
    TokenizedExample,
    prompt_token_count,
    render_example,
    tokenize_example,
    tokenize_examples,
    truncation_counts,
)
from .validate import load_and_validate, record_issues, validate_records

__all__ = [
    "LAYOUTS",
    "jsonl_rows",
    "PAIR_STRATEGIES",
    "DataError",
    "DataIssue",
    "Example",
    "GroupBatch",
    "PreferenceRecord",
    "TokenizedExample",
    "collate",
    "derive_examples",
    "detect_layout",
    "format_issues",
    "group_by_prompt",
    "length_grouped_order",
    "load_and_validate",
    "load_records",
    "padding_tokens",
    "preference_scores",
    "prompt_token_count",
    "record_issues",
    "record_pairs",
    "render_example",
    "shuffled_order",
    "split_conversations",
    "to_lists",
    "to_pairs",
    "to_triples",
    "to_unpaired",
    "tokenize_example",
    "tokenize_examples",
    "truncation_counts",
    "validate_records",
]
