"""Recipe validation: every bad recipe stops with one line naming the file, the field and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from velora_cli.common.errors import RecipeError
from velora_cli.config.load import apply_overrides, load_recipe, validate_recipe
from velora_cli.config.recipe import VeloraSection, expand_layer_names

BASE = {"data": {"path": "train.json"}}


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def with_section(section: str, **fields) -> dict:
    recipe = {"data": {"path": "train.json"}}
    recipe.setdefault(section, {}).update(fields)
    return recipe


BAD_RECIPES = [
    ({"data": {"path": "x.json"}, "trian": {}}, "unknown field 'trian' (did you mean 'train'?)"),
    (with_section("train", learning_rat=1e-4), "unknown field 'train.learning_rat' (did you mean 'learning_rate'?)"),
    (with_section("lora", rank=8), "unknown field 'lora.rank'"),
    ({"model": {"name": "x"}}, "missing required field 'data'"),
    (with_section("train", micro_batch_size="abc"), "train.micro_batch_size='abc': Input should be a valid integer"),
    (with_section("train", micro_batch_size=3, batch_size=16), "batch_size 16 is not a multiple of micro_batch_size 3"),
    (
        with_section("model", quantization="nf3"),
        "model.quantization='nf3': Input should be 'nf4', 'fp4', 'int8' or 'none'",
    ),
    (with_section("lora", dropout=1.5), "lora.dropout=1.5: Input should be less than 1"),
    (with_section("velora", num_groups=0), "velora.num_groups=0: must be a positive integer"),
    (with_section("velora", num_groups="many"), "velora.num_groups='many': must be an integer"),
    (with_section("velora", num_groups={"v": 8}), "velora.num_groups: no count for layer 'down_proj'"),
    (with_section("velora", scale=float("inf")), "velora.scale=inf: Input should be a finite number"),
    (with_section("velora", ema_decay=1.0), "velora.ema_decay=1.0: must be in (0, 1)"),
    (with_section("velora", num_groups=8, subtoken_size=16), "set either num_groups or subtoken_size, not both"),
    (with_section("velora", init="mean"), "velora.init='mean': Input should be"),
    (
        {"data": {"path": "t.json"}, "lora": {"target_modules": ["q", "v"]}, "velora": {"layers": ["d"]}},
        "velora.layers ['down_proj'] are not LoRA targets",
    ),
    (with_section("train", scheduler="cosin"), "train.scheduler='cosin': Input should be"),
    ("model: [unclosed", "invalid YAML at line 1"),
    ("- just\n- a list\n", "a recipe is a mapping of sections, got list"),
]


@pytest.mark.parametrize(("data", "message"), BAD_RECIPES, ids=[m[:40] for _, m in BAD_RECIPES])
def test_bad_recipes_name_the_field(tmp_path: Path, data, message: str) -> None:
    path = write(tmp_path, data)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: ") and message in text, text


def test_defaults_and_letter_expansion(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, BASE))
    assert recipe.name == "recipe"  # defaults to the file name
    assert recipe.lora.module_names == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert recipe.velora.module_names == ["v_proj", "down_proj"] and recipe.velora.num_groups == 32
    assert recipe.model.trust_remote_code is False  # safe by default
    assert expand_layer_names(["vd", "o_proj", "mlp.*"]) == ["v_proj", "down_proj", "o_proj", "mlp.*"]


def test_overrides_are_typed_and_validated(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    recipe = load_recipe(
        path,
        [
            "train.learning_rate=2e-4",
            "velora.num_groups=64",
            "velora.layers=[q, v]",
            "lora.target_modules=[q,v]",
            "model.quantization=none",
        ],
    )
    assert recipe.train.learning_rate == 2e-4 and recipe.velora.num_groups == 64
    assert recipe.velora.module_names == ["q_proj", "v_proj"] and recipe.model.quantization == "none"
    with pytest.raises(RecipeError, match=r"unknown field 'train.learning_rat' \(did you mean 'learning_rate'\?\)"):
        load_recipe(path, ["train.learning_rat=1"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(path, ["train.learning_rate"])
    with pytest.raises(RecipeError, match="'data' is not a section|data.path"):
        apply_overrides({"data": "x"}, ["data.path=y"])


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_velora_section_becomes_the_engine_config() -> None:
    cfg = VeloraSection(layers=["vd"], subtoken_size=16, init="ema", scale=0.1).to_config()
    assert cfg.patterns == ["v_proj", "down_proj"] and cfg.subtoken_size == 16 and cfg.num_groups is None
    assert cfg.subtoken_size_for(64, "x") == 16 and cfg.init == "ema" and cfg.scale == 0.1
    assert VeloraSection().to_config().num_groups == 32
    per_type = VeloraSection(layers=["v", "d"], num_groups={"v": 64, "d": 86}).to_config()
    assert per_type.groups_for("model.layers.0.mlp.down_proj") == 86


def test_shape_errors_from_the_engine_name_the_recipe_field(tiny_llama_dir: Path) -> None:
    """A grouping that does not divide a layer's depth is the engine's ValueError, reported as the recipe's field."""
    import torch

    from velora_cli.models.build import build_training_model

    recipe = validate_recipe(
        {"model": {"name": str(tiny_llama_dir), "quantization": "none"}, "data": {"path": "x.json"},
         "velora": {"layers": ["v"], "num_groups": 5}}
    )  # fmt: skip
    with pytest.raises(RecipeError, match=r"^velora\.num_groups=5: layer .*v_proj has input depth 64"):
        build_training_model(recipe, torch.device("cpu"))
