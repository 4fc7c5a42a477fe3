"""MAML and its direct relatives, all on the functional inner loop of :mod:`.inner`.

* ``maml``     Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
               Networks", ICML 2017: k inner SGD steps, second-order meta-gradient.
* ``fomaml``   the first-order approximation of the same paper (inner gradients are constants).
* ``anil``     Raghu, Raghu, Bengio & Vinyals, "Rapid Learning or Feature Reuse?", ICLR 2020:
               the inner loop adapts the head only; the body is meta-learned through it.
* ``metasgd``  Li, Zhou, Chen & Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning",
               2017: one learned inner learning rate per parameter entry.
* ``pretrain`` the baseline of Finn et al.'s sinusoid experiment: one model trained on the pooled
               tasks, fine-tuned at test time with the same inner loop.

A meta-batch runs as a loop over tasks (each task's graph is freed by its own backward pass, so
peak memory is one task's), under ``torch.func.vmap`` (one batched graph; much faster on a GPU),
or ``grouped``: groups of tasks as one network (:mod:`fastadapt.models.grouped`; a backward pass
per group). ``--batching auto`` chooses once, before the run starts, by a fixed rule (see
``MAML._auto_mode``: ``vmap`` on accelerators and for MLPs, ``loop`` for CPU convnets; never
``grouped``); the choice is saved in ``config.yaml`` and in checkpoints. The paths give the same
gradients up to float rounding, not the same bits, so a run never switches path.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.conv4 import build_backbone
from ..models.fused import fused_blocks
from ..models.grouped import check_grouped, grouped_call, sub_params
from ..registry import DATASETS, METHODS
from ..tasks.episode import Episode
from .base import MetaLearner, check_finite
from .inner import (
    BATCHING_MODES,
    InnerSGD,
    Params,
    check_inner_losses,
    check_positive,
    convert_batchnorm,
    inner_loop,
    map_tasks,
    module_forward,
    resolve_batching,
)


class BodyHead(nn.Module):
    """``head(body(x))``: a backbone and a linear output layer (the part ANIL adapts)."""

    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def grouped_forward(self, params: Params, x: Tensor) -> Tensor:
        """:meth:`forward` for ``T`` tasks at once (see :mod:`fastadapt.models.grouped`)."""
        return grouped_call(self.head, sub_params(params, "head"), grouped_call(self.body, sub_params(params, "body"), x))


def task_kind_of(cfg: dict[str, Any]) -> str:
    """``classification`` or ``regression``: from ``cfg['task_kind']`` when the caller set it,
    else from the ``kind`` attribute of the registered dataset builder."""
    kind = cfg.get("task_kind")
    if kind:
        return kind
    name = cfg.get("dataset") or cfg.get("task")
    if name and name in DATASETS:
        return getattr(DATASETS.get(name), "kind", "classification")
    return "classification"


def build_model(cfg: dict[str, Any], in_shape: tuple[int, ...], kind: str) -> BodyHead:
    """Backbone (``conv4`` for images, ``mlp`` for regression unless ``backbone`` says otherwise)
    plus a linear head with ``ways`` outputs (classification) or ``in_shape``-independent 1 output."""
    name = cfg.get("backbone", "auto")
    if name == "auto":
        name = "mlp" if kind == "regression" else "conv4"
    body = build_backbone(name, in_shape)
    out = int(cfg.get("out_dim", 1)) if kind == "regression" else int(cfg.get("ways", 5))
    return BodyHead(body, nn.Linear(body.out_features, out))


def _loss_and_score(kind: str) -> tuple[Callable[[Tensor, Tensor], Tensor], Callable[[Tensor, Tensor], Tensor]]:
    if kind == "regression":
        return F.mse_loss, lambda out, y: F.mse_loss(out, y)
    return F.cross_entropy, lambda out, y: (out.argmax(-1) == y).to(out.dtype).mean()


#: ``--batching`` help of the learners that run a meta-batch as a loop or under vmap only.
LOOP_OR_VMAP_HELP = "tasks of a meta-batch as a loop or under vmap; auto: decided once by device and model"


def _safe(name: str) -> str:
    return name.replace(".", "__")


@METHODS.register("maml")
class MAML(MetaLearner):
    """Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017).

    Meta-learns an initialisation ``theta`` such that ``inner_steps`` SGD steps of size
    ``inner_lr`` on a task's support set give a low loss on its query set; the meta-gradient
    differentiates through the inner steps (second order) unless ``first_order``.
    ``grad_checkpoint`` recomputes each inner step in the backward pass (memory of one step's
    activations instead of ``inner_steps``). BatchNorm layers use the statistics of the batch
    they see (transductive, as in the paper); see :mod:`fastadapt.methods.inner`.

    Shapes: a batch has ``support_x [T, S, *in_shape]``, ``support_y [T, S]`` (or ``[T, S, 1]``
    for regression), likewise for the query set.
    """

    name = "maml"
    options = {
        "backbone": "auto",
        "inner_steps": 1,
        "inner_lr": 0.4,
        "first_order": False,
        "grad_checkpoint": False,
        "batching": "auto",
        "meta_batch": 32,
        "lr": 1e-3,
        "lr_decay_every": 0,  # Finn et al.: a constant Adam rate
    }
    option_help = {
        "backbone": "network: conv4 (images), mlp (1-40-40 for sinusoids); auto picks by task",
        "inner_steps": "inner SGD steps per task (training and adaptation)",
        "inner_lr": "inner learning rate (Meta-SGD: the initial per-parameter rates)",
        "first_order": "drop second-order terms of the meta-gradient (FOMAML)",
        "grad_checkpoint": "recompute each inner step in the backward pass (less memory, second order)",
        "batching": "tasks of a meta-batch as a loop, under vmap, or grouped (groups of 8 tasks as one network, "
                    "with grouped convolutions); auto: decided once by device and model",
    }
    # Finn et al. (2017), sinusoid regression: one inner step of 0.01, 25 tasks per meta-batch
    # (K = 10 points per task comes from the sinusoid family's own defaults).
    task_defaults = {"regression": {"inner_lr": 0.01, "meta_batch": 25}}
    adapt_requires_grad = True
    # The default; each instance takes the kind of its task family (regression for sinusoids).
    task_kind = "classification"
    head_only: bool = False
    learn_lrs: bool = False
    #: The ``--batching`` values this learner runs (``grouped``: :meth:`_task` with ``grouped=True``).
    batching_modes: tuple[str, ...] = (*BATCHING_MODES, "grouped")
    #: Tasks per group with ``--batching grouped``: on a two-core CPU groups of 4 to 8 tasks ran
    #: fastest (a whole meta-batch of 32 at once was slower, with 3x the memory of 8).
    group_size: int = 8
    #: The task kinds this learner fits (subclasses for other families extend it).
    task_kinds: tuple[str, ...] = ("classification", "regression")

    def __init__(
        self,
        model: nn.Module,
        inner_steps: int = 1,
        inner_lr: float = 0.4,
        first_order: bool = False,
        grad_checkpoint: bool = False,
        batching: str = "auto",
        task_kind: str = "classification",
    ) -> None:
        super().__init__()
        self.inner_steps, self.inner_lr = inner_steps, inner_lr
        self.first_order, self.grad_checkpoint, self.batching = bool(first_order), bool(grad_checkpoint), batching
        self.task_kind = task_kind
        self._check_options()
        # Per-task batch statistics instead of running statistics (see the module docstring).
        self.model = convert_batchnorm(model)
        self._check_model()
        if self.batching == "grouped":
            self._check_grouped()
        self._loss_fn, self._score_fn = _loss_and_score(task_kind)
        if self.learn_lrs:
            self.inner_lrs = nn.ParameterDict(
                {_safe(k): nn.Parameter(torch.full_like(p.detach(), float(inner_lr))) for k, p in self._adapted().items()}
            )

    # ---------------------------------------------------------------- construction and checks
    @classmethod
    def from_config(cls, cfg: dict[str, Any], in_shape: tuple[int, ...]) -> "MAML":
        opts = {**cls.options, **cfg}
        kind = task_kind_of(cfg)
        eval_ways = (cfg.get("eval") or {}).get("ways")
        if kind == "classification" and eval_ways and "ways" in cfg and eval_ways > cfg["ways"]:
            raise ConfigError(f"--eval-ways {eval_ways} is more than the {cfg['ways']} ways {cls.name} is meta-trained "
                              f"with (its head has one output per way); use --eval-ways {cfg['ways']} or fewer, or "
                              f"train with --ways {eval_ways}")
        return cls(build_model(opts, in_shape, kind), **cls._init_kwargs(opts), task_kind=kind)

    @classmethod
    def _init_kwargs(cls, opts: dict[str, Any]) -> dict[str, Any]:
        return {k: opts[k] for k in ("inner_steps", "inner_lr", "first_order", "grad_checkpoint", "batching")}

    def _check_options(self) -> None:
        check_positive("inner_steps", self.inner_steps, integer=True)
        self.inner_steps = int(self.inner_steps)
        check_positive("inner_lr", self.inner_lr)
        if self.batching not in self.batching_modes:
            raise ConfigError(f"--batching must be one of {', '.join(self.batching_modes)} for {self.name}, "
                              f"got '{self.batching}'")
        if self.grad_checkpoint and self.first_order:
            raise ConfigError("--grad-checkpoint only saves memory for second-order MAML; drop it or --first-order")
        if self.grad_checkpoint and self.batching not in ("auto", "loop"):
            raise ConfigError(f"--grad-checkpoint cannot run with --batching {self.batching}; use --batching loop "
                              "(or auto)")
        if self.task_kind not in self.task_kinds:
            raise ConfigError(f"{self.name} does not handle '{self.task_kind}' tasks (it handles "
                              f"{', '.join(self.task_kinds)}); choose another --dataset or method")

    def _check_model(self) -> None:
        """Checks of the model, for subclasses that need more than an ``nn.Module`` (ANIL)."""

    # ---------------------------------------------------------------- the per-task computation
    def _inner_module(self) -> nn.Module:
        return self.model

    def _adapted(self, ways: int | None = None) -> Params:
        """The parameters the inner loop adapts, by their name inside :meth:`_inner_module`.

        With ``ways`` smaller than the head's outputs (a model meta-trained 20-way evaluated
        5-way), the head is cut to its first ``ways`` rows, as if it had been built that size.
        """
        return self._cut_head(dict(self._inner_module().named_parameters()), ways)

    def _cut_head(self, params: Params, ways: int | None) -> Params:
        if ways is None or self.task_kind != "classification":
            return params
        prefix = "" if self.head_only else "head."
        if prefix + "weight" not in params:  # not a BodyHead model: outputs are used as they are
            return params
        out = params[prefix + "weight"].shape[0]
        if ways > out:
            raise ConfigError(f"the model was meta-trained with {out} ways and cannot adapt to {ways}; "
                              f"evaluate with --ways {out} or fewer")
        if ways == out:
            return params
        return {k: (v[:ways] if k in (prefix + "weight", prefix + "bias") else v) for k, v in params.items()}

    def _features(self, x: Tensor) -> Tensor:
        """The input of :meth:`_inner_module` (ANIL: the features the head sees)."""
        return x

    def _inner_optimizer(self, ways: int | None = None) -> Any:
        if self.learn_lrs:
            return InnerSGD(self._cut_head({k: self.inner_lrs[_safe(k)] for k in self._adapted()}, ways))
        return InnerSGD(self.inner_lr)

    def _fit(self, support_x: Tensor, support_y: Tensor, differentiable: bool,
             ways: int | None = None, grouped: bool = False) -> tuple[Params, Tensor]:
        """Adapt to one task: the single inner loop shared by training and evaluation.
        ``grouped``: ``support_x [T, S, ...]`` holds ``T`` tasks, fitted at once as one network
        (``--batching grouped``, :mod:`fastadapt.models.grouped`); the meta-parameters are
        broadcast to ``[T, ...]``, so their gradient sums the tasks' gradients as the loop's does."""
        params = self._adapted(ways)
        loss_fn = self._loss_fn
        if grouped:
            params = {k: v.expand(support_x.shape[0], *v.shape) for k, v in params.items()}
            loss_fn = torch.func.vmap(loss_fn)
        return inner_loop(
            self._forward(grouped),
            loss_fn,
            params,
            self._grouped_features(support_x) if grouped else self._features(support_x),
            support_y,
            self.inner_steps,
            self._inner_optimizer(ways),
            differentiable=differentiable,
            checkpoint=self.grad_checkpoint and differentiable,
            per_task=grouped,
        )

    def _forward(self, grouped: bool = False) -> Callable[[Params, Tensor], Tensor]:
        """``forward(params, features)`` of :meth:`_inner_module` (``grouped``: for stacked tasks)."""
        module = self._inner_module()
        if grouped:
            return lambda params, x: grouped_call(module, params, x)
        return module_forward(module)

    def _outputs(self, params: Params, x: Tensor, grouped: bool = False) -> Tensor:
        return self._forward(grouped)(params, self._grouped_features(x) if grouped else self._features(x))

    def _task(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor,
              grouped: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Query loss after adaptation (differentiable w.r.t. the meta-parameters), inner losses
        ``[steps]`` and the query score (accuracy or MSE), for one task; ``grouped``: for the
        ``T`` tasks of ``sx [T, S, ...]`` at once (see :meth:`_fit`): ``[T]``, ``[T, steps]``, ``[T]``."""
        fast, inner_losses = self._fit(sx, sy, differentiable=not self.first_order, grouped=grouped)
        # Nothing differentiates the query pass's gradient again (the second-order terms run
        # through the inner loop), so Conv-4 may use its fused blocks here.
        with fused_blocks():
            out = self._outputs(fast, qx, grouped)
        loss_fn, score_fn = self._loss_fn, self._score_fn
        if grouped:
            loss_fn, score_fn, inner_losses = torch.func.vmap(loss_fn), torch.func.vmap(score_fn), inner_losses.T
        return loss_fn(out, qy), inner_losses, score_fn(out.detach(), qy)

    def _groups(self, b: Episode) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """``b``'s tasks in groups of :attr:`group_size` (support and query tensors)."""
        k = self.group_size
        return [(b.support_x[i:i + k], b.support_y[i:i + k], b.query_x[i:i + k], b.query_y[i:i + k])
                for i in range(0, b.num_tasks, k)]

    def _grouped_features(self, x: Tensor) -> Tensor:
        """:meth:`_features` of ``[T, N, ...]`` inputs, per task."""
        return x

    def _check_grouped(self) -> None:
        """Refuse, when the learner is built, a model that ``--batching grouped`` cannot run."""
        check_grouped(self.model)

    def _mode(self, batch: Episode) -> str:
        """The batching of this run: ``loop``, ``vmap`` or ``grouped`` as asked, or for ``auto`` the rule of
        :meth:`_auto_mode`, decided once (never by timing, so the same command gives the same
        bits), kept in ``batching`` and saved with checkpoints."""
        if self.batching == "auto":
            self.decide_run_options(batch.support_x.device)
        return resolve_batching(self.batching, batch.support_x.device, self.grad_checkpoint and not self.first_order,
                                self.batching_modes)

    def _auto_mode(self, device: torch.device) -> str:
        """``vmap`` on accelerators. On the CPU: ``loop`` for convolutional models (on an idle
        two-core CPU vmap's batched convolutions were slower than a loop over tasks) and ``vmap``
        for the others (an MLP task is dozens of tiny operations: 14x faster batched, sinusoid
        regression with 25 tasks per meta-batch). Gradient checkpointing always runs as a loop."""
        if self.grad_checkpoint and not self.first_order:
            return "loop"
        if device.type != "cpu":
            return "vmap"
        convolutional = any(isinstance(m, nn.modules.conv._ConvNd) for m in self.model.modules())
        return "loop" if convolutional else "vmap"

    def compile_networks(self) -> None:
        if self.batching == "grouped":
            raise ConfigError("--compile does not apply to --batching grouped (it runs the layers' grouped forms, not "
                              "the compiled modules); use --batching loop or vmap with --compile")
        if not self.first_order:
            raise ConfigError(f"--compile does not work with second-order {self.name}: compiled graphs have no double "
                              "backward (the meta-gradient differentiates through the inner gradients); use "
                              "--first-order or leave out --compile")
        super().compile_networks()

    def decide_run_options(self, device: torch.device | str) -> dict[str, Any]:
        if self.batching == "auto":
            self.batching = self._auto_mode(torch.device(device))
        return {"batching": self.batching}

    def _metrics(self, loss: Tensor, score: Tensor) -> dict[str, float]:
        """Logged training metrics: ``loss`` and ``mse`` or ``accuracy`` (in percent, as everywhere)."""
        if self.task_kind == "regression":
            return {"loss": float(loss.detach()), "mse": float(score.mean())}
        return {"loss": float(loss.detach()), "accuracy": 100.0 * float(score.mean())}

    def run_state(self) -> dict[str, Any]:
        return {"batching": self.batching}

    def load_run_state(self, state: dict[str, Any]) -> None:
        saved = state.get("batching")
        if saved in (None, "auto"):
            return
        if self.batching == "auto":
            self.batching = saved
        elif self.batching != saved:
            raise ConfigError(f"the checkpoint was trained with --batching {saved}, not {self.batching}; the two paths "
                              f"round differently, so resume with --batching {saved}")

    def meta_loss(self, batch: Episode) -> tuple[Tensor, dict[str, float]]:
        b = batch if batch.batched else Episode.stack([batch])
        return self._meta_loss(b, self._mode(b))

    def _meta_loss(self, b: Episode, mode: str) -> tuple[Tensor, dict[str, float]]:
        if mode == "grouped":
            groups = [self._task(*g, grouped=True) for g in self._groups(b)]
            losses, inner, score = (torch.cat(parts) for parts in zip(*groups))
        else:
            losses, inner, score = map_tasks(self._task, mode, b.support_x, b.support_y, b.query_x, b.query_y)
        check_inner_losses(inner, "meta-training")
        loss = losses.mean()
        return loss, self._metrics(loss, score)

    def records_steps(self, device: torch.device | str) -> bool:
        """Only the vmap batching is one loss (the loop runs a backward pass per task), and only
        with this class's meta-loss and metrics (iMAML's and learned-init's are their own)."""
        mode = self._auto_mode(torch.device(device)) if self.batching == "auto" else self.batching
        return (mode == "vmap" and type(self)._meta_loss is MAML._meta_loss
                and type(self)._metrics is MAML._metrics)

    def graphable_loss(self, batch: Episode):
        """The vmap path's meta-loss, for a CUDA-graph step (``None`` where :meth:`records_steps`
        says no). An inner loss that is not finite makes the query loss non-finite too, which the
        captured step reports and never applies."""
        b = batch if batch.batched else Episode.stack([batch])
        self._mode(b)  # decides batching: auto
        if not self.records_steps(b.support_x.device):
            return None
        key = "mse" if self.task_kind == "regression" else "accuracy"
        scale = 1.0 if key == "mse" else 100.0

        def loss_fn(batch: Episode) -> tuple[Tensor, dict[str, Tensor], Tensor]:
            b = batch if batch.batched else Episode.stack([batch])
            losses, _, score = map_tasks(self._task, "vmap", b.support_x, b.support_y, b.query_x, b.query_y)
            loss = losses.mean()
            return loss, {"loss": loss.detach(), key: scale * score.mean()}, torch.ones((), dtype=torch.bool,
                                                                                           device=loss.device)

        return loss_fn

    #: Loop mode runs backward task by task (one task's graph alive at a time); methods whose
    #: meta-loss holds no graph across tasks (Reptile, iMAML) use :meth:`meta_loss` in both modes.
    per_task_backward: bool = True

    def _backward(self, b: Episode, mode: str, step: int) -> dict[str, float]:
        """Zero the gradients and fill them with the meta-gradient of ``b``; nothing is updated.
        Raises before any backward pass contributes if an inner or outer loss is not finite."""
        for p in self.parameters():
            p.grad = None
        if mode == "vmap" or not self.per_task_backward:
            loss, metrics = self._meta_loss(b, mode)
            check_finite(loss, f"meta-training step {step}")
            loss.backward()
            return metrics
        # A loop over tasks, or over groups of tasks: each one's graph is freed by its own backward.
        n = b.num_tasks
        if mode == "grouped":
            units = [(functools.partial(self._task, grouped=True), g) for g in self._groups(b)]
        else:
            units = [(self._task, (b.support_x[i], b.support_y[i], b.query_x[i], b.query_y[i])) for i in range(n)]
        losses, inners, scores = [], [], []
        for fn, data in units:
            loss, inner, score = fn(*data)
            inners.append(inner if mode == "grouped" else inner[None])
            if not (torch.isfinite(inner).all() and torch.isfinite(loss).all()):
                break  # reported below, before the weights change
            (loss.sum() / n).backward()
            losses.append(loss.detach().reshape(-1))
            scores.append(score.reshape(-1))
        check_inner_losses(torch.cat(inners), f"meta-training step {step}")
        if len(losses) < len(units):
            for p in self.parameters():
                p.grad = None
            bad = int((~torch.isfinite(loss.reshape(-1))).nonzero()[0, 0])
            check_finite(loss.reshape(-1)[bad], f"meta-training step {step}, task {sum(map(len, losses)) + bad}")
        total = torch.cat(losses).mean()
        return self._metrics(total, torch.cat(scores))

    def train_step(self, batch: Episode, optimizer: torch.optim.Optimizer, step: int = 0) -> dict[str, float]:
        b = batch if batch.batched else Episode.stack([batch])
        metrics = self._backward(b, self._mode(b), step)
        self.sync_gradients()
        optimizer.step()
        return metrics

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Params:
        ways = int(support_y.max()) + 1 if self.task_kind == "classification" else None
        with torch.enable_grad():
            fast, inner = self._fit(support_x, support_y, differentiable=False, ways=ways)
        check_inner_losses(inner[None], "adaptation")
        return {k: v.detach() for k, v in fast.items()}

    def predict(self, adapted: Params, x: Tensor) -> Tensor:
        return self._outputs(adapted, x)

    def parameter_groups(self) -> list[dict[str, Any]] | None:
        if not self.learn_lrs:
            return None
        lrs = set(id(p) for p in self.inner_lrs.parameters())
        return [
            {"params": [p for p in self.parameters() if id(p) not in lrs]},
            {"params": list(self.inner_lrs.parameters())},
        ]


@METHODS.register("fomaml")
class FOMAML(MAML):
    """First-order MAML (Finn, Abbeel & Levine, ICML 2017, Sec. 5.2): the meta-gradient is the
    query-loss gradient at the adapted parameters, ``mean_i grad L_q(phi_i)``; no second-order
    graph is kept, so memory and time per step are close to plain training."""

    name = "fomaml"
    options = {**MAML.options, "first_order": True}


class _HeadReached(Exception):
    """Raised by the hook of :meth:`ANIL._features` to stop the forward pass at the head."""

    def __init__(self, features: Tensor) -> None:
        super().__init__("the head was reached")
        self.features = features


@METHODS.register("anil")
class ANIL(MAML):
    """Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals, ICLR 2020): the inner loop adapts
    only the head; the body is meta-learned through it. Body features are computed once per
    support/query set, so an inner step costs a head pass, not a backbone pass.

    ``model`` is any ``nn.Module`` whose last operation is its head, named by ``head`` (a
    submodule name as in ``model.named_modules()``: ``"head"`` for :class:`BodyHead`, ``"fc"`` for
    a torchvision ResNet, ``"3"`` for the last layer of an ``nn.Sequential``). The features are the
    input the model gives that submodule; its output is the head's output on them. The other
    arguments are :class:`MAML`'s, e.g. ``ANIL(model, head="fc", inner_steps=5, inner_lr=0.1)``.
    """

    name = "anil"
    head_only = True

    def __init__(self, model: nn.Module, *args: Any, head: str = "head", **kwargs: Any) -> None:
        self.head_name = head
        super().__init__(model, *args, **kwargs)

    def _check_model(self) -> None:
        names = [n for n, _ in self.model.named_modules() if n]
        if self.head_name not in names:
            raise ConfigError(f"ANIL adapts the head named by head=, but the model has no submodule "
                              f"'{self.head_name}'; pass one of: {', '.join(names[-5:]) or 'none'}")
        if not any(True for _ in self._inner_module().parameters()):
            raise ConfigError(f"ANIL: the head '{self.head_name}' has no parameters to adapt; name the model's "
                              "output layer with head=")

    def _inner_module(self) -> nn.Module:
        return self.model.get_submodule(self.head_name)

    def _features(self, x: Tensor) -> Tensor:
        """The model's forward pass on ``x``, stopped where it calls the head: the head's input."""

        def stop(module: nn.Module, args: tuple[Any, ...]) -> None:
            raise _HeadReached(args[0])

        handle = self._inner_module().register_forward_pre_hook(stop)
        try:
            self.model(x)
        except _HeadReached as reached:
            return reached.features
        finally:
            handle.remove()
        raise ConfigError(f"ANIL: the model's forward never called its head '{self.head_name}'; name the "
                          "submodule that produces the model's output with head=")

    def _grouped_features(self, x: Tensor) -> Tensor:
        self._check_body_head()
        return grouped_call(self.model.body, {}, x)

    def _check_grouped(self) -> None:
        self._check_body_head()
        super()._check_grouped()

    def _check_body_head(self) -> None:
        if self.head_name != "head" or not isinstance(self.model, BodyHead):
            raise ConfigError("ANIL with --batching grouped needs a body-and-head model (fastadapt's own); "
                              "use --batching loop or vmap")


@METHODS.register("metasgd")
class MetaSGD(MAML):
    """Meta-SGD (Li, Zhou, Chen & Li, 2017): the inner step is ``theta - alpha * grad`` with
    ``alpha`` a learned tensor of the parameters' shape (initialised to ``inner_lr``), meta-learned
    together with ``theta``."""

    name = "metasgd"
    learn_lrs = True


@METHODS.register("pretrain")
class Pretrained(MAML):
    """The joint-training baseline of Finn et al. (2017, Sec. 5.1): one model fitted to the pooled
    support and query points of all training tasks (no inner loop while training), then
    fine-tuned on a new task's support set by the same inner loop MAML uses."""

    name = "pretrain"
    options = {**MAML.options, "first_order": True}
    option_help = {**MAML.option_help, "batching": LOOP_OR_VMAP_HELP}
    batching_modes = BATCHING_MODES

    def _task(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        params = self._adapted()
        out = self._outputs(params, torch.cat([sx, qx]))
        y = torch.cat([sy, qy])
        return self._loss_fn(out, y), torch.zeros(0, device=sx.device), self._score_fn(out.detach(), y)
