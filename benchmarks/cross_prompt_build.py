"""Throughput and peak memory of the cross-prompt pair builder on synthetic items (data_builders/cross_prompt.py).

    OMP_NUM_THREADS=1 python benchmarks/cross_prompt_build.py                     # 100k and 1M items, text
    OMP_NUM_THREADS=1 python benchmarks/cross_prompt_build.py --sizes 1000000 --chat

Each size runs in a fresh process: the items (10 per prompt, half good) are first written to an Arrow file on disk,
then a new process memory-maps them, builds the pairs (2 per good item, half ties) into another Arrow file and
reports its wall time and peak RSS. Bounded memory shows as peak RSS that barely grows from 100k to 1M items.
"""

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ITEMS_PER_PROMPT = 10


def write_items(n: int, chat: bool, folder: Path) -> None:
    """Synthetic items written straight to disk, in chunks (no Python object per item held)."""
    from datasets import Dataset

    def rows():
        for i in range(n):
            prompt, completion = f"Prompt number {i // ITEMS_PER_PROMPT}: describe item {i}.", f"Response {i} " * 8
            if chat:
                prompt, completion = [{"role": "user", "content": prompt}], [{"role": "assistant", "content": completion}]
            yield {"prompt": prompt, "completion": completion, "label": i % 2}

    Dataset.from_generator(rows, cache_dir=str(folder / "cache")).save_to_disk(str(folder / "items"))


def build(folder: Path) -> None:
    """Build pairs from the items on disk; print pairs, seconds, peak RSS (MiB)."""
    from datasets import load_from_disk

    from data_builders.cross_prompt import build_cross_prompt_pairs

    items = load_from_disk(str(folder / "items"))
    start = time.perf_counter()
    pairs = build_cross_prompt_pairs(items, pairs_per_item=2, tie_ratio=0.5, cache_dir=folder / "pairs")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"RESULT {len(pairs)} {seconds:.2f} {peak:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--chat", action="store_true", help="conversational items instead of plain text")
    parser.add_argument("--step", choices=("write", "build"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step == "write":
        return write_items(args.n, args.chat, args.folder)
    if args.step == "build":
        return build(args.folder)

    print(f"{'items':>10} {'format':>6} {'pairs':>10} {'build s':>8} {'pairs/s':>9} {'peak RSS MiB':>13}")
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="cross-prompt-bench-") as folder:
            common = [sys.executable, __file__, "--folder", folder, "--n", str(n)] + (["--chat"] if args.chat else [])
            subprocess.run(common + ["--step", "write"], check=True, capture_output=True)
            out = subprocess.run(common + ["--step", "build"], check=True, capture_output=True, text=True).stdout
            pairs, seconds, peak = out.split("RESULT ")[1].split()
            print(f"{n:>10} {'chat' if args.chat else 'text':>6} {int(pairs):>10} {float(seconds):>8.1f} "
                  f"{int(pairs) / float(seconds):>9.0f} {float(peak):>13.0f}")


if __name__ == "__main__":
    main()
