"""--matrix_optimizer muon: torch.optim.Muon for the weight matrices of the transformer blocks and AdamW for the
rest (embeddings, output layer, biases, norms), as the one optimizer the Trainer steps, schedules and checkpoints."""

from __future__ import annotations

import math
import re
from collections import defaultdict

import torch
from torch import nn
from transformers import Trainer
from transformers.pytorch_utils import Conv1D

from clmlab.args import ADAMW_OPTIMS
from clmlab.cli import UsageError



def split_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every trainable parameter once (a tied weight is one parameter), as "muon" (the weight of every projection,
    Conv1D or nn.Linear, but the output layer and whatever is tied to the input embeddings: in GPT-2 the attention
    and MLP matrices of the blocks), "adamw_decay" and "adamw_no_decay" (the Trainer's own rule for which weights
    decay: not biases, not norms)."""
    embeddings = {id(model.get_input_embeddings().weight)}
    if model.get_output_embeddings() is not None:
        embeddings.add(id(model.get_output_embeddings().weight))
    projections = {id(m.weight) for m in model.modules() if isinstance(m, (Conv1D, nn.Linear))}
    # The Trainer's method reads nothing from the Trainer it belongs to: called here, AdamW's share decays exactly
    # the weights it would decay under the Trainer's own AdamW.
    decay = set(Trainer.get_decay_parameter_names(None, model))
    split = {"muon": [], "adamw_decay": [], "adamw_no_decay": []}
    for name, param in model.named_parameters():  # each shared parameter once, under its first name
        if not param.requires_grad:
            continue
        if id(param) in projections and id(param) not in embeddings and param.ndim == 2:
            split["muon"].append((name, param))
        else:
            split["adamw_decay" if name in decay else "adamw_no_decay"].append((name, param))
    return split


def fan_out_and_in(model: nn.Module) -> dict[int, tuple[int, int]]:
    """(outputs, inputs) of each projection's weight, by id: nn.Linear stores [out, in], GPT-2's Conv1D [in, out]."""
    fans = {}
    for module in model.modules():
        if isinstance(module, Conv1D):
            fans[id(module.weight)] = (module.weight.shape[1], module.weight.shape[0])
        elif isinstance(module, nn.Linear):
            fans[id(module.weight)] = tuple(module.weight.shape)
    return fans


def orientation_scale(adjustment: str, shape: torch.Size, fan_out: int, fan_in: int) -> float:
    """What to multiply a Muon group's lr by so that torch's adjustment, which reads the stored shape [A, B] as
    nn.Linear's [out, in], gives the layer's. Muon's orthogonalisation does not care: it transposes a tall matrix,
    iterates, and transposes back. Its lr adjustment may: "match_rms_adamw" (0.2 sqrt(max(A, B))) is symmetric, but
    Keller Jordan's "original" sqrt(max(1, A / B)) would read a Conv1D weight [in, out] the wrong way round (GPT-2's
    mlp.c_proj scaled by 2 and c_fc by 1, instead of c_fc by 2, c_attn by sqrt(3) and mlp.c_proj by 1)."""
    if adjustment != "original":
        return 1.0
    return math.sqrt(max(1.0, fan_out / fan_in)) / math.sqrt(max(1.0, shape[0] / shape[1]))


def muon_settings(args) -> dict:
    """Muon's hyperparameters, each unset flag resolved to its default."""
    adjustment = args.muon_lr_adjustment or "match_rms_adamw"
    return {"lr": args.learning_rate if args.muon_learning_rate is None else args.muon_learning_rate,
            "momentum": 0.95 if args.muon_momentum is None else args.muon_momentum,
            "nesterov": True if args.muon_nesterov is None else args.muon_nesterov,
            "weight_decay": args.weight_decay if args.muon_weight_decay is None else args.muon_weight_decay,
            "adjust_lr_fn": adjustment}


def adamw_settings(args) -> dict:
    """AdamW's keyword arguments as the Trainer builds them for --optim (lr, betas, eps, fused)."""
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert cls is torch.optim.AdamW, cls  # --optim was checked against ADAMW_OPTIMS when parsed
    return kwargs


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW and torch.optim.Muon as one torch Optimizer, for what the Trainer does with its optimizer:
    its LR scheduler scales every group's lr, and its checkpoints save and load this optimizer's state_dict, a
    standard one of all the groups. torch has no optimizer made of two (ChainedScheduler chains schedules, not
    optimizers), hence this: the two step the very group dicts and state this optimizer holds.

    The groups are AdamW's first: the Trainer logs the first group's learning rate, so `learning_rate` in the
    logs is --learning_rate's schedule under either --matrix_optimizer."""

    def __init__(self, adamw_groups: list[dict], muon_groups: list[dict], adamw: dict, muon: dict):
        self.adamw = torch.optim.AdamW([{**g, "optimizer": "adamw"} for g in adamw_groups], **adamw)
        self.muon = torch.optim.Muon([{**g, "optimizer": "muon"} for g in muon_groups], **muon)
        super().__init__([*self.adamw.param_groups, *self.muon.param_groups], defaults={})
        self._share()

    def _share(self) -> None:
        n = len(self.adamw.param_groups)
        self.adamw.param_groups, self.muon.param_groups = self.param_groups[:n], self.param_groups[n:]
        # Their parameters are disjoint: one state keyed by parameter serves both.
        self.adamw.state = self.muon.state = self.state

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.adamw.step()
        self.muon.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        saved = [g.get("optimizer") for g in state_dict["param_groups"]]
        if saved != [g["optimizer"] for g in self.param_groups]:
            raise UsageError(f"the checkpoint's optimizer state has the groups {saved}, not Muon and AdamW's "
                             f"{[g['optimizer'] for g in self.param_groups]}: resume it with the --matrix_optimizer it was saved with")
        super().load_state_dict(state_dict)  # new group dicts and a new state: the two must step those
        self._share()


def muon_with_adamw(model: nn.Module, adamw: dict, adamw_weight_decay: float, muon: dict) -> MuonWithAdamW:
    """The optimizer for `model`: Muon (settings `muon`, as from muon_settings) for split_parameters' "muon", AdamW
    (keyword arguments `adamw`, as from adamw_settings) for the rest."""
    split = split_parameters(model)
    adamw_groups = [{"params": [p for _, p in split[key]], "weight_decay": decay}
                    for key, decay in (("adamw_decay", adamw_weight_decay), ("adamw_no_decay", 0.0)) if split[key]]
    fans = fan_out_and_in(model)
    by_scale = defaultdict(list)
    for _, param in split["muon"]:
        by_scale[orientation_scale(muon["adjust_lr_fn"], param.shape, *fans[id(param)])].append(param)
    # lr x scale, weight decay / scale: the update is the layer's, the decay (Muon's lr x weight decay) unchanged.
    muon_groups = [{"params": params, "lr": muon["lr"] * scale, "weight_decay": muon["weight_decay"] / scale}
                   for scale, params in sorted(by_scale.items())]
    return MuonWithAdamW(adamw_groups, muon_groups, adamw, muon)


def trainer_optimizer(args) -> tuple | None:
    """For Trainer(optimizer_cls_and_kwargs=...): None keeps the Trainer's own optimizer. A first item that is not an
    Optimizer class is the Trainer's optimizer "factory" (transformers trainer.py, create_optimizer): called with no
    arguments, then what it returns with (model, **kwargs), where and when the Trainer would build its own."""
    if args.matrix_optimizer != "muon":
        return None
    return (lambda: muon_with_adamw), {"adamw": adamw_settings(args), "adamw_weight_decay": args.weight_decay,
                                       "muon": muon_settings(args)}


def _described(params: list[tuple[str, nn.Parameter]], **settings) -> dict:
    # Block indices starred: the names say which kind of tensor, whatever the depth.
    names = sorted({re.sub(r"\.\d+\.", ".*.", name) for name, _ in params})
    return {"parameters": sum(p.numel() for _, p in params), "tensors": len(params), **settings, "names": names}


def optimizer_record(model: nn.Module, args) -> dict:
    """run_info.json's "optimizer": which parameters each optimizer trains, and with what settings."""
    optim = getattr(args.optim, "value", args.optim)
    if args.matrix_optimizer != "muon":
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return {"adamw" if optim in ADAMW_OPTIMS else optim: _described(params, optim=optim, lr=args.learning_rate,
                                                                    weight_decay=args.weight_decay)}
    split, muon = split_parameters(model), muon_settings(args)
    return {"muon": _described(split["muon"], lr=muon["lr"], momentum=muon["momentum"], nesterov=muon["nesterov"],
                           weight_decay=muon["weight_decay"], lr_adjustment=muon["adjust_lr_fn"]),
            "adamw": _described(split["adamw_decay"] + split["adamw_no_decay"], optim=optim, lr=args.learning_rate,
                            weight_decay=args.weight_decay, no_decay_tensors=len(split["adamw_no_decay"]))}
