"""The registry is the one source: what it declares must agree with the functions it names, and the
shared numerical pieces must hold where precision is at stake."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from preftune.losses import TRIPLE_COLUMNS, Hyper, all_objectives, choices_text, get, names, register
from preftune.losses.functional import logsigmoid

OBJECTIVES = all_objectives()


@pytest.mark.parametrize("obj", OBJECTIVES, ids=lambda o: o.name)
def test_hyperparameter_defaults_equal_the_function_signature(obj):
    # Defaults are written twice (Hyper(...) and the signature); calling fn without a hyperparameter
    # must mean the same as the registry's default, and every hyperparameter must be a parameter.
    params = inspect.signature(obj.fn).parameters
    for name, hyper in obj.hyperparameters.items():
        assert name in params, f"{obj.name}: hyperparameter {name} is not a parameter of {obj.fn.__name__}"
        default = params[name].default
        assert default is not inspect.Parameter.empty, f"{obj.name}: {name} has no default in the signature"
        assert type(default) is type(hyper.default) and default == hyper.default, (
            f"{obj.name}: {name} defaults to {hyper.default!r} in the registry but {default!r} in the signature"
        )


@pytest.mark.parametrize("obj", OBJECTIVES, ids=lambda o: o.name)
def test_defaults_pass_their_own_range(obj):
    for name, hyper in obj.hyperparameters.items():
        assert hyper.check(hyper.default) is None, (obj.name, name)


def test_required_columns_are_the_inputs_only_the_data_gives():
    # Policy objectives: every declared input is derived from the data (labels, scores), computed by the
    # trainer (train/inputs.py), or a required column; nothing else, and nothing twice.
    from preftune.train.inputs import DATA_SOURCES, engine_keys

    for o in all_objectives("policy"):
        from_data = set(o.inputs) - engine_keys() - set(DATA_SOURCES)
        assert set(o.required_columns) == from_data, o.name
    assert get("sppo").required_columns == ("win_probs",)
    assert get("madpo").required_columns == ("rm_margin",)
    assert get("rm_bt_scaled").required_columns == ("preference_strength",)


def test_required_columns_must_be_inputs():
    with pytest.raises(ValueError, match="not among its inputs"):
        register("_bad", summary="", paper="", arxiv=None, inputs=("a",), required_columns=("b",))(lambda p, r: p)
    assert "_bad" not in names()


def test_data_needs_phrase_per_shape():
    assert get("tpo").columns == TRIPLE_COLUMNS == ("chosen", "rejected", "gold")
    assert get("tpo").data_needs.startswith("triples (chosen, rejected, gold): ")
    assert get("dpo").data_needs.startswith("preference pairs: prompt/chosen/rejected rows")
    assert get("kto").data_needs.startswith("unpaired labelled responses: prompt/completion/label rows")
    assert get("pro").data_needs.startswith("ranked lists of at least 2 responses per prompt")
    assert get("diffusion_dpo").data_needs.startswith("preference pairs of images/audio")


def test_names_by_what_they_train_and_the_choices_text():
    assert names(trains="reward_model") == ["rm_bt", "rm_bt_margin", "rm_bt_scaled", "rm_gpm", "rm_regression"]
    assert choices_text("reward_model") == "rm_bt, rm_bt_margin, rm_bt_scaled, rm_gpm or rm_regression"
    assert sorted(names("policy") + names("reward_model") + names("diffusion")) == names()
    assert choices_text("diffusion") == "diffusion_dpo or smpo_diffusion"


def test_hyper_range_text():
    assert Hyper(0.1, 0.0, None, low_open=True).range_text() == "(0, inf)"


@pytest.mark.parametrize("z", [-100.0, -50.0, -20.5, 0.0, 30.0])
def test_logsigmoid_float32_matches_float64(z):
    # log σ(z) ≈ z for very negative z and ≈ −e^{−z} for large z: both ends keep float32's relative
    # precision against a float64 reference, and so does the gradient σ(−z). (Beyond z ≈ 87, e^{−z}
    # is subnormal in float32 and no form keeps relative precision.)
    x = torch.tensor([z], dtype=torch.float32, requires_grad=True)
    x64 = torch.tensor([z], dtype=torch.float64, requires_grad=True)
    y, y64 = logsigmoid(x), torch.nn.functional.logsigmoid(x64)
    torch.testing.assert_close(y.double(), y64.detach(), rtol=2e-7, atol=0.0)
    (g,) = torch.autograd.grad(y.sum(), x)
    (g64,) = torch.autograd.grad(y64.sum(), x64)
    torch.testing.assert_close(g.double(), g64, rtol=2e-7, atol=0.0)


def test_logsigmoid_is_exact_in_float64_where_the_softplus_form_was_not():
    # −softplus(−z) returns z itself once −z passes softplus's threshold (20), dropping log1p(e^z):
    # up to 2e-9 absolute in float64 just below z = −20. Elsewhere the two forms agree to rounding.
    z = torch.linspace(-200, 200, 4001, dtype=torch.float64)
    old = -torch.nn.functional.softplus(-z)
    torch.testing.assert_close(logsigmoid(z), old, rtol=1e-10, atol=0.0)
    # float32: a few ulps apart (two kernels; for large z the value −e^{−z} has relative error ~z·eps
    # in either form), and both underflow to ~0 past z ≈ 87.
    torch.testing.assert_close(logsigmoid(z.float()), -torch.nn.functional.softplus(-z.float()), rtol=1e-5, atol=1e-37)
    exact = -25.0 - math.log1p(math.exp(-25.0))
    assert float(logsigmoid(torch.tensor(-25.0, dtype=torch.float64))) == exact
    minus25 = torch.tensor(-25.0, dtype=torch.float64)
    assert float(-torch.nn.functional.softplus(-minus25)) == -25.0 != exact
