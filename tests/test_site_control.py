"""The site in control: its policy refuses what it does not allow, the coordinator evaluates without a
single patient image (the sites send counts), and the classifier goes home to every site."""

import json
import re

import numpy as np
import pytest

from fedfactory.classify.model import FederatedClassifier
from fedfactory.cli import main
from fedfactory.config import load_config
from fedfactory.errors import FedFactoryError
from fedfactory.evaluate import check_counts, evaluate, pooled_metrics, site_counts
from fedfactory.policy import PolicyRefusal, load_policy
from helpers import EXACT, STRICT, assert_pooled_equals_union, union_metrics

# The three requests a coordinator may try, and what the refusal must name.
REQUESTS = {"classifier.mode=local": "classifier.mode", "module.budget_images=100000": "max_passes",
            "privacy.enforce=false": "privacy.enforce"}


# -- unit: the pooled evaluation, the policy, the classifier file --------------------------------------

@pytest.mark.parametrize("classes, n, sharp", [(10, 3000, 3.0), (2, 400, 5.0), (4, 200, 1.0)])
def test_pooled_counts_give_the_union_metrics(classes, n, sharp):
    rng = np.random.default_rng(classes)
    y = rng.integers(0, classes, n)
    logits = rng.normal(0, sharp / 2, (n, classes))
    logits[np.arange(n), y] += sharp
    log_proba = logits - np.logaddexp.reduce(logits, 1, keepdims=True)
    union = evaluate(y, log_proba, classes)
    sites = np.array_split(rng.permutation(n), 3)
    pooled = pooled_metrics([check_counts(site_counts(y[s], log_proba[s], classes), classes, "site")
                             for s in sites], classes)
    assert {k: pooled[k] for k in EXACT} == {k: union[k] for k in EXACT}
    assert abs(pooled["auroc"] - union["auroc"]) < 0.002


def test_counts_that_do_not_add_up_are_refused():
    y, lp = np.array([0, 1, 1]), np.log(np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]))
    counts = site_counts(y, lp, 2)
    counts["confusion_matrix"][0][0] += 1000  # a site inflating its correct answers
    with pytest.raises(FedFactoryError, match="do not add up"):
        check_counts(counts, 2, "site x")
    counts = site_counts(y, lp, 2)
    counts["positive"][1] = {"../../etc": 1}
    with pytest.raises(FedFactoryError, match="bad entry"):
        check_counts(counts, 2, "site x")


def test_the_site_policy_refuses_each_request_in_one_line_naming_key_and_bound(tmp_path):
    (tmp_path / "policy.toml").write_text(STRICT.format(keep=tmp_path / "kept"))
    policy = load_policy(tmp_path / "policy.toml")
    policy.check(load_config("configs/fashion-silos.toml"), training_images=6000)  # the main job: 56k / 6k passes
    load_policy("configs/policies/site-policy.toml").check(load_config("configs/br35h-silos.toml", ["classifier.mode=server"]), 1080)
    for request, named in REQUESTS.items():
        with pytest.raises(PolicyRefusal) as e:
            policy.check(load_config("configs/fashion-silos.toml", [request]), training_images=5400)
        assert named in str(e.value) and "\n" not in str(e.value)
    looser = load_config("configs/fashion-silos.toml", ["privacy.max_copy_rate=0.5"])
    with pytest.raises(PolicyRefusal, match=r"privacy.max_copy_rate = 0.5.*at most 0.05"):
        policy.check(looser, training_images=5400)
    dp = load_policy_text(tmp_path, "require_dp = true\nmax_epsilon = 5.0\n")
    with pytest.raises(PolicyRefusal, match="require_dp"):
        dp.check(load_config("configs/fashion-silos.toml"), 5400)
    with pytest.raises(PolicyRefusal, match=r"epsilon .*over max_epsilon = 5"):
        dp.check(load_config("configs/fashion-silos.toml", ["privacy.epsilon=10"]), 5400)
    keys = load_policy_text(tmp_path, 'may_set = ["factory.*"]\n')
    with pytest.raises(PolicyRefusal, match=r"seed = 3: the coordinator may set only factory\.\*"):
        keys.check(load_config("configs/fashion-silos.toml", ["seed=3"]))


def load_policy_text(folder, text):
    path = folder / "p.toml"
    path.write_text(text)
    return load_policy(path)


@pytest.mark.parametrize("text, why", [("max_pases = 3\n", "unknown key 'max_pases'"),
                                        ("max_passes = -1\n", "must be >= 0"),
                                        ("[runtime]\nthreads = 'many'\n", "runtime.threads"),
                                        ("allow_expert = 1\n", "allow_expert must be bool")])
def test_a_bad_policy_file_is_one_clear_error(tmp_path, text, why):
    with pytest.raises(FedFactoryError, match=re.escape(why)):
        load_policy_text(tmp_path, text)


def test_a_classifier_file_describes_itself_and_refuses_a_hostile_description():
    from fedfactory.classify import build_classifier

    nets = {"hospital-a": build_classifier(1, 3, "cpu", 4).eval(), "hospital-b": build_classifier(1, 3, "cpu", 4).eval()}
    model = FederatedClassifier(nets, ["a", "b", "c"], (8, 8, 1), "local", [2], "cpu", 4)
    again = FederatedClassifier.from_bytes(model.to_bytes())
    x = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    assert np.array_equal(again.predict_proba(x), model.predict_proba(x)) and not again.predict_proba(x)[:, 2].any()
    blob = model.to_bytes()
    hostile = blob.replace(b'\\"width\\": 4', b'\\"width\\": 99999')
    assert hostile != blob
    with pytest.raises(FedFactoryError, match="width"):
        FederatedClassifier.from_bytes(hostile)
    with pytest.raises(FedFactoryError, match="not a fedfactory classifier"):
        FederatedClassifier.from_bytes(b"\x00" * 64)


# -- end to end: two hospitals as folders, by files and over Flower -------------------------------------

@pytest.mark.slow
def test_files_route_refuses_by_policy_and_evaluates_at_the_sites(hospitals, tmp_path, capsys):
    root, config, test = hospitals
    policy = tmp_path / "policy.toml"
    policy.write_text(STRICT.format(keep=tmp_path / "kept"))
    site = ["--config", str(config), "--data", str(root / "sites/client-0"), "--policy", str(policy)]
    for request, named in REQUESTS.items():
        rc = main(["site", "train", *site, "--client-id", "client-0", "--out", str(tmp_path / "refused"), "--set", request])
        err = capsys.readouterr().err
        assert rc == 2 and named in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "refused").exists() and not (tmp_path / "refused-audit").exists()
    assert main(["site", "expert", *site, "--modules", str(root), "--client-id", "client-0",
                 "--out", str(tmp_path / "expert.st")]) == 2
    assert "allow_expert" in capsys.readouterr().err and not (tmp_path / "expert.st").exists()
    log = [json.loads(l) for l in (tmp_path / "kept/client-0-log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in log] == ["refused"] * 4

    for cid in ("client-0", "client-1"):
        assert main(["site", "train", "--config", str(config), "--data", str(root / "sites" / cid), "--policy",
                     str(policy), "--out", str(tmp_path / "outbox" / cid)]) == 0
    manifest = json.loads((tmp_path / "outbox/client-0/manifest.json").read_text())
    assert manifest["site"]["policy"]["max_passes"] == 10 and manifest["site"]["config"]["privacy"]["enforce"]
    assert "keep_dir" not in manifest["site"]["policy"]  # the site's paths stay at the site
    assert json.loads((tmp_path / "kept/client-0-log.jsonl").read_text().splitlines()[-1])["event"] == "accepted"

    run = tmp_path / "run"
    assert main(["server", "build", "--config", str(config), "--modules", str(tmp_path / "outbox/client-0"),
                 str(tmp_path / "outbox/client-1"), "--out", str(run)]) == 0
    assert json.loads((run / "results.json").read_text())["metrics"] is None
    assert "Metrics pending" in (run / "report.md").read_text()
    for cid in ("client-0", "client-1"):
        assert main(["site", "evaluate", str(run / "model.safetensors"), "--test", str(root / "tests" / cid),
                     "--client-id", cid, "--out", str(tmp_path / f"{cid}.json"), "--policy", str(policy)]) == 0
    answer = (tmp_path / "client-0.json").read_text()
    assert "images" in answer and "pixels" not in answer  # counts, not images
    assert main(["server", "pool", str(run), "--evaluations", str(tmp_path / "client-0.json"),
                 str(tmp_path / "client-1.json")]) == 0
    results = json.loads((run / "results.json").read_text())
    assert_pooled_equals_union(results, union_metrics(run / "model.safetensors", test))
    report = (run / "report.md").read_text()
    assert "Evaluated by the sites" in report and "| client-1 |" in report

    # an answer about another classifier, or a forged one, changes nothing
    forged = json.loads(answer)
    forged["model_sha256"] = "0" * 64
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    assert main(["server", "pool", str(run), "--evaluations", str(tmp_path / "forged.json")]) == 2
    assert json.loads((run / "results.json").read_text())["metrics"] == results["metrics"]


@pytest.mark.slow
def test_flower_sites_refuse_by_policy_evaluate_and_keep_the_model(hospitals, tmp_path):
    from fedfactory.runners.flower.federation import LocalFederation, flower_tools_missing, run_config

    if flower_tools_missing():
        pytest.skip("Flower CLI not installed")
    root, config, test = hospitals
    nodes = []
    for cid in ("client-0", "client-1"):
        policy = tmp_path / f"{cid}-policy.toml"
        policy.write_text(STRICT.format(keep=tmp_path / "kept" / cid))
        nodes.append({"data": str(root / "sites" / cid), "test": str(root / "tests" / cid), "policy": str(policy)})
    with LocalFederation(2, nodes) as fed:
        for i, (request, named) in enumerate(REQUESTS.items()):
            out = tmp_path / f"refused-{i}"
            result = fed.run(run_config(config, out, [request], test="none", num_nodes=2, timeout=120))
            assert result["status"] == "finished:failed"
            refused = re.findall(rf"node (\d+): ClientApp failed: [^;\n]*site policy refuses [^;\n]*{re.escape(named)}",
                                 result["log"])
            assert len(set(refused)) == 2, result["log"][-3000:]  # each site, by node id
            assert not (out / "modules").exists() or not any((out / "modules").iterdir())  # nothing left the sites
    # the same sites, through the command a consortium would type: no coordinator test set at all
    run = tmp_path / "run"
    assert main(["federate", str(config), "--data", *(n["data"] for n in nodes), "--site-test",
                 *(n["test"] for n in nodes), "--policy", *(n["policy"] for n in nodes), "--out", str(run),
                 "--timeout", "300"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert_pooled_equals_union(results, union_metrics(run / "model.safetensors", test))
    for cid in ("client-0", "client-1"):  # every site holds the final classifier, its evaluation and the report
        home = tmp_path / "kept" / cid / f"{cid}-result"
        assert (home / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()
        assert json.loads((home / "metrics.json").read_text()) == results["metrics"]
        assert (home / "report.md").read_text() == (run / "report.md").read_text()
        events = [json.loads(l)["event"] for l in (tmp_path / "kept" / cid / f"{cid}-log.jsonl").read_text().splitlines()]
        assert events == ["refused"] * 3 + ["accepted"] * 3  # module, evaluate, result
