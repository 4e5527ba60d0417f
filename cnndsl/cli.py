"""The `cnndsl` command line: `check` (summary or --json), `plan` (the fused groups,
their kernels and modelled bytes), `train` and `eval` (train.py), `export` (ONNX, safetensors,
a state dict), `emit` (a standalone module) and `bench` (GPU timings). Every CnnError is printed as its rendered message with exit code 1, never a
traceback."""

import argparse
import json
import sys
import warnings
from pathlib import Path

from . import api, cli_tools, runconfig
from .errors import CnnError, CnnInputError, printable
from .files import write_file
from .limits import MAX_SIZE


def _check(args) -> int:
    net = api.parse(Path(args.file))
    print(json.dumps(net.to_json(), indent=2) if args.json else net.summary())
    return 0


ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2}


def _plan(args) -> int:
    from .plan import plan
    from .summary import plan_json, plan_table
    net = api.parse(Path(args.file))
    if not 1 <= args.batch <= MAX_SIZE:
        raise CnnInputError(f"--batch must be from 1 to {MAX_SIZE:,}, got {args.batch}")
    report = plan_json if args.json else plan_table
    out = report(net, plan(net, "block" if args.block_fusion else True), plan(net, False), args.batch,
                 ITEMSIZE[args.dtype], args.train)
    print(json.dumps(out, indent=2) if args.json else out)
    return 0


def _quiet_interpreter_warning() -> None:
    """train and eval say where kernels run in their own report; emit and bench run none here."""
    warnings.filterwarnings("ignore", message="cnndsl: no CUDA device found")


def _train(args) -> int:
    from .train import Options, train
    if args.file is None:
        raise CnnInputError("train needs the .cnn file, or --config with a config.json that names it")
    opts = Options(data=args.data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                   optimizer=args.optimizer, momentum=args.momentum, weight_decay=args.weight_decay,
                   seed=args.seed, device=args.device, dtype=args.dtype, fuse=_fuse(args),
                   backend=args.backend, out=args.out, resume=args.resume, init=args.init, classes=args.classes,
                   freeze=args.freeze, freeze_bn=args.freeze_bn, only_classes=args.only_classes,
                   val_split=args.val_split, early_stop=args.early_stop or None, sched=args.sched,
                   warmup_epochs=args.warmup_epochs, augment=args.augment, normalize=args.normalize,
                   sync_bn=args.sync_bn)
    if args.nproc is not None:  # torchrun runs this command again in each process: its input checked once first
        from .distributed import check_batch, launch
        api.parse(Path(args.file))
        opts.validate()
        check_batch(opts.batch_size, max(args.nproc, 1))
        return launch(args.argv, args.nproc, args.device)
    _quiet_interpreter_warning()
    train(args.file, opts)
    return 0


def _eval(args) -> int:
    from .evaluate import evaluate
    _quiet_interpreter_warning()
    acc = evaluate(args.file, args.weights, args.data, args.batch_size, args.device, args.backend,
                   _fuse(args), args.dtype, args.classes, args.only_classes)
    print(f"test accuracy: {acc:.3f}")
    return 0


def _plot(args) -> int:
    from .plot import draw
    runs = [Path(r) for r in args.runs]
    output = args.output or (runs[0] / "curves.png" if len(runs) == 1 else Path("runs.png"))
    print(f"wrote {printable(draw(runs, output))}")
    return 0


def _export(args) -> int:
    from .export import export
    print(f"wrote {printable(export(args.file, args.weights, args.output, args.classes, args.opset))}")
    return 0


def _fine_tune_options(p) -> None:
    p.add_argument("--classes", type=int, metavar="N", help="replace the last dense layer by one of N classes "
                   "(a fine-tuning checkpoint's own by default)")
    p.add_argument("--only-classes", metavar="LABELS", help="use only these classes of the data, relabelled 0, 1, "
                   "... in the order given: e.g. 0-4 or 5,7,9")


def _model_options(p, batch_size: int, replay: bool = False, dtype_help: str = "default: fp32") -> None:
    """Options `train` and `eval` share (train's file may come from --config)."""
    p.add_argument("file", nargs="?" if replay else None, help="the .cnn file")
    p.add_argument("--data", help="an MNIST IDX folder, a CIFAR-10 python folder, an .npz with x and y, or an "
                                  "image folder (one subfolder per class); default: the bundled 8x8 digits")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"images per step (default: {batch_size})")
    p.add_argument("--device", help="cpu or cuda (default: cuda when there is one)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help=dtype_help)
    p.add_argument("--backend", choices=["triton", "torch"], default="triton",
                   help="triton (Triton kernels) or torch (the eager reference); default: triton")
    _fusion_options(p)


def _fusion_options(p) -> None:
    """--no-fuse and --block-fusion: the fusion level (default: cross-layer)."""
    level = p.add_mutually_exclusive_group()
    level.add_argument("--no-fuse", action="store_true", help="one kernel per layer instead of fused groups")
    level.add_argument("--block-fusion", action="store_true",
                       help="fuse within blocks only: in training each block writes its output, where by default "
                            "the next conv normalises and activates it as it loads it (cross-layer fusion)")


def _fuse(args) -> bool | str:
    """compile()'s fuse for the fusion options."""
    return False if args.no_fuse else "block" if args.block_fusion else True


def _bench(args) -> int:
    _quiet_interpreter_warning()  # (before the import that warns: bench needs a GPU, and says so)
    from .bench import main
    return main(args)


def _emit(args) -> int:
    _quiet_interpreter_warning()  # (before the import that warns: emit writes code, nothing runs)
    from .emit import emit
    text = emit(api.parse(Path(args.file)), fuse=_fuse(args))
    if args.output in (None, "-"):
        print(text, end="")
        return 0
    try:
        write_file(Path(args.output), text)  # (a new file renamed over the old: no half-written module)
    except OSError as err:
        raise CnnInputError(f"cannot write {args.output}: {err.strerror}") from None
    print(f"wrote {printable(args.output)}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cnndsl", description="Compile .cnn model files into fused Triton kernels.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = sub.add_parser("check", help="parse and shape-check a .cnn file; print its summary",
                           description="Parse and shape-check a .cnn file and print a layer table.")
    check.add_argument("file", help="the .cnn file")
    check.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    check.set_defaults(run=_check)
    pl = sub.add_parser("plan", help="show the fused groups, their kernels and bytes moved against the unfused plan",
                        description="Show how the network is grouped into fused kernels: the ops of each group, the "
                                    "kernels it launches and a model of the bytes it reads and writes, next to "
                                    "the unfused plan; and why a layer did not fuse where a rule could take it.")
    pl.add_argument("file", help="the .cnn file")
    pl.add_argument("--train", action="store_true", help="the training step's kernels (forward and backward) "
                                                         "instead of inference's")
    pl.add_argument("--batch", type=int, default=1, help="batch size for the byte counts (default: 1)")
    pl.add_argument("--dtype", choices=sorted(ITEMSIZE), default="fp32", help="element type (default: fp32)")
    pl.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    pl.add_argument("--block-fusion", action="store_true",
                    help="show block-level fusion (each block writes its output in training) instead of cross-layer")
    pl.set_defaults(run=_plan)
    bench = sub.add_parser("bench", help="time fused, unfused, eager PyTorch and torch.compile on a GPU",
                           description="Time the network on one CUDA GPU, side by side in one run: the triton "
                                       "backend fused (cross-layer), fused at block level and unfused, the "
                                       "reference backend (eager PyTorch, cuDNN) "
                                       "in NCHW and channels_last, and torch.compile of it; inference and one "
                                       "training step. Medians with p20/p80 from triton.testing.do_bench, and "
                                       "each row's fraction of the roofline: the fused plan's modelled bytes at "
                                       "the copy bandwidth or its FLOPs at the matmul rate, both measured in the "
                                       "same run. --groups times each block-level fused group against the same "
                                       "layers unfused and eager instead. Needs a GPU.")
    bench.add_argument("file", help="the .cnn file")
    bench.add_argument("--batch", type=int, default=64, help="batch size (default: 64)")
    bench.add_argument("--dtype", choices=sorted(ITEMSIZE), default="bf16", help="element type (default: bf16)")
    bench.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 matmuls in every provider")
    bench.add_argument("--providers", nargs="+", metavar="NAME",
                       choices=["fused", "fused_block", "unfused", "eager", "eager_cl", "compile"],
                       help="which to time: fused (cross-layer), fused_block (block-level fusion), unfused, eager "
                            "(NCHW), eager_cl (channels_last), compile (default: all six; not with --groups)")
    bench.add_argument("--groups", action="store_true",
                       help="time every fused group of the plan against the same layers unfused and eager "
                            "(inference, and forward + backward in training): one row per group with the "
                            "speed-ups and the modelled bytes saved")
    bench.add_argument("--cuda-graph", action="store_true",
                       help="capture each step once as a CUDA graph and time its replays (for launch-bound "
                            "small networks); host work runs at capture only, so a dropout layer repeats the "
                            "same masks on every replay: fine for timing")
    bench.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    bench.add_argument("--csv", metavar="PATH", help="also append the rows to this CSV file")
    bench.add_argument("--plot", metavar="FILE", help="also write a PNG of each provider's speed relative to eager "
                                                     "(needs matplotlib)")
    bench.set_defaults(run=_bench)
    tr = sub.add_parser("train", help="train the network on a labelled image set, with checkpoints",
                        description="Train the network (a classifier) on a labelled image set: the bundled 8x8 "
                                    "digits by default, or your own (--data). Prints the summary, the fused plan, "
                                    "a line per epoch, writes OUT/last.pt after every epoch, and ends with the "
                                    "accuracy on the held-out split. One run at a time may use an OUT folder.")
    _model_options(tr, 64, replay=True, dtype_help="what the kernels compute in: bf16 and fp16 train in mixed "
                   "precision, on fp32 weights and optimizer state (fp16 with loss scaling); default: fp32")
    resumed = "the checkpoint's when resuming, else"
    tr.add_argument("--epochs", type=int, default=4, help=f"epochs in all, a resumed run's included (default: "
                    f"{resumed} 4)")
    tr.add_argument("--optimizer", choices=["sgd", "adam", "adamw"],
                    help=f"default: {resumed} adam (a resumed run cannot change it)")
    tr.add_argument("--lr", type=float, help=f"learning rate (default: {resumed} 0.003 for adam and adamw, 0.05 "
                                             "for sgd)")
    tr.add_argument("--momentum", type=float, help=f"sgd's momentum (default: {resumed} 0.9)")
    tr.add_argument("--weight-decay", type=float, help=f"default: {resumed} 0")
    tr.add_argument("--seed", type=int, default=0, help="seeds the weights, the shuffle and dropout (default: 0)")
    tr.add_argument("--out", help="checkpoint folder (default: runs/NETWORK)")
    tr.add_argument("--resume", nargs="?", const="", metavar="CKPT",
                    help="continue from a checkpoint (default: OUT/last.pt) up to --epochs, with the options it "
                         "was trained with (not --out, --device, the fusion level, --sync-bn) unless "
                         "given again")
    tr.add_argument("--init", metavar="FILE", help="start from these weights: a torch state dict (.pt, .pth), "
                    ".safetensors or a cnndsl checkpoint, matched by name, else in declaration order")
    _fine_tune_options(tr)
    tr.add_argument("--freeze", metavar="LABELS", help="train no parameter of these layers: one label freezes "
                    "every layer up to and including it; several (comma-separated) freeze those")
    tr.add_argument("--freeze-bn", action=argparse.BooleanOptionalAction, default=False, help="keep the frozen "
                    "layers' batch norms in eval mode (their running statistics, not updated)")
    tr.add_argument("--val-split", type=float, default=0.1, metavar="FRACTION", help="the fraction of the "
                    "training data held out to validate after every epoch; OUT/best.pt keeps the best epoch "
                    "(default: 0.1; 0 for none)")
    tr.add_argument("--early-stop", type=int, metavar="N", help="stop after N epochs without a better validation "
                    "accuracy (0: never, as by default)")
    tr.add_argument("--sched", choices=["none", "step", "cosine", "onecycle"], default="none",
                    help="the learning-rate schedule over the run, stepped every batch: step (a tenth at a third, "
                    "a hundredth at two thirds), cosine (to 0), onecycle (up to --lr over 30%%, then down); "
                    "default: none")
    tr.add_argument("--warmup-epochs", type=int, default=0, metavar="N", help="a linear warm-up of the learning "
                    "rate over the first N epochs (default: 0)")
    tr.add_argument("--augment", nargs="?", const="crop,flip", metavar="KINDS", help="augment the training "
                    "images, differently every epoch: crop (shifted by up to an eighth of a side, padded with "
                    "black), flip (mirrored left to right half the time), or both (the default: crop,flip)")
    tr.add_argument("--normalize", action="store_true", help="normalise each channel by the training split's "
                    "mean and standard deviation (kept in the checkpoint for eval and export)")
    tr.add_argument("--nproc", type=int, metavar="N", help="train in N processes on this machine (torchrun; one "
                    "per GPU): --batch-size is split among them; several machines: run torchrun yourself")
    tr.add_argument("--sync-bn", action="store_true", help="with several processes, batch norms normalise by the "
                    "statistics of the whole batch, not each process's part")
    tr.add_argument("--config", metavar="FILE", help="replay a run: the file and options its OUT/config.json "
                    "records (each run writes one); options given here win")
    tr.set_defaults(run=_train)
    p.train_parser = tr
    ev = sub.add_parser("eval", help="report a checkpoint's accuracy on the held-out split",
                        description="Load the weights of a checkpoint written by `cnndsl train` and report the "
                                    "accuracy on the held-out split of the data.")
    _model_options(ev, 256)
    ev.add_argument("--weights", required=True, help="a checkpoint (OUT/last.pt of a training run), a torch state "
                    "dict (.pt, .pth) or .safetensors")
    _fine_tune_options(ev)
    ev.set_defaults(run=_eval)
    ex = sub.add_parser("export", help="write the network with its weights as ONNX, safetensors or a state dict",
                        description="Write the network with its weights for other tools, by the output's suffix: "
                                    ".onnx (opset 17 or newer, the batch dimension dynamic), .safetensors, or .pt "
                                    "(a plain state dict, in declaration order: it loads into the torch model of "
                                    "the same network entry by entry).")
    ex.add_argument("file", help="the .cnn file")
    ex.add_argument("--weights", required=True, help="a checkpoint, a torch state dict or .safetensors")
    ex.add_argument("-o", "--output", required=True, help="model.onnx, model.safetensors or model.pt")
    ex.add_argument("--classes", type=int, metavar="N", help="the head's classes, if fine-tuning replaced it")
    ex.add_argument("--opset", type=int, default=17, help="the ONNX opset (default: 17)")
    ex.set_defaults(run=_export)
    pt = sub.add_parser("plot", help="draw the loss and accuracy curves of training runs",
                        description="Draw loss and accuracy against epochs from each run folder's metrics.csv "
                                    "(training solid, validation dashed), one colour per run. Needs matplotlib.")
    pt.add_argument("runs", nargs="+", metavar="RUN_DIR", help="the OUT folders of `cnndsl train` runs")
    pt.add_argument("-o", "--output", help="the PNG to write (default: RUN_DIR/curves.png for one run, runs.png "
                                           "for several)")
    pt.set_defaults(run=_plot)
    em = sub.add_parser("emit", help="write the network's Triton kernels and launch sequence as one Python module",
                        description="Write one standalone Python module (needs only torch and triton) with the "
                                    "Triton kernels and the forward/backward launch sequence of the network.")
    em.add_argument("file", help="the .cnn file")
    em.add_argument("-o", "--output", help="where to write the module (default: standard output)")
    _fusion_options(em)
    em.set_defaults(run=_emit)
    cli_tools.add_commands(sub, _fusion_options, _fuse)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        taken, where = {}, None
        if getattr(args, "config", None) is not None:  # train --config: its options, the command line's over them
            taken, where = runconfig.defaults(parser.train_parser, args.config), f"--config {args.config}"
        elif getattr(args, "resume", None) is not None and args.file is not None:  # train --resume: likewise
            taken, where = runconfig.resumed(parser.train_parser, args)
            where = f"the checkpoint {where}"
        if taken:
            parser.train_parser.set_defaults(**taken)
            args = parser.parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        try:
            return args.run(args)
        except CnnError as err:
            runconfig.name_origin(err, parser.train_parser, args, taken, where)
            raise
    except CnnError as err:
        print(err.render(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `cnndsl check big.cnn | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
