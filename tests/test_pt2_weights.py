"""Reading a ``torch.export`` archive's weights without ``torch.export.load`` (which unpickles): equal to what
torch reads, and a crafted archive is one error line with nothing run."""
from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from lcsc_ops.errors import LcscError
from lcsc_ops.store.sources.pt2 import load_pt2_weights


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.conv = nn.Conv2d(2, 2, 3)
        self.register_buffer("scale", torch.arange(4, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale.float()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pt2") / "model.pt2"
    torch.export.save(torch.export.export(_Net(), (torch.randn(2, 3),)), path)
    return path


def _rewrite(src: Path, dst: Path, change) -> Path:
    """A copy of the archive with its weights config changed by ``change(config, records)``."""
    with zipfile.ZipFile(src) as z:
        records = {n: z.read(n) for n in z.namelist()}
    name = next(n for n in records if n.endswith("_weights_config.json"))
    config = json.loads(records[name])
    change(config["config"], records, name.rsplit("/", 1)[0])
    records[name] = json.dumps(config).encode()
    with zipfile.ZipFile(dst, "w") as z:
        for n, data in records.items():
            z.writestr(n, data)
    return dst


def test_weights_equal_what_torch_export_load_reads(archive):
    ours = load_pt2_weights(archive, "model.pt2", allow_pickle=False)
    theirs = torch.export.load(archive).state_dict
    assert set(ours) == set(theirs) == {"lin.weight", "lin.bias", "conv.weight", "conv.bias", "scale"}
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path(__file__).parent / "pt2-pwned",))


def test_a_pickled_weight_record_is_refused_and_nothing_runs(archive, tmp_path):
    marker = Path(__file__).parent / "pt2-pwned"

    def poison(config, records, folder):
        meta = config["lin.weight"]
        meta["use_pickle"] = True
        records[f"{folder}/{meta['path_name']}"] = pickle.dumps(_Boom())

    bad = _rewrite(archive, tmp_path / "bad.pt2", poison)
    with pytest.raises(LcscError, match=r"refusing to unpickle bad\.pt2: .*--allow-pickle"):
        load_pt2_weights(bad, "bad.pt2", allow_pickle=False)
    assert not marker.exists()


@pytest.mark.parametrize("field, value, message", [
    ("sizes", [{"as_int": 4000}, {"as_int": 3}], "holds 12 elements"),
    ("sizes", [{"as_expr": {"expr_str": "s0"}}, {"as_int": 3}], "symbolic shape"),
    ("dtype", 999, "unknown dtype"),
])
def test_a_tampered_tensor_meta_is_one_line(archive, tmp_path, field, value, message):
    def tamper(config, records, folder):
        config["lin.weight"]["tensor_meta"][field] = value

    bad = _rewrite(archive, tmp_path / "bad.pt2", tamper)
    with pytest.raises(LcscError, match=message):
        load_pt2_weights(bad, "bad.pt2", allow_pickle=False)


def test_a_record_outside_the_weights_folder_is_refused(archive, tmp_path):
    def escape(config, records, folder):
        config["lin.weight"]["path_name"] = "../../models/model.json"

    bad = _rewrite(archive, tmp_path / "bad.pt2", escape)
    with pytest.raises(LcscError, match="names no plain record"):
        load_pt2_weights(bad, "bad.pt2", allow_pickle=False)


def test_not_an_archive_is_one_line(tmp_path):
    path = tmp_path / "model.pt2"
    path.write_bytes(b"not a zip")
    with pytest.raises(LcscError, match="not a .pt2 archive"):
        load_pt2_weights(path, "model.pt2", allow_pickle=False)
