"""The `attnlab explain` command (added to `attnlab` by attnlab/cli.py).

    attnlab explain "some text" ["more text" ...] [--model minilm|DIR] [--methods rollout,attention-flow,...] --out DIR
    attnlab explain --model MODULE:NAME --tokens "the cat sat" [--tokens "..."] [--import MODULE] --out DIR

writes DIR/index.html (self-contained: inline CSS, JS and images, no network), DIR/explain.json
(every number) and DIR/png/*.png; progress goes to stderr. DIR as a model is a local Hugging Face
model directory (AutoModel + AutoTokenizer, offline, never the directory's own code: a config with
`auto_map` is refused). MODULE:NAME is a model made of attnlab mechanisms: NAME in MODULE (a dotted
name or a .py file) is an nn.Module or a function returning one (given `vocab_size=` when it has
that parameter); it runs in eval mode on token ids built from the `--tokens` strings
(`explain.token_vocabulary`). The methods are the catalogue's analysis entries of the same names
(`attnlab info attention-flow`); explain's former names (flow, relevance, lrp, heads, sinks, qk) are
refused with the new name. A user error (unknown method, missing model, texts with a MODULE:NAME
model...) exits with 2 and a one-line message naming the value and the choices.
Limits (attnlab.analysis.explain): texts are cut to the model's maximum or --max-tokens, a method
whose estimated time exceeds --budget seconds is downsampled or left out. DIR is never written
through a symbolic link (DIR, index.html, explain.json or png/ being one is refused), and png/ holds
only this run's figures (older *.png there are removed).
"""
from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path
from typing import Any

from torch import nn

from .. import catalogue
from ..core.errors import ParameterError, UsageError
from .explain import BUDGET, METHODS, MINILM, check_no_remote_code, explain, resolve_methods, token_vocabulary

USER_ERRORS = ("model:", "tokens:", "qk:", "grads:")  # explain's messages about the model and tokens given
MODEL_CHOICES = f"{MINILM}, a local Hugging Face model directory, or MODULE:NAME (a model of attnlab mechanisms)"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _is_hf_model(model: str) -> bool:
    """True for "minilm" or an existing directory; False for MODULE:NAME; UsageError otherwise."""

    if model == MINILM:
        return True
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"--model: {model!r} holds no config.json; expected {MODEL_CHOICES}")
        try:
            check_no_remote_code(path)
        except ValueError as err:
            raise UsageError(f"--model: {str(err).removeprefix('model: ')}") from None
        return True
    module, _, name = model.rpartition(":")
    if module and name.isidentifier():
        return False
    raise UsageError(f"--model: no directory {model!r}; expected {MODEL_CHOICES}")


def load_module_model(ref: str, vocab_size: int) -> nn.Module:
    """The nn.Module named by MODULE:NAME (NAME a module or a function returning one), in eval mode."""

    module_name, _, name = ref.rpartition(":")
    try:
        module = catalogue.import_module(module_name)
    except ParameterError as err:
        raise UsageError(f"--model: {str(err).removeprefix('--import: ')}") from None
    if not hasattr(module, name):
        raise UsageError(f"--model: expected {module_name!r} to define {name!r}, it does not")
    obj: Any = getattr(module, name)
    if not isinstance(obj, nn.Module) and callable(obj):
        takes_vocab = "vocab_size" in inspect.signature(obj).parameters
        obj = obj(vocab_size=vocab_size) if takes_vocab else obj()
    if not isinstance(obj, nn.Module):
        raise UsageError(f"--model: expected {ref} to be an nn.Module or a function returning one, got {type(obj).__name__}")
    return obj.eval()


def cmd_explain(args: argparse.Namespace) -> int:
    from .export import figures, write_json, write_pngs
    from .page import write_page

    try:
        methods = None if args.methods is None else resolve_methods(args.methods)
    except ValueError as err:
        raise UsageError(f"--methods: {str(err).removeprefix('methods: ')}") from None
    hf = _is_hf_model(args.model)
    tokens = [line.split() for line in args.tokens]
    if any(not t for t in tokens):
        raise UsageError("--tokens: expected token strings separated by spaces, got an empty value")
    if hf and tokens:
        raise UsageError(f"--tokens: a tokenizer model ({args.model}) takes TEXTs; --tokens goes with --model MODULE:NAME")
    if not hf and args.texts:
        raise UsageError(f"--model {args.model}: a model of attnlab mechanisms takes --tokens \"a b c\", not TEXTs")
    if not (args.texts or tokens):
        raise UsageError("expected TEXTs (with --model minilm or DIR) or --tokens (with --model MODULE:NAME)")
    out = Path(args.out)
    _check_out(out)
    start = time.perf_counter()
    limits = {"max_tokens": args.max_tokens, "budget": args.budget or None}
    if hf:
        try:
            ex = explain(args.texts, args.model, methods=methods, quiet=args.quiet, threads=args.threads, **limits)
        except ValueError as err:
            if not str(err).startswith(tuple(f"{m}: estimated" for m in METHODS)):
                raise
            raise UsageError(str(err)) from None
    else:
        model = load_module_model(args.model, len(token_vocabulary(tokens)))
        try:
            ex = explain(model=model, tokens=tokens, methods=methods, quiet=args.quiet, threads=args.threads, **limits)
        except (ValueError, TypeError) as err:
            if not str(err).startswith(USER_ERRORS + tuple(f"{m}: estimated" for m in METHODS)):
                raise  # from inside the model: keep the traceback
            raise UsageError(f"--model {args.model}: {err}") from None
        ex.model = args.model
    out.mkdir(parents=True, exist_ok=True)
    _check_out(out)
    if not args.quiet:
        print("explain: drawing figures …", file=sys.stderr, flush=True)
    figs = figures(ex)
    write_json(ex, out / "explain.json")
    (out / "png").mkdir(exist_ok=True)
    for stale in (out / "png").glob("*.png"):  # this run's figures only (unlink never follows a link)
        stale.unlink()
    write_pngs(figs, out / "png")
    page = write_page(ex, out / "index.html", figs)
    if not args.quiet:
        print(f"explain: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    print(page)
    return 0


def _check_out(out: Path) -> None:
    """UsageError when --out, or what explain writes inside it, is a symbolic link (never written through)."""
    from ..cli import UsageError

    for path in (out, out / "index.html", out / "explain.json", out / "png"):
        if path.is_symlink():
            raise UsageError(f"--out: {path} is a symbolic link; expected a real directory (explain does not write "
                             "through links)")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} is a file; expected a directory")


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (a number >= 0, 0 = no limit), got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds (a number >= 0, 0 = no limit), got {text!r}")
    return value


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add `explain` to the `attnlab` command."""
    p = subparsers.add_parser(
        "explain", help="see what the attention of a model does on some texts (HTML page, JSON, PNG)",
        description="Run attention analyses on TEXTs (one padded batch), or on --tokens through a model of attnlab "
        "mechanisms, and write DIR/index.html (self-contained), DIR/explain.json and DIR/png/*.png. Methods: "
        + "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()),
    )
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to explain (with --model minilm or DIR)")
    p.add_argument("--model", default=MINILM, metavar="minilm|DIR|MODULE:NAME",
                   help="the packaged MiniLM encoder (default), a local Hugging Face model directory (its own code never "
                   "runs), or NAME in MODULE (dotted or .py): a model of attnlab mechanisms or a function making one")
    p.add_argument("--tokens", action="append", default=[], metavar="'A B C'",
                   help="token strings of one sequence, separated by spaces (with --model MODULE:NAME); repeatable")
    p.add_argument("--methods", default=None, metavar="A,B,...",
                   help=f"comma-separated catalogue names (`attnlab info NAME`), among {', '.join(METHODS)} "
                   "(default: every one that applies to the model)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--threads", type=_positive_int, default=1, metavar="T",
                   help="torch threads (default 1: fastest for a few sentences, see attnlab.analysis.explain)")
    p.add_argument("--max-tokens", type=_positive_int, default=None, metavar="N",
                   help="cut each text to N tokens (default: the model's maximum, e.g. 512 for MiniLM)")
    p.add_argument("--budget", type=_budget, default=BUDGET, metavar="SECONDS",
                   help=f"estimated seconds each method may take (default {BUDGET:g}; 0 = no limit): attention-flow is "
                   "computed for the target tokens only, other methods left out, when over it")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    catalogue.add_import_argument(p)
    p.set_defaults(func=cmd_explain)
