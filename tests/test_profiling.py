"""The kernel summary of launch/bench/benchmark.py --profile_dir (vavae_jax/runtime/profiling.py)."""

import jax
import jax.numpy as jnp
import pytest

from vavae_jax.runtime import profiling


@pytest.mark.parametrize(
    "name, category",
    [
        ("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_TNN", "gemm"),
        ("gemm_fusion_dot_20", "gemm"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26", "attention"),
        ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
        ("loop_convert_fusion_3", "fusion"),
        ("input_add_convert_reduce_fusion_1", "reduction"),
        ("memcpy128", "copy"),
        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "collective"),
        ("wrapped_concatenate_1", "other"),
    ],
)
def test_categories(name, category):
    assert profiling.categorize(name) == category


def test_summary_is_per_step_and_sorted():
    events = [
        ("nvjet_gemm_a", 4e6, "dot.1"),
        ("loop_add_fusion", 1e6, "fusion.2"),
        ("nvjet_gemm_a", 2e6, "dot.1"),
        ("memcpy128", 1e6, None),
    ]
    s = profiling.summarize_events(events, steps=2)
    assert s["kernel_ms_per_step"] == pytest.approx(4.0)
    assert s["by_category_ms"] == pytest.approx({"gemm": 3.0, "fusion": 0.5, "copy": 0.5})
    assert list(s["by_category_ms"])[0] == "gemm"
    top = s["top_kernels"][0]
    assert (top["name"], top["ms"], top["launches_per_step"]) == ("nvjet_gemm_a", 3.0, 1.0)
    assert s["top_hlo_ops"][0] == {"op": "dot.1", "ms": 3.0}
    assert "gemm" in profiling.format_summary(s)
    with pytest.raises(ValueError, match="steps"):
        profiling.summarize_events(events, steps=0)


def test_cpu_trace_has_no_device_kernels_but_host_events(tmp_path):
    f = jax.jit(lambda a: jnp.tanh(a @ a).sum())
    a = jnp.ones((64, 64))
    f(a).block_until_ready()
    with pytest.raises(RuntimeError, match="no device kernel events"):
        profiling.profile(lambda: f(a), steps=2, logdir=str(tmp_path))
    (path,) = tmp_path.rglob("*.xplane.pb")  # the trace itself was written
    # The host threads' events (what the runtime does per call) are there on a CPU too.
    rows = profiling.host_events(str(path), steps=2)
    assert rows and all(r["ms"] >= 0 and r["calls_per_step"] > 0 for r in rows)
    assert rows == sorted(rows, key=lambda r: -r["ms"])
    with pytest.raises(ValueError, match="steps"):
        profiling.host_events(str(path), steps=0)


def test_idle_gaps_leave_out_the_host_time_between_steps():
    us = 1e3  # ns
    # Step 1: two overlapping kernels (0-10, 5-12), a 3 us launch gap, one kernel (15-20), a
    # 50 us gap, one kernel (70-80). 5 ms of host time. Step 2: 0-10 then a 200 us wait.
    t2 = 80 * us + 5e6
    spans = [
        (0.0, 10 * us, "a"),
        (5 * us, 12 * us, "b"),
        (15 * us, 20 * us, "c"),
        (70 * us, 80 * us, "d"),
        (t2, t2 + 10 * us, "e"),
        (t2 + 210 * us, t2 + 220 * us, "f"),
    ]
    g = profiling.idle_gaps(spans, steps=2)
    assert g["gaps_per_step"] == pytest.approx(1.5)  # 3 us, 50 us, 200 us
    assert g["idle_ms_per_step"] == pytest.approx((3 + 50 + 200) * 1e-3 / 2)
    assert g["busy_ms_per_step"] == pytest.approx((12 + 5 + 10 + 10 + 10) * 1e-3 / 2)
    assert g["span_ms_per_step"] == pytest.approx((80 + 220) * 1e-3 / 2)
    assert g["idle_ms_per_step_by_gap"] == pytest.approx(
        {"<10us": 0.0015, "<100us": 0.025, "longer": 0.1}
    )
    assert g["longest_gaps"][0] == {"us": 200.0, "after": "e", "before": "f"}
    assert g["longest_gaps"][-1] == {"us": 3.0, "after": "b", "before": "c"}
    with pytest.raises(ValueError, match="steps"):
        profiling.idle_gaps(spans, steps=0)
