"""Benchmarks as ratios against a baseline run in the same process; the same as `mmgen bench`.

    python scripts/benchmark.py --suite sjd --json > bench.json
"""

import sys

from mmgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
