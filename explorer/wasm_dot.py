"""A WebAssembly (SIMD) kernel for the browser hover: many dot products with one query.

The browser path (:mod:`explorer.browser_hover`) computes, on every pointer move, the dot
product of the hovered patch's vector with every patch vector of the page: ~6 M multiply-adds
for 16 images of the default (v2) layers. In scalar JavaScript that took 13 ms of a 18 ms paint
(docs/explorer.md); with 128-bit SIMD four products run at once.

The module is assembled here, by hand, from its instructions, so that what the page runs is
readable and reviewable in this file (no compiler, no opaque blob). It exports its memory and::

    dots(F, q, out, P, Dp)   # out[p] = sum_d F[p*Dp + d] * q[d], p < P   (F, q, out: byte offsets)

``Dp`` must be a multiple of 8: two 4-lane accumulators per row keep the CPU's add pipelines
full. The JavaScript side (:data:`explorer.js.GRID_HOVER_JS`) decodes a layer's page vectors
straight into an instance's memory once per page, and keeps its scalar loop for a layer whose
dimension is not a multiple of 8 and where WebAssembly SIMD is not available (the page says
which ran: ``window.hoverlay_kernel``). Products are summed in float32 (per lane, then across
lanes): on unit vectors of D <= 1280 that is ~1e-6 from float64, far inside the 2e-3 the
browser's maps are held to.

Measured in node 20 (V8, as Chromium) on a v2 page, 16 images x (28x28x240, 14x14x672,
7x7x1280): 1.7 ms a move for the three layers, against 9.5 ms for the scalar loop.
"""

from __future__ import annotations

import base64
from functools import cache

# ------------------------------------------------------------------- binary encoding helpers
I32, V128 = 0x7F, 0x7B


def uleb(n: int) -> bytes:
    """Unsigned LEB128 (sizes, indices, SIMD opcodes)."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def sleb(n: int) -> bytes:
    """Signed LEB128 (``i32.const`` immediates)."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        done = (n == 0 and not byte & 0x40) or (n == -1 and byte & 0x40)
        out.append(byte | (0 if done else 0x80))
        if done:
            return bytes(out)


def vec(items: list[bytes]) -> bytes:
    return uleb(len(items)) + b"".join(items)


def name(text: str) -> bytes:
    raw = text.encode()
    return uleb(len(raw)) + raw


def section(section_id: int, body: bytes) -> bytes:
    return bytes([section_id]) + uleb(len(body)) + body


# ------------------------------------------------------------------------- instructions
def get(i: int) -> bytes:
    return b"\x20" + uleb(i)


def put(i: int) -> bytes:
    return b"\x21" + uleb(i)


def const(n: int) -> bytes:
    return b"\x41" + sleb(n)


def simd(op: int, *immediates: bytes) -> bytes:
    return b"\xfd" + uleb(op) + b"".join(immediates)


def memarg(align_log2: int, offset: int = 0) -> bytes:
    return uleb(align_log2) + uleb(offset)


ADD, MUL, SHL, GE_U = b"\x6a", b"\x6c", b"\x74", b"\x4f"
BLOCK, LOOP, END = b"\x02\x40", b"\x03\x40", b"\x0b"


def br(depth: int) -> bytes:
    return b"\x0c" + uleb(depth)


def br_if(depth: int) -> bytes:
    return b"\x0d" + uleb(depth)


def v128_load(offset: int = 0) -> bytes:
    return simd(0x00, memarg(2, offset))  # alignment hint 4 bytes: any f32 array is fine


V128_ZERO = simd(0x0C, bytes(16))
F32X4_ADD, F32X4_MUL = simd(0xE4), simd(0xE6)
F32_ADD = b"\x92"
F32_STORE = b"\x38" + memarg(2)


def extract_lane(lane: int) -> bytes:
    return simd(0x1F, bytes([lane]))


# ------------------------------------------------------------------------------ the kernel
# params: 0 F, 1 q, 2 out, 3 P, 4 Dp ; locals: 5 p, 6 d (bytes), 7 row bytes, 8 acc0, 9 acc1
F, Q, OUT, P, DP, ROW, D, NB, ACC0, ACC1 = range(10)


def _dots_body() -> bytes:
    code = b"".join([
        get(DP), const(2), SHL, put(NB),                      # NB = Dp * 4 (bytes per row)
        const(0), put(ROW),
        BLOCK, LOOP,                                          # for ROW in 0..P
        get(ROW), get(P), GE_U, br_if(1),
        V128_ZERO, put(ACC0), V128_ZERO, put(ACC1), const(0), put(D),
        BLOCK, LOOP,                                          # for D in 0..NB step 32
        get(D), get(NB), GE_U, br_if(1),
        get(ACC0), get(F), get(D), ADD, v128_load(), get(Q), get(D), ADD, v128_load(),
        F32X4_MUL, F32X4_ADD, put(ACC0),
        get(ACC1), get(F), get(D), ADD, v128_load(16), get(Q), get(D), ADD, v128_load(16),
        F32X4_MUL, F32X4_ADD, put(ACC1),
        get(D), const(32), ADD, put(D),
        br(0), END, END,
        # out[ROW] = the lanes' sum
        get(OUT), get(ROW), const(2), SHL, ADD,
        get(ACC0), get(ACC1), F32X4_ADD, put(ACC0),
        get(ACC0), extract_lane(0), get(ACC0), extract_lane(1), F32_ADD,
        get(ACC0), extract_lane(2), get(ACC0), extract_lane(3), F32_ADD, F32_ADD,
        F32_STORE,
        get(F), get(NB), ADD, put(F),
        get(ROW), const(1), ADD, put(ROW),
        br(0), END, END,
    ])
    locals_ = vec([uleb(3) + bytes([I32]), uleb(2) + bytes([V128])])
    body = locals_ + code + END
    return uleb(len(body)) + body


@cache
def dot_module_bytes() -> bytes:
    """The module's binary (a few hundred bytes)."""
    functype = b"\x60" + vec([bytes([I32])] * 5) + vec([])
    return b"".join([
        b"\x00asm", (1).to_bytes(4, "little"),
        section(1, vec([functype])),                                      # types
        section(3, vec([uleb(0)])),                                       # functions
        section(5, vec([b"\x00" + uleb(1)])),                             # memory: 1 page, grows
        section(7, vec([name("dots") + b"\x00" + uleb(0), name("memory") + b"\x02" + uleb(0)])),
        section(10, vec([_dots_body()])),                                 # code
    ])


def dot_module_base64() -> str:
    """The module for the page's JavaScript (a CustomJS argument)."""
    return base64.b64encode(dot_module_bytes()).decode("ascii")
