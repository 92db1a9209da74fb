"""Hugging Face data sets from local files (save_to_disk folders, parquet/arrow files) and Flower Datasets
partitioners by name. Every file is written here, in the real format, tiny; nothing touches the network."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fedsim.data import load_dataset
from fedsim.data.flwr_partitions import ROW_COLUMN, flwr_partition, list_partitioners, partition_table
from fedsim.data.hf import import_datasets, load_hf_split
from fedsim.errors import FedsimError

N_TRAIN, N_TEST, SIDE = 60, 24, 8
WRITERS = ["w3", "w0", "w2", "w1", "w4"]


def _rows(n: int, seed: int, rgb: bool = False) -> dict[str, list]:
    from PIL import Image as PILImage

    rng = np.random.default_rng(seed)
    shape = (SIDE, SIDE, 3) if rgb else (SIDE, SIDE)
    pixels = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    return {
        "image": [PILImage.fromarray(p) for p in pixels],
        "label": [int(v) for v in rng.permutation(np.arange(n) % 3)],
        "writer_id": [WRITERS[i % len(WRITERS)] for i in rng.permutation(n)],
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    datasets = import_datasets()
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

    root = tmp_path_factory.mktemp("hf")
    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b", "c", "d"]), "writer_id": Value("string")})
    train = Dataset.from_dict(_rows(N_TRAIN, 0), features=features)
    test = Dataset.from_dict(_rows(N_TEST, 1), features=features)
    datasets.disable_progress_bars()
    DatasetDict(train=train, test=test).save_to_disk(str(root / "tiny_dd"))
    Dataset.from_dict(_rows(N_TRAIN, 2)).cast_column("image", Image()).to_parquet(str(root / "tiny.parquet"))
    Dataset.from_dict(_rows(N_TEST, 3)).cast_column("image", Image()).to_parquet(str(root / "tiny_test.parquet"))
    Dataset.from_dict(_rows(12, 4, rgb=True)).cast_column("image", Image()).to_parquet(str(root / "rgb.parquet"))
    arrays = np.random.default_rng(5).random((12, 3, 4, 5)).astype(np.float32)
    Dataset.from_dict({"pixels": list(arrays), "y": [i % 2 for i in range(12)]}).to_parquet(str(root / "arrays.parquet"))
    Dataset.from_dict({"image": [np.zeros((2, 2), np.uint8)] * 4, "label": ["cat", "dog"] * 2}).to_parquet(
        str(root / "text_labels.parquet"))
    (root / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    (root / "not_a_dataset").mkdir()
    (root / "not_a_dataset" / "notes.txt").write_text("hello")
    datasets.enable_progress_bars()
    return {"root": str(root), "folder": str(root / "tiny_dd")}


def _raw(table, column: str = "image") -> np.ndarray:
    return np.asarray(table.select_columns([column]).with_format("numpy")[:][column])


# ----------------------------------------------------------------------------------------------- loader


def test_save_to_disk_folder_shapes_classes_and_table(files: dict[str, str]) -> None:
    split = load_hf_split(0.2, 0, normalise=False, data_dir=files["root"], path="tiny_dd")
    x, y = split.train.tensors
    assert x.shape == (N_TRAIN, 1, SIDE, SIDE) and x.dtype == torch.float32
    assert y.shape == (N_TRAIN,) and y.dtype == torch.int64
    assert split.test.tensors[0].shape == (N_TEST, 1, SIDE, SIDE) and len(split.test) == N_TEST
    assert split.info.name == "hf:tiny_dd" and split.info.input_shape == (1, SIDE, SIDE)
    assert split.info.num_classes == 4  # from the ClassLabel feature, not max(label) + 1
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    # Row i of the table is train sample i, pixels / 255.
    assert len(split.table) == N_TRAIN
    np.testing.assert_array_equal((x[:, 0].numpy() * 255).round().astype(np.uint8), _raw(split.table))
    np.testing.assert_array_equal(y.numpy(), _raw(split.table, "label"))
    assert split.clients is None


def test_registered_and_normalised_with_train_statistics(files: dict[str, str]) -> None:
    split = load_dataset("hf", data_dir=files["root"], path=files["folder"])  # absolute path too
    x = split.train.tensors[0]
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std(unbiased=False)) - 1) < 1e-4
    raw = load_hf_split(0.2, 0, normalise=False, data_dir=files["root"], path="tiny_dd").train.tensors[0]
    expected = (raw - raw.mean()) / raw.std(unbiased=False)
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)


def test_client_column_groups_train_and_test_rows(files: dict[str, str]) -> None:
    split = load_hf_split(0.2, 0, data_dir=files["root"], path="tiny_dd", client_column="writer_id")
    clients = split.clients
    assert clients is not None and clients.names == tuple(sorted(WRITERS))
    train_writers, test_writers = _raw(split.table, "writer_id"), None
    from datasets import load_from_disk

    test_writers = np.asarray(load_from_disk(files["folder"])["test"]["writer_id"][:])
    seen_train, seen_test = [], []
    for k, name in enumerate(clients.names):
        assert (train_writers[clients.train_indices(k)] == name).all()
        assert (test_writers[clients.test_indices(k)] == name).all()
        assert list(clients.train_indices(k)) == sorted(clients.train_indices(k))
        seen_train += list(clients.train_indices(k))
        seen_test += list(clients.test_indices(k))
    assert sorted(seen_train) == list(range(N_TRAIN)) and sorted(seen_test) == list(range(N_TEST))


def test_parquet_without_test_split_is_split_stratified_and_seeded(files: dict[str, str]) -> None:
    split = load_hf_split(0.25, 3, normalise=False, data_dir=files["root"], data_files="tiny.parquet",
                          client_column="writer_id")
    x, y = split.train.tensors
    assert len(split.train) == 45 and len(split.test) == 15 and split.info.name == "hf:tiny"
    assert split.info.num_classes == 3  # plain integer labels: max + 1
    assert np.bincount(split.test.tensors[1].numpy()).tolist() == [5, 5, 5]  # stratified
    # The table stays aligned with the train tensors after the split.
    np.testing.assert_array_equal((x[:, 0].numpy() * 255).round().astype(np.uint8), _raw(split.table))
    np.testing.assert_array_equal(y.numpy(), _raw(split.table, "label"))
    assert sum(len(split.clients.train_indices(k)) for k in range(split.clients.num_clients)) == 45
    assert sum(len(split.clients.test_indices(k)) for k in range(split.clients.num_clients)) == 15
    again = load_hf_split(0.25, 3, normalise=False, data_dir=files["root"], data_files="tiny.parquet")
    assert torch.equal(again.train.tensors[0], x)
    other = load_hf_split(0.25, 4, normalise=False, data_dir=files["root"], data_files="tiny.parquet")
    assert not torch.equal(other.train.tensors[1], y)


def test_data_files_forms_lists_globs_tables_and_arrow(files: dict[str, str]) -> None:
    root = files["root"]
    two = load_hf_split(0.25, 0, normalise=False, data_dir=root, data_files=["tiny.parquet", "tiny_test.parquet"])
    assert len(two.train) + len(two.test) == N_TRAIN + N_TEST
    table = load_hf_split(0.25, 0, data_dir=root, data_files={"train": "tiny.parquet", "test": ["tiny_test.parquet"]})
    assert (len(table.train), len(table.test)) == (N_TRAIN, N_TEST)
    globbed = load_hf_split(0.25, 0, data_dir=root, data_files="tiny*.parquet")
    assert len(globbed.train) + len(globbed.test) == N_TRAIN + N_TEST
    arrow = load_hf_split(0.2, 0, normalise=False, data_dir=root,
                          data_files={"train": "tiny_dd/train/*.arrow", "test": "tiny_dd/test/*.arrow"})
    folder = load_hf_split(0.2, 0, normalise=False, data_dir=root, path="tiny_dd")
    assert torch.equal(arrow.train.tensors[0], folder.train.tensors[0]) and arrow.info.num_classes == 4


def test_colour_images_and_array_columns(files: dict[str, str]) -> None:
    rgb = load_hf_split(0.25, 0, normalise=False, data_dir=files["root"], data_files="rgb.parquet")
    assert rgb.train.tensors[0].shape == (9, 3, SIDE, SIDE)
    hwc = _raw(rgb.table)  # [N, H, W, 3] as PIL gives it
    np.testing.assert_array_equal((rgb.train.tensors[0].numpy() * 255).round().astype(np.uint8),
                                  hwc.transpose(0, 3, 1, 2))
    grey = load_hf_split(0.25, 0, normalise=False, data_dir=files["root"], data_files="rgb.parquet", image_mode="L")
    assert grey.train.tensors[0].shape == (9, 1, SIDE, SIDE)
    arrays = load_hf_split(0.5, 0, normalise=False, data_dir=files["root"], data_files="arrays.parquet",
                           image_column="pixels", label_column="y")
    assert arrays.train.tensors[0].shape == (6, 3, 4, 5) and arrays.info.num_classes == 2
    np.testing.assert_array_equal(arrays.train.tensors[0].numpy(), _raw(arrays.table, "pixels"))  # floats as stored


def test_errors_name_the_path_and_what_to_do(files: dict[str, str]) -> None:
    root = files["root"]
    with pytest.raises(FedsimError, match=r"absent_dd not found.*save_to_disk.*parquet") as missing:
        load_hf_split(0.2, 0, data_dir=root, path="absent_dd")
    assert os.path.join(root, "absent_dd") in str(missing.value) and "\n" not in str(missing.value)
    with pytest.raises(FedsimError, match=r"nothing\.parquet not found.*save_to_disk"):
        load_hf_split(0.2, 0, data_dir=root, data_files="nothing.parquet")
    with pytest.raises(FedsimError, match=r"nope-\*\.parquet not found"):
        load_hf_split(0.2, 0, data_dir=root, data_files="nope-*.parquet")
    with pytest.raises(FedsimError, match=r"not_a_dataset is not a readable save_to_disk folder") as bad:
        load_hf_split(0.2, 0, data_dir=root, path="not_a_dataset")
    assert "\n" not in str(bad.value)
    with pytest.raises(FedsimError, match=r"broken\.parquet is not a readable parquet file"):
        load_hf_split(0.2, 0, data_dir=root, data_files="broken.parquet")
    with pytest.raises(FedsimError, match=r"no column 'img'.*available columns: image, label, writer_id"):
        load_hf_split(0.2, 0, data_dir=root, path="tiny_dd", image_column="img")
    with pytest.raises(FedsimError, match=r"no column 'client'.*available columns: image, label, writer_id"):
        load_hf_split(0.2, 0, data_dir=root, path="tiny_dd", client_column="client")
    with pytest.raises(FedsimError, match=r"label column 'label' is not integer"):
        load_hf_split(0.5, 0, data_dir=root, data_files="text_labels.parquet")
    with pytest.raises(FedsimError, match=r"no split 'training'.*splits: train, test"):
        load_hf_split(0.2, 0, data_dir=root, path="tiny_dd", train_split="training")
    with pytest.raises(FedsimError, match=r"unknown option.*data\.options\.imge_column"):
        load_hf_split(0.2, 0, data_dir=root, path="tiny_dd", imge_column="image")
    with pytest.raises(FedsimError, match=r"exactly one of data\.options\.path"):
        load_hf_split(0.2, 0, data_dir=root)


def test_offline_mode_is_set_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import_datasets()
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    import_datasets()
    assert os.environ["HF_DATASETS_OFFLINE"] == "0"


# ----------------------------------------------------------------------------------------------- Flower Datasets


def _independent(name: str, **kwargs):
    import flwr_datasets.partitioner as fp

    return getattr(fp, name)(**kwargs)


CASES = [
    ("IidPartitioner", {}, {"num_partitions": 4}),
    ("DirichletPartitioner", {"alpha": 0.5, "partition_by": "label", "min_partition_size": 2},
     {"num_partitions": 4, "alpha": 0.5, "partition_by": "label", "min_partition_size": 2, "seed": 11}),
    ("NaturalIdPartitioner", {"partition_by": "writer_id"}, {"partition_by": "writer_id"}),
    ("ShardPartitioner", {"partition_by": "label", "num_shards_per_partition": 2},
     {"num_partitions": 4, "partition_by": "label", "num_shards_per_partition": 2, "seed": 11}),
]


@pytest.mark.filterwarnings("ignore:Specifying null_placement:FutureWarning")  # datasets' sort on pyarrow 25+
@pytest.mark.parametrize("name,options,flower_kwargs", CASES, ids=[c[0] for c in CASES])
def test_clients_train_on_exactly_the_rows_flower_returns(files: dict[str, str], name: str, options: dict,
                                                          flower_kwargs: dict) -> None:
    split = load_hf_split(0.2, 0, normalise=False, data_dir=files["root"], path="tiny_dd",
                          client_column="writer_id")
    parts = flwr_partition(split, name, options, num_partitions=4, seed=11)
    reference = _independent(name, **flower_kwargs)
    reference.dataset = split.table  # the user's own table, without fedsim's row column
    assert len(parts) == reference.num_partitions
    x, y = split.train.tensors
    for k, rows in enumerate(parts):
        expected = reference.load_partition(k)
        assert len(rows) == len(expected) > 0
        # What fedsim trains client k on, row by row, is what Flower's partition holds.
        np.testing.assert_array_equal((x[rows, 0].numpy() * 255).round().astype(np.uint8), _raw(expected))
        np.testing.assert_array_equal(y[rows].numpy(), _raw(expected, "label"))
        np.testing.assert_array_equal(_raw(split.table, "writer_id")[rows], _raw(expected, "writer_id"))
    covered = sorted(np.concatenate(parts).tolist())
    assert len(set(covered)) == len(covered)  # no row in two partitions
    if name != "ShardPartitioner":  # (shards drop an incomplete last shard)
        assert covered == list(range(N_TRAIN))
    if name == "NaturalIdPartitioner":  # Flower numbers writers as the loader's natural clients do
        assert len(parts) == len(WRITERS)
        for k, rows in enumerate(parts):
            assert sorted(rows) == list(split.clients.train_indices(k))


@pytest.mark.parametrize("name,options,flower_kwargs", [
    ("IidPartitioner", {}, {"num_partitions": 5}),
    ("DirichletPartitioner", {"alpha": 0.5, "partition_by": "label"},
     {"num_partitions": 5, "alpha": 0.5, "partition_by": "label", "seed": 3}),
], ids=["iid", "dirichlet"])
def test_digits_by_label(name: str, options: dict, flower_kwargs: dict) -> None:
    from datasets import Dataset

    split = load_dataset("digits")
    assert split.table is None
    parts = flwr_partition(split, name, options, num_partitions=5, seed=3)
    reference = _independent(name, **flower_kwargs)
    reference.dataset = Dataset.from_dict({"label": split.train.tensors[1].numpy()})
    assert len(parts) == 5
    for k, rows in enumerate(parts):
        np.testing.assert_array_equal(split.train.tensors[1][rows].numpy(), _raw(reference.load_partition(k), "label"))
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(split.train)))


def test_split_table_view_partitions_like_flower(files: dict[str, str]) -> None:
    """Without a test split the table is a select()ed view of the file; rows still match Flower's."""
    split = load_hf_split(0.25, 0, normalise=False, data_dir=files["root"], data_files="tiny.parquet")
    parts = flwr_partition(split, "NaturalIdPartitioner", {"partition_by": "writer_id"}, num_partitions=1, seed=0)
    reference = _independent("NaturalIdPartitioner", partition_by="writer_id")
    reference.dataset = split.table
    assert len(parts) == len(WRITERS)
    for k, rows in enumerate(parts):
        expected = reference.load_partition(k)
        np.testing.assert_array_equal((split.train.tensors[0][rows, 0].numpy() * 255).round().astype(np.uint8),
                                      _raw(expected))
        np.testing.assert_array_equal(split.train.tensors[1][rows].numpy(), _raw(expected, "label"))


@pytest.mark.filterwarnings("ignore:The sum of partition sizes")
def test_user_seed_wins_and_sizes_decide_the_count(files: dict[str, str]) -> None:
    split = load_dataset("digits")
    options = {"alpha": 0.3, "partition_by": "label", "seed": 5}
    mine = flwr_partition(split, "DirichletPartitioner", options, num_partitions=3, seed=999)
    again = flwr_partition(split, "DirichletPartitioner", options, num_partitions=3, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(mine, again, strict=True))
    sized = flwr_partition(split, "SizePartitioner", {"partition_sizes": [10, 20, 30]}, num_partitions=8, seed=0)
    assert [len(p) for p in sized] == [10, 20, 30]
    table = partition_table(split)
    assert table.column_names == ["label", ROW_COLUMN]


def test_partitioner_list_and_refusals(files: dict[str, str]) -> None:
    names = list_partitioners()
    assert {"IidPartitioner", "DirichletPartitioner", "NaturalIdPartitioner", "ShardPartitioner",
            "SizePartitioner", "LinearPartitioner"} <= set(names)
    assert not any(n.startswith("Vertical") for n in names)
    assert "Partitioner" not in names and "IdToSizeFncPartitioner" not in names
    split = load_dataset("digits")
    for name, reason in [("VerticalSizePartitioner", "split columns"), ("Partitioner", "abstract"),
                         ("IdToSizeFncPartitioner", "Python function")]:
        with pytest.raises(FedsimError, match=rf"'{name}' cannot be used: .*{reason}.*allowed: .*IidPartitioner"):
            flwr_partition(split, name, {}, 4, 0)
    with pytest.raises(FedsimError, match=r"unknown Flower Datasets partitioner 'DirichletPartitionr'; allowed: "
                                          r".*DirichletPartitioner.*IidPartitioner.*NaturalIdPartitioner"):
        flwr_partition(split, "DirichletPartitionr", {}, 4, 0)


def test_partitioner_option_errors_name_the_argument_and_value(files: dict[str, str]) -> None:
    split = load_dataset("digits")
    cases = [
        ({"alpha": 0.5, "partition_by": "label", "alfa": 1}, r"unknown argument 'alfa' = 1; its arguments: "),
        ({"alpha": "big", "partition_by": "label"}, r"argument 'alpha' = 'big' is not "),
        ({"alpha": 0.5, "partition_by": "writer"}, r"'partition_by' = 'writer' is not a column.*columns: label"),
        ({"partition_by": "label"}, r"missing argument\(s\) alpha"),
        ({"alpha": 0.5, "partition_by": "label", "num_partitions": 7}, r"'num_partitions' = 7 differs"),
        ({"alpha": -1.0, "partition_by": "label"}, r"DirichletPartitioner\(alpha=-1\.0, partition_by='label'\): "),
    ]
    for options, message in cases:
        with pytest.raises(FedsimError, match=message) as err:
            flwr_partition(split, "DirichletPartitioner", options, 4, 0)
        assert "DirichletPartitioner" in str(err.value) and "\n" not in str(err.value)
