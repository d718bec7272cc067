"""Static cost report: what each shipped kernel config costs per weight, read from its SASS.

`python -m lowbit.kernels.cost [--arch 80|90] [--json] [--dump DIR] [--filter NAME] [--max-m M]`

No GPU is needed, and nothing is timed. The question it answers is the one in
../shared/research/gpu-gemv.md: a bandwidth-bound GEMV can only reach the memory bandwidth if
each streamed weight costs few enough instructions. An H100 SM issues 4 warp-instructions, i.e.
128 thread-instructions, per clock; at the measured copy bandwidth (2967 GB/s over 132 SMs at
1.755 GHz) a format of `b` bytes per weight delivers 2967e9 / (132 * 1.755e9) / b weights per SM
per clock, so the instruction budget per weight at a fraction f of the bandwidth is

    budget(f) = 128 * b / (f * 2967e9 / (132 * 1.755e9))        (nf4 + double quant: 5.2 at f = 1)

and, turned around, a loop that spends `i` instructions per weight can reach at most

    ceiling = min(1, 128 * b * 132 * 1.755e9 / (i * 2967e9))     of the copy bandwidth.

It is an upper bound from instruction issue alone: latency, occupancy, bank conflicts and the
tail of split-K are not in it.

Method, per (kernel config, arch):

  1. Compile exactly what the JIT compiles: the spec is the launcher's own launch on meta tensors,
     specialized by Triton's binder (kernels/_compile.py), so the divisibility-16 attributes and
     the constant-1 strides that decide vector widths are the real ones.
  2. Disassemble the cubin with nvdisasm, keeping for every instruction the PTX line it came from.
  3. Find the steady-state loop: a loop in SASS is a branch to an earlier address. Of the
     innermost loops (those containing no other loop) take the one with the most global loads:
     that is the K loop of the matmuls, the M loop of grad_scale, the symbol loop of the decoder.
  4. Count that loop's instructions, and among them the global loads (with their widths:
     LDG.E.U8 = 8 bits ... LDG.E.128 = 128), the shared-memory traffic, the barriers (BAR) and
     the shuffles (SHFL). Each global load is attributed to codes / scales / x / table by the
     kernel argument its address derives from, following the PTX data flow back to ld.param.
  5. Divide by the weights each thread handles per iteration (BLOCK_N * BLOCK_K / threads) and
     apply the ceiling formula above.

Registers, stack frame and local memory come from cuobjdump; spill bytes are the bytes that STL
instructions store (what ptxas -v calls "spill stores").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import NamedTuple

from ._compile import KernelSpec, all_specs, compile_spec, disassemble, resource_usage, specialize, spill_store_bytes
from ._launch import DEFAULT_SMS

# H100 SXM, measured and nominal (../shared/research/gpu-gemv.md)
COPY_BANDWIDTH = 2967e9  # bytes/s, measured device-to-device copy
SMS = DEFAULT_SMS  # 132: the card the launchers size their grids for when compiled without a GPU
CLOCK = 1.755e9  # Hz
ISSUE_PER_SM_CLOCK = 128  # thread-instructions: 4 schedulers x one 32-thread warp-instruction


def ceiling_fraction(instr_per_weight: float, bytes_per_weight: float) -> float:
    """The largest fraction of the copy bandwidth a loop of this many instructions per weight can
    stream, from instruction issue alone."""
    weights_per_sm_clock = COPY_BANDWIDTH / (SMS * CLOCK) / bytes_per_weight
    return min(1.0, ISSUE_PER_SM_CLOCK / (instr_per_weight * weights_per_sm_clock))


# ----------------------------------------------------------------------------------------------
# Step 2: SASS as a list of instructions with their source lines
# ----------------------------------------------------------------------------------------------


class Instr(NamedTuple):
    addr: int
    opcode: str  # with modifiers, e.g. "LDG.E.128"
    operands: str
    ptx_line: int | None  # the line of the PTX instruction it was compiled from (1-based)


_PTX_LINE = re.compile(r'//## File "\.nv_debug_ptx_txt", line (\d+)')
_LABEL = re.compile(r"^\s*(\.L_\w+):")
_INSTR = re.compile(r"/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?)\s*;")


def parse_sass(sass: str) -> tuple[list[Instr], dict[str, int]]:
    """Instructions in address order, and each label's address."""
    instrs, labels, pending = [], {}, []
    ptx_line = None
    for text in sass.splitlines():
        if m := _PTX_LINE.search(text):
            ptx_line = int(m.group(1))
        elif m := _LABEL.match(text):
            pending.append(m.group(1))
        elif m := _INSTR.search(text):
            addr = int(m.group(1), 16)
            for label in pending:
                labels[label] = addr
            pending = []
            instrs.append(Instr(addr, m.group(2), m.group(3), ptx_line))
    return instrs, labels


# ----------------------------------------------------------------------------------------------
# Step 3: the steady-state loop
# ----------------------------------------------------------------------------------------------


def is_global_load(op: str) -> bool:
    """LDG (global), LDGSTS (cp.async global -> shared), UTMALDG (TMA), LD (generic); not
    LDGDEPBAR, the cp.async commit barrier."""
    return op.split(".")[0] in ("LDG", "LDGSTS", "UTMALDG", "LD")


def find_loop(instrs: list[Instr], labels: dict[str, int]) -> list[Instr]:
    """The instructions of the hottest innermost loop (empty when the kernel has no loop)."""
    loops = []
    for ins in instrs:
        if ins.opcode.startswith("BRA") and (m := re.search(r"\((\.L_\w+)\)", ins.operands)):
            target = labels.get(m.group(1))
            if target is not None and target < ins.addr:  # backward: a loop (not the trailing `BRA .`)
                loops.append((target, ins.addr))
    innermost = [(a, b) for a, b in loops
                 if not any((a, b) != (c, d) and a <= c and d <= b for c, d in loops)]
    if not innermost:
        return []

    def body(loop):
        return [ins for ins in instrs if loop[0] <= ins.addr <= loop[1]]

    return max((body(lp) for lp in innermost), key=lambda b: (sum(is_global_load(i.opcode) for i in b), len(b)))


# ----------------------------------------------------------------------------------------------
# Step 4: what the loop does
# ----------------------------------------------------------------------------------------------


def load_bits(opcode: str) -> int:
    """Width of a load from its modifiers: .U8/.S8 8, .U16/.S16 16, .64, .128, else 32."""
    mods = set(opcode.split(".")[1:])
    if mods & {"U8", "S8"}:
        return 8
    if mods & {"U16", "S16"}:
        return 16
    return 128 if "128" in mods else 64 if "64" in mods else 32


# Which operand a load reads, by the pointer argument its address is computed from. A family whose
# kernels name a pointer otherwise adds it in its cost dict: {"roles": {"lut_ptr": "table"}}.
ROLE = {
    "codes_ptr": "codes", "words_ptr": "codes", "payload_ptr": "codes",
    "absmax_ptr": "scales", "nested_absmax_ptr": "scales", "nested_code_ptr": "scales", "offset_ptr": "scales",
    "scale_ptr": "scales", "zero_ptr": "scales",
    "x_ptr": "x", "g_ptr": "x",
    "code_ptr": "table", "table_ptr": "table",
}

_PTX_INSTR = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.:]*)\s+(.*?);")  # "::": ld.global.L1::evict_first
_REG = re.compile(r"%[a-z]+\d+")


def ptx_load_pointers(ptx: str, arg_names: list[str | None]) -> dict[int, frozenset[str]]:
    """PTX line -> the pointer arguments the address of the global load on that line derives from.

    Line numbers of the Python source are not reliable for this (Triton tags some unmasked loads
    with the next line), so this follows the PTX data flow instead: from the address register of
    each ld.global / cp.async back through the arithmetic that defined it to the ld.param of a
    kernel argument. Values read from memory end the walk: an index loaded from memory (the
    nested scale code, a 4-bit code) is data, not part of the pointer's provenance.
    `arg_names[i]` names the i-th runtime parameter if it is a pointer, else None.
    """
    lines = ptx.splitlines()
    defs: dict[str, list[tuple[str, list[str]]]] = {}
    loads: dict[int, str] = {}
    for no, text in enumerate(lines, 1):
        m = _PTX_INSTR.match(text)
        if not m:
            continue
        op, operands = m.groups()
        if op.startswith(("ld.global", "cp.async")) and "[" in operands:
            addrs = re.findall(r"\[\s*(%\w+)", operands)
            if addrs:
                loads[no] = addrs[-1] if op.startswith("cp.async") else addrs[0]  # cp.async: [dst], [src]
        dst, _, rest = operands.partition(",")
        if dst.strip().startswith("["):
            continue  # a store: no register defined
        for reg in _REG.findall(dst):
            defs.setdefault(reg, []).append((op, _REG.findall(rest) + re.findall(r"\[(\w+_param_\d+)\]", rest)))
    out = {}
    for no, addr in loads.items():
        found, seen, todo = set(), set(), [addr]
        while todo:
            reg = todo.pop()
            if reg in seen:
                continue
            seen.add(reg)
            for op, srcs in defs.get(reg, []):
                if op.startswith("ld.param"):
                    i = int(srcs[-1].rsplit("_", 1)[1])
                    if i < len(arg_names) and arg_names[i]:  # a pointer, not a size or a stride
                        found.add(arg_names[i])
                elif not op.startswith(("ld.", "atom", "shfl", "cp.", "tex", "red")):
                    todo.extend(r for r in srcs if r.startswith("%"))
        out[no] = frozenset(found)
    return out


def load_role(ins: Instr, pointers: dict[int, frozenset[str]], roles: dict[str, str] | None = None) -> str:
    """The role of a global load by the pointer arguments its address derives from: ROLE, or the
    spec's own `roles` (its cost dict's "roles") for pointer names ROLE does not know."""
    table = {**ROLE, **(roles or {})}
    found = {table.get(p, "other") for p in pointers.get(ins.ptx_line, ())}
    return found.pop() if len(found) == 1 else ("mixed" if found else "other")


def loop_stats(loop: list[Instr], pointers: dict[int, frozenset[str]], roles: dict[str, str] | None = None) -> dict:
    ops = [i.opcode for i in loop if not i.opcode.startswith("NOP")]
    loads: dict[str, list[int]] = {}
    for ins in loop:
        if is_global_load(ins.opcode):
            loads.setdefault(load_role(ins, pointers, roles), []).append(load_bits(ins.opcode))
    return {
        "loop_instructions": len(ops),
        "loads": {k: sorted(v, reverse=True) for k, v in sorted(loads.items())},
        "shared_per_iter": sum(op.startswith(("LDS", "STS", "LDSM")) for op in ops),
        "barriers_per_iter": sum(op.startswith("BAR") for op in ops),
        "shuffles_per_iter": sum(op.startswith("SHFL") for op in ops),
        "mma_per_iter": sum(op.startswith(("HMMA", "HGMMA")) for op in ops),
        "stores_per_iter": sum(op.startswith("STG") for op in ops),
    }


# ----------------------------------------------------------------------------------------------
# Step 5: one record per (kernel config, arch)
# ----------------------------------------------------------------------------------------------


def _compile_fresh(spec: KernelSpec, arch: int):
    # Bypass Triton's cache: its key hashes the kernel's source text, not its position, so a
    # cached cubin carries the line numbers of the file as it was then, and step 4 reads lines.
    from triton import knobs

    saved = knobs.compilation.always_compile
    knobs.compilation.always_compile = True
    try:
        return compile_spec(spec, arch)
    finally:
        knobs.compilation.always_compile = saved


def cost_record(spec: KernelSpec, arch: int, dump: str | None = None) -> dict:
    compiled = _compile_fresh(spec, arch)
    cubin = compiled.asm["cubin"]
    sass = disassemble(cubin)
    if dump:
        os.makedirs(dump, exist_ok=True)
        stem = os.path.join(dump, re.sub(r"[^\w.=-]+", "_", spec.name) + f".sm{arch}")
        with open(stem + ".cubin", "wb") as f:
            f.write(cubin)
        with open(stem + ".sass", "w") as f:
            f.write(sass)
    signature = specialize(spec, arch)[0]
    params = [k if t.startswith("*") else None for k, t in signature.items() if t != "constexpr"]
    pointers = ptx_load_pointers(compiled.asm["ptx"], params)
    stats = loop_stats(find_loop(*parse_sass(sass)), pointers, spec.cost.get("roles"))
    usage = resource_usage(cubin)
    c = spec.cost
    cfg = c["config"]
    threads = 32 * spec.kwargs.get("num_warps", 4)
    if c.get("iterations_by_stores"):
        # A loop with a constant trip count that ptxas may unroll (the SZ decoder's symbol loop),
        # each of whose source iterations stores one element: count source iterations by stores.
        per_thread = max(1, stats["stores_per_iter"]) * c["weights_per_iter"] / threads
    else:
        per_thread = c["weights_per_iter"] / threads
    ipw = stats["loop_instructions"] / per_thread if per_thread else None

    def widest(role):
        return max(stats["loads"].get(role, [0]))

    rec = {
        "name": spec.name,
        "kernel": c["kernel"],
        "format": c["format"],
        "m_bucket": c["m_bucket"],
        "arch": arch,
        "config": cfg._asdict() if hasattr(cfg, "_asdict") else dict(cfg),
        "threads": threads,
        "weights_per_thread_per_iter": per_thread,
        **stats,
        "instr_per_weight": round(ipw, 2) if ipw else None,
        "code_load_bits": widest("codes"),
        "scale_load_bits": widest("scales"),
        "x_load_bits": widest("x"),
        "registers": usage["reg"],
        "spill_bytes": spill_store_bytes(sass),
        "stack_bytes": usage["stack"],
        "local_bytes": usage["local"],
        "bytes_per_weight": round(c["bytes_per_weight"], 4),
        "ceiling_fraction_of_bandwidth": round(ceiling_fraction(ipw, c["bytes_per_weight"]), 3) if ipw else None,
    }
    if c.get("unit", "weight") != "weight":  # e.g. "symbol": the same figure under the family's own word
        rec[f"instr_per_{c['unit']}"] = rec["instr_per_weight"]
    return rec


def _job(job):
    name, arch, dump = job
    spec = next(s for s in all_specs() if s.name == name)
    try:
        return cost_record(spec, arch, dump)
    except Exception as e:  # report, do not hide
        return {"name": name, "arch": arch, "error": f"{type(e).__name__}: {e}"[:2000]}


def _config_str(rec: dict) -> str:
    """BLOCK_M x BLOCK_N x BLOCK_K, split, warps (sz: output dtype and chunk)."""
    c = rec["config"]
    if "chunk" in c:
        return f"{c['out']} chunk={c['chunk']}"
    split = c.get("split_k", c.get("split_n"))
    return f"{c['block_m']}x{c['block_n']}x{c['block_k']}{f' s{split}' if split else ''} w{c['num_warps']}"


def format_table(records: list[dict]) -> str:
    def loads(rec, role):
        v = rec["loads"].get(role, [])
        return ",".join(f"{v.count(b)}x{b}" for b in sorted(set(v), reverse=True)) or "-"

    head = (f"{'kernel':15} {'fmt':5} {'M<=':>4} {'config':20} {'sm':>2} {'w/thr':>5} {'instr':>5} {'i/w':>6} "
            f"{'codes':>9} {'scales':>12} {'x':>9} {'BAR':>3} {'SHFL':>4} {'regs':>4} {'spill':>5} {'stack':>5} "
            f"{'ceiling':>7}")
    lines = [head, "-" * len(head)]
    for r in records:
        if "error" in r:
            lines.append(f"{r['name']} sm{r['arch']}: {r['error'].splitlines()[0][:100]}")
            continue
        mb = "-" if r["m_bucket"] is None else ("any" if r["m_bucket"] >= 1 << 30 else r["m_bucket"])
        ipw = "-" if r["instr_per_weight"] is None else f"{r['instr_per_weight']:.1f}"
        ceil = "-" if r["ceiling_fraction_of_bandwidth"] is None else f"{100 * r['ceiling_fraction_of_bandwidth']:.0f}%"
        lines.append(
            f"{r['kernel']:15} {r['format']:5} {mb:>4} {_config_str(r):20} {r['arch']:>2} "
            f"{r['weights_per_thread_per_iter']:>5g} {r['loop_instructions']:>5} {ipw:>6} {loads(r, 'codes'):>9} "
            f"{loads(r, 'scales'):>12} {loads(r, 'x'):>9} {r['barriers_per_iter']:>3} {r['shuffles_per_iter']:>4} "
            f"{r['registers']:>4} {r['spill_bytes']:>5} {r['stack_bytes']:>5} {ceil:>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lowbit.kernels.cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, choices=(80, 90), nargs="+", default=[90])
    p.add_argument("--json", action="store_true", help="print a JSON list of records instead of the table")
    p.add_argument("--dump", metavar="DIR", help="write each cubin and its SASS here")
    p.add_argument("--filter", nargs="+", default=[""], help="only specs whose name contains one of these")
    p.add_argument("--max-m", type=int, default=None, help="only configs whose M bucket is at most this")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    a = p.parse_args(argv)
    specs = [s for s in all_specs() if s.cost and any(f in s.name for f in a.filter)
             and (a.max_m is None or (s.cost["m_bucket"] or 0) <= a.max_m)]
    jobs = [(s.name, arch, a.dump) for s in specs for arch in a.arch]
    if a.jobs > 1 and len(jobs) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=a.jobs) as ex:
            records = []
            for i, r in enumerate(ex.map(_job, jobs), 1):
                print(f"[{i}/{len(jobs)}] sm{r['arch']} {r['name']}", file=sys.stderr, flush=True)
                records.append(r)
    else:
        records = [_job(j) for j in jobs]
    print(json.dumps(records, indent=1) if a.json else format_table(records))
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
