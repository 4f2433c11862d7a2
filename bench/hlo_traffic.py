"""The HBM traffic of a compiled GPU or TPU program, from XLA's optimized HLO text: for every kernel
(a fusion, a library call, a copy) the bytes it reads and writes, summed by kind and multiplied by the
trip counts of the loops it runs in. With a card's bandwidth this is a floor under the time of the
kernels that do little arithmetic per byte (the elementwise fusions: norms, modulation, RoPE,
GELU, residual adds), which FLOP counts leave out.

What is counted: each kernel's operands and outputs, once each. Where a fusion only slices an
operand at the loop's index (a scan's stacked layer weights), the slice; where it updates a row of a
buffer in place (a scan writing its stacked outputs), the row. An instruction XLA leaves unfused (a
TPU's reshape or row update) is a kernel read as a fusion of itself. Not counted: what a kernel reads
more than once (a matmul re-reads its operands for each tile row or column of its output; flash
attention reads K and V once per query block), what the L2 cache (50 MB) spares, and library calls'
workspaces (cuDNN's u8, cuBLAS's s8 array beside the output). So the numbers are a lower bound for
matmul and attention kernels and about right for elementwise ones.
On a TPU, arrays XLA keeps in the chip's on-core memory (VMEM: a layout in memory space S(1)) move
no HBM bytes; a copy-start that prefetches one reads its HBM source.
"""

from __future__ import annotations

import re

_BYTES = dict(pred=1, s8=1, u8=1, bf16=2, f16=2, s16=2, u16=2, f32=4, s32=4, u32=4, f64=8, s64=8, u64=8)
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\](\{[^}]*\})?")  # dtype, dims, layout
# no kernel of their own: a conditional's branches are not entered (kernel_traffic)
_NO_KERNEL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "after-all",
              "opt-barrier", "partition-id", "replica-id", "conditional"}
_MATMULS = {"dot", "convolution"}  # TPU's matmuls are convolutions, fused or not
# libtpu's custom calls that move no data: one reserves a buffer (a scan's stack, before its rows
# are written), one places concatenated arrays side by side, one marks gather indices in bounds.
_NO_TRAFFIC_CALLS = {"AllocateBuffer", "ConcatBitcast", "AssumeGatherIndicesInBound"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
KINDS = ("gemm", "attention", "elementwise", "copy", "collective")
# Collectives between devices (gpu_compile.py's TPU slices: the gradients' all-reduce per layer):
# their HBM bytes, not the time on the links between chips.
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def shape_bytes(shape: str, hbm_only: bool = True) -> int:
    """HBM bytes of an HLO shape: one array, or every array of a tuple; none for an array in a TPU
    core's own memory (a layout with a memory space S(n): VMEM, or other non-HBM spaces) unless
    not hbm_only (a slice copied into VMEM reads its bytes from HBM)."""
    total = 0
    for dtype, dims, layout in _ARRAY.findall(shape):
        if hbm_only and "S(" in layout:
            continue
        count = 1
        for dim in filter(None, dims.split(",")):
            count *= int(dim)
        total += count * _BYTES[dtype]
    return total


def _split_top_level(text: str) -> list[str]:
    """Comma-separated items of `text`, not splitting inside brackets or braces."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item for item in (re.sub(r"/\*.*?\*/", "", item).strip() for item in items) if item]


def _closing(text: str, start: int) -> int:
    """Index of the bracket that closes the one at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        depth += text[i] in "([{"
        depth -= text[i] in ")]}"
        if depth == 0:
            return i
    raise ValueError(f"unbalanced brackets in HLO line: {text[:200]}")


def parse_instruction(line: str) -> dict | None:
    """One HLO instruction line -> {name, shape, op, operands (names), attributes (the rest)}."""
    head = re.match(r"\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*", line)
    if not head:
        return None
    rest = line[head.end():]
    shape_end = _closing(rest, 0) + 1 if rest.startswith("(") else rest.index(" ")
    shape, rest = rest[:shape_end], rest[shape_end:].lstrip()
    op = re.match(r"[\w\-]+", rest).group(0)
    close = _closing(rest, len(op))
    operands = [item.split()[-1].lstrip("%") for item in _split_top_level(rest[len(op) + 1:close])]
    return dict(name=head.group(1), shape=shape, op=op, operands=operands, attributes=rest[close + 1:],
                root=line.lstrip().startswith("ROOT"))


def _open_brackets(line: str) -> int:
    """Brackets `line` opens minus those it closes, outside quoted strings."""
    code = _STRING.sub("", line)
    return sum(code.count(c) for c in "([{") - sum(code.count(c) for c in ")]}")


def joined_lines(hlo: str):
    """The module's lines, an instruction that spans several (a TPU Pallas kernel's metadata has
    line breaks) joined into one: it goes on while its brackets are open."""
    pending, depth = [], 0
    for line in hlo.splitlines():
        if not pending and not re.match(r"\s+(?:ROOT\s+)?%", line):
            yield line
            continue
        pending.append(line)
        depth += _open_brackets(line)
        if depth <= 0:
            yield "\n".join(pending)
            pending, depth = [], 0
    if pending:
        yield "\n".join(pending)


def parse_computations(hlo: str) -> dict[str, list[dict]]:
    """Computation name -> its instructions, from a module's HLO text; the entry is also under "ENTRY"."""
    computations, current = {}, None
    for line in joined_lines(hlo):
        header = re.match(r"(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$", line)
        if header and not line.startswith(" "):
            current = computations.setdefault(header.group(2), [])
            if header.group(1):
                computations["ENTRY"] = current
            continue
        if line.startswith("}"):
            current = None
        elif current is not None:
            instruction = parse_instruction(line)
            if instruction:
                current.append(instruction)
    return computations


def _attribute(instruction: dict, key: str) -> str | None:
    """The computation or name an instruction's `key=` attribute names (calls=, body=), if any."""
    found = re.search(rf"\b{key}=%?([\w.\-]+)", instruction["attributes"])
    return found.group(1) if found else None


_MOVES = {"parameter", "constant", "bitcast", "reshape", "tuple", "get-tuple-element", "dynamic-slice",
          "dynamic-update-slice", "slice", "copy"}


def kernel_kind(instruction: dict, fused: list[dict] | None) -> str:
    """gemm, attention (cuDNN's or our Pallas kernel: on a TPU every Mosaic kernel, the model's
    only ones being splash attention's), copy (a copy, or a fusion or lone instruction that only
    moves data: a scan's slicing or stacking, a TPU's relayout by reshape), collective (an
    all-reduce or other exchange between devices), or elementwise (every other fusion)."""
    if instruction["op"].removesuffix("-start") in _COLLECTIVES:
        return "collective"
    target = re.search(r'custom_call_target="([^"]+)"', instruction["attributes"])
    target = target.group(1) if target else ""
    if "fmha" in target or "pixelflow_flash" in instruction["attributes"] or target == "tpu_custom_call":
        return "attention"
    if ("gemm" in instruction["name"] or "gemm" in target or "matmul" in target or instruction["op"] in _MATMULS
            or any(part["op"] in _MATMULS for part in fused or [])):
        return "gemm"
    # scalars are index arithmetic; their size counts wherever they are (a TPU keeps much of a fusion in VMEM)
    moves_only = fused is not None and all(
        part["op"] in _MOVES or shape_bytes(part["shape"], hbm_only=False) <= 8 for part in fused)
    return "copy" if instruction["op"] in ("copy", "copy-start") or moves_only else "elementwise"


def _sliced_bytes(fused: list[dict], name: str, computations: dict[str, list[dict]],
                  output_names: set[str] = frozenset()) -> int | None:
    """Bytes a fusion reads of its value `name` if every use of it slices it (through bitcasts, and
    through the fusions nested in it, as a TPU's are), else None; a buffer that a dynamic-update-
    slice among output_names updates in place is not read."""
    total = 0
    for user in (instruction for instruction in fused if name in instruction["operands"]):
        if user["op"] in ("dynamic-slice", "slice") and user["operands"][0] == name:
            total += shape_bytes(user["shape"], hbm_only=False)
        elif user["op"] == "bitcast":
            inner = _sliced_bytes(fused, user["name"], computations)
            if inner is None:
                return None
            total += inner
        elif user["op"] == "dynamic-update-slice" and user["operands"][0] == name and user["name"] in output_names:
            continue  # the buffer updated in place
        elif user["op"] == "fusion" and _attribute(user, "calls") in computations:
            nested = computations[_attribute(user, "calls")]
            for position in (i for i, operand in enumerate(user["operands"]) if operand == name):
                parameter = next(part["name"] for part in nested
                                 if part["op"] == "parameter" and part["operands"] == [str(position)])
                inner = _sliced_bytes(nested, parameter, computations)
                if inner is None:
                    return None
                total += inner
        else:
            return None
    return total


def _row_bytes(update: dict, by_name: dict[str, dict]) -> int:
    """HBM bytes a dynamic-update-slice writes in place: its update's, where its buffer is in HBM
    (the update itself may come from VMEM)."""
    return shape_bytes(by_name[update["operands"][1]]["shape"], hbm_only=False) if shape_bytes(update["shape"]) else 0


def _fused_reads_and_writes(fused: list[dict], operand_bytes: list[int],
                            computations: dict[str, list[dict]]) -> tuple[int, int]:
    """Bytes a fusion reads and writes, given its fused computation: a parameter used only through
    dynamic-slices (after bitcasts, or in a nested fusion) reads the slices; a dynamic-update-slice
    at the root writes its update, and its in-place buffer is not read."""
    by_name = {instruction["name"]: instruction for instruction in fused}
    root = next(instruction for instruction in fused if instruction["root"])
    outputs = [by_name[name] for name in root["operands"]] if root["op"] == "tuple" else [root]
    output_names = {out["name"] for out in outputs}
    written = sum(_row_bytes(out, by_name) if out["op"] == "dynamic-update-slice" else shape_bytes(out["shape"])
                  for out in outputs)
    read = 0
    for instruction in fused:
        if instruction["op"] == "parameter":
            index = int(instruction["operands"][0])  # parameter(N)
            sliced = _sliced_bytes(fused, instruction["name"], computations, output_names)
            read += operand_bytes[index] if sliced is None else min(sliced, operand_bytes[index])
    return read, written


def _as_computation(instruction: dict, operand_shapes: list[str], op: str, shape: str) -> list[dict]:
    """An instruction as the computation of a fusion of its own: a parameter per operand, then the
    instruction (as `op`, of `shape`) on them, to be read as a fusion's computation is."""
    parameters = [dict(name=f"param_{i}", shape=operand_shape, op="parameter", operands=[str(i)], attributes="",
                       root=False) for i, operand_shape in enumerate(operand_shapes)]
    return parameters + [dict(instruction, shape=shape, op=op, root=True,
                              operands=[parameter["name"] for parameter in parameters])]


def short_async_computation(instruction: dict) -> list[dict] | None:
    """The computation an async start wraps, where the HLO prints it in its short form: a TPU
    executable's as_text() gives `slice-start(%x), slice={...}` with the shape ((operands), output,
    context) for what XLA's dump gives as `async-start(%x), calls=%wrapped`. None for any other
    instruction (a copy-start and a collective's start are kernels of their own)."""
    wrapped = instruction["op"].removesuffix("-start")
    if (wrapped == instruction["op"] or wrapped in ("copy", "async") or wrapped in _COLLECTIVES
            or _attribute(instruction, "calls")):
        return None
    operands, output = _split_top_level(instruction["shape"][1:-1])[:2]
    return _as_computation(instruction, _split_top_level(operands[1:-1]), wrapped, output)


def _computation_of(instruction: dict, operand_shapes: list[str],
                    computations: dict[str, list[dict]]) -> list[dict] | None:
    """What a kernel runs, to be read as a fusion: a fusion's (or a long-form async start's)
    computation, a short-form async start's, or an instruction XLA left unfused (a TPU's reshape,
    slice or dynamic-update-slice) on its own; None for a library call, a copy-start or a collective."""
    op = instruction["op"]
    if op in ("fusion", "async-start"):  # a TPU's async-start wraps a slice into VMEM
        return computations.get(_attribute(instruction, "calls"))
    if op.endswith("-start"):
        return short_async_computation(instruction)
    if op == "custom-call" or op in _COLLECTIVES:
        return None
    return _as_computation(instruction, operand_shapes, op, instruction["shape"])


def _library_call_output(instruction: dict) -> str:
    """The output of a library call or a collective, as HBM it writes: a collective start's
    shape (operand, output, context...) less its operand and context (an all-reduce-start's is its
    output), a custom call's less its workspace (a 1-D byte array: cuDNN's u8, cuBLAS's s8)."""
    op, shape = instruction["op"], instruction["shape"]
    if op.endswith("-start") and op != "all-reduce-start" and shape.startswith("("):
        return _split_top_level(shape[1:-1])[1]
    if op == "custom-call":
        return ", ".join(f"{dtype}[{dims}]{layout}" for dtype, dims, layout in _ARRAY.findall(shape)
                         if not (dtype in ("u8", "s8") and dims.isdigit()))
    return shape


def kernel_traffic(hlo: str) -> list[dict]:
    """Every kernel of a run of the module's entry computation: {name, kind (KINDS), bytes, op}: its
    reads + writes times the runs of the loops it sits in (a loop XLA knows no trip count of: once;
    a conditional's branches are not entered, as which one runs is not known: dopri5's solve is
    counted short, the Euler one whole), and the jax operation XLA's metadata names (e.g.
    .../transpose(jvp())/while/body/.../mul: the backward pass of a scan), '' where it names none."""
    computations = parse_computations(hlo)
    kernels = []

    def walk(name: str, times: int):
        shapes = {}
        local = {instruction["name"]: instruction for instruction in computations[name]}
        for instruction in computations[name]:
            shapes[instruction["name"]] = instruction["shape"]
            if instruction["op"] == "while":
                walk(_attribute(instruction, "body"), times * (trip_count(instruction, computations, local) or 1))
                continue
            if instruction["op"] == "call":  # its computation's kernels run once per call
                walk(_attribute(instruction, "to_apply"), times)
                continue
            if instruction["op"] in _NO_KERNEL or instruction["op"].endswith("-done"):  # its -start moves the bytes
                continue
            target = re.search(r'custom_call_target="([^"]+)"', instruction["attributes"])
            if target and target.group(1) in _NO_TRAFFIC_CALLS:
                continue
            operand_shapes = [shapes.get(operand, "") for operand in instruction["operands"]]
            operand_bytes = [shape_bytes(shape) for shape in operand_shapes]
            fused = _computation_of(instruction, operand_shapes, computations)
            if fused is not None:
                read, written = _fused_reads_and_writes(fused, operand_bytes, computations)
            elif instruction["op"] == "copy-start":  # (destination, source, context): it writes the destination
                read, written = sum(operand_bytes), shape_bytes(_ARRAY.search(instruction["shape"]).group(0))
            else:  # a library call (cuDNN, cuBLAS, a Triton or Mosaic kernel) or a collective
                read, written = sum(operand_bytes), shape_bytes(_library_call_output(instruction))
            op = re.search(r'op_name="([^"]*)"', instruction["attributes"])  # the jax operation it came from
            kernels.append(dict(name=instruction["name"], kind=kernel_kind(instruction, fused),
                                bytes=times * (read + written), op=op.group(1) if op else ""))

    walk("ENTRY", 1)
    return kernels


def trip_count(loop: dict, computations: dict[str, list[dict]], local: dict[str, dict]) -> int | None:
    """A while's trip count: XLA's (known_trip_count, on a GPU) or where it gives none (a TPU) a
    counter's, as jax's scans and loops count: the condition compares element k of the loop's
    state below a constant N, and the loop starts element k at the constant 0 (steps of one, from
    jax). `local`: the instructions of the computation the loop is in, by name."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop["attributes"])
    if known:
        return int(known.group(1))
    condition = computations.get(_attribute(loop, "condition"), [])
    in_condition = {instruction["name"]: instruction for instruction in condition}
    root = next((instruction for instruction in condition if instruction["root"]), None)
    if root is None or root["op"] != "compare" or "direction=LT" not in root["attributes"]:
        return None
    counter, bound = (in_condition.get(name) for name in root["operands"])
    index = counter and counter["op"] == "get-tuple-element" and re.search(r"index=(\d+)", counter["attributes"])
    state = local.get(loop["operands"][0])
    if not index or bound is None or bound["op"] != "constant" or state is None or state["op"] != "tuple":
        return None
    start = local.get(state["operands"][int(index.group(1))])
    while start and start["op"] in ("copy", "bitcast"):  # a TPU's loop starts from a copy of the constant
        start = local.get(start["operands"][0])
    return int(bound["operands"][0]) if start and start["op"] == "constant" and start["operands"] == ["0"] else None


def traffic_by_kind(kernels: list[dict]) -> dict[str, int]:
    """Bytes read + written by the kernels of kernel_traffic, summed by kind (KINDS)."""
    return {kind: sum(kernel["bytes"] for kernel in kernels if kernel["kind"] == kind) for kind in KINDS}
