"""`mmgen convert <family>`: released checkpoints of projects that are not in transformers, read with
`torch.load(..., weights_only=True)` and written as ordinary mmgen pipeline directories (safetensors + JSON).

A family is one module here with two functions: `add_args(parser)` adds its options to its `mmgen convert
<family>` parser (the CLI adds `--out` and `--json` to every family), and `run(args) -> dict` converts and returns
what it wrote, raising ValueError on bad input. `CONVERTERS` lists them; add a family by adding its line.
"""

from __future__ import annotations

from mmgen.convert import llamagen, var

CONVERTERS = {
    "llamagen": (llamagen.add_args, llamagen.run),
    "var": (var.add_args, var.run),
}
