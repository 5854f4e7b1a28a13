"""The arithmetic of benchmarks/gpu_profile.py, which otherwise runs only on a GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from _benchmarks import benchmark_module


@pytest.fixture(scope="module")
def gpu_profile():
    with benchmark_module("gpu_profile") as module:
        yield module


@pytest.mark.parametrize(
    ("name", "category"),
    [
        ("sm90_xmma_sparse_gemm_bf16bf16_f32_tn_n_tilesize128x128x64", "sparse GEMM"),
        ("void cusparseLt::spmma_kernel<...>", "sparse GEMM"),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "dense GEMM"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "dense GEMM"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>", "attention"),
        ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
        ("void at::native::index_elementwise_kernel<128, 4>", "SLoPe bookkeeping"),
        ("_compact_grad_kernel", "SLoPe bookkeeping"),
        ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel rms_norm", "norms/activations"),
        ("void at::native::vectorized_elementwise_kernel<4, silu_kernel>", "norms/activations"),
        ("void at::native::vectorized_elementwise_kernel<4, AddFunctor<float>>", "other element-wise"),
    ],
)
def test_kernels_are_categorized_by_name(gpu_profile, name, category):
    assert gpu_profile.categorize(name) == category


def test_amdahl_bound_against_hand_arithmetic(gpu_profile):
    # step 100 ms; linear products 40 ms dense: 30 ms at 1.5x (20 ms) and 10 ms at 2x (5 ms) -> 25 ms
    products = [{"output_ms": 20.0, "grad_input_ms": 10.0, "output_x": 1.5, "grad_input_x": 2.0},
                {"output_ms": 10.0, "grad_input_ms": 0.0, "output_x": 1.5, "grad_input_x": 1.0}]
    assert gpu_profile.amdahl_bound(100.0, products) == pytest.approx(100.0 / 85.0)
    slower = [{"output_ms": 10.0, "grad_input_ms": 10.0, "output_x": 0.5, "grad_input_x": 0.5}]
    assert gpu_profile.amdahl_bound(50.0, slower) == pytest.approx(50.0 / 70.0)  # sparse slower: a bound below 1


def test_categories_per_step_and_idle_time(gpu_profile):
    def kernel(name, us):
        return SimpleNamespace(name=name, device_type=torch.autograd.DeviceType.CUDA,
                               time_range=SimpleNamespace(elapsed_us=lambda: us))

    cpu_op = SimpleNamespace(name="aten::mm", device_type=torch.autograd.DeviceType.CPU,
                             time_range=SimpleNamespace(elapsed_us=lambda: 10_000.0))
    events = [kernel("nvjet_gemm", 6000.0), kernel("sm90_xmma_sparse_gemm", 3000.0), cpu_op,
              kernel("flash_fwd_kernel", 3000.0)]
    got = gpu_profile.per_category(events, step_ms=5.0, steps=2)  # two steps profiled
    assert got["dense GEMM"] == 3.0 and got["sparse GEMM"] == 1.5 and got["attention"] == 1.5
    assert got["GPU idle"] == 0.0  # kernels (6 ms per step) exceed the 5 ms step: idle is never negative
    assert gpu_profile.per_category(events, step_ms=8.0, steps=2)["GPU idle"] == pytest.approx(2.0)
