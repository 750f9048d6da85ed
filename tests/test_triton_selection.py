"""Where the `triton` backend runs and where it is refused: `auto` takes it on CUDA GPUs from
sm_80 on (not on the CPU, a ROCm build, sm_7x, an old Triton or float64 inputs), with a
warning that names why it falls back; asking for `triton` where it cannot run names the
reason. GPUs are faked (no kernel runs)."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

# Before Triton's first import (see tests/test_kernels.py): the backends import it.
_TRITON_PRELOADED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import make_aligner  # noqa: E402

import carzero_fast as cf  # noqa: E402
from carzero_fast.backends import resolve_backend  # noqa: E402
from carzero_fast.backends.fused import (  # noqa: E402
    _runtime_unavailable,
    check_device,
    kernels_unavailable,
)


@pytest.fixture(autouse=True, scope="module")
def _interpreter_active():
    if _TRITON_PRELOADED:
        pytest.fail("Triton was imported before TRITON_INTERPRET=1 was set (see this module's top)")


# three layers, a one-layer head: any small config does, nothing is computed
CONFIG = cf.AlignerConfig(d_model=64, n_heads=4, n_layers=3, d_ffn=96, head_dims=(40,))


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 64, generator=g).to(dtype), torch.randn(2, 64, generator=g).to(dtype)


CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)  # a device name: nothing runs on it


def test_auto_picks_triton_on_cuda_only(monkeypatch):
    from carzero_fast.kernels import configs as kc

    monkeypatch.setattr(kc, "_capability", lambda index: 90)
    assert resolve_backend("auto", CPU) == "chunked"
    assert resolve_backend("auto", GPU) == "triton"
    assert resolve_backend("triton", CPU) == "triton"
    assert resolve_backend("auto", GPU, torch.bfloat16) == "triton"
    # the kernels compute in fp32/bf16/fp16: float64 stays on chunked, and asking for the
    # kernels names the dtype (tl.dot would not accumulate float64 blocks in fp32)
    assert resolve_backend("auto", GPU, torch.float64) == "chunked"
    al = make_aligner(CONFIG).double()
    mem, q = _inputs(torch.float64)
    with torch.no_grad(), pytest.raises(TypeError, match="float64; use 'chunked'"):
        al(mem, q, backend="triton")
    with pytest.raises(TypeError, match="float64; use 'chunked'"):  # training's entry too
        al(mem.requires_grad_(), q, backend="triton")


@pytest.fixture
def fresh_kernel_check(monkeypatch):
    """The process-wide checks are cached: recheck under the test's patches (on an sm_90
    unless the test fakes another GPU)."""
    from carzero_fast.kernels import configs as kc

    monkeypatch.setattr(kc, "_capability", lambda index: 90)
    _runtime_unavailable.cache_clear()
    yield
    _runtime_unavailable.cache_clear()


@pytest.mark.parametrize(("version", "usable"),
                         [("3.3.1", False), ("3.4.0", True), ("3.10.0+git1a2b", True)])  # fmt: skip
def test_triton_older_than_3_4_is_named_and_auto_falls_back(monkeypatch, fresh_kernel_check,
                                                           version, usable):  # fmt: skip
    import triton

    monkeypatch.setattr(triton, "__version__", version)
    reason = kernels_unavailable()
    assert (reason is None) == usable
    if usable:
        assert resolve_backend("auto", GPU) == "triton"
        return
    assert "3.3.1" in reason and ">= 3.4" in reason
    with pytest.warns(RuntimeWarning, match="runs 'chunked' on CUDA: Triton 3.3.1"):
        assert resolve_backend("auto", GPU) == "chunked"
    assert resolve_backend("auto", CPU) == "chunked"
    al = make_aligner(CONFIG)
    mem, q = _inputs()
    with torch.no_grad(), pytest.raises(RuntimeError, match="'triton' is unavailable: Triton 3.3"):
        al(mem, q, backend="triton")
    with pytest.raises(RuntimeError, match="unavailable"):  # training's entry too
        al(mem.requires_grad_(), q, backend="triton")


@pytest.mark.parametrize(("arch", "hip", "reason"), [
    (75, None, "the GPU is sm_75; the kernels need sm_80 or later"),
    (70, None, "the GPU is sm_70"),
    (90, "6.2.41133", "this PyTorch is a ROCm build"),
    (80, None, None),
    (120, None, None),
])  # fmt: skip
def test_gpus_the_kernels_do_not_target_fall_back(monkeypatch, fresh_kernel_check, arch, hip,
                                                  reason):  # fmt: skip
    from carzero_fast.kernels import configs as kc

    monkeypatch.setattr(kc, "_capability", lambda index: arch)
    monkeypatch.setattr(torch.version, "hip", hip)
    if reason is None:
        assert kernels_unavailable(GPU) is None
        assert resolve_backend("auto", GPU) == "triton"
        return
    assert reason in kernels_unavailable(GPU)
    assert kernels_unavailable(CPU) is None  # the interpreter still runs them
    with pytest.warns(RuntimeWarning, match=reason):
        assert resolve_backend("auto", GPU) == "chunked"
    on_gpu = SimpleNamespace(device=GPU)  # check_device reads only the tensor's device
    with pytest.raises(RuntimeError, match=f"'triton' is unavailable: {reason}"):
        check_device(on_gpu)


def test_launch_device_is_the_tensors_gpu():
    from carzero_fast.backends.fused import launch_device

    guard = launch_device(SimpleNamespace(device=torch.device("cuda", 1)))  # not entered
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with launch_device(torch.zeros(1)):  # CPU: nothing to switch
        pass


def test_missing_triton_is_named(monkeypatch, fresh_kernel_check):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    assert "not installed" in kernels_unavailable()
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        check_device(torch.zeros(1))


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="CUDA"):
        check_device(torch.zeros(1))
    al = make_aligner(CONFIG)
    mem, q = _inputs()
    with torch.no_grad(), pytest.raises(RuntimeError, match="CUDA"):
        al(mem, q, backend="triton")
