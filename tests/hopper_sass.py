"""Reading a compiled kernel as issue 11 reads it, from text alone: ptxas's resource report
(`ptxas -v`) and the SASS that `nvdisasm -c -g` prints for the cubin. No GPU and no Triton here,
so the parsing is unit-tested on small hand-written listings (tests/test_hopper_speed.py).

The main loop is the innermost loop that holds the matrix instructions: a backward branch
(`BRA` to a label at or before it) whose range contains an HGMMA (wgmma) or HMMA (mma.sync).
Its instruction count is the listing's instructions from the branch target to the branch: the
static count, each side of a branch inside counted once. A 64-bit `//` or `%` compiles to a
test whether both operands fit 32 bits, an inline 32-bit division (I2F.RP, MUFU.RCP, ...) and,
on the other side, a CALL to a 64-bit division routine: the CALLs are counted apart, with the
length of each routine (its instructions up to its RET)."""

import re
from collections import Counter
from dataclasses import dataclass

_REGISTERS = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)([^;]*);")
_LABEL = re.compile(r"^([.$A-Za-z_][\w.$]*):\s*$")
_SOURCE = re.compile(r'^\s*//## File "([^"]+)", line (\d+)')
_TARGET = re.compile(r"`\(([^)]+)\)")
_GMMA_SHAPE = re.compile(r"^[A-Z]GMMA\.(\d+)x(\d+)x(\d+)")
_HMMA_SHAPE = re.compile(r"^HMMA\.(\d\d)(\d)(\d+)")  # HMMA.16816: m16 n8 k16; HMMA.1688: m16 n8 k8


def ptxas_usage(log: str) -> dict:
    """Registers, stack frame and spill bytes from a `ptxas -v` log (one kernel)."""
    registers, frame = _REGISTERS.search(log), _FRAME.search(log)
    if registers is None or frame is None:
        raise ValueError(f"no register or stack-frame line in the ptxas log:\n{log[-2000:]}")
    stack, stores, loads = map(int, frame.groups())
    return {"registers": int(registers.group(1)), "stack": stack, "spill_stores": stores, "spill_loads": loads}


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with its modifiers: "LDGSTS.E.BYPASS.128"
    operands: str
    source: str | None  # "file:line" of the Triton source it comes from, where the listing says

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


def parse(listing: str) -> tuple[list[Instruction], dict[str, int]]:
    """(instructions in address order, label -> address) of an `nvdisasm -c -g` listing."""
    instructions, labels, pending, source = [], {}, [], None
    for line in listing.splitlines():
        if m := _SOURCE.match(line):
            source = f"{m.group(1)}:{m.group(2)}"
        elif m := _INSTRUCTION.match(line):
            address = int(m.group(1), 16)
            for label in pending:
                labels[label] = address
            pending = []
            instructions.append(Instruction(address, m.group(3), m.group(4).strip(), source))
        elif m := _LABEL.match(line.strip()):
            pending.append(m.group(1))
    return instructions, labels


def _target(ins: Instruction, labels: dict[str, int]) -> int | None:
    m = _TARGET.search(ins.operands)
    return labels.get(m.group(1)) if m else None


def _is_mma(ins: Instruction) -> bool:
    return ins.base in ("HGMMA", "QGMMA", "IGMMA", "HMMA")


def main_loop(instructions, labels):
    """The instructions of the innermost backward-branch loop that holds an MMA, or None."""
    best = None
    for i, ins in enumerate(instructions):
        if ins.base != "BRA":
            continue
        start = _target(ins, labels)
        if start is None or start > ins.address:
            continue
        body = [x for x in instructions[:i + 1] if x.address >= start]
        if any(map(_is_mma, body)) and (best is None or len(body) < len(best)):
            best = body
    return best


def routine_length(instructions, labels, name) -> int:
    """Instructions of the routine at label `name`, up to and including its first RET."""
    start = labels[name]
    count = 0
    for ins in instructions:
        if ins.address >= start:
            count += 1
            if ins.base == "RET":
                return count
    raise ValueError(f"routine {name} at {start:#x} has no RET")


def _mma_macs(ins: Instruction, num_warps: int) -> int:
    """Multiply-adds one MMA instruction does across the block (wgmma: per warpgroup of 4 warps;
    mma.sync: per warp)."""
    if m := _GMMA_SHAPE.match(ins.opcode):
        m_, n_, k_ = map(int, m.groups())
        return m_ * n_ * k_ * max(1, num_warps // 4)
    if m := _HMMA_SHAPE.match(ins.opcode):
        m_, n_, k_ = map(int, m.groups())
        return m_ * n_ * k_ * num_warps
    raise ValueError(f"unknown MMA shape in {ins.opcode}")


def _width(opcode: str) -> int:
    """Bytes one thread moves with a load or async copy: the .128/.64 suffix, .U16/.S16 2, .U8 1, else 4."""
    mods = opcode.split(".")[1:]
    for bits, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if bits in mods:
            return size
    return 4


def loop_metrics(instructions, labels, num_warps: int) -> dict | None:
    """What one iteration of the main loop holds, or None when the kernel has no MMA loop."""
    body = main_loop(instructions, labels)
    if body is None:
        return None
    calls = Counter(_TARGET.search(x.operands).group(1) for x in body if x.base == "CALL")
    mma = [x for x in body if _is_mma(x)]
    async_copies = [x for x in body if x.base == "LDGSTS"]
    return {
        "instructions": len(body),
        "calls": sum(calls.values()),
        "called": {name: {"calls": n, "length": routine_length(instructions, labels, name)}
                   for name, n in sorted(calls.items())},
        "mma": "wgmma" if any(x.base.endswith("GMMA") for x in mma) else "mma.sync",
        "mma_count": len(mma),
        "mma_macs": sum(_mma_macs(x, num_warps) for x in mma),
        "async_widths": sorted({_width(x.opcode) for x in async_copies}),
        "async_bytes": 32 * num_warps * sum(_width(x.opcode) for x in async_copies),
        "tma_loads": sum(x.base == "UTMALDG" for x in body),
        "sync_load_widths": sorted({_width(x.opcode) for x in body if x.base == "LDG"}),
        "sync_loads": sum(x.base == "LDG" for x in body),
        "local": sum(x.base in ("LDL", "STL") for x in body),
        # each integer division's reciprocal starts with an I2F rounding to +inf (I2F.RP, I2F.U32.RP)
        "divisions": sum(x.base == "I2F" and "RP" in x.opcode.split(".") for x in body),
        "opcodes": dict(Counter(x.base for x in body).most_common()),
        "sources": dict(Counter(x.source or "?" for x in body).most_common()),
    }


def global_loads(instructions) -> dict:
    """The widths of a kernel's global loads (synchronous and async), for kernels without an MMA loop."""
    loads = [x for x in instructions if x.base in ("LDG", "LDGSTS")]
    return {"load_widths": sorted({_width(x.opcode) for x in loads}), "loads": len(loads),
            "calls": sum(x.base == "CALL" for x in instructions),
            "local": sum(x.base in ("LDL", "STL") for x in instructions)}
