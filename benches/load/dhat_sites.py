#!/usr/bin/env python3
"""Allocations per request by call site, from two valgrind dhat files of the same proxy: one run
with 0 requests after the warm-up, one with N (benches/load/callgrind.sh with CG_TOOL=dhat).

    dhat_sites.py BASE.dhat FULL.dhat N [ROWS]

A site is the first frames of an allocation's stack that are neither the allocator nor Rust's
standard library (whose `Vec`/`Box`/`RawVec` frames every allocation passes through), so the
rows name the code that asked. Per site: blocks per request ((FULL - BASE) / N) and their mean
size. Sites below 0.5 blocks per request are summed in the last row."""
import json
import re
import sys

FRAMES = 3


def sites(path):
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    ftbl = d["ftbl"]
    out = {}
    for pp in d["pps"]:
        frames = []
        for i in pp["fs"]:
            f = re.sub(r"^0x[0-9A-Fa-f]+: ", "", ftbl[i])
            if (
                "library/" in f  # Rust's std, alloc and core
                or "UnknownInlinedFun" in f
                or "vgpreload" in f  # valgrind's malloc
                or f.startswith("[root]")
            ):
                continue
            frames.append(f)
        site = " <- ".join(f[:100] for f in frames[:FRAMES]) or "(allocator only)"
        blocks, size = out.get(site, (0, 0))
        out[site] = (blocks + pp["tbk"], size + pp["tb"])
    return out


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    base, full, n = sites(sys.argv[1]), sites(sys.argv[2]), int(sys.argv[3])
    rows = int(sys.argv[4]) if len(sys.argv) > 4 else 30
    per = []
    for site, (blocks, size) in full.items():
        b0, s0 = base.get(site, (0, 0))
        if blocks - b0 > 0:
            per.append(((blocks - b0) / n, (size - s0) / max(blocks - b0, 1), site))
    per.sort(key=lambda r: -r[0])
    total = sum(r[0] for r in per)
    print(f"allocations per request: {total:.1f} (dhat, {n} requests after the warm-up)")
    print("| per request | mean bytes | site (first frames outside the allocator and std) |")
    print("| ---: | ---: | --- |")
    rest = 0.0
    for i, (b, size, site) in enumerate(per):
        if i < rows and b >= 0.5:
            print(f"| {b:.2f} | {size:.0f} | `{site}` |")
        else:
            rest += b
    print(f"| {rest:.2f} | | (all other sites) |")


if __name__ == "__main__":
    main()
