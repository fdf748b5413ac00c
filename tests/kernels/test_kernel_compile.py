"""The kernels compile for the GPU, without one: Triton's ahead-of-time path lowers them to PTX and cubin for Ampere
(sm80) and Hopper (sm90) with the ptxas bundled in its wheel.  The interpreter tests check the numbers; this checks
that the compiled kernels exist at all, use IEEE division and round-half-even, and run the integer GEMM on the int8
tensor-core instructions (``mma.sync ... s8`` on sm80, ``wgmma ... s8`` on sm90), 4-bit weights included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import json, os, re
    os.environ.pop("TRITON_INTERPRET", None)   # compiled kernels, not interpreted ones
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from diffusers_qalora.kernels import _build

    fq = _build.load_kernel_module("_fake_quant_triton")
    gemm = _build.load_kernel_module("_int_gemm_triton")
    assert not fq.INTERPRET

    def compile_ptx(fn, types, constexprs, capability):
        signature = {}
        for name in fn.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = types[name]
            else:
                signature[name] = "fp32" if name in ("qmin", "qmax") else "i32"
        keyed = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
        return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=keyed),
                              target=GPUTarget("cuda", capability, 32)).asm["ptx"]

    fq_types = {"x_ptr": "*fp16", "out_ptr": "*fp16", "grad_ptr": "*bf16", "grad_x_ptr": "*bf16", "step_ptr": "*fp32",
                "zp_ptr": "*fp32", "index_ptr": "*i32", "part_step_ptr": "*fp32", "part_zp_ptr": "*fp32"}
    gemm_types = {"a_ptr": "*i8", "w_ptr": "*u8", "out_ptr": "*fp16", "row_scale_ptr": "*fp32", "row_zp_ptr": "*i32",
                  "w_scale_ptr": "*fp32", "w_rowsum_ptr": "*i32", "bias_ptr": "*fp32", "x_ptr": "*bf16",
                  "scale_ptr": "*fp32", "zp_ptr": "*fp32"}
    ptx = {
        "fake_quant_fwd_sm80": compile_ptx(fq.fake_quant_fwd_kernel, fq_types, dict(
            HAS_ZP=True, HAS_INDEX=False, ROWS=4, BLOCK=512, INTERPRET=False), 80),
        "fake_quant_bwd_sm90": compile_ptx(fq.fake_quant_bwd_kernel, dict(fq_types, x_ptr="*bf16"), dict(
            HAS_ZP=True, HAS_INDEX=True, NEED_X=True, NEED_STEP=True, NEED_ZP=True, ROWS=1, BLOCK=2048,
            INTERPRET=False), 90),
        "quantize_codes_sm80": compile_ptx(gemm.quantize_codes_kernel, dict(gemm_types, out_ptr="*i8"), dict(
            BLOCK=1024, INTERPRET=False), 80),
        "gemm_w4_conv_sm80": compile_ptx(gemm.int_gemm_kernel, gemm_types, dict(
            KH=3, KW=3, HAS_BIAS=True, IS_CONV=True, BITS=4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8,
            INTERPRET=False), 80),
        "gemm_w8_linear_sm90": compile_ptx(gemm.int_gemm_kernel, dict(gemm_types, out_ptr="*bf16"), dict(
            KH=1, KW=1, HAS_BIAS=False, IS_CONV=False, BITS=8, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8,
            INTERPRET=False), 90),
    }
    found = {name: sorted(set(re.findall(r"(div\\.rn\\.f32|cvt\\.rni\\.f32\\.f32|mma\\.sync[\\w.]*s8[\\w.]*|"
                                          r"wgmma\\.mma_async[\\w.]*s8[\\w.]*)", text)))
             for name, text in ptx.items()}
    print(json.dumps(found))
    """
)


@pytest.mark.slow
def test_kernels_compile_to_ptx_for_ampere_and_hopper():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_DEFAULT_FP_FUSION": "1"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    if result.returncode != 0 and ("ptxas" in result.stderr or "GPUTarget" in result.stderr):
        pytest.skip(f"this triton build cannot compile for CUDA here: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("fake_quant_fwd_sm80", "fake_quant_bwd_sm90", "quantize_codes_sm80"):
        assert "div.rn.f32" in found[name] and "cvt.rni.f32.f32" in found[name], (name, found[name])
    assert any(i.startswith("mma.sync") and "s8.s8" in i for i in found["gemm_w4_conv_sm80"]), found
    assert any(i.startswith("wgmma.mma_async") and "s8.s8" in i for i in found["gemm_w8_linear_sm90"]), found
