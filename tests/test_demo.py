"""The README's demo: ISD on digits beats the randomly initialised encoder under the same k-NN protocol."""

from pathlib import Path

import pytest

from isdretrieve.train import Trainer, load_recipe

DEMO = Path(__file__).resolve().parents[1] / "training" / "digits-isd.yaml"


@pytest.mark.slow
def test_digits_demo_beats_random_init(tmp_path):
    recipe = load_recipe(DEMO, ["monitor.every=100"])  # the k-NN before and after training only
    result = Trainer(recipe, tmp_path, quiet=True).fit()
    assert result.knn.k == 20 and result.knn.temperature == 0.07 and result.knn.test_size == 450
    assert result.knn.top1 > result.knn_init.top1, (result.knn_init, result.knn)
