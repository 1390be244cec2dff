"""ESOL's expansion stage (specs/esol.md section 4): the trained IRNet CAM net (the ``model`` input, the
round's classification artifact) gets a deformable head whose sampler ascends the classification loss
while the classifier descends it, so the CAM spreads over less discriminative object parts.

Loss routing (:class:`ExpansionModule`), one forward pass of the backbone:
* ``update=simultaneous``, ``inverse_classes=all``: the offsets pass through a gradient reversal
  (x -lambda_e), so one backward gives the sampler -lambda_e dL_cls and everything else dL_cls;
* ``inverse_classes=positive``: the classifier (and W1, backbone when they train) descend L_cls on a pass
  with the offsets detached; the sampler ascends lambda_e x the present-class terms on a second head
  pass whose other weights and input are detached (same forward values);
* ``update=alternate``: even steps the minimising pass only, odd steps the maximising pass only
  (parameters outside a step's graph get no gradient, so SGD leaves them alone).
The sampler always reads the backbone output detached, so the inverse signal never reaches the backbone.
The mean |offset| is logged per epoch (``train/offset_abs``) and returned as ``offset_abs_per_epoch``;
``train/clip_active`` is the fraction of F'_clip above 0 (the sampler can zero it by sampling outside the
map, where the DCN reads zeros: then the classifier has nothing left to classify from).

:class:`ESOLStage` is what the expansion and shrinkage stages share: a classification stage whose net is
an :class:`~src.models.esol.ESOLNet` that starts from its ``model`` input's network (with CONTA's context
module when the round has one: it is taken over frozen).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torchmetrics.aggregation import MeanMetric

from src.models.conta import ContextPrior
from src.models.esol import ESOLNet, check_options, reverse_gradient
from src.ops.losses import area_loss, positive_soft_margin_loss
from src.ops.optim import ParamGroup
from src.stages.classification import ClassificationModule, ClassificationStage, with_context
from src.stages.core import Artifact, ParameterError, StageContext, check_number, container
from src.stages.training import load_state, read_checkpoint
from src.utils.config import check_choice

INVERSE_CLASSES = ("all", "positive")
UPDATES = ("simultaneous", "alternate")


class ESOLModule(ClassificationModule):
    """A classification module for one ESOL stage: the net's own param groups only (CONTA's context module
    is taken over frozen from the previous stage), and the per-epoch mean |offset| of the stage's sampler."""

    def __init__(self, net: ESOLNet, optim: Mapping[str, Any], max_steps: int, context: ContextPrior | None = None,
                 attention_lr_mult: float = 0.0, val_split: str = "val") -> None:
        super().__init__(net, optim, max_steps, context, attention_lr_mult, val_split)
        if context is not None:
            context.requires_grad_(False)
        self.offset_abs = MeanMetric()
        self.offset_history: list[float] = []

    def param_groups(self) -> list[ParamGroup]:
        return list(self.net.param_groups())

    def on_train_epoch_start(self) -> None:
        if self.context is not None:
            self.context.eval()

    def track_offsets(self, offsets: torch.Tensor) -> None:
        self.offset_abs.update(offsets.detach().float().abs().mean())

    def on_train_epoch_end(self) -> None:
        value = self.offset_abs.compute()
        self.offset_abs.reset()
        self.offset_history.append(float(value))
        self.log("train/offset_abs", value)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["offset_abs_per_epoch"] = list(self.offset_history)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.offset_history = list(checkpoint.get("offset_abs_per_epoch", []))


class ExpansionModule(ESOLModule):
    """The expansion's min-max step (module docstring). ``lambda_e``: weight of the inverse signal;
    ``inverse_classes``: all | positive; ``update``: simultaneous | alternate."""

    def __init__(self, net: ESOLNet, optim: Mapping[str, Any], max_steps: int, lambda_e: float,
                 inverse_classes: str, update: str, context: ContextPrior | None = None,
                 attention_lr_mult: float = 0.0, val_split: str = "val") -> None:
        super().__init__(net, optim, max_steps, context, attention_lr_mult, val_split)
        self.check_options(lambda_e, inverse_classes, update)
        self.lambda_e, self.inverse_classes, self.update = float(lambda_e), inverse_classes, update

    @staticmethod
    def check_options(lambda_e: float, inverse_classes: str, update: str) -> None:
        check_number("module.lambda_e", lambda_e, 0.0, low_open=True)
        check_choice("module.inverse_classes", inverse_classes, INVERSE_CLASSES, ParameterError)
        check_choice("module.update", update, UPDATES, ParameterError)

    def inverse_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.inverse_classes == "positive":
            return positive_soft_margin_loss(logits.float(), labels)
        return F.multilabel_soft_margin_loss(logits.float(), labels)

    def step_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The terms of one step; ``loss`` is what backward runs on (module docstring for the routing)."""
        net: ESOLNet = self.net
        labels, prior = batch["label"], self.prior(batch)
        f = net.features(batch["image"], prior)
        offsets = net.expansion_offsets(f)
        self.track_offsets(offsets)
        terms: dict[str, torch.Tensor] = {}
        if self.update == "simultaneous" and self.inverse_classes == "all":
            clipped = net.expand(f, reverse_gradient(offsets, self.lambda_e))
            terms["cls"] = F.multilabel_soft_margin_loss(net.logits(clipped, prior, net.classifier).float(), labels)
            terms["loss"] = terms["cls"]
        else:
            minimise = self.update == "simultaneous" or self.global_step % 2 == 0
            total = f.new_zeros((), dtype=torch.float32)
            if minimise:
                clipped = net.expand(f, offsets.detach())
                terms["cls"] = F.multilabel_soft_margin_loss(net.logits(clipped, prior, net.classifier).float(),
                                                             labels)
                total = total + terms["cls"]
            if not minimise or self.update == "simultaneous":
                inverse = net.expand(f.detach(), reverse_gradient(offsets, self.lambda_e), frozen_kernel=True)
                terms["inverse"] = self.inverse_loss(net.logits(inverse, prior, net.classifier, frozen=True), labels)
                total = total + terms["inverse"]
                clipped = inverse
            terms["loss"] = total
        with torch.no_grad():  # diagnostics: how much of the image the CAM covers (the shrinkage's area term),
            # and the fraction of F'_clip that is > 0 (0 = collapsed: the sampler reads only outside the map)
            terms["cam_area"] = area_loss(net.class_maps(clipped, prior, net.classifier), labels)
            terms["clip_active"] = (clipped > 0).float().mean()
        return terms

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        terms = self.step_losses(batch)
        logged = [k for k in ("cls", "inverse", "cam_area", "clip_active") if k in terms]
        return self.log_losses(terms, logged, "loss", batch["image"].shape[0])


class ESOLStage(ClassificationStage):
    """Trains one ESOL stage's net (``net``: an ESOLNet config with this stage's ``stage``) from its ``model``
    input's network; ``module``: the stage's LightningModule with its loss options."""

    optional_inputs = frozenset({"context"})
    net_stage: str = ""

    def __init__(self, net: DictConfig, module: DictConfig, epochs: int, batch_size: int, optim: DictConfig,
                 augment: list, crop_size: int, inputs: Mapping[str, str] | None = None) -> None:
        super().__init__(net, module, epochs, batch_size, optim, augment, crop_size, inputs)
        options = {k: v for k, v in container(net).items() if k not in ("_target_", "cam_net")}
        try:
            check_options(**options)
        except (TypeError, ValueError) as err:
            raise ParameterError(f"net.{err}") from err
        if options["stage"] != self.net_stage:
            raise ParameterError(f"net.stage must be {self.net_stage!r} for this stage, got {options['stage']!r}")
        try:
            self.check_module(**{k: v for k, v in container(module).items() if k != "_target_"})
        except TypeError as err:
            raise ParameterError(f"module: {err}") from err

    def check_module(self, **options: Any) -> None:
        raise NotImplementedError

    def start(self, net: ESOLNet, prior: ContextPrior | None, model: Artifact) -> None:
        """Load the starting weights of ``net`` (and of CONTA's context module) from ``model``."""
        raise NotImplementedError

    def check_source(self, model: Artifact, expected: Mapping[str, Any], what: str) -> None:
        given = model.need("net")
        if given != dict(expected):
            raise ValueError(f"the '{model.stage}' input ({model.path}) was trained with another {what} config than "
                             f"this stage's net: {given} vs {dict(expected)}")

    def load_context(self, prior: ContextPrior | None, model: Artifact) -> None:
        if prior is not None:
            load_state(prior, model.checkpoint, "context.", f"{model.stage} context module")

    def run(self, ctx: StageContext) -> dict[str, Any]:
        net: ESOLNet = instantiate(self.net_cfg)
        prior, masks, options = with_context(net, ctx.optional("context"))
        self.start(net, prior, ctx.input("model"))
        data = ctx.data
        fitted = self.fit(ctx, lambda max_steps: self.make_module(net, max_steps, prior, options, data.val_split),
                          extras=[masks] if masks is not None else [], validate=True)
        trainer, module = fitted.trainer, fitted.module
        key = f"{data.val_split}/map"
        if key not in trainer.callback_metrics:  # resumed after the last epoch: score once more
            trainer.validate(module, datamodule=fitted.datamodule, verbose=False)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        history = list(module.offset_history)
        summary = {k: v for k, v in metrics.items() if k.startswith(f"{data.val_split}/")}
        if history:
            summary["train/offset_abs"] = history[-1]
        side = -(-self.crop_size // net.output_stride)
        return {"summary": summary, "final": metrics, "max_steps": fitted.max_steps,
                "offset_abs_per_epoch": history,
                "provides": {"output_stride": net.output_stride, "feature_size": [side, side]}}


class ExpansionStage(ESOLStage):
    """The expansion stage: ``model`` = the round's classification artifact (IRNet's CAM net)."""

    net_stage = "expansion"

    def check_module(self, lambda_e: float, inverse_classes: str, update: str) -> None:
        ExpansionModule.check_options(lambda_e, inverse_classes, update)

    def start(self, net: ESOLNet, prior: ContextPrior | None, model: Artifact) -> None:
        self.check_source(model, container(self.net_cfg)["cam_net"], "CAM net")
        state = read_checkpoint(model.checkpoint, f"{model.stage} network")
        net.load_cam_net({k[4:]: v for k, v in state.items() if k.startswith("net.")},
                         f"checkpoint {model.checkpoint} ({model.stage} network)")
        self.load_context(prior, model)

