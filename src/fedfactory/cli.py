"""The `fedfactory` command: thin wrappers over the library; user mistakes exit with one line."""

from __future__ import annotations

import argparse
import json
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
    _print_metrics(run(cfg, args.out, resume=args.resume), args.out)
    return 0


def cmd_compare(args) -> int:
    from .config import load_config
    from .runners.compare import compare

    cfg = load_config(args.config, args.set)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise FedFactoryError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
    summary = compare(cfg, [m.strip() for m in args.methods.split(",") if m.strip()], seeds, args.out)
    for name, m in summary["methods"].items():
        print(f"{name:<12} accuracy {m['accuracy']['mean']:.4f} +- {m['accuracy']['std']:.4f}  "
              f"AUROC {m['auroc']['mean']:.4f}  rounds {m['rounds']}")
    print(f"comparison: {Path(args.out) / 'comparison.md'}")
    return 0


def cmd_federate(args) -> int:
    from .config import load_config
    from .runners.flower.federation import federate

    cfg = load_config(args.config, args.set)  # fail fast, here, on a bad config or key
    if args.site_test and len(args.site_test) != len(args.data):
        raise FedFactoryError(f"--site-test takes one test folder per --data folder: {len(args.data)} sites, "
                              f"{len(args.site_test)} test folders")
    if len(args.policy) not in (0, 1, max(1, len(args.data) or args.nodes)):
        raise FedFactoryError("--policy takes one site policy for every site, or one per site")
    if args.data:
        node_configs = [{"data": str(Path(d).resolve())} for d in args.data]
        for node, test in zip(node_configs, args.site_test):
            node["test"] = str(Path(test).resolve())
    else:
        node_configs = None
        if args.nodes != cfg.partition.clients and cfg.partition.scheme != "natural":
            raise FedFactoryError(f"--nodes {args.nodes}: each simulated site is one of partition.clients = "
                                  f"{cfg.partition.clients}; pass --nodes {cfg.partition.clients} "
                                  "(or --set partition.clients=N), or give each site its own folder with --data")
    nodes = len(args.data) if args.data else args.nodes
    if not nodes:
        raise FedFactoryError("give --nodes N (simulated sites) or --data DIR [DIR ...] (one site per folder)")
    if args.policy:
        node_configs = node_configs or [{} for _ in range(nodes)]
        for i, node in enumerate(node_configs):
            node["policy"] = str(Path(args.policy[i if len(args.policy) > 1 else 0]).resolve())
    # sites with their own folders and no coordinator test set: the sites evaluate (federated)
    test = args.test or ("none" if args.data else "")
    result = federate(args.config, nodes, args.out, overrides=args.set, node_configs=node_configs,
                      timeout=args.timeout, test=test, tls=args.tls, resume=args.resume)
    m = json.loads((Path(args.out) / "results.json").read_text())["metrics"]
    print(f"Flower run {result['run_id']}: {result['status']}")
    print(f"accuracy {m['accuracy']:.4f}  balanced accuracy {m['balanced_accuracy']:.4f}  AUROC {m['auroc']:.4f}")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def cmd_certs(args) -> int:
    from .runners.flower.certs import make_consortium

    if not args.hostname and not args.ip:
        raise FedFactoryError("give the names the sites reach the SuperLink by: --hostname NAME and/or --ip ADDRESS")
    m = make_consortium(args.out, args.hostname, args.ip, args.sites, args.days)
    out, port, names = Path(args.out), 8000, m["names"]
    print(f"in {out}: a CA (ca.crt; its private key is not kept), the SuperLink's certificate for "
          f"{', '.join(names)} (server.pem, server.key), valid until {m['not_after']:%Y-%m-%d}, "
          f"and a SuperNode key pair for each of {len(m['sites'])} sites")
    print(f"\nthe coordinator keeps {m['ca']}, {m['cert']}, and, private, {m['key']} and {m['secret']}; it starts:")
    print(f"  flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key "
          f"--enable-supernode-auth --database superlink.db --isolation process --superexec-auth-secret-file "
          f"superexec.secret --host 0.0.0.0 --port {port} ...")
    print(f"  flower-superexec --runtime-api-address {names[0]}:{port} --root-certificates ca.crt "
          "--superexec-auth-secret-file superexec.secret")
    for site, f in m["sites"].items():
        print(f"  flwr supernode register {f['pub']} CONNECTION --name {site}")
    for site, f in m["sites"].items():
        print(f"\nto {site}, over a channel you trust, its folder {f['dir']} only ({site}: private; {site}.pub; "
              f"ca.crt); it starts:\n  flower-supernode --superlink {names[0]}:{port} --root-certificates ca.crt "
              f"--auth-supernode-private-key {site} --node-config \"data='...' test='...' policy='...'\"")
    return 0


def _print_metrics(results: dict, out) -> None:
    m = results["metrics"]
    print(f"accuracy {m['accuracy']:.4f}  balanced accuracy {m['balanced_accuracy']:.4f}  "
          f"AUROC {m['auroc']:.4f}  F1 {m['f1']:.4f}")
    print(f"report: {Path(out) / 'report.md'}")


def _policy(args):
    from .policy import load_policy

    return load_policy(args.policy) if args.policy else None


def cmd_site_train(args) -> int:
    from .config import load_config
    from .runners.files import site_train

    m = site_train(load_config(args.config, args.set), args.data, args.out, args.client_id, args.audit_out,
                   _policy(args), sign_key=args.sign_key)
    print(f"{m.client_id}: module of classes {m.classes} ({sum(m.counts)} images) in {args.out}, "
          f"SHA-256 {m.saved_manifest['weights_sha256'][:16]}")
    if "signature" in m.saved_manifest:
        from .signing import fingerprint

        print(f"signed with {fingerprint(m.saved_manifest['signature']['public_key'])}")
    if "audit" in m.privacy:
        print(f"privacy audit: {audit_line(m.privacy['audit'])}; the site's report (it shows training images: "
              f"keep it here) in {args.audit_out or Path(args.out).parent / (Path(args.out).name + '-audit')}")
    return 0


def audit_line(a: dict) -> str:
    parts = [f"copy rate {a['copy_rate']:.3f}"]
    if "closer_to_train" in a:
        parts.append(f"closer to train {a['closer_to_train']:.3f} (p {a['train_vs_held_out_p']:.2g})")
    if "mia_auc" in a:
        parts.append(f"membership AUC {a['mia_auc']:.3f} (p {a['mia_p']:.2g})")
    return ", ".join(parts) + (" -> passed" if a["passed"] else " -> FAILED: " + "; ".join(a["reasons"]))


def cmd_site_audit(args) -> int:
    from .config import load_config
    from .runners.files import site_audit

    a = site_audit(load_config(args.config, args.set), args.module, args.data, args.out, _policy(args))
    print(f"privacy audit of {args.module}: {audit_line(a)}")
    print(f"report (it shows training images: keep it at the site): "
          f"{args.out or Path(args.module).parent / (Path(args.module).name + '-audit')}/audit.md")
    return 0 if a["passed"] else 1


def cmd_site_expert(args) -> int:
    from .config import load_config
    from .runners.files import site_expert

    site_expert(load_config(args.config, args.set), args.data, args.modules, args.out, args.client_id, _policy(args))
    print(f"{args.client_id}: expert classifier in {args.out}")
    return 0


def cmd_site_evaluate(args) -> int:
    from .runners.files import site_evaluate

    a = site_evaluate(args.model, args.test, args.client_id, args.out, _policy(args))
    cm = a["confusion_matrix"]
    print(f"{args.client_id}: {a['images']} test images, {sum(cm[i][i] for i in range(len(cm)))} classified correctly; "
          f"the answer for the coordinator (counts only) is {args.out}")
    return 0


def cmd_server_pool(args) -> int:
    from .runners.files import server_pool

    results = server_pool(args.run_dir, args.evaluations)
    sites = results["evaluation"]["sites"]
    print(f"evaluated by {results['evaluation']['by']}: " +
          ", ".join(f"{cid} ({s['images']} images)" for cid, s in sites.items()))
    _print_metrics(results, args.run_dir)
    return 0

def cmd_server_build(args) -> int:
    from .config import load_config
    from .runners.files import server_build

    results = server_build(load_config(args.config, args.set), args.modules, args.test, args.out, args.experts)
    if results["metrics"]:
        _print_metrics(results, args.out)
    else:
        print(f"classifier: {Path(args.out) / 'model.safetensors'}; no test set here, so each site evaluates it: "
              f"fedfactory site evaluate {Path(args.out) / 'model.safetensors'} --test DIR --client-id ID --out "
              f"ANSWER.json, then fedfactory server pool {args.out} --evaluations ANSWER.json ...")
    return 0


def cmd_unlearn(args) -> int:
    from .runners.unlearn import unlearn

    results = unlearn(args.run_dir, args.client, out=args.out, reason=args.reason, orphaned=args.orphaned)
    u, m = results["unlearning"], results["metrics"]
    if u["orphaned_classes"]:
        names = results["dataset"]["class_names"]
        print(f"classes that lost their only module (never predicted now): {', '.join(names[c] for c in u['orphaned_classes'])}")
    if m:
        print(f"accuracy {u['metrics_before']['accuracy']:.4f} -> {m['accuracy']:.4f}")
    else:
        print("the sites evaluate the rebuilt classifier: fedfactory site evaluate, then fedfactory server pool")
    print(f"report: {Path(u['run_dir']) / 'report.md'}")
    return 0


def cmd_verify(args) -> int:
    from .registry import read_registry, verify, verify_audit, verify_signatures

    problems = verify(args.run_dir)
    for p in problems:
        print(f"MISMATCH {p}")
    n = len(read_registry(args.run_dir)["modules"])
    print(f"{n - len(problems)} of {n} modules verified" + ("" if not problems else f", {len(problems)} failed"))
    failed = bool(problems)
    for check in (verify_signatures, verify_audit):  # the modules' signatures (roster keys), the log's chain
        problems, summary = check(args.run_dir)
        for p in problems:
            print(f"MISMATCH {p}")
        print(summary)
        failed = failed or bool(problems)
    return 1 if failed else 0


def cmd_predict(args) -> int:
    from .classify.model import load_classifier_file
    from .predict import predict_to_csv

    model = load_classifier_file(args.classifier)
    s = predict_to_csv(model, args.images, args.out, args.device, args.bf16)
    print(f"{s['images']} images: a class and {model.num_classes} probabilities each in {args.out}")
    if s["labelled"]:
        print(f"accuracy {s['accuracy']:.4f} ({s['correct']} of {s['images']} images as labelled)")
    return 0


def cmd_export(args) -> int:
    from .classify.model import load_classifier_file
    from .export import check_onnx, to_onnx
    from .utils import atomic_write_bytes

    model = load_classifier_file(args.classifier)
    blob = to_onnx(model)
    diff = check_onnx(model, blob)
    atomic_write_bytes(args.out, blob)
    print(f"ONNX model in {args.out}: images uint8 N x {' x '.join(map(str, model.image_shape))} (resize beforehand) "
          f"-> probabilities over {', '.join(model.class_names)}; onnxruntime matches torch within {diff:.1g}")
    return 0


def _set_option(s) -> None:
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")


def _policy_option(s) -> None:
    s.add_argument("--policy", default="", metavar="TOML", help="this site's policy (site-policy.toml): what a "
                   "coordinator may ask of it")


def _add_pipeline_commands(sub) -> None:
    """datasets, partition, run and compare: a simulated federation on a public data set."""
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
    _set_option(s)
    s.add_argument("--out", required=True, help="the run folder")
    s.add_argument("--resume", action="store_true", help="continue a run: reuse its verified modules")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("compare", help="the factory against centralized, local-only and weight-averaging baselines")
    s.add_argument("config")
    s.add_argument("--methods", default="factory,centralized,local-only,fedavg,fedprox,scaffold,feddyn",
                   help="comma-separated: factory, centralized, centralized-same-recipe, local-only, fedavg, "
                        "fedprox, scaffold, feddyn")
    s.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 1,2,3")
    _set_option(s)
    s.add_argument("--out", required=True, help="the comparison folder")
    s.set_defaults(func=cmd_compare)


def _add_flower_commands(sub) -> None:
    """federate and certs: the federation over Flower, here or across hosts."""
    s = sub.add_parser("federate", help="run the one-shot federation over Flower: a SuperLink and N SuperNodes here")
    s.add_argument("config")
    s.add_argument("--nodes", type=int, default=0, help="simulated sites: SuperNodes holding shares of the config's data set")
    s.add_argument("--data", nargs="+", default=[], metavar="DIR",
                   help="or one SuperNode per site folder (class folders, a CSV of path,label, or an .npz)")
    s.add_argument("--test", default="", help="the coordinator's test set (folder, CSV, .npz or data set name; "
                   "default: none with --data, where the sites evaluate; else the config's data set's test split)")
    s.add_argument("--site-test", nargs="+", default=[], metavar="DIR",
                   help="with --data: each site's own test images, one per --data folder (the sites evaluate)")
    s.add_argument("--policy", nargs="+", default=[], metavar="TOML",
                   help="the sites' policies (site-policy.toml): one for every site, or one per site")
    _set_option(s)
    s.add_argument("--out", required=True, help="the run folder")
    s.add_argument("--timeout", type=float, default=7200, help="seconds the clients may take to train")
    s.add_argument("--resume", action="store_true", help="continue a run: the modules it already received and "
                   "verified are kept, and their sites are not asked to train again")
    s.add_argument("--tls", action="store_true", help="TLS on every connection (a CA made for the run), and only "
                   "SuperNodes whose keys were registered may join (Flower's SuperNode authentication)")
    s.set_defaults(func=cmd_federate)

    s = sub.add_parser("certs", help="TLS and SuperNode keys for a federation across hosts: a CA, the SuperLink's "
                       "certificate, a key pair per site, ready to copy")
    s.add_argument("--out", required=True, help="the folder to write (existing key files are never overwritten)")
    s.add_argument("--hostname", nargs="+", default=[], metavar="NAME",
                   help="the DNS names the sites reach the SuperLink by, e.g. coordinator.example.org")
    s.add_argument("--ip", nargs="+", default=[], metavar="ADDRESS", help="and/or its IP addresses")
    s.add_argument("--sites", nargs="+", default=[], metavar="ID",
                   help="the sites' client ids: one SuperNode key pair each, in OUT/sites/ID/")
    s.add_argument("--days", type=int, default=365, help="how long the certificates are valid")
    s.set_defaults(func=cmd_certs)


def _add_site_commands(sub) -> None:
    """site train, audit, expert and evaluate: what a site does with its own data."""
    site = sub.add_parser("site", help="what a site does with its own data: train and audit its module, or its expert")
    site_sub = site.add_subparsers(dest="site_command", required=True)
    s = site_sub.add_parser("train", help="train this site's generative module from its own data only")
    s.add_argument("--config", required=True)
    s.add_argument("--data", required=True, help="the site's images: class folders, a CSV of path,label, or an .npz")
    s.add_argument("--out", required=True, help="the module folder to write (its name is the client id by default)")
    s.add_argument("--client-id", default="", help="this site's client id (default: the --out folder's name)")
    s.add_argument("--audit-out", default="", help="the site's own audit report folder (default: <out>-audit)")
    _policy_option(s)
    s.add_argument("--sign-key", default="", metavar="PATH", help="sign the module with this site's private key "
                   "(OpenSSH, ECDSA P-384, e.g. its SuperNode key); the roster lists the public key")
    _set_option(s)
    s.set_defaults(func=cmd_site_train)
    s = site_sub.add_parser("audit", help="audit a module against this site's images: copies, held-out test, membership")
    s.add_argument("module", help="the module folder")
    s.add_argument("--config", required=True)
    s.add_argument("--data", required=True, help="the site's images, as given to site train")
    s.add_argument("--out", default="", help="the report folder (default: <module>-audit)")
    _policy_option(s)
    _set_option(s)
    s.set_defaults(func=cmd_site_audit)
    s = site_sub.add_parser("expert", help="local mode: this site's expert classifier from its data and the others' modules")
    s.add_argument("--config", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--modules", nargs="+", required=True, metavar="DIR", help="the other sites' module folders")
    s.add_argument("--client-id", required=True, help="this site's client id")
    s.add_argument("--out", required=True, help="the expert file to write (.safetensors)")
    _policy_option(s)
    _set_option(s)
    s.set_defaults(func=cmd_site_expert)
    s = site_sub.add_parser("evaluate", help="evaluate the federation's classifier on this site's test images; "
                            "the answer holds counts only")
    s.add_argument("model", help="the classifier file (a run's model.safetensors)")
    s.add_argument("--test", required=True, help="the site's own test images: class folders, a CSV, or an .npz")
    s.add_argument("--client-id", required=True, help="this site's client id")
    s.add_argument("--out", required=True, help="the answer to send to the coordinator (.json)")
    _policy_option(s)
    s.set_defaults(func=cmd_site_evaluate)


def _add_server_commands(sub) -> None:
    """server build and pool, unlearn and verify: what the coordinator does with the modules."""
    server = sub.add_parser("server", help="what the server does with the sites' modules: factory, classifier, report")
    server_sub = server.add_subparsers(dest="server_command", required=True)
    s = server_sub.add_parser("build", help="build the run from module folders gathered in any way")
    s.add_argument("--config", required=True)
    s.add_argument("--modules", nargs="+", required=True, metavar="DIR", help="the sites' module folders")
    s.add_argument("--test", default="", help="the coordinator's test set: class folders, a CSV, an .npz, or a "
                   "data set name (default: none; the sites evaluate: site evaluate, then server pool)")
    s.add_argument("--experts", nargs="*", default=[], metavar="FILE", help="local mode: the sites' expert files")
    s.add_argument("--out", required=True, help="the run folder")
    _set_option(s)
    s.set_defaults(func=cmd_server_build)

    s = server_sub.add_parser("pool", help="the sites' evaluations (counts) into the run's metrics and report")
    s.add_argument("run_dir")
    s.add_argument("--evaluations", nargs="+", required=True, metavar="JSON", help="the sites' site evaluate answers")
    s.set_defaults(func=cmd_server_pool)

    s = sub.add_parser("unlearn", help="forget a client exactly: rebuild the run without its module")
    s.add_argument("run_dir")
    s.add_argument("--client", required=True, help="the client id, e.g. client-3")
    s.add_argument("--out", default=None, help="the new run folder (default: RUN_DIR-without-CLIENT)")
    s.add_argument("--reason", default="", help="why, for the audit log")
    s.add_argument("--orphaned", choices=["drop", "error"], default="drop",
                   help="classes only this client held: rebuild without them (drop) or stop (error)")
    s.set_defaults(func=cmd_unlearn)

    s = sub.add_parser("verify", help="re-check every module's SHA-256 against the run's registry, their "
                       "signatures against the roster's keys, and the audit log's hash chain")
    s.add_argument("run_dir")
    s.set_defaults(func=cmd_verify)


def _add_model_commands(sub) -> None:
    """predict and export: the classifier file, used."""
    s = sub.add_parser("predict", help="the classifier's class and probabilities for every image, as a CSV")
    s.add_argument("classifier", help="a classifier file (a run's model.safetensors)")
    s.add_argument("--images", required=True, help="a folder (one subfolder per class, or images at any depth), "
                   "an image or DICOM file, a CSV of path[,label], or an .npz (its test images)")
    s.add_argument("--out", required=True, help="the CSV to write: path, predicted, p_<class> ...")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda")
    s.add_argument("--bf16", default="auto", choices=["auto", "on", "off"], help="as runtime.bf16 (auto: the run's)")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("export", help="the classifier for use outside Python (ONNX, checked against torch)")
    s.add_argument("classifier", help="a classifier file (a run's model.safetensors)")
    s.add_argument("--format", default="onnx", choices=["onnx"])
    s.add_argument("--out", required=True, help="the file to write, e.g. model.onnx")
    s.set_defaults(func=cmd_export)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedfactory", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--version", action="version", version=f"fedfactory {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_pipeline_commands, _add_flower_commands, _add_site_commands, _add_server_commands,
                _add_model_commands):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except FedFactoryError as e:
        print(f"fedfactory: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine, not the user: a full disk, a read-only or vanished folder
        where = f"{e.filename}: " if e.filename else ""
        print(f"fedfactory: error: cannot write or read {where}{e.strerror or e} (files written so far are "
              "complete; free the space or fix the folder, then rerun with --resume)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedfactory: interrupted (finished modules are kept; rerun with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
