"""backend='auto' picks a Triton kernel only where a recorded GPU measurement shows it winning."""
import json

import torch

from skipkernels.ops import attention as ops_attn
from skipkernels.ops import layer_norm as ops_ln
from skipkernels.ops import layer_norm_linear as ops_lnl
from skipkernels.ops import layer_norm_mlp as ops_mlp
from skipkernels.ops import linear as ops_lin
from skipkernels.ops import measured
from skipkernels.ops.linear import linear_act


def _meta(*shape):
    return torch.empty(*shape, device="meta")


# How each benchmark of bench/test_bench_triton.py records its case: the op's own case function on
# the benchmark's inputs (here meta tensors of the benchmark's shape).
CASES = {
    "test_linear_act_fc1": lambda s, e: ("linear_act", ops_lin.linear_act_case(
        _meta(s[0], s[1]), _meta(s[2], s[1]), None, e["act"])),
    "test_layer_norm": lambda s, e: ("layer_norm", ops_ln.layer_norm_case(_meta(*s))),
    "test_attention": lambda s, e: ("attention", ops_attn.attention_case(
        _meta(s[0], s[1], s[2], s[4]), _meta(s[0], s[1], s[3], s[4]), None)),
    "test_layer_norm_linear": lambda s, e: ("layer_norm_linear", ops_lnl.layer_norm_linear_case(
        _meta(s[0], s[1]), None, None, 1e-5, _meta(s[2], s[1]), None, e["act"])),
    "test_layer_norm_mlp": lambda s, e: ("layer_norm_mlp", ops_mlp.layer_norm_mlp_case(
        _meta(s[0], s[1]), None, None, 1e-5, _meta(s[2], s[1]), None, e["act"], _meta(s[1], s[2]), None)),
}


def _bench(name, impl, mode, shape, median_ms, device="FakeGPU H100", **extra):
    return {"name": f"{name}[{impl}-{mode}]", "params": {"impl": impl, "mode": mode, "tower": "image"},
            "extra_info": {"case": measured.case_info(*CASES[name](shape, extra)), "mode": mode,
                           "dtype": "torch.bfloat16", "device": device, "median_ms": median_ms}}


def test_entries_pair_triton_with_the_reference_case():
    report = {"benchmarks": [
        _bench("test_linear_act_fc1", "torch", "fwd", [788, 768, 3072], 1.0, act="gelu"),
        _bench("test_linear_act_fc1", "triton", "fwd", [788, 768, 3072], 0.5, act="gelu"),
        _bench("test_linear_act_fc1", "compile", "fwd", [788, 768, 3072], 0.7, act="gelu"),
        _bench("test_layer_norm", "torch", "fwd_bwd", [788, 768], 0.1),
        _bench("test_layer_norm", "triton", "fwd_bwd", [788, 768], 0.2),
        _bench("test_attention", "torch", "fwd", [4, 12, 1, 197, 64], 0.3, mask="none"),
        _bench("test_attention", "triton", "fwd", [4, 12, 1, 197, 64], 0.2, mask="none"),
        _bench("test_layer_norm_linear", "torch", "fwd", [788, 768, 2304], 0.3, act="none"),
        _bench("test_layer_norm_linear", "triton", "fwd", [788, 768, 2304], 0.25, act="none"),
        _bench("test_layer_norm_mlp", "torch", "fwd_bwd", [788, 768, 3072], 1.0, act="gelu", scale="none"),
        _bench("test_layer_norm_mlp", "triton", "fwd_bwd", [788, 768, 3072], 0.8, act="gelu", scale="none"),
        _bench("test_layer_norm", "triton", "fwd", [788, 768], 0.01, device="cpu"),  # CPU runs never count
    ]}
    entries = {(e["op"], e["pass"]): e for e in measured.build_entries([report])}
    assert set(entries) == {("linear_act", "fwd"), ("layer_norm", "fwd_bwd"), ("attention", "fwd"),
                            ("layer_norm_linear", "fwd"), ("layer_norm_mlp", "fwd_bwd")}
    assert entries["layer_norm_mlp", "fwd_bwd"]["dims"] == [768, 3072, "gelu", "none"] and entries["layer_norm_mlp", "fwd_bwd"]["speedup"] == 1.25
    assert entries["layer_norm_linear", "fwd"]["dims"] == [768, 2304, "none"] and entries["layer_norm_linear", "fwd"]["rows"] == 788
    assert entries["linear_act", "fwd"]["dims"] == [768, 3072, "gelu"] and entries["linear_act", "fwd"]["speedup"] == 2.0
    assert entries["layer_norm", "fwd_bwd"]["speedup"] == 0.5
    assert entries["attention", "fwd"]["dims"] == [64, "none", "pooled"] and entries["attention", "fwd"]["rows"] == 4 * 12 * 197


def test_decision_uses_the_nearest_measured_row_count():
    entries = [
        {"device": "G", "op": "linear_act", "pass": "fwd", "dtype": "torch.bfloat16", "dims": [768, 3072],
         "rows": 788, "speedup": 1.4},
        {"device": "G", "op": "linear_act", "pass": "fwd", "dtype": "torch.bfloat16", "dims": [768, 3072],
         "rows": 50432, "speedup": 0.9},
    ]
    decide = measured.decide
    assert decide(entries, "G", "linear_act", "fwd", "torch.bfloat16", (768, 3072), 1000)
    assert not decide(entries, "G", "linear_act", "fwd", "torch.bfloat16", (768, 3072), 40000)
    assert not decide(entries, "G", "linear_act", "fwd_bwd", "torch.bfloat16", (768, 3072), 1000)  # unmeasured pass
    assert not decide(entries, "G", "linear_act", "fwd", "torch.float16", (768, 3072), 1000)       # other dtype
    assert not decide(entries, "other GPU", "linear_act", "fwd", "torch.bfloat16", (768, 3072), 1000)
    assert not decide(entries, "G", "linear_act", "fwd", "torch.bfloat16", (512, 2048), 1000)      # other dims
    gelu = [dict(e, dims=[768, 3072, "gelu"]) for e in entries]
    assert decide(gelu, "G", "linear_act", "fwd", "torch.bfloat16", (768, 3072, "gelu"), 1000)
    assert not decide(gelu, "G", "linear_act", "fwd", "torch.bfloat16", (768, 3072, "quick_gelu"), 1000)  # other epilogue


def test_generator_writes_the_table_and_auto_stays_on_the_reference_for_cpu(tmp_path, monkeypatch):
    report = tmp_path / "kernels.json"
    report.write_text(json.dumps({"benchmarks": [
        _bench("test_linear_act_fc1", "torch", "fwd", [6, 8, 32], 1.0, act="gelu"),
        _bench("test_linear_act_fc1", "triton", "fwd", [6, 8, 32], 0.5, act="gelu")]}))
    table = tmp_path / "measured_wins.json"
    monkeypatch.setattr(measured, "TABLE", table)
    assert measured.main([str(report)]) == 0
    assert json.loads(table.read_text())["entries"][0]["speedup"] == 2.0
    x, w, b = torch.randn(6, 8), torch.randn(32, 8), torch.randn(32)
    assert not measured.prefers_triton("linear_act", x, (8, 32, "gelu"), 6)  # CPU tensors never leave the reference
    assert torch.equal(linear_act(x, w, b, "gelu"), torch.nn.functional.gelu(x @ w.T + b))


def test_no_table_means_reference(monkeypatch, tmp_path):
    monkeypatch.setattr(measured, "TABLE", tmp_path / "absent.json")
    assert measured._entries(str(tmp_path / "absent.json")) == ()


def test_pet_gate_benchmarks_feed_the_table():
    """The PET benchmark names its implementations 'backend' and keys cases by gate granularity."""
    from skipkernels.ops.pet_gate import gated_update_case

    def pet(backend, ms, gate="middle_x", mode="fwd"):
        case = gated_update_case(None, _meta(32, 197, 768), None, _meta(32, 197, 1))  # a per-token gate
        return {"name": f"test_gated_update[32x197x768-{gate}-{backend}-forward]",
                "params": {"shape": [32, 197, 768], "gate": gate, "backend": backend, "pass_": "forward"},
                "extra_info": {"case": measured.case_info("pet_gate", case), "mode": mode,
                               "dtype": "torch.bfloat16", "device": "G", "median_ms": ms}}
    entries = measured.build_entries([{"benchmarks": [pet("torch", 0.375), pet("triton", 0.125), pet("compile", 0.25)]}])
    assert entries == [{"device": "G", "op": "pet_gate", "pass": "fwd", "dtype": "torch.bfloat16",
                        "dims": [768, "middle_x"], "rows": 32 * 197, "speedup": 3.0}]


def test_gate_kind_names_each_granularity():
    from skipkernels.ops.pet_gate import gate_kind
    h = torch.empty(4, 17, 64)
    assert gate_kind(torch.empty(4, 17, 64), h) == "large"
    assert gate_kind(torch.empty(1, 17, 64), h) == "large"
    assert gate_kind(torch.empty(4, 17, 1), h) == "middle_x"
    assert gate_kind(torch.empty(64), h) == "middle_y"
    assert gate_kind(torch.empty(1, 1, 64), h) == "middle_y"
    assert gate_kind(torch.empty(4, 1, 1), h) == "small"
    # Sequence-first blocks (L, B, D) and flattened rows (M, D).
    assert gate_kind(torch.empty(1, 4, 1), torch.empty(17, 4, 64)) == "small"
    assert gate_kind(torch.empty(17, 4, 1), torch.empty(17, 4, 64)) == "middle_x"
    assert gate_kind(torch.empty(68, 1), torch.empty(68, 64)) == "middle_x"
    # Scalars of any kind: one value for everything.
    assert gate_kind(torch.tensor(0.5), h) == gate_kind(0.5, h) == "small"


def test_auto_pet_gate_accepts_scalar_gates_on_cpu():
    """auto decides on the reference for CPU tensors before looking at the gate."""
    from skipkernels.ops.pet_gate import gated_update
    x, h, dh = torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    for g in (torch.tensor(0.5), 0.5):
        torch.testing.assert_close(gated_update(x, h, dh, g, 2.0, backend="auto"), x + (g * 2.0) * (h + dh))


def test_all_triton_table_forces_cuda_tensors_only(monkeypatch, tmp_path):
    """The all-Triton table of ``skipkernels bench``'s skip-triton mode: CUDA tensors get the
    kernels without a measurement; CPU tensors still run the reference."""
    from skipkernels.ops.policy import ALL_TRITON

    class FakeCudaTensor:
        is_cuda = True
    monkeypatch.setattr(measured, "TABLE", tmp_path / "absent.json")
    cpu = torch.randn(3, 8)
    assert measured.prefers_triton("linear_act", FakeCudaTensor(), (8, 32), 3, table=ALL_TRITON)
    assert not measured.prefers_triton("linear_act", cpu, (8, 32), 3, table=ALL_TRITON)


def _one_win_table(monkeypatch, tmp_path):
    """A table where the Triton GELU fc1 wins on device "G"; a fake CUDA tensor to ask with."""
    import types
    table = tmp_path / "wins.json"
    table.write_text(json.dumps({"entries": [
        {"device": "G", "op": "linear_act", "pass": "fwd", "dtype": "torch.bfloat16",
         "dims": [768, 3072, "gelu"], "rows": 788, "speedup": 1.4}]}))
    monkeypatch.setattr(measured, "TABLE", table)
    monkeypatch.setattr(measured, "_device_name", lambda index: "G")
    return types.SimpleNamespace(is_cuda=True, device=types.SimpleNamespace(index=0, type="cuda"))


class _FakeCuda(torch.Tensor):
    """A CPU tensor that says it is on a GPU: enough for the decision, which reads metadata only."""

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", 0)


def _fake_cuda(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype).as_subclass(_FakeCuda)


def test_a_bound_op_decides_once_per_case(monkeypatch, tmp_path):
    """auto's decision is taken from the table once per case and kept in the bound op: a step asks
    the table nothing (nor the device) after its first call."""
    from skipkernels.ops.op import _AutoTriton
    _one_win_table(monkeypatch, tmp_path)
    bound = ops_lin.LINEAR_ACT.bind("auto")
    assert isinstance(bound, _AutoTriton)
    ran = []
    monkeypatch.setattr(bound, "fallback", lambda *a: ran.append("reference"))
    monkeypatch.setattr(bound, "kernel", lambda *a: ran.append("kernel"))
    monkeypatch.setattr(bound.impl.__class__, "load", lambda self: object())
    monkeypatch.setattr(bound.impl.__class__, "reasons", lambda self, *a, **k: [])
    calls = []
    real_decide = measured.decide
    monkeypatch.setattr(measured, "decide", lambda *a: calls.append(a) or real_decide(*a))
    x, w = _fake_cuda(800, 768), _fake_cuda(3072, 768)
    for _ in range(3):
        bound(x, w, None, "gelu")
        bound(x, w, None, "quick_gelu")
    assert len(calls) == 2 and ran == ["kernel", "reference"] * 3

    def probe(*_):
        raise AssertionError("device or table probed after the case was decided")
    monkeypatch.setattr(measured, "_device_name", probe)
    monkeypatch.setattr(measured, "_entries", probe)
    bound(x, w, None, "gelu")
    assert ran[-1] == "kernel"


def test_auto_binds_the_reference_where_the_table_has_no_entry_for_the_op(monkeypatch, tmp_path):
    _one_win_table(monkeypatch, tmp_path)
    assert ops_lin.LINEAR_ACT.bind("auto").__class__.__name__ == "_AutoTriton"
    assert ops_attn.ATTENTION.bind("auto") is ops_attn.attention_reference  # no measurement of attention
    assert ops_lnl.LAYER_NORM_LINEAR.bind("torch").__name__ == "layer_norm_then_linear"


def test_a_rewritten_table_is_read_again(monkeypatch, tmp_path):
    """main() writes the table inside the package; the decisions taken before it must not stick."""
    x = _one_win_table(monkeypatch, tmp_path)
    monkeypatch.setattr(measured, "TABLE", tmp_path / "empty.json")
    measured._entries.cache_clear()
    assert not measured.prefers_triton("linear_act", x, (768, 3072, "gelu"), 788, dtype="torch.bfloat16")
    report = tmp_path / "kernels.json"
    bench = _bench("test_linear_act_fc1", "torch", "fwd", [788, 768, 3072], 1.0, device="G", act="gelu")
    fast = _bench("test_linear_act_fc1", "triton", "fwd", [788, 768, 3072], 0.5, device="G", act="gelu")
    report.write_text(json.dumps({"benchmarks": [bench, fast]}))
    assert measured.main([str(report)]) == 0
    assert measured.prefers_triton("linear_act", x, (768, 3072, "gelu"), 788, dtype="torch.bfloat16")
