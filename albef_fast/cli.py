"""`albef-fast` command line.

    albef-fast pretrain [--config configs/NAME.yaml | demo] [key.sub=value ...]
    albef-fast eval-retrieval --checkpoint runs/demo/checkpoint-latest.pt [--data eval.json] [key.sub=value ...]
    albef-fast print-config [--config ...] [key.sub=value ...]
    albef-fast convert --output DIR [--checkpoint ALBEF.pth | --bert BERT --vit DEIT] [--to albef-fast|albef|lavis]
    albef-fast parity [--preset tiny|albef_base] [--reference lavis|original|fastpath]

With no --config, `pretrain` runs the embedded default (`demo`): albef_tiny on the generated scene
data, about ten minutes on a 2-core CPU, with zero-shot retrieval before and after.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import yaml


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="albef-fast", description="ALBEF pretraining and evaluation")
    # the deepspeed launcher passes --local_rank=N before the subcommand; the rank is read from the environment
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("pretrain", "train with the ITC + ITM + MLM objectives"),
                        ("print-config", "print the fully resolved config as YAML")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--config", default="demo", help="YAML file or run preset name (default: demo)")
        s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=2e-4 data.batch_size=48")
        s.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    e = sub.add_parser("eval-retrieval", help="zero-shot image-text retrieval (ITC ranking, ITM re-rank of top k)")
    e.add_argument("--checkpoint", required=True, help="checkpoint written by `albef-fast pretrain`, or a weights "
                   "folder (`albef-fast convert`; output_dir/weights of a ZeRO run)")
    e.add_argument("--data", default=None, help="retrieval JSON (default: the run's eval file)")
    e.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.k_test=256 device=cuda")
    from albef_fast.parity.cli import add_parsers  # convert, parity

    add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from albef_fast.config import load_config, to_dict
    from albef_fast.train.checkpoint import CheckpointError

    if args.command in ("convert", "parity"):
        return args.run(args)
    try:
        if args.command == "eval-retrieval":
            return _eval_retrieval(args)
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        print(f"albef-fast: error: {exc}", file=sys.stderr)
        return 2
    if args.command == "print-config":
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0

    from albef_fast.eval.retrieval import format_recalls
    from albef_fast.train.loop import train

    try:
        summary = train(cfg)
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        print(f"albef-fast: error: {exc}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") != "0":  # one summary per job
        return 0
    print(f"trained {summary.steps} steps; outputs in {summary.output_dir} "
          f"(metrics.jsonl, losses.png, checkpoint-latest.pt or .json)")
    if summary.retrieval_before:
        print(f"  before: {format_recalls(summary.retrieval_before)}")
    if summary.retrieval_after:
        print(f"  after:  {format_recalls(summary.retrieval_after)}")
    return 0


def _eval_retrieval(args: argparse.Namespace) -> int:
    from albef_fast.config import TrainConfig, _merge, from_dict, parse_overrides
    from albef_fast.eval.retrieval import evaluate_retrieval_file, format_recalls
    from albef_fast.models.albef import ALBEF
    from albef_fast.models.presets import get_preset
    from albef_fast.train.checkpoint import read_checkpoint
    from albef_fast.train.loop import autocast_for, resolve_data_files, resolve_device

    path = Path(args.checkpoint)
    if path.is_dir() and (path / "model.safetensors").is_file():
        # a weights folder (`albef-fast convert`, or output_dir/weights of a ZeRO run); the run's config,
        # when the folder sits in a run folder, supplies the evaluation settings
        from albef_fast.weights import load_pretrained

        loaded = load_pretrained(path)
        model = getattr(loaded, "model", loaded)
        run_config = path.parent / "config.json"
        saved = json.loads(run_config.read_text()) if run_config.is_file() else {}
        cfg = _merge(from_dict(saved) if "model" in saved else TrainConfig(), parse_overrides(args.overrides))
        model_cfg = model.config
    else:
        state = read_checkpoint(path)
        cfg = _merge(from_dict(state["config"]), parse_overrides(args.overrides))
        overrides = {"image_size": cfg.model.image_size} if cfg.model.image_size else {}
        model_cfg = get_preset(cfg.model.preset, **overrides)
        model = ALBEF(model_cfg)
        model.load_state_dict({k[len("model."):]: v for k, v in state["task"].items() if k.startswith("model.")})
    data = args.data or resolve_data_files(cfg, model_cfg.image_size)[1]
    if not data:
        raise ValueError("no retrieval data: pass --data eval.json (ALBEF format, a caption list per image)")
    device = resolve_device(cfg.device)
    result = evaluate_retrieval_file(model.to(device), data, image_size=model_cfg.image_size,
                                     k_test=cfg.eval.k_test, batch_size=cfg.eval.batch_size, device=device,
                                     autocast=autocast_for(cfg.precision, device))
    print(format_recalls(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
