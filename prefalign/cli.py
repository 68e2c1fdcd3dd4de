"""The ``prefalign`` command: thin dispatch to recipes, data builders and model helpers.

    prefalign train <method> [--key value ...]    runs recipes/<method>.py with those arguments
    prefalign build <builder> [--option ...]      runs a data builder (data_builders/<builder>.py)
    prefalign eval --model M --dataset D [--base B] [--judge]   preference accuracy, margins, KL against the base
    prefalign judge score|compare|consistency --data FILE [--judge-model NAME]   TrustJudge over a data set
    prefalign models [--prepare NAME ...]         lists the embedded models; --prepare converts/caches them now
    prefalign recipes                             lists the recipes and the folder holding them and their configs
    prefalign --version
"""

from __future__ import annotations

import argparse
import importlib
import runpy
import sys
from importlib.metadata import version

from prefalign.models import EMBEDDED_MODELS, resolve_model_path
from prefalign.recipe_args import RECIPES_DIR

BUILDERS = {
    "anchors": "data_builders.negatives",
    "audit": "data_builders.audit",
    "cross-prompt": "data_builders.cross_prompt",
    "delta": "data_builders.delta",
    "phrases": "data_builders.phrases",
    "verdicts": "data_builders.verdicts",
    "wordnet-definitions": "data_builders.wordnet_definitions",
}


def _recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.py"))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``prefalign`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="prefalign", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"prefalign {version('prefalign')}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run a training recipe", add_help=False)
    train.add_argument("method", help=f"one of: {', '.join(_recipes()) or '(recipes folder not found)'}")
    build = sub.add_parser("build", help="build a preference data set", add_help=False)
    build.add_argument("builder", choices=sorted(BUILDERS))
    sub.add_parser("eval", help="evaluate a trained model against its base on preference pairs", add_help=False)
    sub.add_parser("judge", help="TrustJudge: score | compare | consistency over a data file", add_help=False)
    sub.add_parser("recipes", help="list the recipes and where they are (for accelerate launch and --config)")
    models = sub.add_parser("models", help="list or prepare the embedded models")
    models.add_argument("--prepare", nargs="*", default=None, metavar="NAME",
                        help="convert and cache these embedded models now (all when no name is given)")
    args, rest = parser.parse_known_args(argv)

    if args.command == "train":
        script = RECIPES_DIR / f"{args.method}.py"
        if not script.is_file():
            parser.error(f"no recipe {args.method!r}: expected {script} (choices: {', '.join(_recipes())})")
        sys.argv = [str(script), *rest]
        runpy.run_path(str(script), run_name="__main__")
    elif args.command == "build":
        importlib.import_module(BUILDERS[args.builder]).main(rest)
    elif args.command == "eval":
        from prefalign.evaluation import main as eval_main

        eval_main(rest)
    elif args.command == "judge":
        from prefalign.judges.cli import main as judge_main

        judge_main(rest)
    elif args.command == "recipes":
        if rest:
            parser.error(f"unrecognised arguments: {' '.join(rest)}")
        print(f"recipes in {RECIPES_DIR} (configs in configs/, accelerate configs in accelerate/):")
        print("  " + " ".join(_recipes()))
        print(f"accelerate launch --config_file {RECIPES_DIR / 'accelerate' / 'ddp.yaml'} -m prefalign.cli train rrpo")
    elif args.command == "models":
        if rest:
            parser.error(f"unrecognised arguments: {' '.join(rest)}")
        names = EMBEDDED_MODELS if args.prepare == [] else (args.prepare or [])
        for name in names:
            print(f"{name}: {resolve_model_path(name)}")
        if args.prepare is None:
            print("embedded models (short names usable wherever a model id is):", ", ".join(EMBEDDED_MODELS))


if __name__ == "__main__":
    main()
