"""The static cost report (kernels/cost.py): its method on hand-written SASS and PTX, its budget
formula against the research note, and one real run (every spec a family kernel module lists in
its COST_BUDGETS, plus one SZ decoder, on sm_90, compiled as the JIT would, in a subprocess with
the interpreter off) against each family's budgets."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from lowbit.kernels import _families, cost, nf4  # noqa: E402  (decorated under the interpreter here: nothing compiles in-process)

# nvdisasm's layout: an outer loop .L_x_0 around an inner one .L_x_1, and the `BRA .` after EXIT.
SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_0:
	//## File ".nv_debug_ptx_txt", line 7
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
.L_x_1:
	//## File "/k.py", line 3
	//## File ".nv_debug_ptx_txt", line 9
        /*0020*/              @!P2 LDG.E.U8 R8, desc[UR4][R6.64] ;
        /*0030*/                   SHFL.BFLY PT, R9, R8, 0x1, 0x1f ;
        /*0040*/               @P0 BRA `(.L_x_1) ;
        /*0050*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0060*/               @P1 BRA `(.L_x_0) ;
        /*0070*/                   EXIT ;
.L_x_2:
        /*0080*/                   BRA `(.L_x_2);
"""


def test_find_loop_takes_the_innermost_loop():
    instrs, labels = cost.parse_sass(SASS)
    assert labels == {".L_x_0": 0x10, ".L_x_1": 0x20, ".L_x_2": 0x80}
    loop = cost.find_loop(instrs, labels)
    assert [i.addr for i in loop] == [0x20, 0x30, 0x40]
    assert loop[0].ptx_line == 9
    stats = cost.loop_stats(loop, {9: frozenset({"codes_ptr"})})
    assert stats["loop_instructions"] == 3
    assert stats["loads"] == {"codes": [8]}
    assert (stats["shuffles_per_iter"], stats["barriers_per_iter"]) == (1, 0)


def test_load_widths():
    widths = {op: cost.load_bits(op) for op in ("LDG.E.U8", "LDG.E.S16", "LDG.E", "LDG.E.64", "LDG.E.128.CONSTANT",
                                                 "LDGSTS.E.BYPASS.LTC128B.128")}
    assert list(widths.values()) == [8, 16, 32, 64, 128, 128]
    assert all(map(cost.is_global_load, widths)) and not cost.is_global_load("LDGDEPBAR")  # cp.async commit


def test_ceiling_matches_the_budget_of_the_research_note():
    # ../shared/research/gpu-gemv.md: nf4 + double quant moves 0.516 B/weight; ~5.2 SASS instructions
    # per weight at 100% of the H100's copy bandwidth, ~7.4 at 70%; int2 rows (0.254 B/w) ~3.6 at 70%.
    assert cost.ceiling_fraction(5.16, 0.516) == pytest.approx(1.0, abs=0.01)
    assert cost.ceiling_fraction(7.37, 0.516) == pytest.approx(0.70, abs=0.01)
    assert cost.ceiling_fraction(3.63, 0.254) == pytest.approx(0.70, abs=0.01)
    assert cost.ceiling_fraction(1.0, 0.516) == 1.0  # capped: issue is then not the limit


PTX = """\
.visible .entry k(
	.param .u64 .ptr .global .align 1 k_param_0,
	.param .u64 .ptr .global .align 1 k_param_1,
	.param .u32 k_param_2
)
{
	ld.param.b64 	%rd1, [k_param_0];
	ld.param.b64 	%rd2, [k_param_1];
	ld.param.b32 	%r1, [k_param_2];
	mul.wide.s32 	%rd3, %r1, 4;
	add.s64 	%rd4, %rd1, %rd3;
	ld.global.b32 { %r2 }, [ %rd4 + 0 ];
	mad.wide.s32 	%rd5, %r2, 4, %rd2;
	@%p1 ld.global.b32 { %r3 }, [ %rd5 + 0 ];
}
"""


def test_loads_are_attributed_by_the_address_not_by_the_data():
    # The second load indexes b_ptr with a value read through a_ptr (as the nested scale code
    # indexes its table): it reads b, not a. The stride (a u32 parameter) is no pointer.
    pointers = cost.ptx_load_pointers(PTX, ["a_ptr", "b_ptr", None])
    assert pointers == {12: frozenset({"a_ptr"}), 14: frozenset({"b_ptr"})}


def test_a_family_names_the_role_of_its_own_pointers():
    """A pointer name cost.ROLE does not know reads as "other" unless the spec's cost dict maps it."""
    loop = cost.find_loop(*cost.parse_sass(SASS))
    assert cost.loop_stats(loop, {9: frozenset({"lut_ptr"})})["loads"] == {"other": [8]}
    assert cost.loop_stats(loop, {9: frozenset({"lut_ptr"})}, {"lut_ptr": "table"})["loads"] == {"table": [8]}


REQUIRED = {"kernel", "format", "m_bucket", "arch", "weights_per_thread_per_iter", "instr_per_weight",
            "code_load_bits", "barriers_per_iter", "shuffles_per_iter", "registers", "spill_bytes", "stack_bytes",
            "ceiling_fraction_of_bandwidth"}

# Every family kernel module (kernels/<family>.py with aot_specs(), found by kernels/_families.py)
# states its static goals in COST_BUDGETS; a new family's are checked here without an edit.
FAMILIES = _families.families()
BUDGETS = [(family, b) for family, module in FAMILIES.items() for b in module.COST_BUDGETS]
SZ_DECODER = "sz_decode[fp32,4096x4096]"  # the method's second subject: a loop that stores symbols


def test_every_family_states_its_budgets():
    assert {"nf4", "intq", "sz"} <= set(FAMILIES)
    for family, module in FAMILIES.items():
        assert isinstance(getattr(module, "COST_BUDGETS", None), list), f"kernels/{family}.py: no COST_BUDGETS list"
        names = {s.name for s in module.aot_specs() if s.cost}
        for b in module.COST_BUDGETS:
            assert b.spec in names, f"kernels/{family}.py: budget for {b.spec!r}, which aot_specs() does not report"


def _spec_names() -> list[str]:
    return sorted({b.spec for _, b in BUDGETS} | {SZ_DECODER})


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """{(spec name, arch): record} for every budgeted spec and the SZ decoder, and the dump folder."""
    dump = tmp_path_factory.mktemp("cost")
    archs = sorted({b.arch for _, b in BUDGETS} | {90})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "lowbit.kernels.cost", "--arch", *map(str, archs), "--json",
                          "--jobs", "1", "--dump", str(dump), "--filter", *_spec_names()],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    records = {(r["name"], r["arch"]): r for r in json.loads(out.stdout)}
    want = {(b.spec, b.arch) for _, b in BUDGETS} | {(SZ_DECODER, 90)}
    assert want <= set(records), sorted(want - set(records))
    return records, dump


def test_records_carry_the_keys_and_sane_values(report):
    records, _ = report
    for r in records.values():
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert r["instr_per_weight"] > 0 and r["registers"] > 0
        assert r["instr_per_weight"] == pytest.approx(r["loop_instructions"] / r["weights_per_thread_per_iter"],
                                                      abs=0.01)
        assert 0 < r["ceiling_fraction_of_bandwidth"] <= 1
        assert r["ceiling_fraction_of_bandwidth"] == pytest.approx(
            cost.ceiling_fraction(r["instr_per_weight"], r["bytes_per_weight"]), abs=0.001)
        assert r["spill_bytes"] == 0 and r["stack_bytes"] == 0
    gemv = records[(nf4.COST_BUDGETS[0].spec, 90)]
    cfg = nf4.FORWARD_CONFIGS[1][0]
    assert (gemv["kernel"], gemv["format"], gemv["m_bucket"]) == (f"nf4.{cfg.kind}", "nf4", 1)
    assert gemv["weights_per_thread_per_iter"] == cfg.block_n * cfg.block_k / (32 * cfg.num_warps)
    sz = records[(SZ_DECODER, 90)]
    assert (sz["format"], sz["m_bucket"], sz["instr_per_symbol"]) == ("sz", None, sz["instr_per_weight"])


@pytest.mark.parametrize("family,budget", BUDGETS, ids=[f"{f}:{b.spec}:sm{b.arch}" for f, b in BUDGETS])
def test_family_meets_its_static_goals(report, family, budget):
    """A family's COST_BUDGETS entry: SASS instructions per weight, code load width, code bits loaded
    per weight (each code bit once), barriers, shuffles, spill and stack, as the cost report reads them."""
    r = report[0][(budget.spec, budget.arch)]
    assert r["instr_per_weight"] <= budget.max_instr_per_weight, (r["instr_per_weight"], budget)
    if budget.code_load_bits is not None:
        assert r["code_load_bits"] == max(r["loads"]["codes"]) == budget.code_load_bits, r["loads"]
    if budget.code_bits_per_weight is not None:
        assert sum(r["loads"]["codes"]) == budget.code_bits_per_weight * r["weights_per_thread_per_iter"], r["loads"]
    assert r["barriers_per_iter"] <= budget.max_barriers and r["shuffles_per_iter"] <= budget.max_shuffles
    assert r["spill_bytes"] <= budget.max_spill_bytes and r["stack_bytes"] <= budget.max_stack_bytes


def test_nf4_gemv_loop_streams_codes_scales_x_and_the_table(report):
    gemv = report[0][(nf4.COST_BUDGETS[0].spec, 90)]
    loads = gemv["loads"]
    # every global load in the loop is accounted for: the L1-resident code table is gathered per weight
    assert set(loads) == {"codes", "scales", "x", "table"}, loads
    # Each thread loads its own share of the code tile once, as 128-bit words: 4 bits per weight.
    assert sum(loads["codes"]) == 4 * gemv["weights_per_thread_per_iter"]
    assert gemv["code_load_bits"] == max(loads["codes"]) == 128
    assert gemv["x_load_bits"] == max(loads["x"])
    assert len(loads["table"]) == gemv["weights_per_thread_per_iter"]  # one gather per weight
    assert 8 in loads["scales"]  # the uint8 double-quantized scale code
    # the static goals of the M=1 loop: no barrier, no shuffle, no spill
    assert gemv["barriers_per_iter"] == 0 and gemv["shuffles_per_iter"] == 0


def test_sz_loop_refills_one_word_per_two_symbols(report):
    """Stream v2: each lane reads its bits as 32-bit words into a 64-bit buffer (one refill per
    two symbols) and looks each symbol up in a 16-bit table entry."""
    sz = report[0][(SZ_DECODER, 90)]
    assert sz["stores_per_iter"] >= 2  # one output element per symbol, two symbols per refill
    assert sz["loads"]["codes"] == [32] * (sz["stores_per_iter"] // 2)
    assert sz["loads"]["table"] == [16] * sz["stores_per_iter"]


def test_dump_writes_each_cubin_and_its_sass(report):
    records, dump = report
    files = sorted(p.name for p in dump.iterdir())
    assert len(files) == 2 * len(records) and sum(f.endswith(".cubin") for f in files) == len(records)
    stem = re.sub(r"[^\w.=-]+", "_", nf4.COST_BUDGETS[0].spec)  # as cost_record names its files
    sass = (dump / f"{stem}.sm90.sass").read_text()
    assert "LDG" in sass and ".nv_debug_ptx_txt" in sass
