"""Whole forecasts for contexts of one shape, run as fast as the machine runs them: a model
forecasting on new data with fixed weights.

    forecast = FastForecast(model, (16, 10, 1, 64, 64), horizon=10)  # model switched in place
    frames = forecast(context)  # = model(context, 10) without autograd, in the fast precision

FastForecast applies the fast path's options for the model's device (as StreamingPredictor
.fast does) and runs the forecast:
- on CUDA, under bf16 autocast, captured once as one CUDA graph (GraphedForecast): every
  kernel of the context and of the step-by-step forecast replayed with one launch. Without a
  graph the fast path forecast slower than eager on an H100 (870 against 1,021 sequences/s,
  eager bf16, ConvLSTM-S at batch 16), bound by Python and kernel launches;
- on a CPU with AMX-BF16 units, under bf16 autocast, compiled whole by Inductor with the
  weights frozen in (convlstm.compiled.CompiledForecast), where compile_pays;
- elsewhere (a float32 CPU) uncompiled, the hoisted context by Winograd: compiled float32
  forecasts ran at 0.68-0.83x of it.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from convlstm.compiled import CompiledForecast, checked_forecast_shape, same_context_shape
from convlstm.errors import ConfigError, ShapeError
from convlstm.evaluation import autocast
from convlstm.speed import apply_fast_path, capture_graph, compile_failure, compile_pays


class GraphedForecast:
    """`model(context, horizon)` without autograd, under autocast to `autocast_dtype` if
    given, captured once as one CUDA graph for contexts of one shape (B, T, C, H, W): the
    GPU's counterpart of CompiledForecast. The graph reads the parameters where they are, so
    weights changed in place (load_state_dict, copy_) are seen; build a new one after moving
    or converting the model or changing its settings. The returned tensor is a static buffer
    that the next call overwrites: clone it to keep it."""

    def __init__(
        self,
        model: nn.Module,
        context_shape: tuple[int, int, int, int, int],
        horizon: int,
        *,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        shape = checked_forecast_shape(context_shape, horizon)
        weight = next(model.parameters())
        if weight.device.type != "cuda":
            raise ConfigError(f"a CUDA graph needs the model on a CUDA device, not {weight.device}")
        self.model, self.horizon, self.dtype = model.eval(), horizon, autocast_dtype
        self.device = weight.device
        self.context = torch.zeros(shape, dtype=weight.dtype, device=self.device)
        with torch.no_grad():
            self._forecast()  # the model's own checks fail here, plainly, not in a capture
            self.graph, self.output = capture_graph(self._forecast, self.device)

    def _forecast(self) -> Tensor:
        with autocast(self.device, self.dtype, cache=False):  # (no casts kept from outside)
            return self.model(self.context, self.horizon)

    def __call__(self, context: Tensor) -> Tensor:
        """The forecast (B, horizon, C, H, W) of `context`, of the captured shape (any dtype
        and device: copied into the graph's input)."""
        same_context_shape(context, tuple(self.context.shape), "captured")
        with torch.no_grad(), torch.cuda.device(self.device):
            self.context.copy_(context)
            self.graph.replay()
        return self.output


class FastForecast:
    """The fastest whole forecast this machine runs for contexts of `context_shape`: `model`
    switched (in place: its layout, eval mode and speed options change, its checkpointing
    setting is kept) to the fast path's options for its device, forecasting in the precision
    the fast path trains in there (`dtype`, the autocast dtype: bf16 on CUDA and on a CPU with
    AMX-BF16 units, None elsewhere: float32, or float64 for a float64 model), as a CUDA graph
    on CUDA and compiled on a CPU where that pays (see the module's docstring).

    compile (the CPU): None compiles where compile_pays in bf16, falling back to the
    uncompiled forecast with a warning if compiling fails; True compiles in any precision
    (errors raised); False never compiles. `how` says which runs: "graph", "compiled" or
    "plain". The forecast comes in the compute dtype (bf16 under bf16 autocast); on CUDA it
    is the graph's buffer, which the next call overwrites (clone it to keep it)."""

    def __init__(
        self,
        model: nn.Module,
        context_shape: tuple[int, int, int, int, int],
        horizon: int,
        *,
        compile: bool | None = None,
    ) -> None:
        self.shape = checked_forecast_shape(context_shape, horizon)
        weight = next(model.parameters())
        self.device, self.input_dtype = weight.device, weight.dtype
        if compile and self.device.type != "cpu":
            raise ConfigError(f"compile is for the CPU, not for {self.device} (CUDA runs a graph)")
        self.dtype, options = apply_fast_path(model)
        self.model, self.horizon = model.eval(), horizon
        if options.cuda_graph:
            self.how = "graph"
            self.runner = GraphedForecast(model, self.shape, horizon, autocast_dtype=self.dtype)
            return
        self.how, self.runner = "plain", self._plain
        frame_shape = (self.shape[0], *self.shape[2:])
        wanted = self.dtype is not None and compile_pays(model, frame_shape, self.dtype)
        if compile or (compile is None and wanted):
            try:  # (CompiledForecast runs the model's own checks first, uncompiled)
                self.runner = CompiledForecast(
                    model, self.shape, horizon, autocast_dtype=self.dtype
                )
                self.how = "compiled"
                return
            except (ShapeError, ConfigError):  # a mistake in the shape or the model, as itself
                raise
            except Exception as error:  # Inductor's errors have many types
                if compile:
                    raise
                warnings.warn(
                    f"compiling the forecast failed ({compile_failure(error)}); it runs uncompiled",
                    stacklevel=2,
                )
        with torch.no_grad():  # a mistake in the shape or the model fails here, plainly
            self._plain(torch.zeros(self.shape, dtype=self.input_dtype, device=self.device))

    @torch.no_grad()
    def _plain(self, context: Tensor) -> Tensor:
        with autocast(context.device, self.dtype):
            return self.model(context, self.horizon)

    def __call__(self, context: Tensor) -> Tensor:
        """The forecast (B, horizon, C, H, W) of `context` (B, T, C, H, W), the shape given."""
        same_context_shape(context, self.shape, "made")
        if self.how == "plain":  # (the others copy it into their input buffer)
            context = context.to(device=self.device, dtype=self.input_dtype)
        return self.runner(context)
