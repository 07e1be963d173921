"""Write moeflow/weights/iq_grids.py: the IQ quant types' codebooks (the grids of ggml-common.h,
MIT) in a compact form of our own, read from the gguf package's copy of them (gguf-py, MIT).

The grids are constants that llama.cpp found by a search over training data; no rule derives
them, so they are stored. Each grid entry is a few values from a small set (its `map`); an entry
is kept as one little-endian uint16 of indices into the map (2 bits each for 8-value entries, 3
bits for 4-value ones; value j at bits [bits * j, bits * (j + 1))). tests/weights/
test_iq_quants.py checks the stored grids against gguf's whenever gguf is installed.

Run: `python scripts/gen_iq_grids.py` (needs the `test` extra's gguf)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import gguf
import numpy as np

# name in moeflow -> the gguf-py class holding the grid
GRIDS = {
    "IQ2XXS": gguf.quants.IQ2_XXS,
    "IQ2XS": gguf.quants.IQ2_XS,
    "IQ2S": gguf.quants.IQ2_S,
    "IQ3XXS": gguf.quants.IQ3_XXS,
    "IQ3S": gguf.quants.IQ3_S,
    "IQ1S": gguf.quants.IQ1_S,
}

OUT = Path(__file__).resolve().parent.parent / "moeflow" / "weights" / "iq_grids.py"


def encode(cls: type) -> tuple[tuple[int, ...], int, int, str]:
    """(map, values per entry, bits per index, hex of the uint16 codes) of one gguf-py grid."""
    cls.init_grid()
    grid = np.asarray(cls.grid).reshape(cls.grid_shape)  # [entries, values]
    values = tuple(int(v) for v in cls.grid_map)
    bits = math.ceil(math.log2(len(values)))
    per_entry = grid.shape[1]
    assert bits * per_entry <= 16
    index = {v: i for i, v in enumerate(values)}
    codes = np.zeros(grid.shape[0], dtype="<u2")
    for j in range(per_entry):
        idx = np.array([index[int(v)] for v in grid[:, j]], dtype=np.uint16)
        codes |= idx << (bits * j)
    return values, per_entry, bits, codes.tobytes().hex()


def main() -> None:
    lines = [
        '"""The IQ quant types\' grids (ggml-common.h `iq2xxs_grid` .. `iq1s_grid`, MIT),',
        "written by scripts/gen_iq_grids.py from gguf-py's copy (MIT): per grid the values an",
        "entry's indices select, the values per entry, the bits per index, and each entry as a",
        "little-endian uint16 of indices (value j at bits [bits * j, bits * (j + 1))).",
        'Generated: do not edit."""',
        "",
        "# name -> (values, values per entry, bits per index, codes)",
        "GRIDS: dict[str, tuple[tuple[int, ...], int, int, bytes]] = {}",
    ]
    for name, cls in GRIDS.items():
        values, per_entry, bits, hex_codes = encode(cls)
        lines.append(f'GRIDS["{name}"] = (')
        lines.append(f"    {values!r},")
        lines.append(f"    {per_entry},")
        lines.append(f"    {bits},")
        lines.append("    bytes.fromhex(")
        lines += [f'        "{chunk}"' for chunk in textwrap.wrap(hex_codes, 88)]
        lines.append("    ),")
        lines.append(")")
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
