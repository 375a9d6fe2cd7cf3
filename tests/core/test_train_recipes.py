"""Named training recipes: fixed field values, the rest of the parameters kept; the CLI maps --recipe to them."""

from __future__ import annotations

import pytest

from personabot.core.train_params import RECIPE_FIELDS, RECIPES, TrainParams


def test_seeds_is_the_starting_recipe_and_default_is_the_field_defaults() -> None:
    assert RECIPES["seeds"] == {"epochs": 10, "learning_rate": 1e-4, "lora_rank": 8, "lora_alpha": 32,
                                "identity_oversample": 1, "faq_oversample": 1}
    defaults = TrainParams()
    assert RECIPES["default"] == {name: getattr(defaults, name) for name in RECIPE_FIELDS}
    assert set(RECIPES["seeds"]) == set(RECIPE_FIELDS) == set(RECIPES["7b"])
    assert RECIPES["7b"]["learning_rate"] == 1e-4 and RECIPES["7b"]["epochs"] == 1


def test_a_recipe_keeps_the_other_fields() -> None:
    params = TrainParams(general_data=["/data/general.jsonl#50"], speed_mode="24gb", epochs=3)
    seeds = params.with_recipe("seeds")
    assert seeds.epochs == 10 and seeds.learning_rate == 1e-4
    assert seeds.general_data == ["/data/general.jsonl#50"] and seeds.speed_mode == "24gb"
    assert seeds.with_recipe("default").model_dump() == params.updated(epochs=TrainParams().epochs).model_dump()


def test_an_unknown_recipe_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown recipe 'fastest'; choose one of default, seeds, 7b"):
        TrainParams().with_recipe("fastest")


def test_cli_train_takes_a_recipe_and_flags_override_it(settings_env, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    from personabot.cli import build_parser, train_params

    settings = settings_env()
    params = train_params(settings, build_parser().parse_args(["train", "--recipe", "seeds", "--epochs", "4"]))
    assert params.epochs == 4 and params.learning_rate == 1e-4 and params.identity_oversample == 1
    assert params.faq_oversample == 1
    flags = ["train", "--recipe", "seeds", "--identity-oversample", "4", "--faq-oversample", "12"]
    repeated = train_params(settings, build_parser().parse_args(flags))
    assert (repeated.identity_oversample, repeated.faq_oversample, repeated.epochs) == (4, 12, 10)
    assert params.general_data == settings.training.general_data
    assert train_params(settings, build_parser().parse_args(["train"])).model_dump() == settings.training.model_dump()
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["train", "--recipe", "nope"])
    assert exit_info.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
