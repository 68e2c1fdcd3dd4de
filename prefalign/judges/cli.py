"""``prefalign judge score|compare|consistency --data FILE [--judge-model NAME]``: TrustJudge over a data set.

    score        one score per response column (default: the columns among chosen/rejected/completion/response)
    compare      a two-order verdict on the two --columns (default chosen rejected): verdict, margin, probabilities
    consistency  scores and all pairwise verdicts of each row's --candidates-column list, then the inconsistency
                 rates (arXiv:2509.21117, docs/judge.md) over the whole file, printed and written to
                 <output>.summary.json

Results go next to the input, to ``<stem>.judge-<command>.jsonl`` (or --output), one line per row with its row
index. Rows are checked before the judge loads. The run is resumable: every --rows-per-write rows are appended,
flushed to disk and then committed (their byte length recorded atomically in ``<output>.progress``); a rerun rolls
back anything written after the last commit (a write torn by a kill) and judges the remaining rows in the same
chunks, so with the same --batch-size and --rows-per-write an interrupted and resumed run writes exactly the bytes of
an uninterrupted one. The settings that change the results (command, judge model, columns, scale, mode, style,
pairwise mode, tolerance, ...) are kept beside the output in ``<output>.settings``: resuming with other settings is
refused (``--overwrite`` starts again), so one output never pools two judges.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from prefalign.data import iter_json_lines, load_preference_dataset
from prefalign.files import check_settings, write_json
from prefalign.judges.consistency import ConsistencyReport, judge_consistency
from prefalign.judges.judge import MODES, PAIRWISE_MODES, STYLES, TrustJudge
from prefalign.models import DEFAULT_CAUSAL_LM, load_model, load_processing_class

logger = logging.getLogger("prefalign.judges")

RESPONSE_COLUMNS = ("chosen", "rejected", "completion", "response")
IMAGE_COLUMNS = ("images", "image")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefalign judge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("score", "compare", "consistency"))
    parser.add_argument("--data", required=True, help="a .jsonl/.json/.parquet file (or a data set name with --output)")
    parser.add_argument("--split", default="train", help="split to judge (default: train; a single file is 'train')")
    parser.add_argument("--judge-model", default=DEFAULT_CAUSAL_LM, help=f"short name, hub id or path (default: "
                        f"{DEFAULT_CAUSAL_LM})")
    parser.add_argument("--output", help="output .jsonl (default: next to --data, <stem>.judge-<command>.jsonl)")
    parser.add_argument("--columns", nargs="+", help="response columns (score) or the two to compare (compare)")
    parser.add_argument("--candidates-column", default="candidates", help="list-valued column for consistency")
    parser.add_argument("--scale", nargs=2, type=int, default=(1, 100), metavar=("LOW", "HIGH"))
    parser.add_argument("--mode", choices=MODES, default="expected")
    parser.add_argument("--style", choices=STYLES, default="direct")
    parser.add_argument("--pairwise-mode", choices=PAIRWISE_MODES, default="likelihood")
    parser.add_argument("--tolerance", type=float, default=0.0, help="score gap counted as a tie (consistency)")
    parser.add_argument("--max-reason-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="judge prompts per forward")
    parser.add_argument("--rows-per-write", type=int, default=16, help="rows judged between two appends")
    parser.add_argument("--max-rows", type=int, help="judge only the first N rows")
    parser.add_argument("--overwrite", action="store_true", help="discard an existing output and start again")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def _output_path(args: argparse.Namespace) -> Path:
    """--output, or ``<stem>.judge-<command>.jsonl`` beside a --data file."""
    if args.output:
        return Path(args.output)
    data = Path(args.data)
    if not data.is_file():
        raise SystemExit(f"prefalign judge: --data {args.data!r} is not a file; pass --output to say where results go")
    return data.with_name(f"{data.stem}.judge-{args.command}.jsonl")


def _is_text(value: Any) -> bool:
    """A non-empty string, or a non-empty list of {'role', 'content'} messages."""
    if isinstance(value, str):
        return bool(value.strip())
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "content" in m for m in value)


def _check_rows(rows: list[dict], columns: list[str], list_column: str | None, source: str) -> None:
    """Raise naming ``source`` (file and split), row and column for a missing, empty or wrongly typed value (at most
    10 listed)."""
    problems = []
    for index, row in enumerate(rows):
        for column in ["prompt", *columns]:
            if not _is_text(row.get(column)):
                problems.append(f"  row {index}, column {column!r}: expected non-empty text or messages, got "
                                f"{row.get(column)!r:.60}")
        if list_column is not None:
            value = row.get(list_column)
            if not (isinstance(value, list) and len(value) >= 2 and all(_is_text(v) for v in value)):
                problems.append(f"  row {index}, column {list_column!r}: expected a list of ≥ 2 non-empty "
                                f"responses, got {value!r:.60}")
    if problems:
        raise SystemExit(f"prefalign judge: {source}: {len(problems)} problem(s) in the data:\n"
                         + "\n".join(problems[:10])
                         + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""))


def settings_path(output: Path) -> Path:
    """Where the settings of ``output`` are kept: ``<output>.settings`` (JSON), as the data builders keep theirs."""
    return output.with_name(output.name + ".settings")


def progress_path(output: Path) -> Path:
    """Where the committed byte length of ``output`` is kept: ``<output>.progress`` (JSON)."""
    return output.with_name(output.name + ".progress")


def _settings(args: argparse.Namespace, columns: list[str]) -> dict[str, Any]:
    """The settings that change the rows of this command's output (a resumed run must use the same)."""
    settings: dict[str, Any] = dict(command=args.command, judge_model=args.judge_model, split=args.split,
                                    style=args.style)
    if args.style == "reason_then_score":
        settings["max_reason_tokens"] = args.max_reason_tokens
    if args.command in ("score", "consistency"):
        settings.update(scale=list(args.scale), mode=args.mode)
    if args.command in ("compare", "consistency"):
        settings["pairwise_mode"] = args.pairwise_mode
    if args.command == "consistency":
        settings.update(candidates_column=args.candidates_column, tolerance=args.tolerance)
    else:
        settings["columns"] = list(columns)
    return settings


def _start(output: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Refuse to resume an output made with other settings (or by something else); record the settings."""
    if overwrite:
        for path in (output, settings_path(output), progress_path(output), output.with_suffix(".summary.json")):
            path.unlink(missing_ok=True)
    if output.exists() and not settings_path(output).exists():
        raise SystemExit(f"prefalign judge: {output} exists but has no settings ({settings_path(output).name}): it "
                         "was not made by this command; pass --overwrite to replace it, or another --output")
    try:
        check_settings(settings_path(output), settings, what=str(output))
    except ValueError as error:
        raise SystemExit(f"prefalign judge: {error}") from None


def _committed_rows(output: Path, rows: list[dict]) -> list[dict]:
    """The committed result lines of ``output``; anything written after the last commit is rolled back."""
    if not output.exists():
        return []
    committed = json.loads(progress_path(output).read_text())["bytes"] if progress_path(output).exists() else 0
    size = output.stat().st_size
    if size < committed:
        raise SystemExit(f"prefalign judge: {output} is shorter ({size} bytes) than its last commit ({committed} "
                         "bytes): it was changed by something else; pass --overwrite to start again")
    if size > committed:
        logger.warning("%s: rolling back %d bytes written after the last commit (an interrupted write); those rows "
                       "are judged again", output, size - committed)
        with open(output, "r+b") as f:
            f.truncate(committed)
    done = list(iter_json_lines(output))
    for line_number, result in enumerate(done, 1):
        index = result["row"]
        if index < len(rows) and result.get("prompt") != rows[index]["prompt"]:
            raise SystemExit(f"prefalign judge: {output}, line {line_number}: row {index}'s prompt differs from row "
                             f"{index} of the data; the output belongs to other data. Pass --overwrite to start again")
    return done


def _commit(output: Path, size: int) -> None:
    """Record that the first ``size`` bytes of ``output`` are complete result lines (flushed to disk)."""
    write_json(progress_path(output), {"bytes": size})


def _judge_rows(judge: TrustJudge, args: argparse.Namespace, rows: list[dict], columns: list[str]) -> list[dict]:
    """Result lines for a chunk of rows."""
    images = next(([r[c] if isinstance(r[c], list) else [r[c]] for r in rows] for c in IMAGE_COLUMNS if c in rows[0]),
                  None)
    prompts = [r["prompt"] for r in rows]
    if args.command == "score":
        scores = {c: judge.score(prompts, [r[c] for r in rows], images) for c in columns}
        return [{f"score_{c}": scores[c][i] for c in columns} for i in range(len(rows))]
    if args.command == "compare":
        verdicts = judge.compare_pairs(prompts, [r[columns[0]] for r in rows], [r[columns[1]] for r in rows], images)
        return [{"verdict": v.verdict, "margin": v.margin, "merged": v.merged, "probs_order1": v.probs_order1,
                 "probs_order2": v.probs_order2} for v in verdicts]
    results = []
    for index, row in enumerate(rows):
        report = judge_consistency(judge, [row["prompt"]], [row[args.candidates_column]], args.tolerance,
                                   progress=False, images=None if images is None else [images[index]])
        results.append({"scores": report.scores[0], "verdicts": {f"{i}-{j}": v for (i, j), v in
                                                                 report.verdicts[0].items()}, **report.summary()})
    return results


def _summary(path: Path, tolerance: float) -> dict:
    """The consistency counts and rates over every row of a consistency output file."""
    report = ConsistencyReport()
    for row in iter_json_lines(path):
        verdicts = {tuple(int(x) for x in key.split("-")): v for key, v in row["verdicts"].items()}
        report.add(row["scores"], verdicts, tolerance)
    return report.summary()


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``prefalign judge``."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.rows_per_write < 1:
        raise SystemExit(f"prefalign judge: --rows-per-write must be ≥ 1, got {args.rows_per_write}")
    output = _output_path(args)
    dataset = load_preference_dataset(args.data, split=args.split)
    if args.max_rows is not None:
        dataset = dataset.select(range(min(args.max_rows, len(dataset))))
    names = dataset.column_names
    if args.command == "score":
        columns = args.columns or [c for c in RESPONSE_COLUMNS if c in names]
    elif args.command == "compare":
        columns = args.columns or ["chosen", "rejected"]
        if len(columns) != 2:
            raise SystemExit(f"prefalign judge compare: --columns takes exactly two columns, got {columns}")
    else:
        columns = []
    missing = [c for c in ["prompt", *columns] + ([args.candidates_column] if args.command == "consistency" else [])
               if c not in names]
    if missing or (args.command == "score" and not columns):
        raise SystemExit(f"prefalign judge {args.command}: missing column(s) {missing or list(RESPONSE_COLUMNS)}; "
                         f"columns present: {names}")
    rows = dataset.to_list()
    _check_rows(rows, columns, args.candidates_column if args.command == "consistency" else None,
                f"{args.data}, split {args.split!r}")
    _start(output, _settings(args, columns), args.overwrite)
    done = {result["row"] for result in _committed_rows(output, rows)}
    todo = [i for i in range(len(rows)) if i not in done]
    logger.info("%d rows, %d already in %s, %d to judge", len(rows), len(done), output, len(todo))
    if todo:
        model = load_model(args.judge_model).to(args.device)
        judge = TrustJudge(model, load_processing_class(args.judge_model), scale=tuple(args.scale), mode=args.mode,
                           style=args.style, pairwise_mode=args.pairwise_mode, batch_size=args.batch_size,
                           max_reason_tokens=args.max_reason_tokens)
        skipped = [c for c in IMAGE_COLUMNS if c in names]
        with output.open("ab") as out, tqdm(total=len(todo), desc=f"judge {args.command}", unit="row") as bar:
            for start in range(0, len(todo), args.rows_per_write):
                chunk = todo[start : start + args.rows_per_write]
                results = _judge_rows(judge, args, [rows[i] for i in chunk], columns)
                lines = "".join(json.dumps({"row": index, **{k: v for k, v in rows[index].items() if k not in skipped},
                                            **result}, ensure_ascii=False) + "\n"
                                for index, result in zip(chunk, results))
                out.write(lines.encode("utf-8"))
                out.flush()
                os.fsync(out.fileno())
                _commit(output, out.tell())
                bar.update(len(chunk))
    print(f"results: {output}")
    if args.command == "consistency":
        summary = _summary(output, args.tolerance)
        write_json(output.with_suffix(".summary.json"), summary)
        for key, value in summary.items():
            print(f"{key:34s} {value:.4f}" if isinstance(value, float) else f"{key:34s} {value}")


if __name__ == "__main__":
    main()
