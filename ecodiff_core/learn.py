"""End-to-end mask learning: one logit per unit, hard-concrete gates, AdamW, resumable."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .archs import checkpoint_block_paths
from .batching import NotStackable, stack_latents, stack_tree
from .block_checkpoint import checkpointed_blocks
from .errors import SettingsError
from .gate_hooks import GateController
from .hard_concrete import regularizer, sample_gate, uniform_noise
from .learn_settings import TARGET, LearnSettings
from .maskfile import MaskState
from .target_constraint import TargetConstraint
from .trajectory import Denoiser, check_sigmas, per_step_gradient, sample, teacher_steps, trajectory_gradient
from .units import Layout

if TYPE_CHECKING:
    from .distributed import DataParallel
    from .flops import FlopCosts
    from .memory import StepMemory

log = logging.getLogger("ecodiff")


@dataclass
class CalibrationSample:
    """One trajectory's problem: its denoiser (conditioning and CFG inside) and its starting latent
    x_T, shape (B, …) for B ≥ 1 prompts.

    Optionally batchable (see :mod:`.batching`): ``batch_denoiser(c)`` builds the denoiser of
    conditioning ``c`` (tensors with the prompt dimension B first) and ``denoise`` is
    ``batch_denoiser(conditioning)``; with ``LearnSettings.prompt_batch`` > 1, samples that share
    one ``batch_denoiser`` run as one batch.  Build such samples with :meth:`batchable`."""

    denoise: Denoiser
    noise: torch.Tensor
    target: torch.Tensor | None = None
    teacher: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
    conditioning: Any = None
    batch_denoiser: Callable[[Any], Denoiser] | None = None

    @classmethod
    def batchable(cls, batch_denoiser: Callable[[Any], Denoiser], conditioning: Any,
                  noise: torch.Tensor) -> CalibrationSample:
        return cls(batch_denoiser(conditioning), noise, conditioning=conditioning, batch_denoiser=batch_denoiser)


def stack_samples(samples: Sequence[CalibrationSample]) -> CalibrationSample:
    """One sample for several: conditioning, x_T, targets and teacher steps concatenated along the
    prompt dimension, denoised by their shared ``batch_denoiser``.  Raises NotStackable (why)."""
    first = samples[0]
    if first.batch_denoiser is None or any(s.batch_denoiser is not first.batch_denoiser for s in samples):
        raise NotStackable("their denoisers cannot take a batch (no shared batch_denoiser: the host builds "
                           "one denoiser per prompt)")
    rows = [s.noise.shape[0] for s in samples]
    conditioning = stack_tree([s.conditioning for s in samples], rows)
    noise = stack_latents([s.noise for s in samples], "starting latents")
    target = stack_latents([s.target for s in samples], "targets")
    teacher = None
    if any(s.teacher is not None for s in samples):
        if any(s.teacher is None for s in samples):
            raise NotStackable("some samples have no teacher steps")
        teacher = tuple([stack_latents([s.teacher[part][i] for s in samples], "teacher steps")
                         for i in range(len(first.teacher[part]))] for part in (0, 1))
    return CalibrationSample(first.batch_denoiser(conditioning), noise, target, teacher, conditioning,
                             first.batch_denoiser)


@dataclass
class StepInfo:
    step: int
    total_steps: int
    epoch: int
    loss: float
    recon: float
    reg: float
    sparsity: dict[str, float]
    elapsed: float


@contextlib.contextmanager
def frozen_weights(model: nn.Module) -> Iterator[None]:
    """Weights need no gradient while masks learn; autograd then skips every weight-gradient product.

    Parameters created under ``torch.inference_mode()`` (ComfyUI's loaders) are inference tensors:
    their flag can only be set back to True inside inference mode.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        yield
    finally:
        for p in trainable:
            with torch.inference_mode(p.is_inference()):
                p.requires_grad_(True)


def use_block_checkpointing(mode: str, step_memory: StepMemory | None, free_memory: int | None,
                            device: torch.device) -> bool:
    """"on"/"off" as given; "auto" is on only when the preflight's plain-step estimate exceeds the
    free memory of a non-CPU device (off on CPU or when either figure is unknown)."""
    if mode != "auto":
        return mode == "on"
    if torch.device(device).type in ("cpu", "meta") or step_memory is None or free_memory is None:
        return False
    return step_memory.total(block_checkpointing=False) > free_memory


def _loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.5g}"


def _seed(*parts: int) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class MaskLearner:
    """Learns one logit λ per unit of ``layout`` on ``model`` (whose weights stay frozen)."""

    def __init__(
        self,
        model: nn.Module,
        layout: Layout,
        settings: LearnSettings,
        resume: MaskState | None = None,
        grad_context: Callable[[], ContextManager] = contextlib.nullcontext,
        inputs: dict[str, Any] | None = None,
        step_memory: StepMemory | None = None,
        free_memory: int | None = None,
        flop_costs: FlopCosts | None = None,
        parallel: DataParallel | None = None,
    ) -> None:
        """``inputs`` (from :func:`run_inputs`) fingerprints what this run learns from; with it, a
        ``resume`` state recorded for other inputs is not continued: learning starts fresh and
        ``state.start_note`` (and the ``ecodiff`` log) says why.  Without it, ``resume`` is trusted.
        ``step_memory`` (the preflight's estimate of one step) and ``free_memory`` (bytes free on
        the device) decide ``block_checkpointing="auto"``; without either, auto means off.
        ``flop_costs`` (``flops.measure_flops``) price the units for ``regularizer="target"`` with
        ``target_mode="flops"``; without them, one denoiser call of the first sample is measured.
        ``parallel`` (data-parallel learning, see ``distributed``): this process computes only the
        samples it ``owns`` (the others may be None) and the λ gradients are all-reduced before each
        optimiser step, so every process takes the step one process would take."""
        settings.validate()
        self.parallel = parallel
        self.model, self.layout, self.settings = model, layout, settings
        self.grad_context = grad_context
        self.start_note = ""
        if resume is not None:
            resume.check_layout(layout)
            problem = resume_problem(resume, inputs) if inputs is not None else ""
            if problem:
                self.start_note = f"started fresh instead of resuming: {problem}"
                log.warning("EcoDiff learning %s", self.start_note)
                resume = None
        self.inputs = dict(inputs) if inputs is not None else dict(resume.inputs) if resume is not None else {}
        start = resume or MaskState.fresh(layout, settings.gate.init_logit)
        self.history = list(start.history)
        self.progress = dict(start.progress)
        self.stop_reason = ""
        self.diverged = False  # stopped by a non-finite loss or gradient (the last good logits are kept)
        device = next(model.parameters()).device
        self.logits = {
            g.name: nn.Parameter(start.logits[g.name].detach().float().to(device).clone()) for g in layout.groups
        }
        self.optimizer = self._make_optimizer()
        if resume is not None and resume.optimizer:
            self._load_optimizer(resume.optimizer)
        self.controller = GateController(model, layout)
        self.block_checkpointing = use_block_checkpointing(
            settings.block_checkpointing, step_memory, free_memory, device)
        self.block_paths = checkpoint_block_paths(model, layout.arch) if self.block_checkpointing else []
        self.batching_note = ""  # why samples ran one by one despite prompt_batch (logged once)
        self.flop_costs = flop_costs
        self.constraint: TargetConstraint | None = None  # regularizer "target": built when learning starts

    # -- optimiser -----------------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Optimizer:
        groups = []
        for kind in self.layout.kinds():
            params = [self.logits[g.name] for g in self.layout.groups if g.kind == kind]
            if kind not in self.settings.lr:
                raise SettingsError(f"no learning rate for unit kind '{kind}'; set settings.lr['{kind}']")
            groups.append({"params": params, "lr": self.settings.lr[kind], "kind": kind})
        return torch.optim.AdamW(groups, weight_decay=self.settings.weight_decay)

    def _optimizer_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, param in self.logits.items():
            for key, value in self.optimizer.state.get(param, {}).items():
                out[f"{key}/{name}"] = torch.as_tensor(value).detach().clone()
        return out

    def _load_optimizer(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, param in self.logits.items():
            entry = {k.split("/", 1)[0]: v.to(param.device) for k, v in tensors.items() if k.split("/", 1)[1] == name}
            if entry:
                self.optimizer.state[param] = entry

    # -- state ---------------------------------------------------------------------------------
    @property
    def state(self) -> MaskState:
        """The latest good state: safe to save at any time, e.g. after an interrupt."""
        return MaskState(
            arch=self.layout.arch,
            fingerprint=self.layout.fingerprint(),
            logits={n: p.detach().cpu().clone() for n, p in self.logits.items()},
            kinds={g.name: g.kind for g in self.layout.groups},
            settings=copy.deepcopy(self.settings),
            progress=dict(self.progress),
            history=list(self.history),
            optimizer=self._optimizer_tensors(),
            stop_reason=self.stop_reason,
            inputs=dict(self.inputs),
            start_note=self.start_note,
        )

    def sparsity(self) -> dict[str, float]:
        """Per kind, the fraction of units whose logit is below 0 (gate closed more often than not)."""
        out = {}
        for kind in self.layout.kinds():
            lams = torch.cat([self.logits[g.name].detach().flatten() for g in self.layout.groups if g.kind == kind])
            out[kind] = (lams < 0).float().mean().item()
        return out

    # -- gates ---------------------------------------------------------------------------------
    def _gate_setter(self, noise_seed: int, steps: int = 1) -> Callable[[int], None]:
        """``before_step(i)`` installs step i's gate sample; the noise of steps 0…steps-1 is drawn
        on the CPU (reproducible across devices) and moved to the device in one copy, here."""
        total = self.layout.total_units()
        names = [g.name for g in self.layout.groups]
        sizes = [g.count for g in self.layout.groups]
        device = next(iter(self.logits.values())).device

        def noise(step_list: list[int]) -> dict[int, tuple[torch.Tensor, ...]]:
            rows = [uniform_noise(total, torch.Generator().manual_seed(_seed(noise_seed, i))) for i in step_list]
            moved = torch.stack(rows).to(device)
            return {i: torch.split(row, sizes) for i, row in zip(step_list, moved, strict=True)}

        drawn = noise(list(range(steps)))

        def before_step(step: int) -> None:
            if step not in drawn:
                drawn.update(noise([step]))
            values = {name: sample_gate(self.logits[name], u, self.settings.gate)
                      for name, u in zip(names, drawn[step], strict=True)}
            self.controller.set(values)

        return before_step

    def _sparsity_term(self, total_steps: int) -> tuple[torch.Tensor, float, dict[str, float]]:
        """(the term to minimise, its weight, extra history entries): β × the official regulariser, or
        the target constraint (weight 1) with the expected removed fraction and the step's target."""
        if self.constraint is None:
            return self._regularizer(), self.settings.beta, {}
        term, expected, target = self.constraint.term(self.logits, self.progress["step"], total_steps)
        return term, 1.0, {"expected_sparsity": expected, "target": target}

    def _regularizer(self) -> torch.Tensor:
        terms = []
        for kind in self.layout.kinds():
            lams = [self.logits[g.name] for g in self.layout.groups if g.kind == kind]
            terms.append(regularizer(lams, self.settings.regularizer, self.settings.gate))
        return torch.stack(terms).sum()

    # -- learning ------------------------------------------------------------------------------
    def _owns(self, index: int) -> bool:
        return self.parallel is None or self.parallel.owns(index)

    def prepare(self, samples: Sequence[CalibrationSample], sigmas: torch.Tensor) -> None:
        """Targets: the ungated model's trajectory from the same x_T and prompt (own samples only), for
        the objectives of the epochs still to learn."""
        objectives = {self._objective(e) for e in range(self.progress["epoch"], self.settings.epochs)}
        for index, s in enumerate(samples):
            if not self._owns(index):
                continue
            if "end_to_end" in objectives and s.target is None:
                s.target = sample(s.denoise, s.noise, sigmas)
            if "per_step" in objectives and s.teacher is None:
                s.teacher = teacher_steps(s.denoise, s.noise, sigmas)

    def _step_context(self) -> ContextManager:
        """Block checkpointing around each step with grad (gates replayed from the controller)."""
        if not self.block_paths:
            return contextlib.nullcontext()
        return checkpointed_blocks(self.model, self.block_paths, self.controller)

    def _objective(self, epoch: int) -> str:
        """The objective of ``epoch`` (0-based): per-step during the warm start, then the settings'."""
        return "per_step" if epoch < self.settings.warm_start_epochs else self.settings.objective

    def _sample_gradient(self, s: CalibrationSample, sigmas: torch.Tensor, noise_seed: int,
                         weights: torch.Tensor | None = None):
        params = list(self.logits.values())
        before_step = self._gate_setter(noise_seed, len(sigmas) - 1)
        if self._objective(self.progress["epoch"]) == "per_step":
            return per_step_gradient(s.denoise, sigmas, s.teacher, params, before_step, self.grad_context,
                                     self._step_context, weights)
        return trajectory_gradient(
            s.denoise, s.noise, sigmas, s.target, params, before_step, self.settings.checkpointing, self.grad_context,
            self._step_context, weights,
        )

    def _batches(self, samples: Sequence[CalibrationSample],
                 indices: list[int]) -> list[tuple[list[int], CalibrationSample]]:
        """``indices`` in order, cut into runs of at most ``prompt_batch`` samples that stack, each
        with its (stacked) sample; samples that do not stack run alone, and the log says why once."""
        out: list[tuple[list[int], CalibrationSample]] = []
        for index in indices:
            if out and len(out[-1][0]) < self.settings.prompt_batch:
                members = out[-1][0] + [index]
                try:
                    out[-1] = (members, stack_samples([samples[i] for i in members]))
                    continue
                except NotStackable as why:
                    if not self.batching_note:
                        self.batching_note = str(why)
                        log.info("EcoDiff prompt_batch=%d: calibration samples run one by one: %s",
                                 self.settings.prompt_batch, why)
            out.append(([index], samples[index]))
        return out

    def learn(
        self,
        samples: Sequence[CalibrationSample],
        sigmas: torch.Tensor,
        callback: Callable[[StepInfo], bool | None] | None = None,
    ) -> MaskState:
        """Run (or continue) learning; returns the final state.  ``callback`` returning False stops.
        One ``ecodiff`` log line at the start and one at the end (finished, or why it stopped)."""
        state = self._learn(samples, sigmas, callback)
        summary = state.summary()
        log.info("EcoDiff: mask learning %s after %d steps (loss %s -> %s)",
                 "finished" if state.progress.get("finished") else f"stopped: {state.stop_reason or 'interrupted'}",
                 state.progress.get("step", 0), _loss(summary["first_loss"]), _loss(summary["last_loss"]))
        return state

    def _learn(self, samples: Sequence[CalibrationSample], sigmas: torch.Tensor,
               callback: Callable[[StepInfo], bool | None] | None) -> MaskState:
        if not samples:
            raise SettingsError("no calibration samples: give at least one prompt")
        check_sigmas(sigmas)
        start_time = time.perf_counter()
        per_epoch = math.ceil(len(samples) / self.settings.accumulate)
        total_steps = per_epoch * self.settings.epochs
        log.info("EcoDiff: mask learning started: %s, %d unit groups, %d prompts, %d steps of %d trajectory steps "
                 "(from step %d)", self.layout.arch, len(self.layout.groups), len(samples), total_steps,
                 len(sigmas) - 1, self.progress["step"])
        with self.controller.installed(), frozen_weights(self.model):
            self.controller.set(None)
            if self.settings.regularizer == TARGET and self.constraint is None:
                own = [s for i, s in enumerate(samples) if self._owns(i)]  # data-parallel: this process's

                def run():  # one denoiser call, for pricing the units in FLOPs
                    if not own:
                        raise SettingsError("this process holds no calibration prompt to measure FLOPs on: "
                                            "run fewer processes than prompts, or give flop_costs")
                    return own[0].denoise(own[0].noise, sigmas[0])

                self.constraint = TargetConstraint.for_model(self.model, self.layout, self.settings, self.progress,
                                                             run=run, flop_costs=self.flop_costs)
            self.prepare(samples, sigmas)
            while self.progress["epoch"] < self.settings.epochs:
                epoch = self.progress["epoch"]
                order = torch.randperm(
                    len(samples), generator=torch.Generator().manual_seed(_seed(self.settings.seed, epoch))
                )
                while self.progress["position"] < len(samples):
                    chunk = order[self.progress["position"] : self.progress["position"] + self.settings.accumulate]
                    info = self._optimizer_step(samples, sigmas, chunk.tolist(), epoch, total_steps, start_time)
                    if info is None:
                        return self.state
                    if callback is not None and callback(info) is False:
                        self.stop_reason = f"stopped by request after step {info.step}"
                        return self.state
                self.progress.update(epoch=epoch + 1, position=0)
        self.progress["finished"] = True
        return self.state

    def _optimizer_step(
        self, samples, sigmas, indices: list[int], epoch: int, total_steps: int, start_time: float
    ) -> StepInfo | None:
        params = list(self.logits.values())
        grads = [torch.zeros_like(p) for p in params]
        recon_sum = torch.zeros((), dtype=torch.float64, device=params[0].device)
        n = len(indices)
        own = [i for i in indices if self._owns(i)]  # this process's share (all of them alone)
        for members, s in self._batches(samples, own):
            # one gate sample per step for the whole batch; alone, each sample keeps its own
            noise_seed = _seed(self.settings.seed, epoch, members[0])
            if len(members) == 1:
                result, scale = self._sample_gradient(s, sigmas, noise_seed), 1.0 / n
            else:  # each prompt row weighted as its sample's one-by-one loss would be
                weights = torch.cat([torch.full((r,), 1.0 / (n * r), dtype=torch.float64, device=s.noise.device)
                                     for r in (samples[i].noise.shape[0] for i in members)])
                result, scale = self._sample_gradient(s, sigmas, noise_seed, weights), 1.0
            recon_sum += result.loss_tensor.double() * scale
            for acc, g in zip(grads, result.grads, strict=True):
                acc.add_(g, alpha=scale)
            self.controller.set(None)
        if self.parallel is not None:  # sum of every process's share of this step's samples
            recon_sum = self.parallel.all_reduce(grads, recon_sum)
        with torch.enable_grad():
            reg, weight, extra = self._sparsity_term(total_steps)
            reg_grads = torch.autograd.grad(weight * reg, params)
        # the only reads back to the host: once per optimiser step, for the log and the stop test
        recon, reg_value = recon_sum.item(), reg.item()
        loss = recon + weight * reg_value
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all().item() if grads else True
        if not math.isfinite(loss) or not finite:
            self.diverged = True
            self.stop_reason = (
                f"non-finite loss ({loss}) at step {self.progress['step'] + 1}; stopped with the last "
                "good mask kept. Lower the learning rates or check the model's outputs."
            )
            return None
        for p, g, rg in zip(params, grads, reg_grads, strict=True):
            p.grad = g + rg
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.constraint is not None:
            self.progress["multipliers"] = list(self.constraint.ascend(extra["expected_sparsity"], extra["target"]))
        self.progress["step"] += 1
        self.progress["position"] += len(indices)
        sparsity = self.sparsity()
        self.history.append({"step": self.progress["step"], "loss": loss, "recon": recon, "reg": reg_value, **extra})
        return StepInfo(
            self.progress["step"],
            total_steps,
            epoch,
            loss,
            recon,
            reg_value,
            sparsity,
            time.perf_counter() - start_time,
        )


# -- what a run learns from: resume only when it is unchanged -------------------------------------
RESULT_NEUTRAL_SETTINGS: tuple[str, ...] = ("checkpointing", "block_checkpointing")  # memory vs time; same result
WEIGHT_SAMPLE = 4096  # elements hashed per weight tensor (evenly spaced), besides shape and dtype
RESPONSE_SAMPLE = 64  # values kept per probed σ of the model's response (evenly spaced)
RESPONSE_RTOL = 1e-4  # relative tolerance of the response comparison: far above run-to-run noise (fp32
#   CPU/GPU ~1e-6), below what a patch does (RescaleCFG on a tiny random model: 3e-4)


def digest(obj: Any, sample: int | None = None) -> str:
    """A stable hash of nested tensors / dicts / lists / scalars (16 hex digits).

    Tensors contribute shape, dtype and their bytes; with ``sample``, only ``sample`` evenly spaced
    elements of larger tensors (on their own device, so GPU weights are not copied whole).  Objects
    of other types contribute only their type name.
    """
    h = hashlib.sha256()
    _feed(h, obj, sample)
    return h.hexdigest()[:16]


@torch.no_grad()
def _feed(h: hashlib._Hash, obj: Any, sample: int | None) -> None:
    if isinstance(obj, torch.Tensor):
        flat = obj.detach().reshape(-1)
        h.update(f"T{tuple(obj.shape)}{obj.dtype}".encode())
        if sample is not None and flat.numel() > sample:
            index = torch.linspace(0, flat.numel() - 1, sample, dtype=torch.float64).long().to(flat.device)
            flat = flat.index_select(0, index)
        h.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"{")
        for key in sorted(obj, key=str):
            h.update(repr(str(key)).encode())
            _feed(h, obj[key], sample)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for value in obj:
            _feed(h, value, sample)
        h.update(b"]")
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(repr(obj).encode())
    else:
        h.update(f"<{type(obj).__module__}.{type(obj).__qualname__}>".encode())


def weights_digest(model: nn.Module) -> str:
    """Fingerprint of the weights a run reads: every parameter and buffer (names, shapes, dtypes and
    an evenly spaced sample of values), cheap even for large models on the GPU."""
    return digest(dict(model.state_dict(keep_vars=True)), sample=WEIGHT_SAMPLE)


def response_probe_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """The σ values the model's response is probed at: the first of the schedule and one mid-way
    (a patch active only for part of the trajectory is seen too).  Shape (1,) or (2,)."""
    steps = len(sigmas) - 1
    return sigmas[[0, steps // 2]] if steps >= 2 else sigmas[:1]


@torch.no_grad()
def model_response(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                   sigmas: torch.Tensor) -> dict[str, Any]:
    """What the model *does*, as a small JSON-able fingerprint: at each σ of
    ``response_probe_sigmas(sigmas)``, the derivative the sampler integrates, ``(x - denoise(x, σ)) / σ``
    (ε for ε-prediction models, the velocity for flow models; the x0 prediction itself is dominated
    by ``x`` at large σ), from the starting latent ``x``, ungated.

    Everything that changes the output is seen without being enumerated: weight wrappers, model
    patches (FreeU…), CFG functions (RescaleCFG…), object patches such as ``model_sampling``.  Per σ,
    the full derivative's L2 norm and ``RESPONSE_SAMPLE`` evenly spaced values are kept (float64
    lists), to be compared with a tolerance (``responses_match``), never hashed.  Costs one denoiser
    call per probed σ."""
    probe_sigmas = response_probe_sigmas(sigmas)
    probes = []
    for sigma in probe_sigmas:
        flat = ((x - denoise(x, sigma)) / sigma).detach().reshape(-1).double()
        count = min(RESPONSE_SAMPLE, flat.numel())
        index = torch.linspace(0, flat.numel() - 1, count, dtype=torch.float64).long().to(flat.device)
        probes.append({"shape": list(x.shape), "norm": flat.norm().item(),
                       "values": flat.index_select(0, index).cpu().tolist()})
    return {"sigmas": [float(s) for s in probe_sigmas], "probes": probes}


def responses_match(old: Any, new: Any, rtol: float = RESPONSE_RTOL) -> bool:
    """Whether two ``model_response`` fingerprints describe the same model behaviour: the same
    probed σ (to ``rtol``), shapes and value counts, and per probe the full outputs' norms and the
    sampled values each within ``rtol`` relative L2 distance (``|a - b| <= rtol * max(|a|, |b|)``).
    Malformed fingerprints (e.g. from a damaged file) and non-finite values never match."""
    try:
        if len(old["probes"]) != len(new["probes"]) or len(old["sigmas"]) != len(new["sigmas"]):
            return False
        pairs = [(torch.tensor([float(a)], dtype=torch.float64), torch.tensor([float(b)], dtype=torch.float64))
                 for a, b in zip(old["sigmas"], new["sigmas"], strict=True)]
        for p, q in zip(old["probes"], new["probes"], strict=True):
            if [int(n) for n in p["shape"]] != [int(n) for n in q["shape"]] or len(p["values"]) != len(q["values"]):
                return False
            pairs.append((torch.tensor([float(p["norm"])], dtype=torch.float64),
                          torch.tensor([float(q["norm"])], dtype=torch.float64)))
            pairs.append((torch.tensor([float(v) for v in p["values"]], dtype=torch.float64),
                          torch.tensor([float(v) for v in q["values"]], dtype=torch.float64)))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        return False
    for a, b in pairs:
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            return False
        if not (a - b).norm().item() <= rtol * max(a.norm().item(), b.norm().item()):
            return False
    return True


def run_inputs(model: nn.Module, conditioning: Any, settings: LearnSettings, sampling: dict[str, Any],
               response: dict[str, Any] | None = None) -> dict:
    """What a learning run learns from, as a JSON-able dict stored in its MaskState.

    ``conditioning``: the prompts' encodings (any nesting of tensors); ``sampling``: the trajectory
    settings (size, steps, cfg, sampler, scheduler, seed...; tensor values such as the σ schedule or
    the starting latents are stored as digests).  Settings that do not change the result
    (``RESULT_NEUTRAL_SETTINGS``) are left out, so they may change between interrupt and resume.
    ``response`` (from ``model_response``): the model's output, which sees what the weights and
    settings do not (patches, model options, sampling objects); compared with a tolerance.
    """
    learning = {k: v for k, v in settings.to_dict().items() if k not in RESULT_NEUTRAL_SETTINGS}
    inputs = {
        "weights": weights_digest(model),
        "conditioning": digest(conditioning),
        "learning": learning,
        "sampling": {k: v if v is None or isinstance(v, (bool, int, float, str)) else digest(v)
                     for k, v in sampling.items()},
    }
    if response is not None:
        inputs["response"] = response
    return inputs


def resume_problem(saved: MaskState, inputs: dict[str, Any]) -> str:
    """Why ``saved`` must not be continued with ``inputs`` ("" when everything matches)."""
    if not saved.inputs:
        return "the saved run does not record what it was learned from (saved by an older version)"
    problems = []
    if saved.inputs.get("weights") != inputs.get("weights"):
        problems.append("the model's weights differ from the saved run's")
    if saved.inputs.get("conditioning") != inputs.get("conditioning"):
        problems.append("the prompts (conditioning) differ from the saved run's")
    if "response" in saved.inputs or "response" in inputs:
        if "response" not in saved.inputs:
            problems.append("the saved run does not record the model's output (saved by an older version)")
        elif "response" not in inputs or not responses_match(saved.inputs["response"], inputs["response"]):
            problems.append("the model's output differs from the saved run's: patches, model options or "
                            "sampling changed")
    for part in ("learning", "sampling"):
        old, new = saved.inputs.get(part), inputs.get(part)
        if old == new:
            continue
        if not (isinstance(old, dict) and isinstance(new, dict)):
            problems.append(f"the {part} settings differ from the saved run's")
            continue
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        problems.append(f"{part} settings changed: " + ", ".join(
            f"{k} {_short(old.get(k))} → {_short(new.get(k))}" for k in changed))
    return "; ".join(problems)


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 24 else text[:21] + "..."
