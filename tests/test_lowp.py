"""Low-precision compute on the CPU (dsinstab.run.lowp): the fp32-compute emulation, the path choice, a run."""

from __future__ import annotations

import math
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import ROOT, TINY, assert_ok, env, launch, train_rows
from dsinstab.run.config import load_config
from dsinstab.run.lowp import LowPrecisionInFp32, has_native_kernels, use_fp32_compute
from dsinstab.run.model import build_model

LOW = [torch.bfloat16, torch.float16]
# mantissa bits: one rounding step at |x| is 2**(floor(log2|x|) - bits)
MANTISSA = {torch.bfloat16: 7, torch.float16: 10}


class Seen(TorchDispatchMode):
    """Records each op with the dtypes of its tensor arguments, as the kernels receive them."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, set]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor)}
        self.calls.append((func.overloadpacket.__name__, dtypes))
        return func(*args, **(kwargs or {}))


def emulated(fn, dtype):
    """``fn()`` under the emulation, and what its kernels saw (entered first, so it sees them)."""
    with Seen() as seen, LowPrecisionInFp32(dtype):
        out = fn()
    return out, seen.calls


def tensors(dtype, seed=0) -> dict[str, torch.Tensor]:
    """Positive operands: no cancellation, so the order of the sums moves the last bits only."""
    g = torch.Generator().manual_seed(seed)
    shapes = dict(a=(16, 48), b=(48, 24), c=(16, 24), ba=(3, 16, 48), bb=(3, 48, 24), bc=(3, 16, 24), v=(48,))
    return {k: torch.rand(*shape, generator=g).to(dtype) for k, shape in shapes.items()}


OPS = {
    "mm": lambda t: t["a"] @ t["b"],
    "addmm": lambda t: torch.addmm(t["c"], t["a"], t["b"], beta=0.5, alpha=2.0),
    "linear": lambda t: F.linear(t["a"], t["b"].t(), t["c"][0]),
    "bmm": lambda t: t["ba"] @ t["bb"],
    "baddbmm": lambda t: torch.baddbmm(t["bc"], t["ba"], t["bb"], beta=0.5, alpha=2.0),
    "mv": lambda t: t["a"] @ t["v"],
    "dot": lambda t: t["v"] @ t["v"],
    "einsum": lambda t: torch.einsum("bij,bjk->bik", t["ba"], t["bb"]),
    "matmul_3d_2d": lambda t: torch.matmul(t["ba"], t["b"]),
}
KERNELS = {"mm", "addmm", "bmm", "baddbmm", "mv", "dot"}


def test_fp16_overflow_is_inf_where_bf16_stays_finite():
    a, b = torch.full((2, 4), 200.0), torch.full((4, 3), 100.0)  # exact result 80000 > 65504
    half, _ = emulated(lambda: a.half() @ b.half(), torch.float16)
    bf16, _ = emulated(lambda: a.bfloat16() @ b.bfloat16(), torch.bfloat16)
    assert half.dtype == torch.float16 and torch.isinf(half).all()
    assert bf16.dtype == torch.bfloat16 and torch.isfinite(bf16).all()
    assert bf16[0, 0].item() == torch.tensor(80000.0).bfloat16().item()


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_emulated_results_are_the_rounded_fp32_results(dtype):
    t = tensors(dtype)
    up = {k: v.float() for k, v in t.items()}
    for name, op in OPS.items():
        out, calls = emulated(lambda: op(t), dtype)  # noqa: B023 (called at once)
        assert out.dtype == dtype, name
        assert torch.equal(out, op(up).to(dtype)), name  # bit-exact
        kernels = [d for n, d in calls if n in KERNELS]
        assert kernels and all(d == {torch.float32} for d in kernels), (name, calls)


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_native_kernels_agree_with_emulation_within_one_rounding_step(dtype):
    if not has_native_kernels(dtype):
        pytest.skip(f"this CPU has no native {dtype} kernels to compare with")
    t = tensors(dtype, seed=1)
    for name, op in OPS.items():
        native, (emu, _) = op(t), emulated(lambda: op(t), dtype)  # noqa: B023
        big = torch.maximum(native.float().abs(), emu.float().abs())
        step = torch.exp2(torch.floor(torch.log2(big)) - MANTISSA[dtype])
        assert ((native.float() - emu.float()).abs() <= step).all(), name


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_attention_forward_and_backward_run_in_fp32_close_to_the_fp32_reference(dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(2, 4, 32, 16, generator=g) for _ in range(4))
    low = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    ref = [t.to(dtype).float().requires_grad_() for t in (q, k, v)]

    def attend(q, k, v, grad):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(grad)
        return out.detach()

    out, calls = emulated(lambda: attend(*low, grad.to(dtype)), dtype)
    expected = attend(*ref, grad.to(dtype).float())
    assert out.dtype == dtype and torch.equal(out, expected.to(dtype))  # the forward, bit-exact
    for t, r in zip(low, ref):
        assert t.grad.dtype == dtype
        torch.testing.assert_close(t.grad.float(), r.grad, rtol=0.02, atol=0.02 * r.grad.abs().max().item())
    flash = {n: d for n, d in calls if "flash_attention" in n}
    assert set(flash) == {
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention_for_cpu_backward",
    }
    assert all(d == {torch.float32} for d in flash.values())


@pytest.mark.parametrize("linear", ["torch", "zero3"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen3"])
def test_every_matmul_of_a_model_step_runs_in_fp32(arch, linear, monkeypatch):
    """A whole forward and backward of each family, the eager and softcapped attention included:
    no matmul or attention kernel receives a bf16 operand, and the gradients come back bf16. Also
    where a ZeRO-3 engine has put DeepSpeed's linear in F.linear, as it does for the process, which
    is back there after the step."""
    if linear == "zero3":
        from deepspeed.runtime.zero.linear import zero3_linear_wrap

        monkeypatch.setattr(F, "linear", zero3_linear_wrap)
    before = F.linear
    for attention in ("model.attn_implementation=eager", "model.attn_softcap=50", "model.logit_softcap=30"):
        mc = load_config(ROOT / "configs", [f"model.arch={arch}", *TINY[:4], attention]).model
        model = build_model(mc, vocab_size=128, eos_id=0, seed=0).to(torch.bfloat16)
        ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
        _, calls = emulated(lambda: model(input_ids=ids, labels=ids).loss.backward(), torch.bfloat16)  # noqa: B023
        kernels = {(n, frozenset(d)) for n, d in calls if n in KERNELS or "attention" in n}
        assert {n for n, _ in kernels} >= {"mm"}, (arch, attention)
        assert all(d == {torch.float32} for _, d in kernels), (arch, attention, kernels)
        assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters() if p.grad is not None)
    assert F.linear is before


def test_out_and_mixed_dtypes_behave_as_without_the_mode():
    a = torch.full((2, 3), 2.0).half()
    for c in (torch.zeros(2, 2).half(), torch.empty(0).half()):  # written, resized where empty
        with LowPrecisionInFp32(torch.float16):
            got = torch.matmul(a, a.t(), out=c)
        assert got is c and torch.equal(c, torch.full((2, 2), 12.0).half())
    with pytest.raises(RuntimeError, match="dtype"), LowPrecisionInFp32(torch.float16):
        torch.matmul(a, a.t().float())  # refused natively: not computed in fp32 and rounded to fp16


def test_attention_with_an_fp32_mask_is_computed_in_fp32():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 16, generator=g).bfloat16() for _ in range(3))
    mask = torch.randn(8, 8, generator=g)  # an additive float mask, as torch takes beside bf16
    out, calls = emulated(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), torch.bfloat16)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected.bfloat16())
    kernels = [d for n, d in calls if "attention" in n or n in KERNELS]
    assert kernels and all(d == {torch.float32} for d in kernels), calls


def test_the_path_follows_utils_cpu_compute():
    for dtype in LOW:
        assert use_fp32_compute(dtype, "fp32") and not use_fp32_compute(dtype, "native")
        assert use_fp32_compute(dtype, "auto") == (not has_native_kernels(dtype))
        assert not use_fp32_compute(torch.float32, "fp32")  # fp32 runs have nothing to emulate
    with pytest.raises(ValueError, match="cpu_compute"):
        use_fp32_compute(torch.bfloat16, "fast")


def uncapped_env() -> dict:
    return {k: v for k, v in env().items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 ISA settings")
@pytest.mark.parametrize("env", ["ATEN_CPU_CAPABILITY=avx2", "ONEDNN_MAX_CPU_ISA=AVX2"])
def test_auto_takes_fp32_compute_when_the_isa_is_capped_at_avx2(env):
    """Either setting alone leaves torch without fast bf16 kernels (SDPA, or the matmuls)."""
    code = (
        "import torch; from dsinstab.run.lowp import use_fp32_compute as f; print(f(torch.bfloat16, 'auto'))"
    )
    name, value = env.split("=")
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**uncapped_env(), name: value},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "True"


def test_bf16_run_in_fp32_compute_matches_native_kernels(tmp_path, cache_dir):
    """Both paths multiply bf16 inputs with fp32 accumulation and round to bf16; only the order of
    the sums differs, so the first losses agree to well under one bf16 step (2**-8 relative)."""
    short = ("trainer.max_steps=4", "trainer.eval_every=100", "trainer.checkpoint_every=0")
    runs, said = {}, {}
    for mode in ("fp32", "native"):
        proc, run = launch(tmp_path, cache_dir, *short, f"utils.cpu_compute={mode}", name=mode)
        assert_ok(proc)
        runs[mode], said[mode] = [r["train/loss"] for r in train_rows(run)], proc.stdout
    assert "bf16 matmuls and attention computed in fp32 and rounded to bf16" in said["fp32"]
    assert "bf16 matmuls and attention on torch's bf16 kernels" in said["native"]
    assert len(runs["fp32"]) == len(runs["native"]) == 4
    for emu, native in zip(runs["fp32"], runs["native"]):
        assert math.isfinite(emu) and abs(emu - native) <= 2e-3 * native
