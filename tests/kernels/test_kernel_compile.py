"""The kernels compile for the GPU, without one: Triton's ahead-of-time path lowers them to PTX and cubin for Ampere
(sm80) and Hopper (sm90) with the ptxas bundled in its wheel.  The interpreter tests check the numbers; this checks
that the compiled kernels exist at all, use IEEE division and round-half-even, and run the integer GEMMs (the
exported layers' and Winograd's per-position products) on the int8 tensor-core instructions (``mma.sync ... s8`` on
sm80, ``wgmma ... s8`` on sm90), 4-bit weights included, and quantized attention's code products on fp16 ones."""

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

    import triton.language as tl

    fq = _build.load_kernel_module("_fake_quant_triton")
    gemm = _build.load_kernel_module("_int_gemm_triton")
    att = _build.load_kernel_module("_attention_triton")
    wg = _build.load_kernel_module("_winograd_triton")
    assert not fq.INTERPRET

    def compile_ptx(fn, types, constexprs, capability):
        signature = {}
        for name in fn.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = types[name]
            else:
                signature[name] = "fp32" if name.lower() in ("qmin", "qmax", "p_qmin", "p_qmax") else "i32"
        keyed = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
        return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=keyed),
                              target=GPUTarget("cuda", capability, 32)).asm["ptx"]

    fq_types = {"x_ptr": "*fp16", "out_ptr": "*fp16", "grad_ptr": "*bf16", "grad_x_ptr": "*bf16", "step_ptr": "*fp32",
                "zp_ptr": "*fp32", "index_ptr": "*i32", "part_step_ptr": "*fp32", "part_zp_ptr": "*fp32"}
    gemm_types = {"a_ptr": "*i8", "w_ptr": "*u8", "out_ptr": "*fp16", "row_scale_ptr": "*fp32", "row_zp_ptr": "*i32",
                  "w_scale_ptr": "*fp32", "w_rowsum_ptr": "*i32", "bias_ptr": "*fp32", "x_ptr": "*bf16",
                  "scale_ptr": "*fp32", "zp_ptr": "*fp32"}
    att_types = {"q_ptr": "*fp16", "k_ptr": "*fp16", "v_ptr": "*fp16", "o_ptr": "*fp16", "mask_ptr": "*fp32",
                 "qk_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "p_step_ptr": "*fp32", "p_zp_ptr": "*fp32"}
    wg_types = {"x_ptr": "*fp16", "kb_ptr": "*fp32", "codes_ptr": "*i8", "steps_ptr": "*fp32", "a_ptr": "*i8",
                "b_ptr": "*i8", "sa_ptr": "*fp32", "sb_ptr": "*fp32", "out_ptr": "*fp32", "m_ptr": "*fp32",
                "ka_ptr": "*fp32", "bias_ptr": "*fp32", "y_ptr": "*fp16"}
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
        # quantized attention: codes, then fp16 tensor-core products of the integer codes (exact), fp32 softmax
        "attention_codes_sm80": compile_ptx(att.codes_kernel, dict(x_ptr="*bf16", out_ptr="*fp16", step_ptr="*fp32",
                                                                   zp_ptr="*fp32"), dict(HAS_ZP=True, BLOCK=1024), 80),
        "attention_fp16_sm80": compile_ptx(att.attention_kernel, att_types, dict(
            HAS_MASK=True, QUANT_P=True, INTERPRET=False, QK_DTYPE=tl.float16, PV_DTYPE=tl.float16, QK_IEEE=False,
            PV_IEEE=False, BLOCK_M=128, BLOCK_N=64, BLOCK_D=64, BLOCK_DV=64), 80),
        "attention_fp32_sm90": compile_ptx(att.attention_kernel, dict(att_types, q_ptr="*fp32", k_ptr="*fp32",
                                                                      v_ptr="*fp32", o_ptr="*fp32"), dict(
            HAS_MASK=False, QUANT_P=False, INTERPRET=False, QK_DTYPE=tl.float32, PV_DTYPE=tl.float32, QK_IEEE=True,
            PV_IEEE=True, BLOCK_M=64, BLOCK_N=32, BLOCK_D=128, BLOCK_DV=128), 90),
        # integer Winograd F(4,3): input transform + codes, the n^2 int8 GEMMs, output transform
        "winograd_input_sm80": compile_ptx(wg.input_codes_kernel, wg_types, dict(
            M_TILE=4, N_TILE=6, NN_PAD=64, PER_POSITION=True, INTERPRET=False, BLOCK_T=8, BLOCK_C=16), 80),
        "winograd_gemm_sm80": compile_ptx(wg.position_gemm_kernel, wg_types, dict(
            BLOCK_M=128, BLOCK_N=128, BLOCK_K=32), 80),
        "winograd_gemm_sm90": compile_ptx(wg.position_gemm_kernel, wg_types, dict(
            BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), 90),
        "winograd_output_sm80": compile_ptx(wg.output_transform_kernel, wg_types, dict(
            M_TILE=4, N_TILE=6, NN_PAD=64, MM_PAD=16, REQUANT=True, HAS_BIAS=True, INTERPRET=False, BLOCK_T=4,
            BLOCK_K=32), 80),
    }
    found = {name: sorted(set(re.findall(r"(div\\.rn\\.f32|cvt\\.rni\\.f32\\.f32|mma\\.sync[\\w.]*|"
                                          r"wgmma\\.mma_async[\\w.]*)", text)))
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
    for name in ("attention_codes_sm80", "winograd_input_sm80"):
        assert "div.rn.f32" in found[name], (name, found[name])
    # fp16 products of integer codes on the tensor cores; fp32 operands stay IEEE (no TF32 mma)
    assert any(i.startswith("mma.sync") and "f16.f16" in i for i in found["attention_fp16_sm80"]), found
    assert not any("tf32" in i for i in found["attention_fp32_sm90"]), found
    assert any(i.startswith("mma.sync") and "s8.s8" in i for i in found["winograd_gemm_sm80"]), found
    assert any(i.startswith("wgmma.mma_async") and "s8.s8" in i for i in found["winograd_gemm_sm90"]), found
