"""Stage checkpoints a user brings (``artifacts.reuse``, CONTA's warm start) are read as data only
(``torch.load(weights_only=True)``); our own Lightning checkpoints load that way."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn

from src.stages.classification import warm_start
from src.stages.core import Artifact
from src.stages.training import fit_resumable, load_state, read_checkpoint


class WritesAFile:
    """Unpickled, this object calls open(marker, "w"): a payload that leaves a trace if it ever runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3, 2)

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Data(pl.LightningDataModule):
    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 3)), batch_size=2)


def test_our_checkpoints_load_as_data_only(tmp_path: Path) -> None:
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    module = Tiny()
    final = fit_resumable(trainer, module, Data(), tmp_path)
    raw = torch.load(final, map_location="cpu", weights_only=True)  # what a Lightning weights_only file holds
    assert set(raw) <= {"epoch", "global_step", "loops", "pytorch-lightning_version", "state_dict"}
    state = read_checkpoint(final, "tiny")
    assert set(state) == {"net.weight", "net.bias"}
    fresh = nn.Linear(3, 2)
    load_state(fresh, final, "net.", "tiny network")
    assert torch.equal(fresh.weight, module.net.weight)


def payload_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "ran"
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"net.weight": torch.zeros(2, 3)}, "hyper_parameters": WritesAFile(marker)}, path)
    torch.load(path, weights_only=False)  # the ordinary reader runs it: the payload is real
    assert marker.exists()
    marker.unlink()
    return path, marker


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    path, marker = payload_checkpoint(tmp_path)
    with pytest.raises(ValueError) as info:
        read_checkpoint(path, "classification network")
    msg = str(info.value)
    assert f"checkpoint {path} (classification network)" in msg and "refused" in msg and "io.open" in msg
    assert not marker.exists()
    with pytest.raises(ValueError, match=f"checkpoint {path} .* refused"):  # artifacts.reuse -> load_state
        load_state(nn.Linear(3, 2), path, "net.", "classification network")
    source = Artifact("classification", "reused", tmp_path, {"checkpoint": str(path)})
    with pytest.raises(ValueError, match=f"checkpoint {path} \\(warm start from classification\\) .* refused"):
        warm_start(nn.Linear(3, 2), source)
    assert not marker.exists()


def test_a_checkpoint_that_is_not_a_dict_is_named(tmp_path: Path) -> None:
    path = tmp_path / "list.ckpt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match=f"checkpoint {path} \\(x\\) holds a list, not a state dict"):
        read_checkpoint(path, "x")
