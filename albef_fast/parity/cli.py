"""The `albef-fast convert` and `albef-fast parity` subcommands (registered by albef_fast/cli.py).

    albef-fast convert --output runs/albef14m --checkpoint ALBEF.pth                  # -> safetensors folder
    albef-fast convert --output init --bert bert.safetensors --vit deit_base.pth      # BERT + DeiT init
    albef-fast convert --output ALBEF_lavis.pth --checkpoint runs/albef14m --to lavis # our folder -> LAVIS layout
    albef-fast convert --output ALBEF_demo.pth --checkpoint runs/demo --to albef       # our training run -> ALBEF
    albef-fast parity --preset tiny --reference lavis                                 # table, exit 1 on failure

Imports stay inside the handlers: building the parser must not import torch.
"""

from __future__ import annotations

import argparse
import sys


def add_parsers(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("convert", help="convert ALBEF / BERT / DeiT weights to and from our safetensors folder")
    c.add_argument("--output", required=True, help="folder (--to albef-fast) or .pth/.safetensors file")
    c.add_argument("--checkpoint", help="ALBEF checkpoint (.pth/.safetensors; pretrain, retrieval or LAVIS "
                                        "layout), a folder written by this command, or a training checkpoint "
                                        "of `albef-fast pretrain` (checkpoint-latest.pt or its run folder)")
    c.add_argument("--bert", help="transformers BertForMaskedLM weights (bert-base-uncased) for the text side")
    c.add_argument("--vit", help="DeiT / timm ViT-B/16 weights for the vision encoder")
    c.add_argument("--to", default="albef-fast", choices=["albef-fast", "albef", "albef-retrieval", "lavis"])
    c.add_argument("--preset", default=None, help="model preset of the target (default albef_base); not with "
                                                 "a folder or training checkpoint, which carry their own")
    c.add_argument("--image-size", type=int, default=None, help="target resolution; pos_embed is interpolated")
    c.add_argument("--queue-size", type=int, default=None, help="default: the checkpoint's, else 65536")
    c.add_argument("--strict", action="store_true", help="fail on any missing or unexpected key")
    c.set_defaults(run=run_convert)

    p = sub.add_parser("parity", help="one pretraining step against a reference implementation; prints a table")
    p.add_argument("--preset", default="tiny", help="tiny (albef_tiny) or albef_base")
    p.add_argument("--reference", default="lavis", choices=["lavis", "original", "fastpath"],
                   help="lavis: salesforce-lavis 1.0.2 in .venv-lavis; original: an ALBEF checkout "
                        "($ALBEF_REFERENCE_DIR) in .venv-albef; fastpath: our kernels vs our PyTorch path")
    p.add_argument("--albef-dir", default=None, help="ALBEF checkout (default $ALBEF_REFERENCE_DIR)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="fastpath only")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="fastpath only")
    p.add_argument("--fast-backend", default="auto", choices=["auto", "triton"], help="fastpath only")
    p.add_argument("--attention", default=None, help="fastpath only: attention backend of the fast side "
                                                     "(the slow side uses 'math')")
    p.add_argument("--fp64-oracle", default="auto", choices=["auto", "always", "never"],
                   help="lavis/original: rerun both sides in float64 when a tensor's fp32 difference exceeds "
                        "1e-5 (auto), always or never; such a tensor is then judged against the fp64 result "
                        "(see albef_fast/parity/harness.py)")
    p.add_argument("--verbose", action="store_true", help="one row per tensor instead of per group")
    p.set_defaults(run=run_parity)


def run_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from albef_fast import weights as W
    from albef_fast.models.albef import ALBEF
    from albef_fast.models.presets import get_preset
    from albef_fast.task import PretrainTask

    try:
        source = None
        ours = args.checkpoint and (W.is_training_checkpoint(args.checkpoint)
                                    or (Path(args.checkpoint) / W.CONFIG_FILE).is_file())
        if ours:
            given = [f"--{n.replace('_', '-')}" for n in ("vit", "bert", "preset", "image_size", "queue_size")
                     if getattr(args, n) is not None]
            if given:
                raise W.WeightsError(f"{', '.join(given)}: not with --checkpoint {args.checkpoint}, whose own "
                                     "config defines the model (convert to an ALBEF layout first to change it)")
        if ours and W.is_training_checkpoint(args.checkpoint):
            task = W.load_training_checkpoint(args.checkpoint)
            print(f"read training checkpoint {args.checkpoint} (queue {task.queues.size}; its optimizer state, "
                  "RNG states and position are run state and are not converted)")
        elif ours:
            task = W.load_pretrained(args.checkpoint)
            print(f"read {args.checkpoint} ({W.FORMAT})")
        else:
            if args.checkpoint:
                source = W.read_state_dict(args.checkpoint)
            overrides = {"image_size": args.image_size} if args.image_size else {}
            queue = args.queue_size or (source["image_queue"].shape[1] if source and "image_queue" in source else 65536)
            task = PretrainTask(ALBEF(get_preset(args.preset or "albef_base", **overrides)), queue_size=queue)
            for label, path, loader in (("vit", args.vit, W.load_vit), ("bert", args.bert, W.load_hf_bert)):
                if path:
                    report = loader(task.model, W.read_state_dict(path))
                    print(f"{label} {path}: {report}")
            if args.vit or args.bert:
                task.reset_momentum_()
            if source is not None:
                # a queue of another size than the checkpoint's is kept fresh (reported as missing)
                same_queue = "image_queue" not in source or source["image_queue"].shape[1] == task.queues.size
                report = W.load_albef_state_dict(task, source, strict=args.strict, load_queues=same_queue)
                print(f"checkpoint {args.checkpoint}: {report}")
        if args.to == "albef-fast":
            out = W.save_pretrained(task, args.output)
        else:
            layout = "retrieval" if args.to == "albef-retrieval" else "pretrain"
            flavour = "lavis" if args.to == "lavis" else "albef"
            out = W.save_state_dict(W.to_albef_state_dict(task, layout=layout, flavour=flavour), args.output)
    except (W.WeightsError, FileNotFoundError) as exc:
        print(f"albef-fast convert: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def run_parity(args: argparse.Namespace) -> int:
    import torch

    from albef_fast.parity import harness

    try:
        if args.reference == "fastpath":
            ctx = None
            if args.attention:
                from albef_fast.models import attention

                ctx = lambda: attention.use_backend(args.attention)  # noqa: E731
            rows, info = harness.parity_fast_paths(
                args.preset, device=args.device, dtype=getattr(torch, args.dtype), batch_size=args.batch,
                seed=args.seed, fast_backend=args.fast_backend, fast_context=ctx, verbose=args.verbose)
        else:
            rows, info = harness.parity_vs_reference(args.preset, args.reference, albef_dir=args.albef_dir,
                                                     batch_size=args.batch, seed=args.seed, verbose=args.verbose,
                                                     fp64_oracle=args.fp64_oracle)
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"albef-fast parity: error: {exc}", file=sys.stderr)
        return 2
    print(harness.main_table(rows, info))
    failed = [r.quantity for r in harness.failures(rows)]
    counted = [r for r in rows if not r.informational]
    print(f"{len(counted) - len(failed)}/{len(counted)} rows pass"
          + (f" ({len(rows) - len(counted)} informational)" if len(counted) < len(rows) else "")
          + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0
