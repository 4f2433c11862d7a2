"""The GPU benchmarks' own plumbing, checked on the CPU: a GPU session is rare and short (15
minutes, one call), so a script that breaks there costs the whole measurement."""

import argparse
import json
import os
import re
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import pytest

from conftest import cpu_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from profile_ops import profile_top_ops  # noqa: E402


def test_profile_top_ops_totals_the_traced_ops():
    matmul_then_tanh = jax.jit(lambda a: jnp.tanh(a @ a) @ a)
    a = jnp.ones((256, 256))
    matmul_then_tanh(a).block_until_ready()
    report = profile_top_ops(lambda: matmul_then_tanh(a), calls=3, top=5)
    assert report["ops_from"] == ("host" if jax.default_backend() == "cpu" else "device") and report["calls"] == 3
    ops = report["top_ops"]
    assert 1 <= len(ops) <= 5 and report["distinct_ops"] >= len(ops)
    assert all(op["launches_per_call"] >= 1 and op["ms_per_call"] > 0 for op in ops)
    assert ops == sorted(ops, key=lambda op: -op["ms_per_call"])
    assert 0 < sum(op["share_of_op_time"] for op in ops) <= 1 + 1e-9
    assert 0 < report["busy_ms_per_call"] <= report["wall_ms_per_call"]
    json.dumps(report)  # it travels back from the GPU machine as JSON


def test_gpu_compile_reads_the_compilers_reports():
    """bench/gpu_compile.py compiles for an H200 on a CPU (with jax's CUDA plugin, not installed in
    the test environment): what it reads from XLA's thunk list and ptxas -v is checked on lines in
    their formats, and the per-SM occupancy on hand-computed cases (65536 registers, allocated per
    warp in units of 256; 233472 bytes of shared memory, 1 KiB reserved per block)."""
    from gpu_compile import blocks_per_sm, parse_ptxas_report, parse_thunk_sequence

    thunks = ("001: kCustomKernel [source       | next=002 (1)] pixelflow_flash_forward grid: [32, 8, 16] "
              "threads: [128, 1, 1]  shared_memory: 81920 bytes\n"
              "002: kCustomKernel [prev=001 (1) | sink        ] input_reduce_fusion grid: [65536, 1, 1] "
              "threads: [256, 1, 1]  shared_memory: 0 bytes\n")
    assert parse_thunk_sequence(thunks) == [
        dict(kernel="pixelflow_flash_forward", grid=[32, 8, 16], threads=[128, 1, 1], shared_memory=81920),
        dict(kernel="input_reduce_fusion", grid=[65536, 1, 1], threads=[256, 1, 1], shared_memory=0)]
    report = ("ptxas info    : 0 bytes gmem\n"
              "ptxas info    : Compiling entry function 'pixelflow_flash_backward_dq' for 'sm_90a'\n"
              "ptxas info    : Function properties for pixelflow_flash_backward_dq\n"
              "    0 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
              "ptxas info    : Used 134 registers, used 1 barriers\n"
              "ptxas info    : Compiling entry function 'fusion_1' for 'sm_90a'\n"
              "ptxas info    : Function properties for fusion_1\n"
              "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
              "ptxas info    : Used 10 registers, used 0 barriers\n")
    assert parse_ptxas_report(report) == {
        "pixelflow_flash_backward_dq": dict(registers=134, spill_stores=8, spill_loads=12),
        "fusion_1": dict(registers=10, spill_stores=0, spill_loads=0)}
    assert blocks_per_sm(threads=128, registers=236, shared_memory=81920) == 2  # 4 warps x 7680 registers
    assert blocks_per_sm(threads=256, registers=126, shared_memory=143360) == 1  # shared memory bounds it
    assert blocks_per_sm(threads=128, registers=128, shared_memory=30720) == 4  # registers bound it (7 by memory)
    assert blocks_per_sm(threads=32, registers=10, shared_memory=0) == 32  # the SM's block limit
    # 2048 threads per SM: 16 blocks of 128 threads, not the 32 that registers and blocks allow
    assert blocks_per_sm(threads=128, registers=16, shared_memory=0) == 16


def test_gpu_compile_counts_what_one_sampling_step_launches():
    """`gpu_compile.py sample` reads XLA's thunk list (after its passes, which group kernels into
    command buffers) as a tree, and counts per call and per trip of a loop what runs on the card and
    what the host dispatches. Checked on an excerpt of a real list (a stage's Euler loop over a
    2-layer scan), with its "condition:" lines not aligned with their while, as XLA writes them."""
    from gpu_compile import launch_counts, memory_plan, parse_thunk_tree, parse_trip_counts, thunk_kind

    thunks = ("001: kCustomKernel [source       | next=003 (2)] loop_add_fusion_8 grid: [96, 1, 1]\n"
              "003: kWhile        [prev=002 (1) | sink        ]   \n"
              "condition:\n"
              "    004: kCustomKernel [source | sink] loop_compare_fusion_1 grid: [1, 1, 1] threads: [1, 1, 1]\n"
              "  body:\n"
              "    000: kCommandBuffer [source       | next=020 (1)] \n"
              "        005: kCustomKernel [source       | next=007 (2)] input_concatenate_fusion_3 grid: [8, 1, 1]\n"
              "        007: kCustomKernel [prev=006 (1) | next=008 (1)] gemm_fusion_dot_general_39 grid: [4, 1, 1]\n"
              "        019: kCopy         [source       | sink        ] kCopy\n"
              "    020: kWhile         [prev=000 (1) | next=000 (1)]       \n"
              "condition:\n"
              "        021: kCustomKernel [source | sink] loop_compare_fusion grid: [1, 1, 1] threads: [1, 1, 1]\n"
              "      body:\n"
              "        000: kCommandBuffer      [source       | next=031 (3)] \n"
              "            022: kCustomKernel [source       | next=023 (1)] loop_convert_fusion grid: [48, 1, 1]\n"
              "            023: kCustomKernel [prev=022 (1) | next=024 (1)] gemm_fusion_dot_general_29\n"
              "        028: kDynamicSliceFusion [source       | next=031 (2)] params=1, results=1\n"
              "            029: kCopy [source | sink] kCopy\n"
              "        039: kCuDnn              [prev=038 (1) | next=040 (1)] kCuDnn\n"
              "        040: kCustomKernel       [prev=039 (1) | next=041 (1)] pixelflow_flash_forward grid: [8, 1, 1]\n"
              "    000: kCommandBuffer [prev=020 (1) | sink        ] \n"
              "        053: kCustomKernel [source       | next=054 (1)] wrapped_convert_3 grid: [16, 1, 1]\n"
              "060: kCustomKernel [prev=003 (1) | sink] loop_add_fusion_9 grid: [96, 1, 1] threads: [128, 1, 1]\n")
    roots = parse_thunk_tree(thunks)
    assert [(t["id"], t["kind"]) for t in roots] == [(1, "kCustomKernel"), (3, "kWhile"), (60, "kCustomKernel")]
    loop = roots[1]
    assert [t["name"] for t in loop["blocks"]["condition"]] == ["loop_compare_fusion_1"]
    assert [t["kind"] for t in loop["blocks"]["body"]] == ["kCommandBuffer", "kWhile", "kCommandBuffer"]
    layers = loop["blocks"]["body"][1]
    assert [t["id"] for t in layers["blocks"]["body"]] == [0, 28, 39, 40]
    assert layers["blocks"]["body"][1]["blocks"]["thunks"][0]["kind"] == "kCopy"
    assert [thunk_kind(t) for t in layers["blocks"]["body"][2:]] == ["cudnn", "pallas"]

    metadata = ('thunk_metadata {\n  thunk_info {\n    profile_annotation: "while.25"\n    thunk_id: 3\n  }\n'
                '  thunk_kind: "kWhile"\n}\nthunk_metadata {\n  thunk_info {\n    profile_annotation: "while.23"\n'
                '    thunk_id: 20\n  }\n  thunk_kind: "kWhile"\n}\n')
    hlo = ('  %while.23 = (s32[], bf16[8,64,32]{2,1,0}) while(%tuple.25), condition=%region_8.21.clone, '
           'body=%region_2.20, backend_config={"known_trip_count":{"n":"2"},"known_init_step":{"init":"0"}}\n'
           '  %while.25 = (s32[], f32[4,32,32,3]{3,2,1,0}) while(%tuple.28), condition=%region_11.26, '
           'body=%region_0.25, backend_config={"known_trip_count":{"n":"3"},"known_init_step":{"init":"0"}}\n')
    trips = parse_trip_counts(metadata, hlo)
    assert trips == {3: 3, 20: 2}
    # One step: 2 command buffers, and per layer (x2) one buffer + the sliced copy, cuDNN, Pallas.
    per_step = dict(fusion=1 + 2 + 1, gemm=1 + 2, copy=1 + 2, cudnn=2, pallas=2, dispatches=2 + 2 * 4)
    assert launch_counts(loop["blocks"]["body"], trips) == per_step
    per_call = {kind: 3 * n for kind, n in per_step.items()}
    per_call["fusion"] += 2
    per_call["dispatches"] += 2
    assert launch_counts(roots, trips) == per_call
    # A loop of unknown trip count (dopri5's) counts once, with its condition (read back each trip).
    unknown = launch_counts(roots, {20: 2})
    assert unknown["unknown_trips"] == 1 and unknown["fusion"] == per_step["fusion"] + 1 + 2

    plan = type("Memory", (), dict(argument_size_in_bytes=3e9, output_size_in_bytes=1e9, alias_size_in_bytes=1e9,
                                   temp_size_in_bytes=2.5e9))
    assert memory_plan(type("Compiled", (), dict(memory_analysis=lambda self: plan))()) == dict(
        arguments_gb=3.0, outputs_gb=1.0, temporaries_gb=2.5, peak_gb=5.5)


# A layer loop of 3 trips in the format of XLA's optimized GPU HLO (from a real dump, cut down): it
# casts its layer's row of stacked float32 weights, runs a matmul, GELU and cuDNN's attention, and
# writes its output into a stack in place; before the loop the stack is zeroed, after it copied.
LAYER_LOOP_HLO = """HloModule jit_step, entry_computation_layout={(bf16[16,4]{1,0}, \
f32[3,4,8]{2,1,0})->bf16[3,16,8]{2,1,0}}

%fused_convert (param_0.1: f32[3,4,8], param_1.2: s32[]) -> bf16[1,4,8] {
  %param_0.1 = f32[3,4,8]{2,1,0} parameter(0)
  %param_1.2 = s32[] parameter(1)
  %constant_1 = s32[] constant(0)
  %dynamic-slice.1 = f32[1,4,8]{2,1,0} dynamic-slice(%param_0.1, %param_1.2, %constant_1, %constant_1), \
dynamic_slice_sizes={1,4,8}
  ROOT %convert.1 = bf16[1,4,8]{2,1,0} convert(%dynamic-slice.1)
}

%gemm_fusion_dot_computation (parameter_0: bf16[16,4], parameter_1: bf16[4,8]) -> bf16[16,8] {
  %parameter_0 = bf16[16,4]{1,0} parameter(0)
  %parameter_1 = bf16[4,8]{1,0} parameter(1)
  ROOT %dot.1 = bf16[16,8]{1,0} dot(%parameter_0, %parameter_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_tanh (param_0.3: bf16[16,8]) -> bf16[16,8] {
  %param_0.3 = bf16[16,8]{1,0} parameter(0)
  ROOT %tanh.1 = bf16[16,8]{1,0} tanh(%param_0.3), metadata={op_name="jit(step)/tanh" stack_frame_id=7}
}

%fused_dynamic_update_slice (param_0.4: bf16[3,16,8], param_1.5: bf16[16,8], param_2.6: s32[]) -> bf16[3,16,8] {
  %param_0.4 = bf16[3,16,8]{2,1,0} parameter(0)
  %param_1.5 = bf16[16,8]{1,0} parameter(1)
  %bitcast.3 = bf16[1,16,8]{2,1,0} bitcast(%param_1.5)
  %param_2.6 = s32[] parameter(2)
  %constant_2 = s32[] constant(0)
  ROOT %dynamic-update-slice.1 = bf16[3,16,8]{2,1,0} dynamic-update-slice(%param_0.4, %bitcast.3, %param_2.6, \
%constant_2, %constant_2)
}

%region_0.1 (arg_tuple.1: (s32[], bf16[16,4], f32[3,4,8], bf16[3,16,8])) -> (s32[], bf16[16,4], f32[3,4,8], \
bf16[3,16,8]) {
  %arg_tuple.1 = (s32[], bf16[16,4]{1,0}, f32[3,4,8]{2,1,0}, /*index=3*/bf16[3,16,8]{2,1,0}) parameter(0)
  %get-tuple-element.1 = s32[] get-tuple-element(%arg_tuple.1), index=0
  %get-tuple-element.2 = bf16[16,4]{1,0} get-tuple-element(%arg_tuple.1), index=1
  %get-tuple-element.3 = f32[3,4,8]{2,1,0} get-tuple-element(%arg_tuple.1), index=2
  %get-tuple-element.4 = bf16[3,16,8]{2,1,0} get-tuple-element(%arg_tuple.1), index=3
  %loop_convert_fusion = bf16[1,4,8]{2,1,0} fusion(%get-tuple-element.3, %get-tuple-element.1), kind=kLoop, \
calls=%fused_convert
  %bitcast.1 = bf16[4,8]{1,0} bitcast(%loop_convert_fusion)
  %gemm_fusion_dot = bf16[16,8]{1,0} fusion(%get-tuple-element.2, %bitcast.1), kind=kCustom, \
calls=%gemm_fusion_dot_computation, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %loop_tanh_fusion = bf16[16,8]{1,0} fusion(%gemm_fusion_dot), kind=kLoop, calls=%fused_tanh, \
metadata={op_name="jit(step)/while/body/tanh" source_file="model.py" source_line=3}
  %attention.1 = (bf16[16,8]{1,0}, u8[4096]{0}) custom-call(%loop_tanh_fusion, %gemm_fusion_dot, %loop_tanh_fusion), \
custom_call_target="__cudnn$fmhaSoftmax", operand_layout_constraints={bf16[16,8]{1,0}, bf16[16,8]{1,0}, bf16[16,8]{1,0}}
  %get-tuple-element.5 = bf16[16,8]{1,0} get-tuple-element(%attention.1), index=0
  %loop_dynamic_update_slice_fusion = bf16[3,16,8]{2,1,0} fusion(%get-tuple-element.4, %get-tuple-element.5, \
%get-tuple-element.1), kind=kLoop, calls=%fused_dynamic_update_slice
  ROOT %tuple.1 = (s32[], bf16[16,4]{1,0}, f32[3,4,8]{2,1,0}, \
/*index=3*/bf16[3,16,8]{2,1,0}) tuple(%get-tuple-element.1, %get-tuple-element.2, %get-tuple-element.3, \
%loop_dynamic_update_slice_fusion)
}

%fused_broadcast () -> bf16[3,16,8] {
  %constant_5 = bf16[] constant(0)
  ROOT %broadcast.1 = bf16[3,16,8]{2,1,0} broadcast(%constant_5), dimensions={}
}

%region_1.2 (arg_tuple.2: (s32[], bf16[16,4], f32[3,4,8], bf16[3,16,8])) -> pred[] {
  %arg_tuple.2 = (s32[], bf16[16,4]{1,0}, f32[3,4,8]{2,1,0}, /*index=3*/bf16[3,16,8]{2,1,0}) parameter(0)
  %get-tuple-element.6 = s32[] get-tuple-element(%arg_tuple.2), index=0
  %constant_3 = s32[] constant(3)
  ROOT %compare.1 = pred[] compare(%get-tuple-element.6, %constant_3), direction=LT
}

ENTRY %main.3 (x.1: bf16[16,4], w.1: f32[3,4,8]) -> bf16[3,16,8] {
  %x.1 = bf16[16,4]{1,0} parameter(0)
  %w.1 = f32[3,4,8]{2,1,0} parameter(1)
  %constant_4 = s32[] constant(0)
  %loop_broadcast_fusion = bf16[3,16,8]{2,1,0} fusion(), kind=kLoop, calls=%fused_broadcast
  %tuple.2 = (s32[], bf16[16,4]{1,0}, f32[3,4,8]{2,1,0}, /*index=3*/bf16[3,16,8]{2,1,0}) tuple(%constant_4, %x.1, \
%w.1, %loop_broadcast_fusion)
  %while.1 = (s32[], bf16[16,4]{1,0}, f32[3,4,8]{2,1,0}, /*index=3*/bf16[3,16,8]{2,1,0}) while(%tuple.2), \
condition=%region_1.2, body=%region_0.1, \
backend_config={"known_trip_count":{"n":"3"},"known_init_step":{"init":"0","step":"1"}}
  %get-tuple-element.7 = bf16[3,16,8]{2,1,0} get-tuple-element(%while.1), index=3
  ROOT %copy.1 = bf16[3,16,8]{2,1,0} copy(%get-tuple-element.7)
}
"""


def test_hlo_traffic_counts_what_each_kernel_reads_and_writes_per_trip():
    """bench/hlo_traffic.py: the bytes a kernel moves are its operands and outputs, except that a
    loop's kernel slicing its layer's row of a stacked array reads the row, and one stacking its
    output writes the row; a loop's kernels count once per trip."""
    from hlo_traffic import kernel_traffic, traffic_by_kind

    per_trip = dict(loop_convert_fusion=4 * 8 * 4 + 4 + 4 * 8 * 2,  # a float32 row (and the index) in, bf16 out
                    gemm_fusion_dot=16 * 4 * 2 + 4 * 8 * 2 + 16 * 8 * 2,
                    loop_tanh_fusion=2 * 16 * 8 * 2,
                    **{"attention.1": 3 * 16 * 8 * 2 + 16 * 8 * 2},  # its u8 workspace is no traffic
                    loop_dynamic_update_slice_fusion=16 * 8 * 2 + 4 + 16 * 8 * 2)  # a row in, a row written
    kernels = kernel_traffic(LAYER_LOOP_HLO)
    stack = 3 * 16 * 8 * 2
    assert {k["name"]: k["bytes"] for k in kernels} == {**{name: 3 * n for name, n in per_trip.items()},
                                                        "loop_broadcast_fusion": stack, "copy.1": 2 * stack}
    assert {k["name"]: k["kind"] for k in kernels} == dict(
        loop_convert_fusion="elementwise", gemm_fusion_dot="gemm", loop_tanh_fusion="elementwise",
        **{"attention.1": "attention"}, loop_dynamic_update_slice_fusion="copy", loop_broadcast_fusion="elementwise",
        **{"copy.1": "copy"})
    assert {k["name"]: k["op"] for k in kernels if k["op"]} == {"loop_tanh_fusion": "jit(step)/while/body/tanh"}
    assert traffic_by_kind(kernels) == dict(
        gemm=3 * per_trip["gemm_fusion_dot"], attention=3 * per_trip["attention.1"],
        elementwise=3 * (per_trip["loop_convert_fusion"] + per_trip["loop_tanh_fusion"]) + stack,
        copy=3 * per_trip["loop_dynamic_update_slice_fusion"] + 2 * stack, collective=0)


# Two fusions updating a row of a stack: one returns it beside another output (a multi-output
# fusion, whose root is a tuple), the other scales the whole updated stack.
ROW_UPDATE_HLO = """HloModule jit_rows

%fused_row_and_tanh (param_0: bf16[3,16,8], param_1: bf16[16,8], param_2: s32[]) -> (bf16[3,16,8], bf16[16,8]) {
  %param_0 = bf16[3,16,8]{2,1,0} parameter(0)
  %param_1 = bf16[16,8]{1,0} parameter(1)
  %bitcast.1 = bf16[1,16,8]{2,1,0} bitcast(%param_1)
  %param_2 = s32[] parameter(2)
  %constant_1 = s32[] constant(0)
  %dynamic-update-slice.1 = bf16[3,16,8]{2,1,0} dynamic-update-slice(%param_0, %bitcast.1, %param_2, %constant_1, \
%constant_1)
  %tanh.1 = bf16[16,8]{1,0} tanh(%param_1)
  ROOT %tuple.1 = (bf16[3,16,8]{2,1,0}, bf16[16,8]{1,0}) tuple(%dynamic-update-slice.1, %tanh.1)
}

%fused_row_then_scale (param_0.1: bf16[3,16,8], param_1.1: bf16[16,8], param_2.1: s32[]) -> bf16[3,16,8] {
  %param_0.1 = bf16[3,16,8]{2,1,0} parameter(0)
  %param_1.1 = bf16[16,8]{1,0} parameter(1)
  %bitcast.2 = bf16[1,16,8]{2,1,0} bitcast(%param_1.1)
  %param_2.1 = s32[] parameter(2)
  %constant_2 = s32[] constant(0)
  %dynamic-update-slice.2 = bf16[3,16,8]{2,1,0} dynamic-update-slice(%param_0.1, %bitcast.2, %param_2.1, %constant_2, \
%constant_2)
  ROOT %multiply.1 = bf16[3,16,8]{2,1,0} multiply(%dynamic-update-slice.2, %dynamic-update-slice.2)
}

ENTRY %main.2 (a.1: bf16[3,16,8], b.1: bf16[16,8], i.1: s32[]) -> (bf16[3,16,8], bf16[16,8], bf16[3,16,8]) {
  %a.1 = bf16[3,16,8]{2,1,0} parameter(0)
  %b.1 = bf16[16,8]{1,0} parameter(1)
  %i.1 = s32[] parameter(2)
  %row_fusion = (bf16[3,16,8]{2,1,0}, bf16[16,8]{1,0}) fusion(%a.1, %b.1, %i.1), kind=kLoop, calls=%fused_row_and_tanh
  %scale_fusion = bf16[3,16,8]{2,1,0} fusion(%a.1, %b.1, %i.1), kind=kLoop, calls=%fused_row_then_scale
  ROOT %tuple.2 = (bf16[3,16,8]{2,1,0}, bf16[16,8]{1,0}, bf16[3,16,8]{2,1,0}) tuple(%row_fusion, %scale_fusion)
}
"""


def test_hlo_traffic_counts_a_row_update_in_place_only_where_the_fusion_outputs_it():
    """A stack's row updated in place and output beside another result (a tuple root) moves the
    row, not the stack; a stack updated and then computed on is read and written whole."""
    from hlo_traffic import kernel_traffic

    row, stack = 16 * 8 * 2, 3 * 16 * 8 * 2
    assert {k["name"]: k["bytes"] for k in kernel_traffic(ROW_UPDATE_HLO)} == dict(
        row_fusion=row + 4 + row + row,  # the row and the index in; the row and tanh's output written
        scale_fusion=stack + row + 4 + stack)


# Sampling's shape: a loop of 3 trips (a stage's layers) inside one of 4 (its Euler steps), then a
# loop of no known trip count (dopri5's), after an optimization barrier over the loop's state.
NESTED_LOOPS_HLO = """HloModule jit_nested

%fused_negate (param_0: f32[8]) -> f32[8] {
  %param_0 = f32[8]{0} parameter(0)
  ROOT %negate.1 = f32[8]{0} negate(%param_0)
}

%cond (arg.0: (s32[], f32[8])) -> pred[] {
  %arg.0 = (s32[], f32[8]{0}) parameter(0)
  %gte.0 = s32[] get-tuple-element(%arg.0), index=0
  %constant.0 = s32[] constant(3)
  ROOT %compare.0 = pred[] compare(%gte.0, %constant.0), direction=LT
}

%inner_body (arg.1: (s32[], f32[8])) -> (s32[], f32[8]) {
  %arg.1 = (s32[], f32[8]{0}) parameter(0)
  %gte.1 = s32[] get-tuple-element(%arg.1), index=0
  %gte.2 = f32[8]{0} get-tuple-element(%arg.1), index=1
  %layer_fusion = f32[8]{0} fusion(%gte.2), kind=kLoop, calls=%fused_negate
  ROOT %tuple.1 = (s32[], f32[8]{0}) tuple(%gte.1, %layer_fusion)
}

%outer_body (arg.2: (s32[], f32[8])) -> (s32[], f32[8]) {
  %arg.2 = (s32[], f32[8]{0}) parameter(0)
  ROOT %layers = (s32[], f32[8]{0}) while(%arg.2), condition=%cond, body=%inner_body, \
backend_config={"known_trip_count":{"n":"3"}}
}

%solver_body (arg.3: (s32[], f32[8])) -> (s32[], f32[8]) {
  %arg.3 = (s32[], f32[8]{0}) parameter(0)
  %gte.3 = s32[] get-tuple-element(%arg.3), index=0
  %gte.4 = f32[8]{0} get-tuple-element(%arg.3), index=1
  %solver_fusion = f32[8]{0} fusion(%gte.4), kind=kLoop, calls=%fused_negate
  ROOT %tuple.3 = (s32[], f32[8]{0}) tuple(%gte.3, %solver_fusion)
}

ENTRY %main.4 (x.1: f32[8]) -> (s32[], f32[8]) {
  %x.1 = f32[8]{0} parameter(0)
  %constant.1 = s32[] constant(0)
  %tuple.4 = (s32[], f32[8]{0}) tuple(%constant.1, %x.1)
  %opt-barrier.1 = (s32[], f32[8]{0}) opt-barrier(%tuple.4)
  %steps = (s32[], f32[8]{0}) while(%opt-barrier.1), condition=%cond, body=%outer_body, \
backend_config={"known_trip_count":{"n":"4"}}
  ROOT %solve = (s32[], f32[8]{0}) while(%steps), condition=%cond, body=%solver_body
}
"""


def test_hlo_traffic_multiplies_nested_loops_trips_and_counts_an_unknown_loop_once():
    """A kernel in a loop inside a loop runs the product of their trips; one in a loop of no known
    trip count is counted once (a floor); an optimization barrier moves no bytes."""
    from hlo_traffic import kernel_traffic

    per_run = 2 * 8 * 4  # a float32[8] read and written
    assert {k["name"]: k["bytes"] for k in kernel_traffic(NESTED_LOOPS_HLO)} == dict(
        layer_fusion=4 * 3 * per_run, solver_fusion=per_run)


def test_hlo_traffic_names_cublaslt_matmuls_and_our_pallas_attention_by_their_kind():
    """Library calls other than the test's layer loop: cuBLASLt's matmul (its target says matmul,
    not gemm) is a gemm, and our Pallas attention kernel (a Triton call named in its backend
    config) is attention, not elementwise traffic."""
    from hlo_traffic import kernel_kind, parse_instruction

    matmul = parse_instruction('  %custom-call.3 = (bf16[16,8]{1,0}, s8[4194304]{0}) custom-call(%p.1, %p.2), '
                               'custom_call_target="__cublas$lt$matmul", backend_config={"alpha_real":1}')
    flash = parse_instruction('  %custom-call.5 = bf16[2,16,64]{2,1,0} custom-call(%q.1, %k.1, %v.1), '
                              'custom_call_target="__gpu$xla.gpu.triton", '
                              'backend_config={"name":"pixelflow_flash_forward","num_warps":"4"}')
    assert (kernel_kind(matmul, None), kernel_kind(flash, None)) == ("gemm", "attention")


# A TPU program's shape (libtpu's HLO): the weight prefetched into the core's VMEM (memory space
# S(1)) by an async copy, a Pallas (Mosaic) kernel whose metadata spans lines (one begins with '}'),
# and a matmul fused as a convolution reading the prefetched weight.
TPU_HLO = """HloModule jit_tpu_step

%async_slice (param_0.3: bf16[16,8]) -> bf16[4,8] {
  %param_0.3 = bf16[16,8]{1,0:T(8,128)(2,1)} parameter(0)
  ROOT %slice.3 = bf16[4,8]{1,0:T(8,128)(2,1)S(1)} slice(%param_0.3), slice={[0:4], [0:8]}
}

%fused_matmul (param_0: bf16[16,8], param_1: bf16[8,8]) -> bf16[16,8] {
  %param_0 = bf16[16,8]{1,0:T(8,128)(2,1)} parameter(0)
  %param_1 = bf16[8,8]{1,0:T(8,128)(2,1)S(1)} parameter(1)
  %convolution.1 = bf16[16,8]{1,0:T(8,128)(2,1)} convolution(%param_0, %param_1), dim_labels=bf_io->bf
  ROOT %tanh.1 = bf16[16,8]{1,0:T(8,128)(2,1)} tanh(%convolution.1)
}

ENTRY %main.1 (x.1: bf16[16,8], w.1: bf16[8,8], b.1: f32[8]) -> bf16[16,8] {
  %x.1 = bf16[16,8]{1,0:T(8,128)(2,1)} parameter(0)
  %w.1 = bf16[8,8]{1,0:T(8,128)(2,1)} parameter(1)
  %b.1 = f32[8]{0:T(128)} parameter(2)
  %copy-start = (bf16[8,8]{1,0:T(8,128)(2,1)S(1)}, bf16[8,8]{1,0:T(8,128)(2,1)}, u32[]{:S(2)}) copy-start(%w.1)
  %copy-done = bf16[8,8]{1,0:T(8,128)(2,1)S(1)} copy-done(%copy-start)
  %stack.1 = bf16[28,16,8]{2,1,0:T(8,128)(2,1)} custom-call(), custom_call_target="AllocateBuffer"
  %slice-start.1 = ((bf16[16,8]{1,0:T(8,128)(2,1)}), bf16[4,8]{1,0:T(8,128)(2,1)S(1)}, \
s32[]{:S(2)}) async-start(%x.1), calls=%async_slice
  %slice-done.1 = bf16[4,8]{1,0:T(8,128)(2,1)S(1)} async-done(%slice-start.1)
  %all-reduce.1 = (bf16[8,8]{1,0:T(8,128)(2,1)}, f32[8]{0:T(128)}) all-reduce(%w.1, %b.1), replica_groups={{0,1}}, \
to_apply=%add
  %splash.1 = (bf16[16,8]{1,0:T(8,128)(2,1)}, f32[16]{0:T(128)}) custom-call(%x.1, %x.1, %x.1), \
custom_call_target="tpu_custom_call", frontend_attributes={kernel_metadata={
"xprof_metadata":"{\"block_q\": 128, \"q_layout\": 1}"
}}, metadata={op_name="jit(step)/pallas_call"}, backend_config={"custom_call_config":{"body":"TUzvUgFN"}}
  %o.1 = bf16[16,8]{1,0:T(8,128)(2,1)} get-tuple-element(%splash.1), index=0
  ROOT %convolution_tanh_fusion = bf16[16,8]{1,0:T(8,128)(2,1)} fusion(%o.1, %copy-done), kind=kOutput, \
calls=%fused_matmul
}
"""


def test_hlo_traffic_reads_a_tpu_program():
    """On a TPU (gpu_compile.py --card=v5p): a Mosaic kernel whose metadata spans lines is attention
    and the instructions after it still count (its line beginning with '}' ended the computation);
    a fused convolution is a matmul; a copy into VMEM reads its HBM source and writes no HBM, its
    copy-done moves nothing, and a kernel reading the copy reads no HBM for it; reserving a buffer
    (a custom call, AllocateBuffer) moves nothing; an all-reduce between the chips is a collective;
    an async slice into VMEM reads its slice (it counted the whole array, twice)."""
    from hlo_traffic import kernel_traffic

    x, w = 16 * 8 * 2, 8 * 8 * 2
    assert {k["name"]: (k["kind"], k["bytes"]) for k in kernel_traffic(TPU_HLO)} == {
        "copy-start": ("copy", w), "splash.1": ("attention", 3 * x + x + 16 * 4),
        "convolution_tanh_fusion": ("gemm", x + x), "all-reduce.1": ("collective", 2 * (w + 8 * 4)),
        "slice-start.1": ("copy", x // 4)}


def test_hlo_traffic_reads_an_async_slice_in_its_short_form_as_in_its_long_one():
    """A TPU executable's as_text() prints the async slice into VMEM as `slice-start(%x), slice=...`
    where XLA's dump prints `async-start(%x), calls=%async_slice`: both read the slice (the short
    form was counted a kernel reading the whole array and writing it again, 18 such per layer of
    XL/4's stage-0 forward: 79 GB of elementwise traffic where the dump gives 4)."""
    from hlo_traffic import kernel_traffic

    short = TPU_HLO.replace("), calls=%async_slice", "), slice={[0:4], [0:8]}").replace(" async-start(%x.1)",
                                                                                       " slice-start(%x.1)")
    assert "slice-start(%x.1), slice=" in short and "calls=%async_slice" not in short
    by_name = lambda hlo: {k["name"]: (k["kind"], k["bytes"]) for k in kernel_traffic(hlo)}
    assert by_name(short) == by_name(TPU_HLO)
    assert by_name(short)["slice-start.1"] == ("copy", 16 * 8 * 2 // 4)


# A TPU's scan over 3 layers: its while has no known_trip_count (libtpu's HLO gives none); the
# condition compares the counter, which starts at a copy of 0, below 3. The layer's matmul reads its
# row of the stacked input through a fusion nested in its own.
TPU_LOOP_HLO = """HloModule jit_tpu_scan

%fused_row (param_0.1: bf16[3,16,8], param_1.1: s32[]) -> bf16[16,8] {
  %param_0.1 = bf16[3,16,8]{2,1,0:T(8,128)(2,1)} parameter(0)
  %param_1.1 = s32[]{:T(128)} parameter(1)
  %constant.1 = s32[]{:T(128)} constant(0)
  %dynamic-slice.1 = bf16[1,16,8]{2,1,0:T(8,128)(2,1)} dynamic-slice(%param_0.1, %param_1.1, %constant.1, \
%constant.1), dynamic_slice_sizes={1,16,8}
  ROOT %bitcast.1 = bf16[16,8]{1,0:T(8,128)(2,1)} bitcast(%dynamic-slice.1)
}

%fused_layer (param_0.2: bf16[3,16,8], param_1.2: s32[], param_2.2: bf16[8,8]) -> bf16[16,8] {
  %param_0.2 = bf16[3,16,8]{2,1,0:T(8,128)(2,1)} parameter(0)
  %param_1.2 = s32[]{:T(128)} parameter(1)
  %row.1 = bf16[16,8]{1,0:T(8,128)(2,1)} fusion(%param_0.2, %param_1.2), kind=kLoop, calls=%fused_row
  %param_2.2 = bf16[8,8]{1,0:T(8,128)(2,1)} parameter(2)
  ROOT %convolution.2 = bf16[16,8]{1,0:T(8,128)(2,1)} convolution(%row.1, %param_2.2), dim_labels=bf_io->bf
}

%cond (param.3: (s32[], bf16[3,16,8], bf16[8,8])) -> pred[] {
  %constant.3 = s32[]{:T(128)} constant(3)
  %param.3 = (s32[]{:T(128)}, bf16[3,16,8]{2,1,0:T(8,128)(2,1)}, bf16[8,8]{1,0:T(8,128)(2,1)}) parameter(0)
  %get-tuple-element.3 = s32[]{:T(128)} get-tuple-element(%param.3), index=0
  ROOT %lt.3 = pred[]{:T(512)} compare(%get-tuple-element.3, %constant.3), direction=LT
}

%body (param.4: (s32[], bf16[3,16,8], bf16[8,8])) -> (s32[], bf16[3,16,8], bf16[8,8]) {
  %param.4 = (s32[]{:T(128)}, bf16[3,16,8]{2,1,0:T(8,128)(2,1)}, bf16[8,8]{1,0:T(8,128)(2,1)}) parameter(0)
  %i.4 = s32[]{:T(128)} get-tuple-element(%param.4), index=0
  %x.4 = bf16[3,16,8]{2,1,0:T(8,128)(2,1)} get-tuple-element(%param.4), index=1
  %w.4 = bf16[8,8]{1,0:T(8,128)(2,1)} get-tuple-element(%param.4), index=2
  %layer_fusion = bf16[16,8]{1,0:T(8,128)(2,1)} fusion(%x.4, %i.4, %w.4), kind=kOutput, calls=%fused_layer
  ROOT %tuple.4 = (s32[]{:T(128)}, bf16[3,16,8]{2,1,0:T(8,128)(2,1)}, bf16[8,8]{1,0:T(8,128)(2,1)}) tuple(%i.4, \
%x.4, %w.4)
}

ENTRY %main.5 (x.5: bf16[3,16,8], w.5: bf16[8,8]) -> (s32[], bf16[3,16,8], bf16[8,8]) {
  %x.5 = bf16[3,16,8]{2,1,0:T(8,128)(2,1)} parameter(0)
  %w.5 = bf16[8,8]{1,0:T(8,128)(2,1)} parameter(1)
  %constant.5 = s32[]{:T(128)} constant(0)
  %copy.5 = s32[]{:T(128)} copy(%constant.5)
  %tuple.5 = (s32[]{:T(128)}, bf16[3,16,8]{2,1,0:T(8,128)(2,1)}, bf16[8,8]{1,0:T(8,128)(2,1)}) tuple(%copy.5, %x.5, \
%w.5)
  ROOT %while.5 = (s32[]{:T(128)}, bf16[3,16,8]{2,1,0:T(8,128)(2,1)}, bf16[8,8]{1,0:T(8,128)(2,1)}) while(%tuple.5), \
condition=%cond, body=%body
}
"""


def test_hlo_traffic_counts_a_tpu_scan_per_layer_and_its_row_of_a_stack():
    """libtpu's HLO gives its loops no trip count: a scan's is its counter's, from 0 below the
    condition's constant (counted once, the whole XL step's layers counted as one layer); a matmul
    reading its layer's row of a stack through a nested fusion reads the row (it was the stack)."""
    from hlo_traffic import kernel_traffic

    row, weight = 16 * 8 * 2, 8 * 8 * 2
    assert {k["name"]: (k["kind"], k["bytes"]) for k in kernel_traffic(TPU_LOOP_HLO)} == {
        "copy.5": ("copy", 2 * 4), "layer_fusion": ("gemm", 3 * (row + 4 + weight + row))}


def test_gpu_compile_top_lists_the_kernels_that_move_the_most_with_their_jax_operation():
    """--top=N adds hbm_top to a row: the N kernels of the most bytes, largest first, each with its
    kind, name and the jax operation it came from; without --top the row has none."""
    from gpu_compile import traffic_report

    compiled = type("Compiled", (), dict(as_text=lambda self: LAYER_LOOP_HLO))()
    assert "hbm_top" not in traffic_report(compiled, "h200")
    top = traffic_report(compiled, "h200", top=3)["hbm_top"]
    assert [row[1:] for row in top] == [["attention", "attention.1", ""],
                                        ["copy", "loop_dynamic_update_slice_fusion", ""],
                                        ["elementwise", "loop_tanh_fusion", "jit(step)/while/body/tanh"]]


def test_gpu_compile_does_not_count_a_stream_wait_as_a_kernel():
    """jax 0.11 runs some copies on other streams: an async start wraps them (counted as what they
    run) and an async done waits for them, a host dispatch but no kernel (it was counted a fusion)."""
    from gpu_compile import launch_counts, parse_thunk_tree

    thunks = ("018: kAsyncStart    [source       | next=044 (5) ] stream=computation_stream[0], async_id=18\n"
              "    020: kDynamicSliceFusion [source | sink] params=1, results=1\n"
              "        019: kCopy [source | sink] kCopy\n"
              "000: kCommandBuffer [source       | next=044 (2) ] \n"
              "    027: kCustomKernel [source       | next=031 (4)] loop_convert_fusion_7 grid: [288, 1, 1]\n"
              "043: kAsyncDone     [source       | sink         ] async_id=18\n"
              "044: kCustomKernel  [prev=000 (2) | next=046 (2) ] fusion_73 grid: [512, 1, 1]\n")
    assert launch_counts(parse_thunk_tree(thunks), {}) == dict(copy=1, fusion=2, stream_wait=1, dispatches=4)


def test_gpu_compile_trains_the_text_model_of_configs_t2i():
    """`train --model=t2i` builds configs/t2i.py's model and caption length, written out in the
    script (the GPU machine has no ml_collections); its text options are usage errors elsewhere."""
    from gpu_compile import TEXT_MODEL, TEXT_TOKENS

    sys.path.insert(0, ROOT)
    from configs import t2i

    config = t2i.get_config()
    assert TEXT_MODEL == dict(num_classes=config.model.num_classes,
                              cross_attention_dim=config.model.cross_attention_dim)
    assert TEXT_TOKENS == config.train.max_text_tokens
    for args, message in ((["sample", "--model=t2i"], "argument --model: t2i is for train only, not sample"),
                          (["train", "--text_tokens=77"], "argument --text_tokens: for train --model=t2i only"),
                          (["train", "--encoder_dtype=bfloat16"],
                           "argument --encoder_dtype: for train --model=t2i only"),
                          (["train", "--model=t2i", "--text_tokens=0"], "argument --text_tokens: must be a whole")):
        result = subprocess.run([sys.executable, "bench/gpu_compile.py", *args], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr[-500:])


@pytest.mark.parametrize("encoder_dtype", ["float32", "bfloat16"])
def test_gpu_compile_plans_the_t5_encoder_in_the_dtype_asked(encoder_dtype):
    """--encoder_dtype (train.text_encoder_dtype) is the frozen encoder's parameters in the step's
    plan: flan-t5-xl's encoder, about 1.2e9 of them, each of that dtype's size."""
    from gpu_compile import text_encoder

    from pixelflow_jax.sharding import make_mesh

    _, params, _ = text_encoder(make_mesh(1), 16, encoder_dtype)
    leaves = jax.tree.leaves(params)
    assert {leaf.dtype for leaf in leaves} == {jnp.dtype(encoder_dtype)}
    assert 1.1e9 < sum(leaf.size for leaf in leaves) < 1.3e9


def test_gpu_compile_refuses_a_bad_list_before_compiling():
    """Its lists (--batch=32,48 --remat=dots,full) are checked item by item as usage errors: a typo
    in the last item surfaced after minutes of compiling the first ones."""
    from gpu_compile import comma_separated, one_of
    from harness import positive_int

    assert comma_separated(positive_int)("32,48") == [32, 48]
    assert comma_separated(one_of(("dots", "full")))("dots") == ["dots"]
    with pytest.raises(argparse.ArgumentTypeError, match="must be one of dots, full, got 'dotz'"):
        comma_separated(one_of(("dots", "full")))("full,dotz")
    result = subprocess.run([sys.executable, "bench/gpu_compile.py", "train", "--batch=32,0"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "argument --batch: must be a whole number >= 1, got '0'" in result.stderr
    result = subprocess.run([sys.executable, "bench/gpu_compile.py", "sample", "--cfg=0.5"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "argument --cfg: cfg_scale must be a finite number in [1, " in result.stderr
    result = subprocess.run([sys.executable, "bench/gpu_compile.py", "train", "--top=-3"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "argument --top: must be a whole number >= 0, got '-3'" in result.stderr


def test_gpu_compile_refuses_tpu_options_that_do_not_fit_the_card(capsys):
    """--card=v5p/v6e/v5e compiles for a TPU (with libtpu, not installed in the test environment): a
    backend of the other platform, a TPU topology for a GPU or outside train, an fsdp axis or a
    global batch that does not divide over the topology's chips are usage errors, before the
    minutes of building the step."""
    from gpu_compile import check_chip_arguments

    base = dict(what="train", card="h200", attention=None, topology=None, fsdp=1, batch=None)
    for changes, message in ((dict(topology="2x2x1"), "argument --topology: for a TPU card only, not h200"),
                             (dict(fsdp=2), "argument --fsdp: for a TPU card only, not h200"),
                             (dict(attention=["splash"]), "argument --attention: splash does not run on h200; one of "
                                                          "auto, cudnn, pallas_gpu, xla"),
                             (dict(card="v5p", attention=["xla", "cudnn"]), "argument --attention: cudnn does not "
                                                                            "run on v5p; one of auto, splash, xla"),
                             (dict(card="v5p", what="sample", topology="2x2x1"), "argument --topology: for train only"),
                             (dict(card="v5p", topology="2x2x1", fsdp=3), "argument --fsdp: 3 does not divide the 4 "
                                                                          "chips of --topology=2x2x1"),
                             (dict(card="v6e", topology="2x4", batch=[64, 12]), "argument --batch: 12 does not split "
                                                                                "over the 8 chips")):
        with pytest.raises(SystemExit) as exit:
            check_chip_arguments(argparse.ArgumentParser(), argparse.Namespace(**{**base, **changes}))
        assert exit.value.code == 2 and message in capsys.readouterr().err, changes
    for fine in (dict(card="v5p", topology="2x2x1", fsdp=4, batch=[128]), dict(card="v6e", attention=["splash"]),
                 dict(card="v5e", what="sample", batch=[3])):
        check_chip_arguments(argparse.ArgumentParser(), argparse.Namespace(**{**base, **fine}))
    result = subprocess.run([sys.executable, "bench/gpu_compile.py", "train", "--card=v6e", "--topology=2x"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "argument --topology: must be chips per dimension like 2x2 or 2x2x1, got '2x'" \
        in result.stderr


def test_a_bad_argument_is_a_usage_error_before_anything_compiles():
    """--repeats=0 failed with a StatisticsError after compiling the model; --dtype=fp16 and
    --batch=0 with tracebacks."""
    from harness import non_negative_int, positive_int

    assert positive_int("3") == 3 and non_negative_int("0") == 0
    for parse, text in ((positive_int, "0"), (positive_int, "-1"), (positive_int, "2.5"), (non_negative_int, "-1")):
        with pytest.raises(argparse.ArgumentTypeError, match=f"must be a whole number >= \\d, got '{re.escape(text)}'"):
            parse(text)
    for script, argument, message in (("train_speed.py", "--dtype=fp16", "argument --dtype: invalid choice: 'fp16'"),
                                      ("sample_speed.py", "--cfg=0.5", "argument --cfg: must be >= 1")):
        result = subprocess.run([sys.executable, f"bench/{script}", "--preset=tiny", argument], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_the_gpu_machine_site_hides_its_packages_as_if_absent():
    """find_spec raised for a hidden package where a machine without it answers None (etils asks it
    about tensorflow, and every read of a persistent compilation cache warned and missed), and
    importlib.metadata still found the hidden distributions."""
    probe = ("import importlib.util\n"
             "assert importlib.util.find_spec('tensorflow') is None\n"
             "assert importlib.util.find_spec('numpy') is not None\n"
             "for name in ('grain', 'gcsfs.core', 'tensorboardX'):\n"
             "    try:\n"
             "        __import__(name)\n"
             "    except ModuleNotFoundError:\n"
             "        continue\n"
             "    raise AssertionError(name)\n"
             "import importlib.metadata\n"
             "for name in ('array-record', 'tensorflow_datasets', 'gcsfs'):\n"
             "    try:\n"
             "        importlib.metadata.version(name)\n"
             "    except importlib.metadata.PackageNotFoundError:\n"
             "        continue\n"
             "    raise AssertionError(name)\n"
             "assert importlib.metadata.version('jax')\n"
             "import jax, flax\n")
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests", "gpu_machine_site"), JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
@pytest.mark.timed
def test_gpu_session_script_runs_every_step_in_a_cpu_dry_run(tmp_path):
    out = tmp_path / "out"
    # As on the GPU machine: one device, and no grain, ml_collections, TFDS, tensorboardX, gradio,
    # diffusers or gcsfs (tests/gpu_machine_site). The test session's compilation cache is kept.
    # PYTHON: the steps run on this interpreter, not on whichever python3 is first on PATH (a
    # venv of the GPU machine's versions, not activated, checked the script on another jax).
    env = dict(os.environ, DRY_RUN="1", OUT=str(out), JAX_PLATFORMS="cpu", PYTHON=sys.executable,
               XLA_FLAGS=cpu_devices(1, one_process=False),
               PYTHONPATH=os.path.join(ROOT, "tests", "gpu_machine_site"))
    subprocess.run(["bash", "bench/gpu_session.sh"], cwd=ROOT, env=env, check=True, timeout=600,
                   capture_output=True)
    summary = (out / "summary.txt").read_text().splitlines()
    steps = {line.split()[0]: line for line in summary}
    assert set(steps) == {"env", "attention", "train_fast", "train_cublas", "sample", "release", "resume_exactness",
                          "train_profile", "sample_profile", "sweep"}, summary
    skipped = ("release", "train_fast", "train_cublas")
    for name in skipped[1:]:  # train_profile times the same step (a CPU ignores XLA's GPU GEMM flag)
        assert steps[name].startswith(f"{name} skipped: a dry run"), summary
    failed = [line for name, line in steps.items() if name not in skipped and " rc=0 " not in line]
    assert not failed, (out / "log.txt").read_text()[-5000:]
    assert sorted(os.listdir(out)) == ["log.txt", "summary.txt"]  # the tool returns at most 8 files
    log = (out / "log.txt").read_text()
    assert f"\n{jax.__version__} {flax.__version__} [CpuDevice(id=0)]\n" in log, log[:2000]  # the env step
    outputs = dict(re.findall(r"^===== (\w+) \(limit \d+s\): [^\n]*\n(.*?)(?=^===== |\Z)", log, re.M | re.S))
    for name, results in (("attention", ('"forward_backward_tflops"', '"backend": "cudnn_pad96"')),
                          ("sample", ('"seconds_per_image"',)),
                          ("resume_exactness", ('"resumed_losses_equal": true', '"resumed_state_equal": true')),
                          ("train_profile", ('"images_per_s"', '"profile": "train_step"', '"top_ops"')),
                          ("sample_profile", ('"profile": "last_stage_forward"', '"top_ops"')),
                          ("sweep", ('"settings"', '"changed"'))):
        for result in results:
            assert result in outputs[name], (name, result, outputs[name][-2000:])
    # Sampling is timed without a profile; the profiles run with XLA's command buffers off, and
    # nothing is timed before the stage-3 forward's.
    assert '"profile"' not in outputs["sample"]
    profiles = [json.loads(line) for name in ("train_profile", "sample_profile")
                for line in outputs[name].splitlines() if line.startswith('{"profile"')]
    assert len(profiles) == 2 and all(p["xla_flags"].endswith(" --xla_gpu_enable_command_buffer=") for p in profiles)
    # A training row names the XLA_FLAGS its step was compiled under (train_cublas's GEMMs on cuBLAS).
    timing = json.loads(next(line for line in outputs["train_profile"].splitlines() if '"images_per_s"' in line))
    assert timing["xla_flags"] == profiles[0]["xla_flags"], timing
    assert '"seconds_per_image"' not in outputs["sample_profile"] and '"generate"' not in outputs["sample_profile"]


def test_padded_cudnn_backends_attend_as_the_72_columns_do():
    """bench/attention_speed.py's cudnn_padN runs attention on q, k, v zero-padded to N columns and
    cuts the output back: the same output and gradients as attention at 72 (checked through XLA's
    implementation on the CPU), the softmax scale kept at 1/sqrt(72)."""
    from attention_speed import PADDED_CUDNN, attention_fn, padded_attention

    assert PADDED_CUDNN.fullmatch("cudnn_pad96") and not PADDED_CUDNN.fullmatch("cudnn")
    with pytest.raises(ValueError, match="unmasked attention only"):
        attention_fn("cudnn_pad96", False, key_mask=jnp.ones((1, 16)))
    q, k, v, cotangent = (jax.random.normal(key, (1, 16, 2, 72)) for key in jax.random.split(jax.random.key(0), 4))
    want = attention_fn("xla", False)
    for width in (80, 96, 128):
        got = padded_attention(width, "xla")
        for a, b in zip(jax.vjp(got, q, k, v)[1](cotangent), jax.vjp(want, q, k, v)[1](cotangent)):
            assert jnp.allclose(a, b, atol=1e-5)
        assert jnp.allclose(got(q, k, v), want(q, k, v), atol=1e-5)


def test_the_tile_sweep_changes_the_forward_or_the_backward_of_the_defaults():
    """The sweep after the first GPU session explores around pallas_gpu's defaults, each setting
    changing the forward's settings or the backward's, not both (the 2026-12-04 sweep changed both
    and all lost), the backward's first; each row says what it changed."""
    from attention_speed import DEFAULTS, SWEEP, changed_settings

    assert SWEEP[0] == DEFAULTS and len(set(SWEEP)) == len(SWEEP)
    sides = [{name.split("_")[0] for name in changed_settings(settings)} for settings in SWEEP[1:]]
    assert all(side in ({"backward"}, {"forward"}) for side in sides), sides
    assert sides == sorted(sides, key=lambda side: side == {"forward"}) and {"forward"} in sides, sides
    assert changed_settings(SWEEP[1]) == dict(backward_blocks=(128, 32))


def test_hlo_traffic_leaves_out_a_cublas_calls_workspace():
    """cuBLASLt's matmul returns its workspace beside its output as an s8 array (cuDNN's is u8):
    scratch, not traffic (it was counted written, 4 MiB a call: with XLA's GEMMs on cuBLAS, 77 GB
    of a generate's GEMM bytes)."""
    from hlo_traffic import kernel_traffic

    hlo = """HloModule jit_matmul

ENTRY %main.1 (x.1: bf16[16,8], y.1: bf16[8,8]) -> bf16[16,8] {
  %x.1 = bf16[16,8]{1,0} parameter(0)
  %y.1 = bf16[8,8]{1,0} parameter(1)
  %custom-call.2 = (bf16[16,8]{1,0}, s8[4194304]{0}) custom-call(%x.1, %y.1), \
custom_call_target="__cublas$lt$matmul", backend_config={"alpha_real":1}
  ROOT %get-tuple-element.2 = bf16[16,8]{1,0} get-tuple-element(%custom-call.2), index=0
}
"""
    assert [(k["kind"], k["bytes"]) for k in kernel_traffic(hlo)] == [("gemm", 16 * 8 * 2 + 8 * 8 * 2 + 16 * 8 * 2)]


# A TPU slice's exchanges as libtpu and XLA print them: a collective-permute-start's shape is
# (operand, output, context, context), an all-gather-start's (operand, output), an
# all-reduce-start's its output.
COLLECTIVE_STARTS_HLO = """HloModule jit_exchanges

ENTRY %main.1 (x.1: bf16[2,8]) -> (bf16[2,8], bf16[4,8], bf16[2,8]) {
  %x.1 = bf16[2,8]{1,0:T(2,128)(2,1)} parameter(0)
  %collective-permute-start.1 = (bf16[2,8]{1,0:T(2,128)(2,1)}, bf16[2,8]{1,0:T(2,128)(2,1)}, u32[]{:S(2)}, \
u32[]{:S(2)}) collective-permute-start(%x.1), channel_id=1, source_target_pairs={{0,1},{1,0}}
  %collective-permute-done.1 = bf16[2,8]{1,0:T(2,128)(2,1)} collective-permute-done(%collective-permute-start.1)
  %all-gather-start.1 = (bf16[2,8]{1,0:T(2,128)(2,1)}, bf16[4,8]{1,0:T(4,128)(2,1)}) all-gather-start(%x.1), \
channel_id=2, replica_groups={{0,1}}, dimensions={0}
  %all-gather-done.1 = bf16[4,8]{1,0:T(4,128)(2,1)} all-gather-done(%all-gather-start.1)
  %all-reduce-start.1 = bf16[2,8]{1,0:T(2,128)(2,1)} all-reduce-start(%x.1), channel_id=3, replica_groups={{0,1}}, \
to_apply=%add
  %all-reduce-done.1 = bf16[2,8]{1,0:T(2,128)(2,1)} all-reduce-done(%all-reduce-start.1)
  ROOT %tuple.1 = (bf16[2,8]{1,0:T(2,128)(2,1)}, bf16[4,8]{1,0:T(4,128)(2,1)}, bf16[2,8]{1,0:T(2,128)(2,1)}) \
tuple(%collective-permute-done.1, %all-gather-done.1, %all-reduce-done.1)
}
"""


def test_hlo_traffic_counts_a_collective_starts_operand_once():
    """An exchange reads its operand and writes its output: the operand that a collective-permute-
    start's or an all-gather-start's shape repeats was counted written too (a third more bytes for
    the permutes of a TPU slice's sharded matmuls)."""
    from hlo_traffic import kernel_traffic

    x = 2 * 8 * 2
    assert {k["name"]: (k["kind"], k["bytes"]) for k in kernel_traffic(COLLECTIVE_STARTS_HLO)} == {
        "collective-permute-start.1": ("collective", x + x), "all-gather-start.1": ("collective", x + 2 * x),
        "all-reduce-start.1": ("collective", x + x)}


# What libtpu leaves unfused in a loop body: a stack's row updated in place from VMEM (S(1)), a
# row sliced out, a relayout by reshape; and a fusion that converts in VMEM before its bitcast.
TPU_UNFUSED_HLO = """HloModule jit_tpu_unfused

%fused_convert (param_0: f32[16,8]) -> bf16[128] {
  %param_0 = f32[16,8]{1,0:T(8,128)} parameter(0)
  %convert.1 = bf16[16,8]{1,0:T(8,128)(2,1)S(1)} convert(%param_0)
  ROOT %bitcast.1 = bf16[128]{0:T(1024)(128)(2,1)} bitcast(%convert.1)
}

ENTRY %main.1 (stack.1: f32[4,16,8], row.1: f32[1,16,8], i.1: s32[], x.1: f32[16,8]) -> (f32[4,16,8], \
f32[1,16,8], f32[128], bf16[128]) {
  %stack.1 = f32[4,16,8]{2,1,0:T(8,128)} parameter(0)
  %row.1 = f32[1,16,8]{2,1,0:T(8,128)S(1)} parameter(1)
  %i.1 = s32[]{:T(128)S(6)} parameter(2)
  %x.1 = f32[16,8]{1,0:T(8,128)} parameter(3)
  %constant.1 = s32[]{:T(128)S(6)} constant(0)
  %update.1 = f32[4,16,8]{2,1,0:T(8,128)} dynamic-update-slice(%stack.1, %row.1, %i.1, %constant.1, %constant.1)
  %take.1 = f32[1,16,8]{2,1,0:T(8,128)} dynamic-slice(%stack.1, %i.1, %constant.1, %constant.1), \
dynamic_slice_sizes={1,16,8}
  %reshape.1 = f32[128]{0:T(1024)} reshape(%x.1)
  %convert_fusion = bf16[128]{0:T(1024)(128)(2,1)} fusion(%x.1), kind=kLoop, calls=%fused_convert
  ROOT %tuple.1 = (f32[4,16,8]{2,1,0:T(8,128)}, f32[1,16,8]{2,1,0:T(8,128)}, f32[128]{0:T(1024)}, \
bf16[128]{0:T(1024)(128)(2,1)}) tuple(%update.1, %take.1, %reshape.1, %convert_fusion)
}
"""


def test_hlo_traffic_reads_what_a_tpu_leaves_unfused_as_a_fusion_of_one():
    """An instruction outside any fusion is a kernel read as a fusion of itself: a row updated in
    place writes the row (it was the whole stack read and written), a dynamic-slice reads its row,
    and these and a reshape (a TPU's relayout) only move data: copies, not elementwise traffic. A
    fusion's arithmetic held in VMEM is not index arithmetic: the convert is elementwise, not a copy."""
    from hlo_traffic import kernel_traffic

    row = 16 * 8 * 4
    assert {k["name"]: (k["kind"], k["bytes"]) for k in kernel_traffic(TPU_UNFUSED_HLO)} == {
        "update.1": ("copy", row), "take.1": ("copy", row + row), "reshape.1": ("copy", row + row),
        "convert_fusion": ("elementwise", row + row // 2)}


def test_gpu_compile_refuses_an_option_its_subcommand_does_not_read(capsys):
    """`train --preset=tiny` compiled XL, `kernels --batch=4` the default shapes: an option of
    another subcommand is a usage error naming where it applies; a bad --shapes is one too (it was
    a ValueError's traceback); the defaults of the options not given are filled in."""
    from gpu_compile import DEFAULTS, USED_BY, batch_by_length, check_options_apply

    assert batch_by_length("8x4096") == (8, 4096)
    for text in ("8x", "8x4096x2", "0x16", "8"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"must be batch x length like 8x4096, got '{text}'"):
            batch_by_length(text)
    unset = dict.fromkeys(USED_BY)
    refused = (("train", "preset", "tiny", "argument --preset: for sample only, not train"),
               ("kernels", "batch", [4], "argument --batch: for train or sample only, not kernels"),
               ("sample", "remat", ["full"], "argument --remat: for train only, not sample"),
               ("train", "shapes", [(8, 64)], "argument --shapes: for kernels only, not train"))
    for what, name, value, message in refused:
        with pytest.raises(SystemExit) as exit:
            check_options_apply(argparse.ArgumentParser(), argparse.Namespace(**{**unset, "what": what, name: value}))
        assert exit.value.code == 2 and message in capsys.readouterr().err, (what, name)
    args = argparse.Namespace(**{**unset, "what": "sample", "steps": 5})
    check_options_apply(argparse.ArgumentParser(), args)
    assert args.steps == 5 and args.cfg == DEFAULTS["cfg"] and args.remat == ["dots"]
    result = subprocess.run([sys.executable, "bench/gpu_compile.py", "kernels", "--shapes=8x4096,8x"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "argument --shapes: must be batch x length like 8x4096, got '8x'" \
        in result.stderr, result.stderr[-500:]
    result = subprocess.run([sys.executable, "bench/gpu_compile.py", "train", "--steps=10"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "argument --steps: for sample only, not train" in result.stderr


def test_gpu_compile_counts_each_host_callback_once():
    """`sample`'s host_callbacks counts the instructions that wait on the host; it counted every
    match of 'callback' in the HLO text, three for one pure_callback (its target, its op_name, its
    source file), and one for a fusion whose jax operation's name held the word."""
    from gpu_compile import host_callbacks

    hlo = """HloModule jit_step

ENTRY %main.1 (x.1: f32[8]) -> f32[8] {
  %x.1 = f32[8]{0} parameter(0)
  %loop_fusion = f32[8]{0} fusion(%x.1), kind=kLoop, calls=%fused_negate, \
metadata={op_name="jit(step)/neg" source_file="/src/pixelflow_jax/callbacks.py" source_line=3}
  %custom-call.1 = (f32[8]{0}) custom-call(%loop_fusion), custom_call_target="xla_ffi_python_gpu_callback", \
metadata={op_name="jit(step)/pure_callback" source_file="/jax/_src/callback.py" source_line=9}, \
backend_config={"callback":"1"}
  %after-all.1 = token[] after-all()
  %send.1 = (f32[8]{0}, u32[], token[]) send(%x.1, %after-all.1), channel_id=1, is_host_transfer=true
  %send-done.1 = token[] send-done(%send.1), channel_id=1, is_host_transfer=true
  ROOT %get-tuple-element.1 = f32[8]{0} get-tuple-element(%custom-call.1), index=0
}
"""
    assert host_callbacks(hlo) == 2
    assert host_callbacks(hlo.replace("xla_ffi_python_gpu_callback", "__cublas$gemm")) == 1


def test_hlo_traffic_enters_a_call_and_counts_no_kernel_for_a_conditional():
    """A call runs its computation's kernels (they were left out, and the call counted as one
    elementwise kernel reading and writing its operands); a conditional is no kernel: its branches
    are not entered (which one runs is not known), and it was counted as one reading its operands."""
    from hlo_traffic import kernel_traffic

    hlo = NESTED_LOOPS_HLO.replace(
        "  ROOT %solve = (s32[], f32[8]{0}) while(%steps), condition=%cond, body=%solver_body\n",
        "  %called = (s32[], f32[8]{0}) call(%steps), to_apply=%solver_body\n"
        "  %pred.1 = pred[] constant(true)\n"
        "  ROOT %branch = (s32[], f32[8]{0}) conditional(%pred.1, %called, %called), "
        "true_computation=%solver_body, false_computation=%solver_body\n")
    assert "call(%steps)" in hlo and "conditional(" in hlo
    assert {k["name"]: k["bytes"] for k in kernel_traffic(hlo)} == dict(layer_fusion=4 * 3 * 2 * 8 * 4,
                                                                       solver_fusion=2 * 8 * 4)
