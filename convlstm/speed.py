"""The fast path: the same model and the same arithmetic as the eager reference, run faster.

    options = SpeedOptions.for_path("fast", device, amp_dtype=torch.bfloat16)  # None: fp32
    apply_speed(model, options)                       # hoisting, fused gates, channels-last
    step = GraphedStep(forward_loss, model, batch, mask)  # CUDA: forward + backward as a graph

What each option does (see the benchmark, experiments/benchmark.py, for what each buys):
- hoist: each recurrent layer's input-to-state convolution runs once over all the frames it
  knows (the context; the layer below's outputs when the stack runs layer by layer; in an
  encoder-forecaster's forecaster, which then runs layer by layer, top first, the layer
  above's) and each step adds only the state-to-state convolution; the first step from a
  zero state skips it.
- fused_gates: the ConvLSTM gate arithmetic (3 sigmoids, 2 tanh, products and sums) as one
  compiled kernel forward and one backward (with a hand-written backward, convlstm.gates),
  instead of about ten kernels each.
- low_precision_h: with fused_gates or native_gates, the ConvLSTM hidden state h comes out of
  the gate update in autocast's dtype (bf16 / fp16) instead of float32; in the stacked,
  encoder-forecaster and bidirectional models every use of h is a convolution that autocast
  casts it for, so the forward values are the same and those casts go, with half of h's
  bytes (the cell memory c stays float32; encoder attention's residual h + W_o(...) adds the
  rounded h). The gradients of h then arrive and are summed in that dtype (one more rounding
  where h has two uses). In a dispatch trace of ConvLSTM-S's CUDA options at batch 16
  (experiments.memory_traffic --options-of cuda), the bytes written outside the compiled
  kernels fell by 22-34% and the calls by 16-30% (session 19; not yet run on a GPU). On the
  bf16 CPU fast path (the C update, in training) 1.06-1.07x on mmnist-cpu-small, 1.01x on
  ConvLSTM-S. On by default on both.
- channels_last: parameters and states in NHWC, the layout cuDNN's bf16 kernels use.
- cuda_graph: the whole forward and backward of a training step captured once as a CUDA graph
  and replayed: no Python or launch overhead per kernel (static shapes; CUDA only).
- fused_optimizer: Adam / AdamW's fused kernel for all parameters at once (CUDA, and the CPU:
  ConvLSTM-S's 13M parameters took 7.8 against 33.5 ms per Adam step, a 2-core Xeon).
- batched_wgrad: each ConvLSTM, ConvGRU and ConvRNN weight's gradient computed once per
  sequence, over all its steps stacked (convlstm.wgrad), instead of one small product per
  step summed in the compute dtype. More peak memory (each step's gate gradient is kept);
  not with checkpointing.
- forward_dgrad: each ConvLSTM, ConvGRU and ConvRNN convolution's input gradient made as a
  forward convolution of its output gradient with the filter transposed and flipped once per
  sequence (convlstm.wgrad), instead of the library's data-gradient kernels: on an H100
  cuDNN's ran at 270 TFLOP/s against 530 forward at ConvLSTM-S's step shapes at batch 16
  (session 5). A candidate for CUDA, off by default until a GPU has measured it; with or
  without batched_wgrad and checkpointing, not with winograd or packed (other ways to run
  the convolutions).
- winograd: the 3x3 and 5x5 convolutions of ConvLSTM, ConvGRU and ConvRNN cells by
  Winograd's F(4x4, 3x3) and F(4x4, 5x5) (convlstm.winograd): 2.25 multiplications per output
  instead of 9, and 4 instead of 25, for the CPU, where training is bound by the
  convolutions' arithmetic; the tile transforms are C kernels (convlstm/tiles.c; on
  PyTorch's OpenMP threads) where a C compiler is found. A training step (TrainStep,
  model(...)) transforms each filter once for its encoding and its forecast
  (winograd.shared_transforms). A model run one step at a time without autograd (model.step,
  StreamingPredictor) keeps its filters' transform from step to step while the weights are
  unchanged (changes made through `.data` are not seen), and runs steps of fewer than 8 tiles
  (batch 1 on a grid of up to 8x8) directly. Other kernel sizes, and autocast (bf16 / fp16),
  keep the direct convolution. Turning it on also asks glibc's malloc to keep freed memory
  for reuse (convlstm.native.keep_freed_memory: process-wide), which the CPU fast path's
  large temporaries need to avoid fresh pages at every step.
- native_gates: the plain ConvLSTM gate update, forward and backward, as one C pass each
  (convlstm/gates.c; the forward saves the gate activations, its sigmoid and tanh within 2
  eps of PyTorch's), for float32 / float64, and autocast's bf16 pre-activations with a
  float32 memory, on the CPU, where autograd's version is a dozen small kernels each way and
  a concatenation (without grad, too: one pass beats the dozen kernels when streaming).
- packed: the convolutions of ConvLSTM, ConvGRU and ConvRNN cells (and a model's output
  head) run from weights cast and packed once into oneDNN's blocked layout (convlstm.packed),
  where F.conv2d reorders (and under autocast casts) the weight at every call; on the CPU,
  where Winograd does not run them. Without autograd (model.step, StreamingPredictor, a
  forecast under no_grad) the packs are kept while the weights are unchanged; in training,
  with batched_wgrad, each weight is packed once per sequence for its steps' convolutions
  and their input gradients.
- checkpointing: each recurrent step is recomputed in backward instead of stored.

Precision: on CUDA the fast path runs under bf16 autocast ("auto"). On a CPU with AMX-BF16
units (cpu_bf16_units), "auto" also means bf16 for the fast path, whose options there are
hoisting, channels-last, batched_wgrad, native_gates, packed and fused_optimizer (for_path);
elsewhere, and with precision="fp32", the CPU fast path is float32 with Winograd.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from convlstm import compiled, native, packed, winograd
from convlstm.cells.base import RecurrentCell
from convlstm.cells.gru import ConvGRUCell, ConvRNNCell
from convlstm.cells.lstm import ConvLSTMCell
from convlstm.compiled import FrozenStep
from convlstm.errors import ConfigError, ShapeError
from convlstm.evaluation import autocast
from convlstm.gates import fused_lstm_update, native_lstm_update
from convlstm.layers import ConvRNN
from convlstm.models import EncoderForecaster

# the cells whose 3x3 and 5x5 convolutions can run by Winograd (the `winograd` option)
WINOGRAD_CELLS = (ConvLSTMCell, ConvGRUCell, ConvRNNCell)


@dataclass(frozen=True)
class SpeedOptions:
    hoist: bool = False
    fused_gates: bool = False
    channels_last: bool = False
    cuda_graph: bool = False
    fused_optimizer: bool = False
    batched_wgrad: bool = False
    forward_dgrad: bool = False
    winograd: bool = False
    native_gates: bool = False
    packed: bool = False
    checkpointing: bool = False
    low_precision_h: bool = False

    def __post_init__(self) -> None:
        if self.low_precision_h and not (self.fused_gates or self.native_gates):
            raise ConfigError(
                "low_precision_h is made by the gate update's own kernels: it needs "
                "fused_gates or native_gates"
            )
        if self.native_gates and self.fused_gates:
            raise ConfigError(
                "native_gates (the CPU's C kernel) and fused_gates (compiled, for CUDA) are "
                "two ways to run the gate update: use one or the other"
            )
        if self.batched_wgrad and self.winograd:
            raise ConfigError(
                "batched_wgrad and winograd are two ways to run the gate "
                "convolution: use one or the other"
            )
        for name in ("winograd", "packed"):
            if self.forward_dgrad and getattr(self, name):
                raise ConfigError(
                    f"forward_dgrad and {name} are two ways to run the gate convolution's "
                    "input gradient: use one or the other"
                )
        if self.batched_wgrad and self.checkpointing:
            raise ConfigError(
                "batched_wgrad keeps every step's input and gradient until the weights' "
                "gradient is made, which checkpointing exists to avoid: use one or the other"
            )

    @classmethod
    def for_path(
        cls,
        path: str,
        device: torch.device,
        checkpointing: bool = False,
        amp_dtype: torch.dtype | None = None,
    ) -> SpeedOptions:
        """Options for TrainConfig.path, given the autocast dtype the run uses (None: float32
        or float64). "eager": the readable reference. "fast": the options that paid on the
        device in experiments/benchmark.

        On CUDA (H100, ConvLSTM-S: 2.8x eager bf16 at batch 16, 1.1x at batch 64): all of
        them but batched_wgrad and forward_dgrad, not yet measured on a GPU, and winograd,
        native_gates and packed, which are for the CPU. low_precision_h (since session 19,
        not yet run on a GPU either) only drops casts and halves bytes: the same forward
        values, the gradients of h summed in bf16.

        On a CPU under bf16 autocast (where AMX units run bf16 convolutions at 4-9x
        the float32 rate): hoisting; channels-last, the layout of oneDNN's fastest bf16
        kernels; the weight gradient batched over the steps (per-step bf16 weight gradients
        ran at half the rate and were summed step by step); the C gate update, with h in
        bf16 (1.06-1.07x on mmnist-cpu-small, session 19); and the
        convolutions from packed weights (1.08-1.13x in training on the 4 x 128 presets,
        1.5-2.3x when streaming). Winograd, meant for float32, stays off. 2-core Xeon with
        AMX, against eager float32: mmnist-cpu-small 2.26x at batch 8 and 2.50x at batch
        16, ConvLSTM-S 4.39x at batch 2; streaming at batch 1 1.27x and 4.49x.

        On a CPU in float32, where training is bound by the convolutions' arithmetic:
        hoisting, Winograd 3x3 and 5x5 convolutions and the C gate update. 2-core AVX-512
        Xeon, mmnist-cpu-small: 1.74x eager at batch 8, 1.84x at batch 16; ConvLSTM-S 2.55x
        at batch 2; ConvGRU 2.28x. On a 2-core AVX2 EPYC a session earlier: 1.80x, 2.05x and
        3.01x; on the Xeon held to AVX2 (session 14): 1.87x, 1.97x and 2.77x. Channels-last
        and compiled gates measured no better than eager within the CPU's noise.

        Both CPU paths step with the fused Adam kernel too (one Adam step over ConvLSTM-S's
        parameters: 7.8 against 33.5 ms; 1.01-1.02x of a training step)."""
        if path == "eager":
            return cls(checkpointing=checkpointing)
        if path != "fast":
            raise ConfigError(f"path must be 'eager' or 'fast', got {path!r}")
        cuda = torch.device(device).type == "cuda"
        if not cuda and amp_dtype == torch.bfloat16:
            return cls(
                hoist=True,
                channels_last=True,
                batched_wgrad=not checkpointing,
                native_gates=True,
                low_precision_h=True,
                packed=True,
                fused_optimizer=True,
                checkpointing=checkpointing,
            )
        return cls(
            hoist=True,
            winograd=not cuda,
            native_gates=not cuda,
            fused_gates=cuda,
            low_precision_h=cuda,
            channels_last=cuda,
            cuda_graph=cuda,
            fused_optimizer=True,
            checkpointing=checkpointing,
        )

    def check(self, device: torch.device) -> None:
        if torch.device(device).type != "cuda":
            if self.cuda_graph:
                raise ConfigError(f"cuda_graph needs a CUDA device, not {device}")
        else:
            for name in ("native_gates", "winograd", "packed"):
                if getattr(self, name):
                    raise ConfigError(f"{name} is for the CPU, not for {device}")

    def describe(self) -> str:
        on = [f.name for f in dataclasses.fields(self) if getattr(self, f.name)]
        return "+".join(on) if on else "eager"


def _cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        text = Path(path).read_text()
    except OSError:  # not Linux: no way to ask here
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def _amx_permission() -> bool:
    """The Linux kernel's permission for the AMX tiles, which oneDNN would otherwise ask for
    itself (False where it is refused)."""
    init = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)
    return bool(init()) if init is not None else True


def _onednn_allows_amx() -> bool:
    """False where oneDNN is held below the AMX instructions by ONEDNN_MAX_CPU_ISA (or its
    older name DNNL_MAX_CPU_ISA; e.g. AVX2, AVX512_CORE_BF16): its bf16 convolutions then run
    without the tiles, however the CPU is built. Values with AMX in their name (e.g.
    AVX512_CORE_AMX), ALL and DEFAULT leave AMX on."""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        value = os.environ.get(name, "").strip().upper()
        if value:
            return "AMX" in value or value in ("ALL", "DEFAULT")
    return True


@functools.cache
def cpu_bf16_units() -> bool:
    """Whether this CPU has AMX-BF16 tiles (Intel Sapphire Rapids and later), with which
    oneDNN runs bf16 convolutions at several times the float32 rate (a 2-core Xeon: 4-9x
    at ConvLSTM's shapes). Without them bf16 is taken to be slower than float32: on that
    Xeon with oneDNN held to AVX512-BF16 instructions (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16,
    as on AMD Zen 4) the bf16 fast path trained at 0.80-0.93x eager float32
    (mmnist-cpu-small, ConvLSTM-S); no CPU without AMX itself has run it. False too where
    ONEDNN_MAX_CPU_ISA holds oneDNN below AMX (as a stand-in for an older CPU, say)."""
    if "amx_bf16" not in _cpu_flags() or not torch.backends.mkldnn.is_available():
        return False  # (without oneDNN, PyTorch's own bf16 convolutions are slow)
    if not _onednn_allows_amx():
        return False
    return _amx_permission()


def apply_speed(model: nn.Module, options: SpeedOptions) -> nn.Module:
    """Switch `model` (in place) to the options' execution; returns it. Parameters, state
    dict and results (up to float rounding) are unchanged, so checkpoints move freely
    between the paths."""
    fused = None
    if options.fused_gates:
        fused = fused_lstm_update(low_precision_h=options.low_precision_h)
    if options.native_gates:  # None without a C compiler: the eager update then
        fused = native_lstm_update(low_precision_h=options.low_precision_h)
    for module in model.modules():
        if isinstance(module, (ConvRNN, EncoderForecaster)):
            module.hoist = options.hoist
        if isinstance(module, RecurrentCell):
            module.checkpointing = options.checkpointing
            module.channels_last = options.channels_last
        if isinstance(module, ConvLSTMCell):
            plain = module.peephole == "none" and module.norm.kind == "none"
            module.fused_update = fused if plain else None
        if isinstance(module, WINOGRAD_CELLS):
            module.batched_wgrad = options.batched_wgrad
            module.forward_dgrad = options.forward_dgrad
            module.winograd = options.winograd and module.kernel_size in winograd.KERNEL_SIZES
            module.packed = options.packed
        if isinstance(module, packed.Conv2d):
            module.packed = options.packed
    if options.winograd:
        native.keep_freed_memory()
    layout = torch.channels_last if options.channels_last else torch.contiguous_format
    model.to(memory_format=layout)
    return model


class GraphedStep:
    """`forward_loss(batch, mask)` and its backward, captured as one CUDA graph.

    Capture needs a few eager warm-up passes first (cuDNN's algorithm choice, compiled
    kernels, lazy allocations); their gradients are thrown away, so training is unchanged.
    After capture each parameter's .grad is a static buffer that every replay overwrites:
    the caller must not zero the gradients or set them to None (the graph writes them).
    `mask` may be None for models that are never fed true frames.
    """

    def __init__(
        self,
        forward_loss: Callable[[Tensor, Tensor | None], Tensor],
        model: nn.Module,
        batch: Tensor,
        mask: Tensor | None,
        warmup: int = 3,
    ) -> None:
        if batch.device.type != "cuda":
            raise ConfigError("cuda_graph needs the batches on a CUDA device")
        self.batch = batch.clone()
        self.mask = None if mask is None else mask.clone()

        def body() -> Tensor:
            model.zero_grad(set_to_none=True)  # so backward allocates .grad inside the graph
            loss = forward_loss(self.batch, self.mask)
            loss.backward()
            return loss

        # warm-up passes, their gradients thrown away; streams and capture on batch's device
        self.graph, self.loss = capture_graph(body, batch.device, warmup)

    def __call__(self, batch: Tensor, mask: Tensor | None) -> Tensor:
        """Run forward and backward on `batch`; returns the loss (a static buffer: copy it
        before the next call if you keep it)."""
        for name, new, captured in (("batch", batch, self.batch), ("mask", mask, self.mask)):
            same = new is None and captured is None
            if not same and (new is None or captured is None or new.shape != captured.shape):
                got = None if new is None else tuple(new.shape)
                want = None if captured is None else tuple(captured.shape)
                raise ShapeError(
                    f"a CUDA graph replays fixed shapes: the {name} was {want} when captured, "
                    f"got {got} (keep the batch size fixed, or use path=eager)"
                )
        with torch.cuda.device(self.batch.device):  # (the current stream of the graph's device)
            self.batch.copy_(batch, non_blocking=True)
            if self.mask is not None:
                self.mask.copy_(mask, non_blocking=True)
            self.graph.replay()
        return self.loss


def capture_graph(body: Callable[[], Any], device: torch.device, warmup: int = 3):
    """(graph, output): `body()` run `warmup` times (cuDNN's algorithm choice, compiled
    kernels, lazy allocations) on a side stream, as capture wants, then captured once as a
    CUDA graph on `device`, whose replays rewrite `output` (body's result) in place. The
    caller sets the grad mode; autocast inside `body` needs cache=False."""
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):  # (its default stream: the first device's)
            output = body()
    return graph, output


def apply_fast_path(model: nn.Module) -> tuple[torch.dtype | None, SpeedOptions]:
    """Switch `model` in place to the fast path's options for its device (its checkpointing
    setting kept) and return them with the autocast dtype the fast path runs in there:
    "auto", bf16 on CUDA and on a CPU with AMX-BF16 units, else None (float32); None for a
    float64 model, which stays float64."""
    from convlstm.training import resolve_precision  # (training imports this module)

    weight = next(model.parameters())
    amp_dtype = None
    if weight.dtype == torch.float32:
        amp_dtype, _ = resolve_precision("auto", weight.device, path="fast")
    checkpointing = any(getattr(m, "checkpointing", False) for m in model.modules())
    options = SpeedOptions.for_path("fast", weight.device, checkpointing, amp_dtype=amp_dtype)
    apply_speed(model, options)
    return amp_dtype, options


def compile_failure(error: Exception) -> str:
    """A failed torch.compile's error in one line: its type and first line of its own (after
    Inductor's "backend='inductor' raised:")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("backend="):
        lines = lines[1:]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def compile_pays(
    model: nn.Module, frame_shape: tuple[int, ...], autocast_dtype: torch.dtype | None
) -> bool:
    """Whether StreamingPredictor.fast compiles the step of `model` (its speed options
    applied) on frames of `frame_shape`: on the CPU, for a float32 model, where a C++ compiler
    is found, under bf16 autocast, or in float32 where no convolution of the step runs by
    Winograd (which beat the compiled step where it runs: see StreamingPredictor)."""
    weight = next(model.parameters())
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and not weight.is_inference()  # (FrozenStep refuses these)
        and compiled.available()
        and (autocast_dtype is not None or not _steps_by_winograd(model, frame_shape))
    )


def _steps_by_winograd(model: nn.Module, frame_shape: tuple[int, ...]) -> bool:
    """Whether a float32 step of a stacked model on frames of `frame_shape` runs a convolution
    by Winograd (a cell with it on, at winograd.MIN_STEP_TILES tiles or more, batch times the
    grid's: every layer of a stacked model runs at the patch grid). Only the cells the model
    steps count: a cell inside another (SA-ConvLSTM's ConvLSTM, whose step() it calls) never
    takes the Winograd step."""
    b, _, height, width = frame_shape
    patch = getattr(model, "patch", 1)
    grid = torch.empty(b, 1, height // patch, width // patch, device="cpu")  # a state's shape
    cells = [m for m in model.modules() if isinstance(m, RecurrentCell)]
    inner = {id(sub) for cell in cells for sub in cell.modules() if sub is not cell}
    return any(
        id(m) not in inner and m.winograd and winograd.keeps_per_step(grid, m.first_parameter())
        for m in cells
    )


class StreamingPredictor:
    """Online next-frame prediction: feed one frame (B, C, H, W), get the prediction of the
    next one, with the state kept inside. The same as model.step (a stacked model's
    `state.prediction`); on CUDA the step is captured once as a CUDA graph (static buffers,
    one launch per frame), and the returned tensor is overwritten by the next call: clone it
    to keep it. Without a graph the state is the step's own output, not copied into buffers
    (1-3% of a streamed frame on a CPU). `reset()` starts a new sequence. The model is put
    in eval mode; the graph reads the parameters where they are, so build a new predictor
    after moving or converting the model (loading new weights into it in place is fine; on
    the CPU fast path, a change made through `.data` is not seen: see
    winograd.kept_transform and packed.kept_conv).

    compile=True (the CPU): the step is compiled once by torch.compile with the weights frozen
    in (convlstm.compiled: seconds, at construction; again when the weights or a submodule
    change; the model's other settings are taken as fixed, as the graph takes them), tracing
    the plain PyTorch step whatever the model's speed options (their C kernels are not
    traced). A 2-core Xeon, batch 1, against the eager float32 step (experiments.benchmark,
    session 16): mmnist-cpu-small 2.40x in bf16 (uncompiled, from packed weights: 1.24x) and
    1.49x in float32 (uncompiled, with the C gate update: 0.99x); session 15: ConvLSTM-S 5.61x
    in bf16 (4.22x), but in float32 1.3x, where Winograd's 1.7x is faster (ad hoc).
    """

    def __init__(
        self,
        model: nn.Module,
        frame_shape: tuple[int, int, int, int],
        *,
        autocast_dtype: torch.dtype | None = None,
        graph: bool | None = None,
        compile: bool = False,
    ) -> None:
        self.device = self._checked(model, frame_shape, graph, compile)
        self.model = model.eval()
        self.dtype = autocast_dtype
        self.graph_mode = self.device.type == "cuda" if graph is None else graph
        dtype = next(model.parameters()).dtype  # (a float64 model streams float64 frames)
        self.frame = torch.zeros(frame_shape, device=self.device, dtype=dtype)
        with torch.no_grad():
            first = self._step(self.frame, None)  # the state's structure, from zeros
        if not isinstance(getattr(first, "prediction", None), Tensor):
            raise ConfigError(
                "StreamingPredictor needs a model whose state carries its next-frame "
                "prediction (architecture=stacked)"
            )
        leaves, self.spec = tree_flatten(first)
        self.index = next(i for i, leaf in enumerate(leaves) if leaf is first.prediction)
        self.state = [torch.zeros_like(leaf) for leaf in leaves]
        self.compiled: FrozenStep | None = None
        if compile:
            self._compile_step()
        if self.graph_mode:
            with torch.no_grad():
                self.graph, self.output = capture_graph(self._graph_body, self.device)
        self.reset()

    def _compile_step(self) -> None:
        """Compile the step (convlstm.compiled), from here on."""
        spec, step = self.spec, self._step

        def leaf_step(frame: Tensor, *leaves: Tensor) -> tuple[Tensor, ...]:
            return tuple(tree_flatten(step(frame, tree_unflatten(list(leaves), spec)))[0])

        compiled = FrozenStep(leaf_step, self.model)
        zeros = [torch.zeros_like(leaf) for leaf in self.state]
        # from the zero state, and from one it made itself (whose strides may differ)
        compiled.warm(self.frame, *compiled.warm(self.frame, *zeros))
        self.compiled = compiled

    @classmethod
    def fast(
        cls,
        model: nn.Module,
        frame_shape: tuple[int, int, int, int],
        *,
        graph: bool | None = None,
        compile: bool | None = None,
    ) -> StreamingPredictor:
        """The fastest streaming this machine runs: `model` switched (in place: its layout,
        eval mode and speed options change, its checkpointing setting is kept) to the fast
        path's options for its device, stepped in the precision the fast path trains in
        there: "auto", bf16 on CUDA and on a CPU with AMX-BF16 units, float32 with Winograd
        on other CPUs. A float64 model stays in float64 (no autocast).

        On a CPU the step is also compiled (compile=None: where that was measured to pay, for
        a float32 model where a C++ compiler is found: in bf16, and in float32 where no
        convolution of the step runs by Winograd, i.e. fewer than 8 tiles, batch times the
        grid's: compile_pays; see above). ConvLSTM-S streamed 5.6x faster than eager float32
        so, and the small preset 2.4x (bf16, AMX). If that compilation fails, the step runs
        uncompiled, with a warning (a failure later, when new weights compile again, is an
        error)."""
        cls._checked(model, frame_shape, graph, compile)  # before the model changes
        amp_dtype, _ = apply_fast_path(model)
        # built uncompiled first: a mistake in the frames or the model fails here, plainly
        stream = cls(
            model, frame_shape, autocast_dtype=amp_dtype, graph=graph, compile=bool(compile)
        )
        if compile is None and compile_pays(model, frame_shape, amp_dtype):
            try:
                stream._compile_step()
            except Exception as error:  # Inductor's errors have many types
                warnings.warn(
                    f"compiling the streamed step failed ({compile_failure(error)}); it runs "
                    "uncompiled",
                    stacklevel=2,
                )
        return stream

    @staticmethod
    def _checked(
        model: nn.Module, frame_shape: tuple[int, ...], graph: bool | None, compile: bool | None
    ) -> torch.device:
        """The model's device, once the checks that need no step pass."""
        if not getattr(model, "feeds_back", False):
            raise ConfigError("StreamingPredictor needs a model that predicts every next frame")
        if len(frame_shape) != 4:
            raise ShapeError(f"frame_shape must be (B, C, H, W), got {tuple(frame_shape)}")
        device = next(model.parameters()).device
        if graph and device.type != "cuda":
            raise ConfigError("a CUDA graph needs the model on a CUDA device")
        if compile and device.type != "cpu":
            raise ConfigError(
                f"compile is for the CPU, not for {device} (CUDA streams from a graph)"
            )
        if compile:
            compiled.require("compile")
        return device

    def _step(self, frame: Tensor, state):
        with autocast(self.device, self.dtype, cache=not self.graph_mode):
            return self.model.step(frame, state)

    def _graph_body(self) -> Tensor:
        new = self._step(self.frame, tree_unflatten(self.state, self.spec))
        leaves, _ = tree_flatten(new)
        for buffer, leaf in zip(self.state, leaves, strict=True):
            buffer.copy_(leaf)
        return self.state[self.index]

    def reset(self) -> None:
        """Forget the sequence: the next frame starts from the zero state."""
        if self.graph_mode:  # the graph reads and writes these buffers
            for buffer in self.state:
                buffer.zero_()
        else:  # (the last state may be the caller's last prediction: not zeroed in place)
            self.state = [torch.zeros_like(leaf) for leaf in self.state]

    @torch.no_grad()
    def __call__(self, frame: Tensor) -> Tensor:
        if tuple(frame.shape) != tuple(self.frame.shape):
            raise ShapeError(
                f"this predictor was built for frames {tuple(self.frame.shape)}, "
                f"got {tuple(frame.shape)}"
            )
        if self.graph_mode:
            with torch.cuda.device(self.device):  # (the current stream of the graph's device)
                self.frame.copy_(frame)
                self.graph.replay()
            return self.output
        if self.compiled is not None:  # the compiled step's input: one buffer, fixed strides
            self.frame.copy_(frame)  # (a frame of other strides would compile again)
            self.state = list(self.compiled(self.frame, *self.state))
            return self.state[self.index]
        frame = frame.to(device=self.device, dtype=self.frame.dtype)
        self.state, _ = tree_flatten(self._step(frame, tree_unflatten(self.state, self.spec)))
        return self.state[self.index]
