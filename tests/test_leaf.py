"""The LEAF loader on tiny files in LEAF's real JSON format: hand-written ones and the stand-in writer's."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedsim.data import leaf, load_dataset
from fedsim.data.leaf import ALL_LETTERS, decode_text, encode_text, load_leaf_split, write_leaf_standin
from fedsim.errors import FedsimError

# --------------------------------------------------------------------------------------------------
# hand-written files


def _pixels(value: int) -> list[float]:
    """A recognisable FEMNIST row: every pixel value/255, one pixel marked."""
    row = [value / 255] * 784
    row[0] = 0.0
    return row


def _write(path: Path, content: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _leaf_file(users: dict[str, tuple[list[Any], list[Any]]], **extra: Any) -> dict[str, Any]:
    return {
        "users": list(users),
        "num_samples": [len(y) for _, y in users.values()],
        "user_data": {u: {"x": x, "y": y} for u, (x, y) in users.items()},
        **extra,
    }


def _femnist_folder(root: Path) -> Path:
    """Train: file 0 = alice (2), bob (1) (+ an empty unlisted entry, as LEAF's split leaves it);
    file 1 = carol (3). Test: file 0 = carol (1), dave (2, test-only); file 1 = alice (1), bob (1)."""
    folder = root / "femnist" / "data"
    train0 = _leaf_file({"alice": ([_pixels(1), _pixels(2)], [0, 61]), "bob": ([_pixels(3)], [5])},
                        hierarchies=["h", "h"])
    train0["user_data"]["dropped"] = {"x": [], "y": []}
    _write(folder / "train" / "all_data_0_niid_1_keep_0_train_9.json", train0)
    _write(folder / "train" / "all_data_1_niid_1_keep_0_train_9.json",
           _leaf_file({"carol": ([_pixels(4), _pixels(5), _pixels(6)], [7, 8, 9])}))
    _write(folder / "test" / "all_data_0_niid_1_keep_0_test_9.json",
           _leaf_file({"carol": ([_pixels(14)], [10]), "dave": ([_pixels(20), _pixels(21)], [11, 12])}))
    _write(folder / "test" / "all_data_1_niid_1_keep_0_test_9.json",
           _leaf_file({"alice": ([_pixels(11)], [1]), "bob": ([_pixels(13)], [3])}))
    return folder


def _marks(x: torch.Tensor) -> list[int]:
    return [round(float(v) * 255) for v in x.reshape(len(x), -1)[:, 1]]


def test_hand_written_femnist_shapes_classes_and_per_user_splits(tmp_path: Path) -> None:
    folder = _femnist_folder(tmp_path)
    split = load_leaf_split(path=str(folder), kind="femnist")
    x, y = split.train.tensors
    assert split.info.name == "leaf_femnist" and split.info.input_shape == (1, 28, 28)
    assert split.info.num_classes == 62
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert split.test.tensors[0].shape == (5, 1, 28, 28)
    # the union, in sorted-file then users order, exactly LEAF's values
    assert _marks(x) == [1, 2, 3, 4, 5, 6]
    assert torch.equal(x[0, 0, 0, 1], torch.tensor(1 / 255, dtype=torch.float32))
    assert y.tolist() == [0, 61, 5, 7, 8, 9]
    assert _marks(split.test.tensors[0]) == [14, 20, 21, 11, 13]
    clients = split.clients
    assert clients is not None and clients.names == ("alice", "bob", "carol")
    assert [clients.train_indices(k).tolist() for k in range(3)] == [[0, 1], [2], [3, 4, 5]]
    assert [clients.test_indices(k).tolist() for k in range(3)] == [[3], [4], [0]]
    # dave is test-only: his rows 1 and 2 are in the central test split and in no client's test group
    assert split.test.tensors[1].tolist() == [10, 11, 12, 1, 3]
    assert sorted(np.concatenate([clients.test_indices(k) for k in range(3)]).tolist()) == [0, 3, 4]


def test_hand_written_shakespeare_and_auto_kind(tmp_path: Path) -> None:
    folder = tmp_path / "shakespeare" / "data"
    lines = ["To be, or not to be, that is the question:" + " " * 38, "Q" * 79 + "}", "\n" * 80]
    assert all(len(s) == 80 for s in lines)
    _write(folder / "train" / "a_train.json", _leaf_file({"HAMLET": (lines[:2], ["W", "a"])}))
    _write(folder / "test" / "a_test.json", _leaf_file({"HAMLET": (lines[2:], ["\n"])}))
    split = load_leaf_split(data_dir=str(tmp_path), path="shakespeare/data")  # relative to data_dir; auto
    x, y = split.train.tensors
    assert split.info.name == "leaf_shakespeare" and split.info.input_shape == (80,)
    assert split.info.num_classes == 80
    assert x.shape == (2, 80) and x.dtype == torch.int64 and y.dtype == torch.int64
    assert [decode_text(row) for row in x] == lines[:2]
    assert decode_text(y) == "Wa" and decode_text(split.test.tensors[0][0]) == lines[2]
    assert split.clients is not None and split.clients.names == ("HAMLET",)
    assert split.clients.test_indices(0).tolist() == [0]


def test_alphabet_and_encoding_round_trip() -> None:
    assert len(ALL_LETTERS) == 80 and len(set(ALL_LETTERS)) == 80
    assert encode_text("\n A}").tolist() == [0, 1, 25, 79]
    text = "Shall I compare thee to a summer's day? [Exit.]"
    codes = encode_text(text)
    assert codes.dtype == np.int64 and decode_text(codes) == text
    assert decode_text(torch.as_tensor(codes)) == text
    with pytest.raises(ValueError, match="'~'"):
        encode_text("a~b")
    with pytest.raises(ValueError, match="'é'"):
        encode_text("café")


# --------------------------------------------------------------------------------------------------
# stand-in writer


def _json_users(folder: Path, split: str) -> dict[str, tuple[list[Any], list[Any], str]]:
    out = {}
    for path in sorted((folder / split).glob("*.json")):
        data = json.loads(path.read_text())
        for user in data["users"]:
            out[user] = (data["user_data"][user]["x"], data["user_data"][user]["y"], path.name)
    return out


@pytest.mark.parametrize("kind", ["femnist", "shakespeare"])
def test_standin_round_trips_per_user(tmp_path: Path, kind: str) -> None:
    folder = write_leaf_standin(tmp_path / kind, kind, users=5, files=2, test_samples=(0, 2), seed=3)
    assert len(list((folder / "train").glob("*.json"))) == 2 and len(list((folder / "test").glob("*.json"))) == 2
    train_users, test_users = _json_users(folder, "train"), _json_users(folder, "test")
    assert len({f for _, _, f in train_users.values()}) == 2  # users spread over both files
    split = load_dataset("leaf", data_dir=str(tmp_path), path=kind, kind=kind)
    clients = split.clients
    assert clients is not None and clients.names == tuple(train_users) and clients.num_clients == 5
    assert len(split.train) == sum(len(y) for _, y, _ in train_users.values())
    assert len(split.test) == sum(len(y) for _, y, _ in test_users.values())

    def expected(xs: list[Any], ys: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if kind == "femnist":
            return torch.tensor(xs, dtype=torch.float32).reshape(-1, 1, 28, 28), torch.tensor(ys)
        return (torch.stack([torch.as_tensor(encode_text(s)) for s in xs]),
                torch.as_tensor(encode_text("".join(ys))))

    for k, name in enumerate(clients.names):
        for part, users, indices in (("train", train_users, clients.train_indices(k)),
                                     ("test", test_users, clients.test_indices(k))):
            dataset = split.train if part == "train" else split.test
            if name not in users:  # 0 test samples: not listed in the test file
                assert len(indices) == 0
                continue
            x, y = expected(*users[name][:2])
            assert torch.equal(dataset.tensors[0][indices], x) and torch.equal(dataset.tensors[1][indices], y)


def test_standin_femnist_is_learnable(tmp_path: Path) -> None:
    torch.manual_seed(0)
    split = load_leaf_split(path=str(write_leaf_standin(tmp_path, "femnist", users=8, train_samples=(10, 12))))
    x, y = split.train.tensors
    x_test, y_test = split.test.tensors
    model = torch.nn.Linear(784, 62)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    before = (model(x_test.flatten(1)).argmax(1) == y_test).float().mean()
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x.flatten(1)), y).backward()
        opt.step()
    after = (model(x_test.flatten(1)).argmax(1) == y_test).float().mean()
    assert after > max(0.8, float(before))


def test_standin_shakespeare_is_learnable(tmp_path: Path) -> None:
    torch.manual_seed(0)
    split = load_leaf_split(path=str(write_leaf_standin(tmp_path, "shakespeare", train_samples=(20, 30))))
    x, y = split.train.tensors
    model = torch.nn.Sequential(torch.nn.Embedding(80, 32), torch.nn.Flatten(), torch.nn.Linear(3 * 32, 80))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)

    def accuracy() -> float:
        return float((model(x[:, -3:]).argmax(1) == y).float().mean())

    before = accuracy()
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[:, -3:]), y).backward()
        opt.step()
    assert accuracy() > max(0.6, before + 0.3)


def test_standin_writer_checks_its_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_leaf_standin(tmp_path, "sent140")
    with pytest.raises(ValueError):
        write_leaf_standin(tmp_path, "femnist", users=2, files=3)


# --------------------------------------------------------------------------------------------------
# the cache


def _no_parsing(path: Path) -> Any:
    raise AssertionError(f"parsed {path} although the cache is valid")


def test_cache_is_built_once_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_leaf_standin(tmp_path / "f", "femnist")
    first = load_leaf_split(path=str(folder))
    manifest = json.loads((folder / leaf.CACHE_NAME / "manifest.json").read_text())
    assert manifest["format"] == leaf.CACHE_FORMAT and manifest["kind"] == "femnist"
    assert [name for name, _, _ in manifest["files"]["train"]] == sorted(p.name for p in (folder / "train").iterdir())
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]  # installed atomically
    monkeypatch.setattr(leaf, "_parse_json_file", _no_parsing)
    second = load_leaf_split(path=str(folder))
    for a, b in zip(first.train.tensors + first.test.tensors, second.train.tensors + second.test.tensors, strict=True):
        assert torch.equal(a, b)
    assert second.clients is not None and second.clients.names == first.clients.names
    arrays = leaf._open_arrays(folder / leaf.CACHE_NAME, manifest)
    assert arrays is not None and all(isinstance(a, np.memmap) for a in arrays.values())  # lazy: paged in on use
    # writing to a loaded tensor never reaches the cache (copy-on-write mapping)
    second.train.tensors[0][0] += 1
    assert torch.equal(load_leaf_split(path=str(folder)).train.tensors[0], first.train.tensors[0])


def test_cache_is_rebuilt_when_a_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _femnist_folder(tmp_path)
    assert load_leaf_split(path=str(folder)).train.tensors[1].tolist() == [0, 61, 5, 7, 8, 9]
    path = folder / "train" / "all_data_1_niid_1_keep_0_train_9.json"
    data = json.loads(path.read_text())
    data["user_data"]["carol"]["y"] = [30, 31, 32]
    path.write_text(json.dumps(data))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same size: the mtime tells
    parsed: list[str] = []
    real = leaf._parse_json_file
    monkeypatch.setattr(leaf, "_parse_json_file", lambda p: parsed.append(p.name) or real(p))
    assert load_leaf_split(path=str(folder)).train.tensors[1].tolist() == [0, 61, 5, 30, 31, 32]
    assert len(parsed) == 4  # rebuilt from every file
    parsed.clear()
    load_leaf_split(path=str(folder))
    assert parsed == []


def test_read_only_data_folder_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_leaf_standin(tmp_path / "ro" / "data", "shakespeare")
    data_dir = tmp_path / "work"
    real, real_parse = leaf._new_tmp, leaf._parse_json_file

    def refuse_beside_data(cache: Path) -> Path:
        if cache.parent == folder:
            raise PermissionError(13, "read-only", str(cache))
        return real(cache)

    monkeypatch.setattr(leaf, "_new_tmp", refuse_beside_data)
    split = load_leaf_split(data_dir=str(data_dir), path=str(folder))
    assert not (folder / leaf.CACHE_NAME).exists()
    caches = list((data_dir / leaf.CACHE_NAME).glob("leaf-*/manifest.json"))
    assert len(caches) == 1
    monkeypatch.setattr(leaf, "_new_tmp", lambda cache: (_ for _ in ()).throw(PermissionError(13, "no")))
    monkeypatch.setattr(leaf, "_parse_json_file", _no_parsing)
    assert torch.equal(load_leaf_split(data_dir=str(data_dir), path=str(folder)).train.tensors[0],
                       split.train.tensors[0])  # the fallback cache is found again

    # nowhere writable: parsed into memory, with a warning
    monkeypatch.setattr(leaf, "_parse_json_file", real_parse)
    with pytest.warns(UserWarning, match="held in memory"):
        in_memory = load_leaf_split(data_dir=str(tmp_path / "elsewhere"), path=str(folder))
    assert torch.equal(in_memory.train.tensors[0], split.train.tensors[0])


def test_cache_dir_that_is_not_a_cache_is_left_alone(tmp_path: Path) -> None:
    folder = write_leaf_standin(tmp_path / "f", "femnist", users=2, files=1)
    mine = _write(tmp_path / "mine" / "precious.txt", "keep me")
    with pytest.raises(FedsimError, match="not a fedsim LEAF cache"):
        load_leaf_split(path=str(folder), cache_dir=str(mine.parent))
    assert mine.read_text() == "keep me"
    load_leaf_split(path=str(folder), cache_dir=str(tmp_path / "cache"))
    assert (tmp_path / "cache" / "manifest.json").exists()


# --------------------------------------------------------------------------------------------------
# errors: one line, naming the path and what to do


def _one_line(error: pytest.ExceptionInfo[FedsimError]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_missing_data_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(FedsimError) as error:
        load_leaf_split(data_dir=str(tmp_path), kind="femnist")
    message = _one_line(error)
    assert str(tmp_path / "leaf" / "femnist" / "data") in message
    assert "git clone https://github.com/TalwalkarLab/leaf" in message
    assert "./preprocess.sh -s niid --sf 0.05 -k 0 -t sample" in message and "data.options.path" in message

    with pytest.raises(FedsimError) as error:  # auto: both recipes
        load_leaf_split(data_dir=str(tmp_path))
    assert "leaf/data/shakespeare" in _one_line(error) and "leaf/data/femnist" in str(error.value)

    folder = write_leaf_standin(tmp_path / "x" / "data", "femnist", users=2, files=1)
    for path in (folder / "test").iterdir():
        path.unlink()
    with pytest.raises(FedsimError) as error:
        load_leaf_split(path=str(folder))
    assert str(folder) in _one_line(error) and "test/*.json" in str(error.value)

    with pytest.raises(FedsimError) as error:  # pointed one level too high, as LEAF's own layout invites
        load_leaf_split(path=str(folder.parent))
    assert "point data.options.path there" in _one_line(error) and str(folder) in str(error.value)


def _valid_femnist() -> dict[str, Any]:
    return _leaf_file({"u1": ([_pixels(1), _pixels(2)], [0, 1]), "u2": ([_pixels(3)], [2])})


def _valid_shakespeare() -> dict[str, Any]:
    return _leaf_file({"ROMEO": (["a" * 80, "b" * 80], ["c", "d"])})


def _mutated(kind: str, change: str) -> Any:
    data = _valid_femnist() if kind == "femnist" else _valid_shakespeare()
    user = data["users"][0]
    entry = data["user_data"][user]
    if change == "invalid json":
        return '{"users": ["u1"], "num_samples": [1,'
    if change in ("users", "num_samples", "user_data"):
        del data[change]
    elif change == "not listed in user_data":
        data["users"].append("ghost")
        data["num_samples"].append(1)
    elif change == "num_samples disagrees":
        data["num_samples"][0] += 1
    elif change == "no samples":
        entry["x"], entry["y"] = [], []
        data["num_samples"][0] = 0
    elif change == "x/y lengths":
        entry["y"] = entry["y"][:1]
        data["num_samples"][0] = 1
    elif change == "label outside":
        entry["y"][0] = 62 if kind == "femnist" else "~"
    elif change == "feature size":
        entry["x"][0] = entry["x"][0][:-1]
    elif change == "unknown character":
        entry["x"][0] = "é" + entry["x"][0][1:]
    elif change == "user twice":
        data["users"].append(user)
        data["num_samples"].append(data["num_samples"][0])
    return data


ERRORS = [
    ("femnist", "invalid json", "not valid JSON"),
    ("femnist", "users", "missing key 'users'"),
    ("femnist", "num_samples", "missing key 'num_samples'"),
    ("femnist", "user_data", "missing key 'user_data'"),
    ("femnist", "not listed in user_data", "'ghost' is listed in 'users' but has no entry in 'user_data'"),
    ("femnist", "num_samples disagrees", "num_samples says 3 but user_data holds 2 samples"),
    ("femnist", "no samples", "user 'u1' has no samples"),
    ("femnist", "x/y lengths", "2 inputs x but 1 labels y"),
    ("femnist", "label outside", "label 62 is outside FEMNIST's 62 classes"),
    ("femnist", "feature size", "has 783 values, not 784"),
    ("femnist", "user twice", "listed twice"),
    ("shakespeare", "feature size", "is 79 characters, not an 80-character string"),
    ("shakespeare", "unknown character", "character 'é' in x is not in LEAF's 80-letter alphabet"),
    ("shakespeare", "label outside", "label '~' is outside LEAF's 80-letter alphabet"),
    ("shakespeare", "no samples", "user 'ROMEO' has no samples"),
]


@pytest.mark.parametrize(("kind", "change", "expected"), ERRORS, ids=[f"{k}-{c}" for k, c, _ in ERRORS])
def test_malformed_file_names_path_and_remedy(tmp_path: Path, kind: str, change: str, expected: str) -> None:
    folder = tmp_path / "data"
    good = _valid_femnist() if kind == "femnist" else _valid_shakespeare()
    _write(folder / "train" / "a_train.json", good)
    bad = _write(folder / "test" / "a_test.json", _mutated(kind, change))
    with pytest.raises(FedsimError) as error:
        load_leaf_split(path=str(folder), kind=kind)
    message = _one_line(error)
    assert str(bad) in message and expected in message
    assert "regenerate it with LEAF" in message and "preprocess.sh" in message
    assert not (folder / leaf.CACHE_NAME).exists() and not list(folder.glob(".fedsim-cache*"))  # nothing left


def test_user_in_two_train_files_and_bad_options(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    _write(folder / "train" / "a.json", _valid_femnist())
    _write(folder / "train" / "b.json", _valid_femnist())
    _write(folder / "test" / "a.json", _valid_femnist())
    with pytest.raises(FedsimError) as error:
        load_leaf_split(path=str(folder))
    assert str(folder / "train" / "b.json") in _one_line(error) and "also in a.json" in str(error.value)

    with pytest.raises(FedsimError, match="GloVe"):
        load_leaf_split(path=str(folder), kind="sent140")
    with pytest.raises(FedsimError, match="unknown option"):
        load_leaf_split(path=str(folder), users=3)
    (folder / "train" / "b.json").unlink()
    with pytest.raises(FedsimError) as error:  # the wrong kind: femnist pixels are not 80-char strings
        load_leaf_split(path=str(folder), kind="shakespeare")
    assert "not an 80-character string" in _one_line(error)


def test_unsupported_leaf_sets_are_named(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    celeba = _leaf_file({"celeb": (["000001.jpg"], [1])})
    _write(folder / "train" / "a.json", celeba)
    _write(folder / "test" / "a.json", celeba)
    with pytest.raises(FedsimError) as error:
        load_leaf_split(path=str(folder))
    assert "CelebA" in _one_line(error) and str(folder / "train" / "a.json") in str(error.value)
