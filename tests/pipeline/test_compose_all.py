"""Every group option the paper setting combines composes, validates and plans, without running:
``profile=paper`` x every baseline (conf/baseline/*.yaml) x ``trainer=cpu|gpu|ddp`` x ``data=voc12|coco14``
x ``conta=on`` (and ``conta=off``), with ``hydra/launcher=slurm`` and ``logger=tensorboard``. Data roots are empty tmp
folders: validation must not touch the data."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CONF
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from src.pipeline.plan import plan
from src.pipeline.validate import finalize

BASELINES = sorted(p.stem for p in (CONF / "baseline").glob("*.yaml"))
REFINEMENT_STAGES = {"irn": ["ir_labels", "irn", "pseudo_masks"],
                     "affinity": ["affinity_labels", "affinity", "pseudo_masks"]}
DATA = {"voc12": 20, "coco14": 80}
ACCELERATOR = {"cpu": "cpu", "gpu": "gpu", "ddp": "auto"}


def compose_paper(overrides: list[str], tmp_path: Path):
    """The run config as ``python -m src.run <overrides>`` composes it (Hydra's node kept for the launcher
    check), with the cache, outputs and weights under tmp_path."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    with open_dict(cfg):
        cfg.paths.cache_dir = str(tmp_path / "cache")
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.weights_dir = str(tmp_path / "weights")
        del cfg.hydra
    return cfg, launcher


# conta=off plans round 0 of conta=on alone; once per baseline and data set is enough
COMBINATIONS = [(b, t, d, "on") for b in BASELINES for t in ("cpu", "gpu", "ddp") for d in sorted(DATA)] + \
    [(b, "cpu", d, "off") for b in BASELINES for d in sorted(DATA)]


@pytest.mark.parametrize(("baseline", "trainer", "data", "conta"), COMBINATIONS)
def test_paper_combination_composes_validates_and_plans(tmp_path: Path, baseline: str, trainer: str, data: str,
                                                        conta: str) -> None:
    root = tmp_path / "data_root"
    root.mkdir()
    cfg, launcher = compose_paper([f"+baseline={baseline}", f"+conta={conta}", "profile=paper", f"trainer={trainer}",
                                   f"data={data}", f"data.root={root}", "logger=tensorboard",
                                   "hydra/launcher=slurm"], tmp_path)
    finalize(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # every interpolation resolves
    rounds = plan(cfg)

    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["tasks_per_node"] >= 1
    assert resolved["trainer"]["accelerator"] == ACCELERATOR[trainer]
    assert resolved["logger"]["_target_"] == "pytorch_lightning.loggers.TensorBoardLogger"
    assert resolved["data"]["num_classes"] == DATA[data]
    assert resolved["profile"]["name"] == "paper"
    assert resolved["baseline"]["seeds"]["pyramid"] == "pil" and resolved["baseline"]["seeds"]["dtype"] == "float32"
    # paper backbones from the weights folder, none loaded here
    weights = resolved["segmentation"]["net"]["backbone"]["weights"]
    assert weights == str(tmp_path / "weights" / "resnet101-5d3b4d8f.pth")

    expected_rounds = 1 + (resolved["conta"]["rounds"] if conta == "on" else 0)
    assert len(rounds) == expected_rounds
    names = [st.name for st in rounds[0]]
    refinement = "affinity" if "affinity" in resolved["baseline"]["refinement"] else "irn"
    for stage in ["classification", "seeds", *REFINEMENT_STAGES[refinement], "segmentation"]:
        assert stage in names, (stage, names)
    assert names.index("classification") < names.index("seeds") < names.index("pseudo_masks") \
        < names.index("segmentation")
    assert list(root.iterdir()) == []  # nothing read or written under the data root
