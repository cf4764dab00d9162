from pathlib import Path

import pytest

from isdretrieve.data.augment import view_config
from isdretrieve.errors import RecipeError
from isdretrieve.train.recipe import IsdConfig, MocoConfig, load_recipe, recipe_from_data
from isdretrieve.train.schedule import learning_rate

RECIPES = sorted((Path(__file__).resolve().parents[1] / "training").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.optim.batch_size > 0


def test_method_section_picks_its_dataclass():
    assert isinstance(recipe_from_data({"method": "moco"}).method, MocoConfig)
    r = recipe_from_data({"method": {"name": "isd", "variant": "mlp", "tau_teacher": 0.02}})
    assert r.method == IsdConfig(variant="mlp", tau_teacher=0.02)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"optim": {"lrr": 0.1}}, "unknown key 'optim.lrr'"),
        ({"optim": {"lr": "fast"}}, "optim.lr: expected a number"),
        ({"optim": {"batch_size": 1.5}}, "optim.batch_size: expected an integer"),
        ({"method": {"name": "isd", "tau": 0.1}}, "unknown key 'method.tau'"),
        ({"method": "simclr"}, "method.name: expected one of isd, moco, byol"),
        ({"engine": {"precision": "fp8"}}, "engine.precision: expected one of"),
        ({"optim": {"milestones": 3}}, "optim.milestones: expected a list"),
        ({"optim": {"epochs": 0}}, "optim.epochs: must be positive"),
        ({"bogus": 1}, "unknown key 'bogus'"),
    ],
)
def test_bad_recipes_name_the_key(data, message):
    with pytest.raises(RecipeError, match=message.replace(".", r"\.")):
        recipe_from_data(data)


def test_augment_section_sets_dino_views_scales_and_local_size():
    augment = recipe_from_data(
        {"augment": {"global_scale": [0.3, 1.0], "local_scale": [0.1, 0.5], "local_size": 12,
                     "crop_scale": [0.5, 1.0], "blur_p": 0.0}}
    ).augment  # fmt: skip
    g2 = augment.apply(view_config("dino_global2", "cifar"), "dino_global2")
    assert (g2.size, g2.scale, g2.blur_p, g2.solarize_p) == (32, (0.3, 1.0), 0.1, 0.2)  # blur_p: strong only
    local = augment.apply(view_config("dino_local", "cifar"), "dino_local")
    assert (local.size, local.scale, local.blur_p) == (12, (0.1, 0.5), 0.5)
    strong = augment.apply(view_config("strong", "cifar"), "strong")
    assert (strong.scale, strong.blur_p) == ((0.5, 1.0), 0.0)
    with pytest.raises(RecipeError, match=r"augment\.local_size: must be positive"):
        recipe_from_data({"augment": {"local_size": 0}})


def test_overrides_and_yaml_exponents(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("method: {name: isd}\noptim: {weight_decay: 5e-4, lr: 0.1}\n")
    r = load_recipe(path, ["optim.lr=0.2", "method.queue_size=128", "engine.channels_last=true"])
    assert (r.optim.lr, r.optim.weight_decay, r.method.queue_size, r.engine.channels_last) == (
        0.2,
        5e-4,
        128,
        True,
    )
    with pytest.raises(RecipeError, match="unknown key 'optim.foo'"):
        load_recipe(path, ["optim.foo=1"])
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")


def test_schedules():
    o = recipe_from_data({"optim": {"lr": 1.0, "warmup_epochs": 1, "schedule": "cosine"}}).optim
    lrs = [learning_rate(o, s, steps_per_epoch=10, total_steps=100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] < 0.001
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    s = recipe_from_data({"optim": {"lr": 1.0, "schedule": "step", "milestones": [2, 4], "gamma": 0.2}}).optim
    assert [learning_rate(s, e * 10, 10, 60) for e in range(6)] == pytest.approx([1, 1, 0.2, 0.2, 0.04, 0.04])
