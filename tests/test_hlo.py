# ruff: noqa: E501 - the HLO module is XLA text, one instruction per line
"""jaxalign.hlo on hand-written optimized HLO: instructions that span lines (a Pallas kernel's
JSON metadata), loop-multiplied HBM traffic and collectives, and the matmuls inside splash
attention's kernels, each against a count done by hand. No compile: milliseconds."""

from __future__ import annotations

from jaxalign import hlo

# A layer loop of 4 trips: each trip slices one layer's weights out of a stacked parameter,
# all-gathers them (a fused collective, as TPU programs have them), runs a splash forward
# kernel whose frontend_attributes carry multi-line JSON, a matmul, and writes one layer of a
# stacked output in place.
MODULE = """HloModule jit_step, is_scheduled=true

%fused_slice (param_0: bf16[4,64,128], param_1: s32[]) -> bf16[1,64,128] {
  %param_0 = bf16[4,64,128]{2,1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %c0 = s32[] constant(0)
  ROOT %ds = bf16[1,64,128]{2,1,0} dynamic-slice(%param_0, %param_1, %c0, %c0), dynamic_slice_sizes={1,64,128}
}

%fused_gather (param_0: bf16[1,64,128]) -> bf16[1,256,128] {
  %param_0 = bf16[1,64,128]{2,1,0} parameter(0)
  ROOT %ag = bf16[1,256,128]{2,1,0} all-gather(%param_0), dimensions={1}
}

%fused_update (param_0: bf16[4,2,256,128], param_1: bf16[1,2,256,128], param_2: s32[]) -> bf16[4,2,256,128] {
  %param_0 = bf16[4,2,256,128]{3,2,1,0} parameter(0)
  %param_1 = bf16[1,2,256,128]{3,2,1,0} parameter(1)
  %param_2 = s32[] parameter(2)
  %c0 = s32[] constant(0)
  ROOT %dus = bf16[4,2,256,128]{3,2,1,0} dynamic-update-slice(%param_0, %param_1, %param_2, %c0, %c0, %c0)
}

%body (p: (s32[], bf16[4,64,128], bf16[2,2,256,128], bf16[4,2,256,128])) -> (s32[], bf16[4,64,128], bf16[2,2,256,128], bf16[4,2,256,128]) {
  %p = (s32[], bf16[4,64,128], bf16[2,2,256,128], bf16[4,2,256,128]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %w = bf16[4,64,128]{2,1,0} get-tuple-element(%p), index=1
  %x = bf16[2,2,256,128]{3,2,1,0} get-tuple-element(%p), index=2
  %acc = bf16[4,2,256,128]{3,2,1,0} get-tuple-element(%p), index=3
  %one = s8[1,1,1]{2,1,0} constant({...})
  %layer = bf16[1,64,128]{2,1,0} fusion(%w, %i), kind=kLoop, calls=%fused_slice
  %full = bf16[1,256,128]{2,1,0} fusion(%layer), kind=kOutput, calls=%fused_gather
  %splash_mha_fwd_segmented_no_residuals.1 = bf16[2,2,256,128]{3,2,1,0} custom-call(%one, %x, %x, %x), custom_call_target="tpu_custom_call", frontend_attributes={kernel_metadata={
"xprof_metadata":"{\\"block_q\\": 128, \\"block_kv\\": 128}"
}}, metadata={op_name="jit(step)/pallas_call"}
  %y = bf16[1,2,256,128]{3,2,1,0} dot(%splash_mha_fwd_segmented_no_residuals.1, %full), lhs_contracting_dims={3}, rhs_contracting_dims={2}
  %acc2 = bf16[4,2,256,128]{3,2,1,0} fusion(%acc, %y, %i), kind=kLoop, calls=%fused_update
  %i2 = s32[] add(%i, %i)
  ROOT %t = (s32[], bf16[4,64,128], bf16[2,2,256,128], bf16[4,2,256,128]) tuple(%i2, %w, %x, %acc2)
}

%cond (p: (s32[], bf16[4,64,128], bf16[2,2,256,128], bf16[4,2,256,128])) -> pred[] {
  %p = (s32[], bf16[4,64,128], bf16[2,2,256,128], bf16[4,2,256,128]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: bf16[4,64,128], b: bf16[2,2,256,128], c: bf16[4,2,256,128]) -> bf16[4,2,256,128] {
  %a = bf16[4,64,128]{2,1,0} parameter(0)
  %b = bf16[2,2,256,128]{3,2,1,0} parameter(1)
  %c = bf16[4,2,256,128]{3,2,1,0} parameter(2)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[4,64,128], bf16[2,2,256,128], bf16[4,2,256,128]) tuple(%zero, %a, %b, %c)
  %loop = (s32[], bf16[4,64,128], bf16[2,2,256,128], bf16[4,2,256,128]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  ROOT %out = bf16[4,2,256,128]{3,2,1,0} get-tuple-element(%loop), index=3
}
"""


def test_instructions_spanning_lines_stay_in_their_computation():
    computations, entry = hlo.parse_hlo(MODULE)
    assert entry == "main"
    body = [i.name for i in computations["body"]]
    # the kernel's JSON lines ("...", "}}, metadata=...") neither close %body nor get lost
    assert body[-4:] == ["y", "acc2", "i2", "t"]
    assert "splash_mha_fwd_segmented_no_residuals.1" in body
    times, unknown = hlo.computation_multipliers(computations, entry)
    assert (times["body"], times["fused_update"], unknown) == (4, 4, 0)


def test_matmul_and_splash_flops_are_multiplied_by_the_trip_count():
    # the dot: 2 x output elements (1 x 2 x 256 x 128) x contracted size (128) per trip
    assert hlo.hlo_flops(MODULE) == (4 * 2.0 * 65536 * 128, 0)
    # splash forward: 2 matmuls x 2 x (2 x 2 x 256 query rows) x 256 keys x 128, of which a
    # causal mask over 256 / 128 = 2 blocks visits (2 + 1) / (2 x 2) = 3/4; 4 trips
    per_call = 2 * 2.0 * (2 * 2 * 256) * 256 * 128 * 3 / 4
    assert hlo.pallas_attention_flops(MODULE) == 4 * per_call


def test_traffic_reads_slices_writes_updates_and_counts_fused_collectives():
    traffic, collective = hlo.hlo_traffic(MODULE)
    layer, gathered, x, update = (
        64 * 128 * 2,
        256 * 128 * 2,
        2 * 2 * 256 * 128 * 2,
        2 * 256 * 128 * 2,
    )
    per_trip = (
        layer
        + 4  # the slice fusion reads one layer of %w (and the index)
        + layer  # ... and writes it
        + layer
        + gathered  # the all-gather fusion
        + 3 * x
        + x  # the splash call: q, k, v in (the s8 constant is 1 byte), out
        + 1  # the s8[1,1,1] mask operand
        + x
        + gathered
        + update  # the dot
        + update
        + 4
        + update  # the in-place update: reads the update (and index), writes it
        + 4
        + 4
        + 4  # the add of two s32 scalars
    )
    compare = 4 + 4 + 1  # the loop condition's compare, counted once (as XLA's cost analysis)
    assert traffic == 4 * per_trip + compare
    assert collective == 4 * gathered


def test_trip_count_without_xla_annotation_divides_by_the_counter_step():
    """A loop XLA left without known_trip_count (as TPU programs' scans are) and unrolled into
    steps of 2: `counter < 8` with `counter + 2` runs 4 times, the same work as MODULE."""
    unrolled = (
        MODULE.replace(', backend_config={"known_trip_count":{"n":"4"}}', "")
        .replace("%n = s32[] constant(4)", "%n = s32[] constant(8)")
        .replace("%i2 = s32[] add(%i, %i)", "%two = s32[] constant(2)\n  %i2 = s32[] add(%i, %two)")
    )
    assert "known_trip_count" not in unrolled
    assert hlo.hlo_flops(unrolled) == hlo.hlo_flops(MODULE)
    assert hlo.pallas_attention_flops(unrolled) == hlo.pallas_attention_flops(MODULE)
