"""The `fedfactory` command: thin wrappers over the library; user mistakes exit with one line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .errors import FedFactoryError


def cmd_datasets(args) -> int:
    from .data import list_datasets

    rows = list_datasets()
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    for name, status, text in rows:
        print(f"{name:<{w0}}  {status:<{w1}}  {text}")
    return 0


def cmd_partition(args) -> int:
    from .data import load_dataset, make_partition

    ds = load_dataset(args.dataset, root=args.root, size=args.size)
    part = make_partition(ds.y_train, args.scheme, args.clients, seed=args.seed, num_classes=ds.num_classes,
                          groups=ds.groups_train, min_size=args.min_size)
    print(f"{ds.name}: {len(ds.y_train)} training images, {ds.num_classes} classes, "
          f"scheme {args.scheme}, {len(part.clients)} clients, seed {args.seed}")
    print(part.table(ds.class_names))
    return 0


def cmd_run(args) -> int:
    from .config import load_config
    from .runners.embedded import run

    cfg = load_config(args.config, args.set)
    results = run(cfg, args.out, resume=args.resume)
    m = results["metrics"]
    print(f"accuracy {m['accuracy']:.4f}  balanced accuracy {m['balanced_accuracy']:.4f}  "
          f"AUROC {m['auroc']:.4f}  F1 {m['f1']:.4f}")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedfactory", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--version", action="version", version=f"fedfactory {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("datasets", help="list the data sets and whether each is available here")
    s.set_defaults(func=cmd_datasets)

    s = sub.add_parser("partition", help="partition a data set over clients and print the client x class table")
    s.add_argument("dataset", help="fashion-mnist, br35h, medmnist:<subset>[:<size>], cifar10, isic2019, npz:<path>")
    s.add_argument("--scheme", default="silos", help="silos | pathological:<k> | dirichlet:<alpha> | iid | natural")
    s.add_argument("--clients", type=int, default=10)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--min-size", type=int, default=10, help="dirichlet: the smallest client")
    s.add_argument("--root", default="", help="the data set's folder or file, if not the default")
    s.add_argument("--size", type=int, default=0, help="resize images to SIZE x SIZE (0 = data set default)")
    s.set_defaults(func=cmd_partition)

    s = sub.add_parser("run", help="run the whole pipeline: modules, one round, factory, classifier, report")
    s.add_argument("config", help="a TOML file, e.g. configs/fashion-silos.toml")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    s.add_argument("--out", required=True, help="the run folder")
    s.add_argument("--resume", action="store_true", help="continue a run: reuse its verified modules")
    s.set_defaults(func=cmd_run)

    args = p.parse_args(argv)
    try:
        return args.func(args)
    except FedFactoryError as e:
        print(f"fedfactory: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedfactory: interrupted (finished modules are kept; rerun with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
