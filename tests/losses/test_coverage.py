"""Which kinds of tests cover each registered objective. Every name in ``preftune.losses.names()`` must
have an entry (a new objective without tests fails here).

Kinds: golden (LOSSES.md Appendix A or a hand-derived value), parity (independent float64 formula,
loss and gradients, B = 1 and B = 7), property (limits, reductions, invariances), stability (finite
loss and gradients at |Δ| ≈ 1e4 in float32), state (state_dict round trip / resume), trl (one loss
evaluation through TRL 1.16's trainer on the same tiny models and batch equals preftune's,
tests/losses/test_trl_parity*.py).

Keep it a literal dict, one line per objective; several engineers append to it.
"""

from preftune.losses import names

KINDS = {"golden", "parity", "property", "stability", "state", "trl"}

COVERAGE = {
    # Part A — tests/losses/test_pairwise.py
    "dpo": {"golden", "parity", "property", "stability", "trl"},
    "cdpo": {"golden", "parity", "property", "stability"},
    "rdpo": {"golden", "parity", "property", "stability", "trl"},
    "ipo": {"golden", "parity", "stability", "trl"},
    "ipo_sum": {"golden", "parity", "stability"},
    "hinge": {"golden", "parity", "stability", "trl"},
    "dpo_nll": {"golden", "parity", "stability", "trl"},
    "rpo_liu2024": {"parity", "property", "stability"},
    "fdpo_forward_kl": {"golden", "parity", "property", "stability", "trl"},
    "fdpo_js": {"golden", "parity", "stability", "trl"},
    "fdpo_alpha": {"golden", "parity", "property", "stability", "trl"},
    "exo_pair": {"golden", "parity", "property", "stability", "trl"},
    "nca_pair": {"golden", "parity", "stability", "trl"},
    "bco_pair": {"golden", "parity", "property", "stability", "state", "trl"},
    "apo_zero": {"golden", "parity", "property", "stability", "trl"},
    "apo_down": {"golden", "parity", "stability", "trl"},
    "beta_dpo": {"parity", "property", "stability", "state"},
    "madpo": {"parity", "property", "stability"},
    "ld_dpo": {"parity", "property", "stability", "trl"},
    "sem_dpo": {"parity", "property", "stability"},
    "adpo": {"parity", "property", "stability"},
    "modpo": {"golden", "parity", "property", "stability"},  # tests/losses/test_modpo.py
    "rdpo_rationale": {"golden", "parity", "property", "stability"},  # tests/losses/test_rationale.py
    "rorpo_rationale": {"golden", "parity", "property", "stability"},  # tests/losses/test_rationale.py
    "simpo": {"golden", "parity", "property", "stability", "trl"},
    "orpo": {"golden", "parity", "stability", "trl"},
    # Part B — tests/losses/test_reference_free.py
    "cpo": {"golden", "parity", "property", "stability", "trl"},
    "slic_hf": {"golden", "parity", "property", "stability"},
    "asft": {"golden", "parity", "stability"},
    "tpo": {"golden", "parity", "property", "stability"},
    "tpo_l": {"parity", "property", "stability"},
    # Part C — tests/losses/test_unpaired.py
    "kto": {"golden", "parity", "property", "stability", "trl"},
    "bco": {"parity", "property", "stability", "state"},
    "apo_zero_unpaired": {"parity", "property", "stability", "trl"},
    # Parts D–H (token, self-play, listwise, reward, diffusion): append below, one line per objective.
    # Part D — tests/losses/test_token.py
    "tdpo1": {"golden", "parity", "property", "stability"},
    "tdpo2": {"golden", "parity", "property", "stability"},
    "sparsepo": {"golden", "parity", "property", "stability"},  # = sparsepo_learned; tests/losses/test_sparsepo.py
    "sparsepo_learned": {"golden", "parity", "property", "stability", "state"},  # state: tests/train
    "sparsepo_mapo": {"golden", "parity", "property", "stability"},
    "tgdpo": {"parity", "property", "stability"},
    "oreo": {"golden", "parity", "property", "stability"},  # tests/losses/test_oreo.py
    "oreo_value": {"golden", "parity", "property", "stability", "state"},  # state: tests/train/test_oreo_train.py
    # Part E — tests/losses/test_selfplay.py
    "sppo": {"golden", "parity", "property", "stability"},
    "sppo_single": {"parity", "stability"},
    "sppo_hard": {"golden", "parity", "property", "stability", "trl"},
    "dno": {"parity", "property", "stability"},
    "inpo": {"golden", "parity", "property", "stability"},
    # Part F — tests/losses/test_listwise.py
    "pro": {"parity", "property", "stability"},
    "irpo_ranking": {"parity", "property", "stability"},
    "nca_k": {"parity", "property", "stability"},
    "infonca_k": {"parity", "property", "stability"},
    "exo_k": {"parity", "property", "stability"},
    "adpo_list": {"parity", "property", "stability"},
    "brain": {"golden", "parity", "property", "stability"},  # tests/losses/test_brain.py
    "tpo_tree": {"golden", "parity", "property", "stability"},  # tests/losses/test_tpo_tree.py
    "mapl_intra": {"golden", "parity", "stability"},  # tests/losses/test_mapl.py
    "mapl_inter": {"golden", "parity", "stability"},  # tests/losses/test_mapl.py
    # Part G — tests/losses/test_reward_losses.py
    "rm_bt": {"golden", "parity", "stability"},
    "rm_bt_margin": {"golden", "parity", "stability"},
    "rm_bt_scaled": {"golden", "parity", "stability"},
    "rm_regression": {"parity", "property"},
    "rm_gpm": {"golden", "parity", "property", "stability"},
    # Part H — tests/losses/test_diffusion.py
    "diffusion_dpo": {"golden", "parity", "property", "stability"},
    "smpo_diffusion": {"parity", "property", "stability"},
}


def test_every_registered_objective_has_coverage():
    missing = sorted(set(names()) - set(COVERAGE))
    assert not missing, f"objectives without a COVERAGE entry (add tests, then a line here): {missing}"


def test_coverage_entries_are_registered_and_well_formed():
    stale = sorted(set(COVERAGE) - set(names()))
    assert not stale, f"COVERAGE lists objectives that are not registered: {stale}"
    for name, kinds in COVERAGE.items():
        assert kinds and kinds <= KINDS, f"{name}: unknown test kinds {sorted(kinds - KINDS)}"
        assert kinds & {"golden", "parity"}, f"{name}: needs a golden value or a float64 parity test"


def test_trl_kind_matches_the_trl_parity_tests():
    """An objective marked "trl" is named in a TRL parity test, and one the parity tests name is marked."""
    import re
    from pathlib import Path

    text = "".join(p.read_text(encoding="utf-8") for p in Path(__file__).parent.glob("test_trl_parity*.py"))
    named = {n for n in names() if re.search(rf'"{re.escape(n)}"', text)}
    marked = {n for n, kinds in COVERAGE.items() if "trl" in kinds}
    assert marked == named, f"marked, untested: {sorted(marked - named)}; tested, unmarked: {sorted(named - marked)}"
