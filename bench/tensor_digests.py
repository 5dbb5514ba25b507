"""SHA-256 of every tensor in the safetensors files of some directories: two machines' builds compared tensor by
tensor, whatever each machine's safetensors package writes around the tensors (its header layout, its padding).

    python bench/tensor_digests.py --write OUT.json LABEL=DIR [LABEL=DIR ...]     write them
    python bench/tensor_digests.py --against THEIRS.json LABEL=DIR [...]        compare; exit 1 naming each difference

A tensor's digest (the first 16 hex digits of a SHA-256) covers its dtype, its shape and its bytes; keys are
LABEL/path/in/DIR.safetensors:tensor.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open


def tensor_digests(label: str, root: Path) -> dict[str, str]:
    digests = {}
    for path in sorted(root.rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in sorted(f.keys()):
                t = f.get_tensor(name).contiguous()
                h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
                digests[f"{label}/{path.relative_to(root)}:{name}"] = h.hexdigest()[:16]
    return digests


def main() -> int:
    ap = argparse.ArgumentParser()
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", type=Path, metavar="OUT.json", help="write the digests here")
    mode.add_argument("--against", type=Path, metavar="THEIRS.json", help="compare with these digests")
    ap.add_argument("dirs", nargs="+", metavar="LABEL=DIR")
    args = ap.parse_args()
    ours: dict[str, str] = {}
    for item in args.dirs:
        label, _, root = item.partition("=")
        ours.update(tensor_digests(label, Path(root)))
    if args.write is not None:
        args.write.write_text(json.dumps(ours, indent=1, sort_keys=True) + "\n")
        print(f"{args.write}: {len(ours)} tensors")
        return 0
    theirs = json.loads(args.against.read_text())
    problems = [f"{k}: {'missing here' if k not in ours else 'not in theirs' if k not in theirs else 'differs'}"
                for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
    print("\n".join(problems) if problems else f"tensors: all {len(ours)} equal to {args.against.name}'s")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
