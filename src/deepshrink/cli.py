"""``deepshrink`` command line: run, demo, evaluate, validate.

Any input error prints one line ``deepshrink: error: ...`` on stderr and exits with code 2.
Results go to stdout; progress and warnings to stderr through the ``deepshrink`` logger, whose
handler lives for one command: ``-q`` keeps warnings and errors only, ``-v`` adds debug lines and
the third-party warnings and log lines (deprecations of torch internals) hidden by default.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import sysconfig
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from deepshrink import __version__
from deepshrink.core.errors import DeepshrinkError
from deepshrink.core.log import LOGGER, scoped_levels

EXIT_USAGE = 2
EXIT_FAILED = 1   # a run that failed inside a stage (input errors are EXIT_USAGE)


log = logging.getLogger(__name__)

# the runtimes log deprecations and missing optional kernels on import; they are not ours to fix
THIRD_PARTY_LOGGERS = ("torchao", "torch", "executorch", "onnxscript", "torch.onnx")


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (a bad flag or value) as the same one line as every other input error."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"deepshrink: error: {message} (see '{self.prog} --help')\n")


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _add_verbosity(parser: argparse.ArgumentParser, *, default) -> None:
    # on the main parser (defaults False) and again on each command (SUPPRESS: given or absent),
    # so `deepshrink -q run r.yaml` and `deepshrink run r.yaml -q` both work
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", default=default, help="only warnings and errors")
    group.add_argument("-v", "--verbose", action="store_true", default=default,
                       help="also debug lines, and the third-party warnings and log lines hidden by default")


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            message = f"deepshrink: {record.levelname.lower()}: {message}"
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        return message


_LIBRARY_DIRS = tuple(sorted({os.path.join(sysconfig.get_path(key), "") for key in ("stdlib", "platstdlib", "purelib", "platlib")}))


def _in_libraries(filename: str) -> bool:
    """A warning raised in the standard library or an installed package (``<frozen ...>``: an import)."""
    return filename.startswith("<") or os.path.abspath(filename).startswith(_LIBRARY_DIRS)


@contextmanager
def _console(*, quiet: bool, verbose: bool) -> Iterator[None]:
    """For one command: deepshrink's log records and warnings on stderr, third-party noise only
    with ``-v``. Everything is restored afterwards, so ``main()`` run in-process leaves no trace."""
    if not verbose:
        import torch  # noqa: F401  (its import sets the levels of torch's loggers: mute them after it)
    muted = {} if verbose else {name: logging.ERROR for name in THIRD_PARTY_LOGGERS}
    logger = logging.getLogger(LOGGER)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    previous = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    logger.addHandler(handler)
    # ExecuTorch's quantizer calls logging.basicConfig on import: through the root's handler
    # every line would print twice
    logger.propagate = False
    try:
        with warnings.catch_warnings(), scoped_levels(muted):
            if not sys.warnoptions:  # an explicit -W / PYTHONWARNINGS wins
                warnings.simplefilter("default")
            python_show = warnings.showwarning

            def show(message, category, filename, lineno, file=None, line=None):
                if category.__module__.partition(".")[0] == "deepshrink":
                    # ours name a layer or a setting the user may want to change: always shown
                    log.warning("%s", message)
                elif verbose or not _in_libraries(filename):   # the user's own code: theirs to see
                    python_show(message, category, filename, lineno, file, line)

            warnings.showwarning = show
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous[0])
        logger.propagate = previous[1]


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="deepshrink", description="Prune, quantize, export and measure models for mobile CPUs.")
    parser.add_argument("--version", action="version", version=f"deepshrink {__version__}")
    _add_verbosity(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a YAML recipe")
    run.add_argument("recipe")
    run.add_argument("--out", default=None, help="output directory (default out/<recipe name>)")
    run.add_argument("--resume", action="store_true", help="continue a run of the same recipe from its last finished stage")
    run.add_argument("--data-dir", default=None, help="directory of the dataset's IDX files (overrides the recipe)")
    ddp = run.add_argument_group("distributed training (torchrun: the stages that train run on every process, "
                                 "DistributedDataParallel; the rest on rank 0, which alone writes files)")
    ddp.add_argument("--nproc-per-node", type=_at_least(1), default=None, metavar="N",
                     help="start N processes on this machine through torchrun (torch.distributed.run); "
                          "default 1 when --nnodes is given")
    ddp.add_argument("--nnodes", type=_at_least(1), default=1, metavar="M", help="machines taking part (default 1)")
    ddp.add_argument("--node-rank", type=_at_least(0), default=0, metavar="R", help="this machine's index, 0..M-1")
    ddp.add_argument("--master-addr", default="127.0.0.1", metavar="HOST", help="address of node 0 (default 127.0.0.1)")
    ddp.add_argument("--master-port", type=_at_least(1), default=None, metavar="PORT",
                     help="a free port on node 0 (default: 29500 with several nodes; one node picks a free port)")

    demo = sub.add_parser("demo", help="run the packaged demo recipe (LeNet-5 on embedded digits)")
    demo.add_argument("--out", default="out/demo")
    demo.add_argument("--resume", action="store_true")

    ev = sub.add_parser("evaluate", help="measure a .pte, .onnx or checkpoint in its own runtime")
    ev.add_argument("model")
    ev.add_argument("--data", required=True, help="digits, mnist or fashion-mnist")
    ev.add_argument("--data-dir", default=None)
    ev.add_argument("--image-size", type=_at_least(1), default=28)
    ev.add_argument("--threads", type=_at_least(1), default=1)
    ev.add_argument("--runs", type=_at_least(1), default=200, help="timed batch-1 calls (after warm-up)")
    ev.add_argument("--warmup", type=_at_least(0), default=20)
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")
    ev.add_argument("--model-code", default=None, metavar="FILE.py:NAME",
                    help="your code that rebuilds a checkpoint of your own model (it runs; a checkpoint never names code itself)")

    val = sub.add_parser("validate", help="check a recipe without running it")
    val.add_argument("recipe")
    for command in (run, demo, ev, val):
        _add_verbosity(command, default=argparse.SUPPRESS)
    return parser


def _launch(args: argparse.Namespace) -> int:
    """``run --nproc-per-node N``: the recipe checked once here, then ``deepshrink run`` on N processes
    through torchrun; one line naming the rank when one fails."""
    from deepshrink.core.errors import ConfigError
    from deepshrink.pipeline import load_recipe
    from deepshrink.pipeline.recipe_checks import training_batch_problems
    from deepshrink.training import distributed

    if distributed.launched():
        raise ConfigError("--nproc-per-node: this process was itself started by torchrun; run `deepshrink run` "
                          "without --nproc-per-node/--nnodes under torchrun")
    if args.node_rank >= args.nnodes:
        raise ConfigError(f"--node-rank {args.node_rank} must be below --nnodes {args.nnodes}")
    recipe = load_recipe(args.recipe)
    nproc = args.nproc_per_node or 1
    problems = training_batch_problems(recipe.stages, nproc * args.nnodes)
    if problems:
        raise ConfigError(*problems)
    child = ["run", args.recipe, "--out", args.out or os.path.join("out", recipe.name)]
    child += (["--resume"] if args.resume else []) + (["--data-dir", args.data_dir] if args.data_dir else [])
    child += ["-q"] if args.quiet else ["-v"] if args.verbose else []
    try:
        distributed.launch(child, nproc_per_node=nproc, nnodes=args.nnodes, node_rank=args.node_rank,
                           master_addr=args.master_addr, master_port=args.master_port, quiet_logs=not args.verbose)
    except distributed.RankFailed as err:
        if err.input_error:
            print(f"deepshrink: error: {err}", file=sys.stderr)
            return EXIT_USAGE
        print(f"deepshrink: error: {err} (rerun the same command with --resume to continue from the last finished "
              "stage and epoch)", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _run(recipe_path: str, out: str | None, resume: bool, data_dir: str | None, *, quiet: bool = False) -> int:
    import dataclasses

    from deepshrink.pipeline import load_recipe, run_recipe
    from deepshrink.training.distributed import is_main

    recipe = load_recipe(recipe_path)
    if data_dir is not None:
        recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, data_dir=data_dir))
    started = time.perf_counter()
    result = run_recipe(recipe, out or os.path.join("out", recipe.name), resume=resume, progress=False if quiet else None)
    if not is_main():   # a torchrun process other than rank 0: rank 0 reports
        return 0
    log.info("finished %s in %.1f s wall", recipe.name, time.perf_counter() - started)
    for label, v in result.state.variants.items():
        size = f"{v['file_bytes'] / 1024:8.1f} KiB" if v.get("file_bytes") else " " * 12
        lat = f"{v['latency_ms_median']:.3f} ms" if v.get("latency_ms_median") is not None else ""
        score = f"acc {100 * v['accuracy']:6.2f} %" if v["accuracy"] is not None else (
            f"{v['fidelity']['headline']} " + ("identical" if v["fidelity"]["value"] is None else f"{v['fidelity']['value']:.4f}")
            if v.get("fidelity") else "")
        print(f"  {label:38s} {v['runtime']:12s} {score}  {size}  {lat}")
    if result.metrics_path:
        print(f"metrics: {result.metrics_path}")
    if result.report_path:
        print(f"report:  {result.report_path}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from deepshrink.data import load as load_data
    from deepshrink.evaluation import evaluate

    data = load_data(args.data, data_dir=args.data_dir, image_size=args.image_size)
    metrics = evaluate(args.model, data.test, threads=args.threads, latency_runs=args.runs, warmup=args.warmup,
                       code=args.model_code)
    if args.json:
        from deepshrink.core.cpu import cpu_info

        print(json.dumps({**metrics.as_dict(), "cpu": cpu_info().as_dict()}, indent=2))
        return 0
    d = metrics.as_dict()
    print(f"{d['artifact']} ({d['runtime']}, {d['threads']} thread(s))")
    if d["accuracy"] is not None:
        print(f"  test accuracy   {100 * d['accuracy']:.2f} %  (error {100 * (1 - d['accuracy']):.2f} %, {d['test_samples']} samples of {args.data})")
    if d["params"] is not None:
        print(f"  parameters      {d['params']:,}  non-zero {d['nonzero_params']:,}  ({d['counts_source']})")
    if d["macs"] is not None:
        print(f"  MACs            {d['macs']:,}")
    if d["file_bytes"] is not None:
        print(f"  file size       {d['file_bytes']:,} B  (download: zstd {d['zstd_bytes']:,} B, gzip {d['gzip_bytes']:,} B)")
    if d["latency_ms_median"] is not None:
        print(f"  latency batch 1 median {d['latency_ms_median']:.3f} ms, p90 {d['latency_ms_p90']:.3f} ms over {d['latency_runs']} runs")
    for check in d.get("parity") or []:
        verdict = "ok" if check.get("passed", True) else "FAILED: " + "; ".join(check.get("failures", []))
        steps = f", p99 {check['p99_steps']:.2f} output steps" if check.get("p99_steps") is not None else ""
        agree = f", top-1 agreement {100 * check['argmax_agreement']:.1f} %" if check.get("argmax_agreement") is not None else ""
        print(f"  export parity   {check['runtime']}: max |Δ| {check['max_abs_diff']:.3g}{steps}{agree} — {verdict}")
    from deepshrink.core.cpu import cpu_info

    print(f"  CPU             {cpu_info().describe()}")
    print(f"  ({cpu_info().int8_caveat()})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.quiet and args.verbose:
        parser.error("-q/--quiet and -v/--verbose cannot be combined")
    os.environ.setdefault("TORCHINDUCTOR_DISABLE", "1")
    with _console(quiet=args.quiet, verbose=args.verbose):
        return _command(args)


def _command(args: argparse.Namespace) -> int:
    try:
        if args.command == "run" and (args.nproc_per_node is not None or args.nnodes > 1):
            return _launch(args)
        if args.command == "run":
            return _run(args.recipe, args.out, args.resume, args.data_dir, quiet=args.quiet)
        if args.command == "demo":
            from deepshrink.pipeline.recipe import packaged_recipe

            return _run(str(packaged_recipe("demo")), args.out, args.resume, None, quiet=args.quiet)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "validate":
            from deepshrink.pipeline import load_recipe

            recipe = load_recipe(args.recipe)
            print(f"{args.recipe}: valid ({len(recipe.stages)} stages: {', '.join(s.kind for s in recipe.stages)})")
            return 0
    except DeepshrinkError as err:
        _say(f"error: {err}", str(err), err)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("deepshrink: interrupted; rerun with --resume to continue from the last finished stage", file=sys.stderr)
        return 130
    except SystemExit as err:   # the user's code (a model's forward, a data or metric function) called sys.exit()
        _say(f"failed: your code called sys.exit({err.code!r}); it must raise an exception instead (--resume continues "
             "from the last finished stage)", f"SystemExit: {err.code!r}", err)
        return EXIT_FAILED
    except Exception as err:   # a failure inside a stage (often the model's own code): one line, exit 1
        if os.environ.get("DEEPSHRINK_TRACEBACK"):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        _say(f"failed: {type(err).__name__}: {first} (set DEEPSHRINK_TRACEBACK=1 for the traceback; "
             "--resume continues from the last finished stage)", f"{type(err).__name__}: {first}", err)
        return EXIT_FAILED
    return EXIT_USAGE


def _say(line: str, message: str, err: BaseException) -> None:
    """``deepshrink: LINE`` on stderr; in a process ``run --nproc-per-node`` started, ``message`` goes to
    the launcher instead, which prints one line for the run naming the rank that failed."""
    if os.environ.get("DEEPSHRINK_LAUNCHED"):
        from deepshrink.training.distributed import record_failure

        if record_failure(message, err):
            return
    print(f"deepshrink: {line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
