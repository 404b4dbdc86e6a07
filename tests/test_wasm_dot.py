"""The browser's SIMD kernel module (explorer/wasm_dot.py), checked as bytes; tests/ui runs it in
Chromium (its maps against float64, and the scalar fallback without WebAssembly)."""

import base64

import pytest

from hoverlay.explorer.wasm_dot import dot_module_base64, dot_module_bytes, sleb, uleb


@pytest.mark.parametrize(("n", "want"), [(0, "00"), (127, "7f"), (128, "8001"), (624485, "e58e26"), (230, "e601")])
def test_unsigned_leb128(n, want):
    assert uleb(n).hex() == want


@pytest.mark.parametrize(("n", "want"), [(0, "00"), (2, "02"), (32, "20"), (63, "3f"), (64, "c000"), (-1, "7f"),
                                         (-64, "40"), (-65, "bf7f"), (-123456, "c0bb78")])
def test_signed_leb128(n, want):
    assert sleb(n).hex() == want


def test_the_module_is_wasm_1_with_its_exports_and_travels_as_base64():
    raw = dot_module_bytes()
    assert raw[:8] == b"\x00asm\x01\x00\x00\x00"
    assert b"\x04dots\x00\x00" in raw and b"\x06memory\x02\x00" in raw  # a function and the memory
    assert base64.b64decode(dot_module_base64()) == raw and len(raw) < 4096  # compiled synchronously
