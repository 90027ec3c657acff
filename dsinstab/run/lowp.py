"""Low-precision compute on the CPU: bf16 and fp16 matmuls natively, or in fp32 rounded to the dtype.

On a CPU without native kernels for a dtype, torch falls back to reference loops some 20-30x slower
than fp32 GEMM (measured with torch 2.13 at 512x512: bf16 on an AVX2-only x86, fp16 on any x86
without AVX512-FP16 or AMX-FP16, AVX-512 machines included). GPU tensor cores and flash attention multiply low-precision inputs, accumulate
in fp32 and round the output to the dtype; doing the same here (upcast the inputs, which is exact,
run the fp32 kernel, round the result) gives the values, overflows and loss-scale behaviour of
low-precision training at fp32 speed.

The path is chosen from what the CPU and torch's build report, never by timing, so every rank and
every resume takes the same numerics: ``utils.cpu_compute`` is ``native``, ``fp32`` or ``auto``
(fp32 wherever any rank lacks native kernels for the run's dtype). Nothing here runs on a GPU.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Callable

import deepspeed.comm as dist
import torch
import torch.nn.functional as F
from deepspeed.accelerator import get_accelerator
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

MODES = ("auto", "native", "fp32")

# x86 flags of hardware that computes the dtype itself (without them oneDNN converts at best)
_X86_NATIVE = {
    torch.bfloat16: ("avx512_bf16", "amx_bf16"),
    torch.float16: ("avx512_fp16", "amx_fp16"),
}


def cpu_features() -> dict[str, bool | str]:
    """What decides the path: the CPU's flags for low-precision arithmetic, torch's vector ISA
    (``ATEN_CPU_CAPABILITY`` lowers it) and oneDNN's bf16/fp16 support (``ONEDNN_MAX_CPU_ISA``
    lowers it). For logs and benchmark headers."""
    caps = getattr(torch.cpu, "get_capabilities", dict)()
    flags = ("avx2", "avx512_f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")
    return {
        "cpu": str(caps.get("cpu_name", platform.processor() or platform.machine())),
        **{f: bool(caps.get(f, False)) for f in flags},
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_bf16": _onednn_supports(torch.bfloat16),
        "onednn_fp16": _onednn_supports(torch.float16),
    }


def _onednn_supports(dtype: torch.dtype) -> bool:
    check = "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def has_native_kernels(dtype: torch.dtype) -> bool:
    """Whether this process's torch runs ``dtype`` matmuls and attention in fast native kernels.

    All three must hold: oneDNN supports the dtype at its effective ISA (the matmuls), torch's own
    vectorised kernels are above AVX2 (the CPU flash attention and its backward use them), and on
    x86 the CPU has the dtype's arithmetic. AVX-512 without AVX512-BF16 only emulates bf16 in
    oneDNN; fp32 compute is as fast there and rounds the same, so it counts as not native.
    """
    if not _onednn_supports(dtype):
        return False
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True  # Arm: oneDNN's answer already reflects the CPU's bf16/fp16 extensions
    if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2"):
        return False
    caps = getattr(torch.cpu, "get_capabilities", dict)()
    return any(caps.get(flag, False) for flag in _X86_NATIVE[dtype])


def use_fp32_compute(dtype: torch.dtype, mode: str = "auto") -> bool:
    """This process's choice for ``dtype`` under ``utils.cpu_compute = mode`` (before the ranks agree)."""
    if mode not in MODES:
        raise ValueError(f"cpu_compute must be one of {', '.join(MODES)}, not {mode!r}")
    if dtype not in _X86_NATIVE or mode == "native":
        return False
    return mode == "fp32" or not has_native_kernels(dtype)


T = torch.Tensor
# torch's own linear: ZeRO-3 puts its own in F.linear for the whole process (deepspeed.zero.Init)
_LINEAR = torch._C._nn.linear
# every function that multiplies matrices or attends: what the fp32 path computes in fp32
_MATMULS = frozenset(
    {
        _LINEAR,
        F.bilinear,
        F.scaled_dot_product_attention,
        torch.matmul, T.matmul, T.__matmul__, T.__rmatmul__,
        torch.mm, T.mm, torch.bmm, T.bmm,
        torch.addmm, T.addmm, torch.baddbmm, T.baddbmm, torch.addbmm, T.addbmm,
        torch.mv, T.mv, torch.addmv, T.addmv, torch.dot, T.dot, torch.inner, T.inner,
        torch.einsum, torch.tensordot,
    }
)  # fmt: skip


class LowPrecisionInFp32(TorchFunctionMode):
    """Run ``dtype`` matmuls and attention in fp32 and round the results to ``dtype``.

    A call with ``dtype`` tensors among its inputs gets them upcast (exact) and its result rounded
    to nearest, so it equals ``op(fp32 inputs).to(dtype)``: an fp16 result past 65504 is inf, a
    bf16 one stays finite. The casts are differentiable, so the backward runs in fp32 too and
    rounds each input's gradient to ``dtype`` (the fp32 copies are what autograd saves: the
    activations held for backward take twice the memory). Other functions
    (elementwise, norms, reductions) and a matmul that mixes ``dtype`` with another float dtype
    run natively, as they would without the mode; attention's fp32 mask stays fp32.

    While it is on, ``F.linear`` is torch's own: ZeRO-3's memory-efficient linear is an autograd
    Function whose backward, written in Python, runs where no torch-function mode sees its matmuls
    (they ran in bf16, measured); the fp32 copies it would have saved memory on are saved anyway.

    A torch-function mode rather than a dispatch mode: only the forward's Python calls pass
    through it, not every aten op of forward and backward (measured on the tests' 2-layer model
    on a 2-core EPYC: forward + backward 10-12 ms a step against 14-16 ms for an aten-level mode).
    """

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        if dtype not in _X86_NATIVE:
            raise ValueError(f"LowPrecisionInFp32 takes torch.bfloat16 or torch.float16, not {dtype}")
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"LowPrecisionInFp32({self.dtype})"

    def __enter__(self):
        self._linears = [*getattr(self, "_linears", []), F.linear]
        F.linear = _LINEAR
        return super().__enter__()

    def __exit__(self, *exc):
        F.linear = self._linears.pop()
        return super().__exit__(*exc)

    def _up(self, x):
        return x.float() if isinstance(x, torch.Tensor) and x.dtype == self.dtype else x

    def _down(self, x):
        return x.to(self.dtype) if isinstance(x, torch.Tensor) and x.dtype == torch.float32 else x

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _MATMULS:
            return func(*args, **kwargs)
        leaves = tree_leaves((args, kwargs))
        dtypes = {t.dtype for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()}
        if self.dtype not in dtypes or (len(dtypes) > 1 and func is not F.scaled_dot_product_attention):
            return func(*args, **kwargs)  # nothing of dtype, or a mix torch refuses (SDPA takes a float mask)
        out = kwargs.pop("out", None)
        result = tree_map(self._down, func(*tree_map(self._up, args), **tree_map(self._up, kwargs)))
        return result if out is None else out.resize_(result.shape).copy_(result)


def engine_dtype(engine) -> torch.dtype:
    """The dtype the engine trains in (its ds_config's bf16 or fp16 block, else fp32)."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    return torch.float16 if engine.fp16_enabled() else torch.float32


def compute_context(
    engine, mode: str = "auto", log: Callable[[str], None] | None = None
) -> contextlib.AbstractContextManager:
    """The context for forward and backward (reusable): fp32 compute for the engine's dtype where
    ``mode`` asks for it on the CPU, else a no-op. ``log`` receives one line naming the CPU path.

    Under ``auto`` the ranks agree (all-reduce MIN): one rank without native kernels puts every
    rank on fp32 compute, so all ranks share numerics and none crawls. Call it on every rank.
    """
    dtype = engine_dtype(engine)
    fp32 = use_fp32_compute(dtype, mode)  # refuses a bad mode on every device
    if get_accelerator().device_name() != "cpu" or dtype not in _X86_NATIVE:
        return contextlib.nullcontext()
    if mode == "auto" and dist.is_initialized() and dist.get_world_size() > 1:
        native = torch.tensor([0 if fp32 else 1], device=engine.device)
        dist.all_reduce(native, op=dist.ReduceOp.MIN)
        fp32 = not bool(native.item())
    ctx = LowPrecisionInFp32(dtype) if fp32 else contextlib.nullcontext()
    if log is not None:
        log(f"CPU compute ({mode}): {describe(ctx, dtype)}")
    return ctx


def describe(ctx: contextlib.AbstractContextManager, dtype: torch.dtype) -> str:
    """How the CPU computes ``dtype`` matmuls and attention under ``ctx``, for the run log."""
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    if isinstance(ctx, LowPrecisionInFp32):
        return f"{name} matmuls and attention computed in fp32 and rounded to {name}"
    return f"{name} matmuls and attention on torch's {name} kernels"
