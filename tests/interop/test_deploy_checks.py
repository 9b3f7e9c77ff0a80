"""The deployment checks (`make check-deploy`, scripts/check_deploy.py) pass on the
repository and fail on copies broken on purpose: a misspelt or mistyped field in a
Kubernetes manifest, an API version no Kubernetes serves, manifests that disagree
with each other, a deployment missing a piece or wired wrong (a required kind, the
headless Service, the daemon's nodeSelector, the device socket's shared hostPath), a
bad custom resource (ServiceMonitor, checked against the CRD schema kept in
deploy/schemas/crds), a bad compose file (compose-spec schema, or no device, fewer
than two gateways, no socket volume they all share), a Dockerfile hadolint rejects
or that runs make before installing it, a dashboard without a required panel, and
a Package.swift whose exact pins do not cover the resolved graph.

The last test runs what the Kubernetes manifests configure through the real
server: the gateway ConfigMap's main configuration passes `accelgate check-config`,
and the tenants file the gateway pod's init container writes from the tenants
ConfigMap and the key-hash Secret is one a gateway serves with.
"""
import os
import shutil
import subprocess
import sys

import grpc
import pytest
import yaml

from agtest import pb
from conftest import ROOT, server_binary

CHECKER = os.path.join(ROOT, "scripts", "check_deploy.py")
STAGES = ("dockerfile", "k8s", "compose", "dashboard", "pins", "runtime-libs")


def run_checker(root=ROOT, only=None):
    argv = [sys.executable, CHECKER, "--root", str(root)]
    if only:
        argv += ["--only", only]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout + p.stderr


@pytest.fixture
def tree(tmp_path):
    """A copy of deploy/ and README.md (the dashboard check reads its metrics list)."""
    dst = tmp_path / "tree"
    shutil.copytree(os.path.join(ROOT, "deploy"), dst / "deploy")
    shutil.copy(os.path.join(ROOT, "README.md"), dst / "README.md")
    # The pins check compares Package.swift with the graph SwiftPM resolved for it.
    shutil.copy(os.path.join(ROOT, "Package.swift"), dst / "Package.swift")
    if not os.path.exists(os.path.join(ROOT, "Package.resolved")):
        subprocess.run(["swift", "package", "resolve"], cwd=ROOT, check=True, capture_output=True, timeout=600)
    shutil.copy(os.path.join(ROOT, "Package.resolved"), dst / "Package.resolved")
    # The runtime-libs check reads what the built server links.
    (dst / ".build" / "debug").mkdir(parents=True)
    os.symlink(server_binary(), dst / ".build" / "debug" / "accelgate")
    return dst


def edit(path, old, new):
    text = path.read_text()
    assert text.count(old) == 1, f"test setup: {old!r} occurs {text.count(old)} times in {path}"
    path.write_text(text.replace(old, new))


def expect_failure(root, stage, *needles):
    rc, out = run_checker(root, stage)
    assert rc == 1, f"check-deploy --only {stage} passed a broken file (exit {rc}):\n{out}"
    assert f"check-deploy: {stage}: " in out and f"check-deploy: {stage}: ok" not in out, out
    for n in needles:
        assert n in out, f"the failure does not say {n!r}:\n{out}"
    return out


def test_the_repository_passes_every_check():
    rc, out = run_checker()
    assert rc == 0, f"make check-deploy fails on the repository:\n{out}"
    for stage in STAGES:
        assert f"check-deploy: {stage}: ok" in out, out


def test_a_runtime_image_without_the_c_core_library_fails(tree):
    """Issue 18: the server links gRPC's C core, so the runtime stage must install libgrpc29
    (its own dependencies, such as libabsl, come with it)."""
    edit(tree / "deploy" / "Dockerfile", " libgrpc29", "")
    expect_failure(tree, "runtime-libs", "libgrpc.so.29", "from libgrpc29, which the runtime stage does not install")


def test_an_unbroken_copy_passes(tree):
    """The copies below fail because of their edits, not because they are copies."""
    rc, out = run_checker(tree)
    assert rc == 0, out


@pytest.mark.parametrize("path,old,new,says", [
    # a misspelt field: strict validation refuses unknown properties
    ("gateway-deployment.yaml", "  revisionHistoryLimit: 5", "  revisionHistoryLimt: 5",
     ["deploy/k8s/gateway-deployment.yaml", "Deployment/accelgate-gateway", "'revisionHistoryLimt' was unexpected"]),
    # a wrong type
    ("gateway-service.yaml", "      port: 50051", '      port: "50051"',
     ["deploy/k8s/gateway-service.yaml", "Service/accelgate", "is not of type 'integer'"]),
    # an API version no Kubernetes serves: kubernetes-validate alone only warns
    ("pdb.yaml", "apiVersion: policy/v1", "apiVersion: policy/v2",
     ["deploy/k8s/pdb.yaml", "no schema for PodDisruptionBudget policy/v2"]),
    # valid alone, but the autoscaler asks for a metric the adapter rule does not serve
    ("hpa.yaml", "name: accelgate_queue_wait_p99_seconds", "name: accelgate_queue_wait_p95_seconds",
     ["deploy/k8s/hpa.yaml", "'accelgate_queue_wait_p95_seconds' is not served"]),
    # valid alone, but the pod may run as root
    ("device-daemonset.yaml", "        runAsNonRoot: true\n", "        runAsNonRoot: false\n",
     ["deploy/k8s/device-daemonset.yaml", "runAsNonRoot: true"]),
])
def test_a_broken_manifest_fails(tree, path, old, new, says):
    edit(tree / "deploy" / "k8s" / path, old, new)
    expect_failure(tree, "k8s", *says)


@pytest.mark.parametrize("manifest,says", [
    ("pdb.yaml", "no PodDisruptionBudget"),
    ("hpa.yaml", "no HorizontalPodAutoscaler"),
    ("networkpolicy.yaml", "no NetworkPolicy"),
    ("device-daemonset.yaml", "no DaemonSet"),
])
def test_a_deployment_without_a_required_kind_fails(tree, manifest, says):
    """Each kind docs/DEPLOY.md promises must be there, even when kustomization.yaml
    and every remaining manifest agree that it is gone."""
    (tree / "deploy" / "k8s" / manifest).unlink()
    edit(tree / "deploy" / "k8s" / "kustomization.yaml", f"  - {manifest}\n", "")
    expect_failure(tree, "k8s", f"deploy/k8s: {says} (")


@pytest.mark.parametrize("path,old,new,says", [
    # a ClusterIP Service: every connection of a client would stay on one gateway
    ("gateway-service.yaml", "  clusterIP: None\n", "",
     ["deploy/k8s/gateway-service.yaml", "Service/accelgate", "must be headless (clusterIP: None"]),
    # a device daemon on every node, accelerator or not
    ("device-daemonset.yaml", '      nodeSelector:\n        accelgate.io/accelerator: "true"\n', "",
     ["deploy/k8s/device-daemonset.yaml", "DaemonSet/accelgate-device", "needs a nodeSelector"]),
    # gateways may land on nodes the daemon does not run on
    ("gateway-deployment.yaml", '                    values: ["true"]', '                    values: ["yes"]',
     ["Deployment/accelgate-gateway: affinity.nodeAffinity", "does not require accelgate.io/accelerator=true"]),
    # the daemon's socket in a pod-private directory: no gateway can reach it
    ("device-daemonset.yaml",
     "        - name: socket-dir\n          hostPath:\n            path: /run/accelgate\n            type: DirectoryOrCreate\n",
     "        - name: socket-dir\n          emptyDir: {}\n",
     ["DaemonSet/accelgate-device: containers[device]", "must be a hostPath volume", "not emptyDir"]),
    # the gateways mount another host directory than the daemon's
    ("gateway-deployment.yaml", "            path: /run/accelgate\n", "            path: /run/accelgate-gateway\n",
     ["Deployment/accelgate-gateway: containers[gateway]", "/run/accelgate-gateway/dev0.sock",
      "must share the socket's hostPath directory"]),
    # the gateways' configuration names a socket the daemon does not create
    ("gateway-config.yaml", "address: unix:///run/accelgate/dev0.sock", "address: unix:///run/accelgate/dev1.sock",
     ["deploy/k8s/gateway-deployment.yaml", "its device socket /run/accelgate/dev1.sock",
      "must share the socket's hostPath directory"]),
])
def test_a_deployment_wired_wrong_fails(tree, path, old, new, says):
    edit(tree / "deploy" / "k8s" / path, old, new)
    expect_failure(tree, "k8s", *says)


@pytest.mark.parametrize("old,new,says", [
    ("      interval: 15s", "      intervall: 15s", ["spec.endpoints[0]", "'intervall' was unexpected", "[CRD "]),
    ("      scheme: http", "      scheme: ftp", ["spec.endpoints[0].scheme", "'ftp' is not one of"]),
    ("      interval: 15s", "      interval: 15", ["spec.endpoints[0].interval", "is not of type 'string'"]),
    ("  selector:\n    matchLabels:\n      app.kubernetes.io/name: accelgate\n      app.kubernetes.io/component: gateway\n",
     "  selector:\n    matchLabels:\n      app.kubernetes.io/name: accelgate\n      app.kubernetes.io/component: gateways\n",
     ["ServiceMonitor/accelgate", "matches no Service"]),
])
def test_a_broken_service_monitor_fails_against_its_crd(tree, old, new, says):
    edit(tree / "deploy" / "k8s" / "servicemonitor.yaml", old, new)
    expect_failure(tree, "k8s", "deploy/k8s/servicemonitor.yaml", *says)


def test_a_custom_resource_without_its_crd_fails(tree):
    shutil.rmtree(tree / "deploy" / "schemas" / "crds")
    expect_failure(tree, "k8s", "deploy/k8s/servicemonitor.yaml", "no schema for ServiceMonitor monitoring.coreos.com/v1")


@pytest.mark.parametrize("old,new,says", [
    ("    network_mode: none", "    network_mod: none", ["services.device", "'network_mod'", "[compose-spec schema]"]),
    ("    shm_size: \"520m\"", "    shm_size: [520]", ["services.device.shm_size", "[compose-spec schema]"]),
    ("../grafana/accelgate.json:", "../grafana/missing.json:", ["services.grafana.volumes", "does not exist"]),
])
def test_a_broken_compose_file_fails(tree, old, new, says):
    edit(tree / "deploy" / "compose" / "compose.yaml", old, new)
    expect_failure(tree, "compose", "deploy/compose/compose.yaml", *says)


GATEWAY_B = """  gateway-b:
    <<: *gateway
    command: ["serve", "--device", "unix:///run/accelgate/dev0.sock", "--queue-weight", "1"]
    ports:
      - "127.0.0.1:50052:50051"
"""


@pytest.mark.parametrize("old,new,says", [
    # no device daemon: the first service runs a gateway instead
    ('    command: ["device", "--socket"', '    command: ["serve", "--socket"', ["services: no device service"]),
    # one gateway: nothing shares the device
    (GATEWAY_B, "", ["services: two or more gateway services", "found 1: ['gateway-a']"]),
    # the gateways look for the socket in a host directory, not in the daemon's volume
    ("    - accelgate-run:/run/accelgate:ro", "    - /run/accelgate:/run/accelgate:ro",
     ["services.gateway-a.volumes: its device socket /run/accelgate/dev0.sock is in bind '/run/accelgate'",
      "services.gateway-b.volumes", "must mount the same volume"]),
    # the socket volume is not declared, so each service would get a volume of its own
    ("  accelgate-run: {}\n", "", ["services.device.volumes: the device daemon: volume 'accelgate-run' is not declared"]),
    # the daemon's socket directory is not a volume at all
    ("      - accelgate-run:/run/accelgate\n", "      - /run/accelgate\n",
     ["services.device.volumes: the device daemon", "not an anonymous volume"]),
])
def test_a_compose_file_without_a_shared_device_fails(tree, old, new, says):
    edit(tree / "deploy" / "compose" / "compose.yaml", old, new)
    expect_failure(tree, "compose", "deploy/compose/compose.yaml", *says)


@pytest.mark.parametrize("old,new,says", [
    ("FROM swift:${SWIFT_VERSION}-bookworm-slim", "FROM swift:latest", ["DL3007"]),
    ("USER 10001:10001", "USER root", ["DL3002", "numeric non-root user"]),
    ("(hadolint DL3008).\n# hadolint ignore=DL3008\n", "(hadolint DL3008).\n", ["DL3008"]),
])
def test_a_dockerfile_hadolint_rejects_fails(tree, old, new, says):
    edit(tree / "deploy" / "Dockerfile", old, new)
    expect_failure(tree, "dockerfile", "deploy/Dockerfile", *says)


MAKE_DEPS = """RUN apt-get update \\
    && apt-get install -y --no-install-recommends make \\
    && make deps \\
    && rm -rf /var/lib/apt/lists/*
"""


@pytest.mark.parametrize("new,runtime_make,says", [
    # the Dockerfile as it was: the swift image has no make
    ("RUN make deps\n", False,
     ["line 23: RUN", "stage 'build' runs make before make is apt-get installed", "`make deps`"]),
    # installed, but after its first use
    ("RUN make deps \\\n    && apt-get update && apt-get install -y --no-install-recommends make\n", False,
     ["line 23: RUN", "stage 'build' runs make before make is apt-get installed", "`make deps`"]),
    # installed in the runtime stage, not in the build stage that runs it
    ("RUN make deps\n", True, ["line 23: RUN", "stage 'build' runs make before make is apt-get installed"]),
])
def test_a_dockerfile_that_runs_make_before_installing_it_fails(tree, new, runtime_make, says):
    dockerfile = tree / "deploy" / "Dockerfile"
    edit(dockerfile, MAKE_DEPS, new)
    if runtime_make:
        edit(dockerfile, "       libisal2 libdeflate0", "       make libisal2 libdeflate0")
    out = expect_failure(tree, "dockerfile", "deploy/Dockerfile", *says)
    # hadolint has nothing against these Dockerfiles: the make rule alone fails them.
    assert "deploy/Dockerfile: hadolint:" not in out, out


def test_the_dockerfile_installs_make_before_it_runs_make(tree):
    """The real Dockerfile passes the rule: make is installed, then `make deps`, and the
    build stage's later `make build-release` finds it."""
    text = (tree / "deploy" / "Dockerfile").read_text()
    assert MAKE_DEPS in text and text.index(MAKE_DEPS) < text.index("\n    make build-release"), text
    rc, out = run_checker(ROOT, "dockerfile")
    assert rc == 0 and "check-deploy: dockerfile: ok" in out, out


@pytest.mark.parametrize("old,new,says", [
    # the rejections panel now shows successes
    ('outcome=~\\"rejected_.*\\"', 'outcome=\\"ok\\"', ["no panel shows rejections"]),
    # a metric the gateway does not export
    ("rate(accelgate_jobs_retried_total", "rate(accelgate_jobs_retryed_total",
     ["accelgate_jobs_retryed_total, which README.md's metrics list does not name"]),
    # a query that is not PromQL
    ("sum by (le, tenant) (rate(accelgate_queue_wait_seconds_bucket", "sum by (le tenant) (rate(accelgate_queue_wait_seconds_bucket",
     ["PromQL", "could not parse expression"]),
])
def test_a_broken_dashboard_fails(tree, old, new, says):
    if "PromQL" in says and not shutil.which("promtool"):
        pytest.skip("promtool is not installed (scripts/install-deps.sh test installs it)")
    edit(tree / "deploy" / "grafana" / "accelgate.json", old, new)
    expect_failure(tree, "dashboard", "deploy/grafana/accelgate.json", *says)


def test_the_k8s_configuration_and_tenants_are_what_a_gateway_accepts(tmp_path, start_server):
    k8s = os.path.join(ROOT, "deploy", "k8s")
    # Main configuration (ConfigMap accelgate-config).
    cm = yaml.safe_load(open(os.path.join(k8s, "gateway-config.yaml")))
    config = tmp_path / "accelgate.yaml"
    config.write_text(cm["data"]["accelgate.yaml"])
    p = subprocess.run([server_binary(), "check-config", str(config)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"accelgate check-config on ConfigMap accelgate-config:\n{p.stdout}{p.stderr}"
    # The init container's script, run on the ConfigMap's and the Secret's files.
    tenants = yaml.safe_load(open(os.path.join(k8s, "tenants-configmap.yaml")))["data"]
    hashes = yaml.safe_load(open(os.path.join(k8s, "key-hashes-secret.yaml")))["stringData"]
    assert set(hashes) == {name[:-5] for name in tenants}, "Secret and ConfigMap name different tenants"
    etc, out = tmp_path / "etc", tmp_path / "out"
    for sub, files in (("tenants", tenants), ("key-hashes", hashes)):
        (etc / sub).mkdir(parents=True)
        for name, text in files.items():
            (etc / sub / name).write_text(text)
    out.mkdir()
    deployment = yaml.safe_load(open(os.path.join(k8s, "gateway-deployment.yaml")))
    init = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["initContainers"]}["tenants"]
    script = init["command"][-1].replace("/etc/accelgate", str(etc)).replace("/run/accelgate-tenants", str(out))
    p = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, f"the tenants init script failed:\n{p.stderr}"
    written = yaml.safe_load((out / "tenants.yaml").read_text())
    assert [t["id"] for t in written["tenants"]] == sorted(name[:-5] for name in tenants), written
    # A gateway serves with it and knows its tenants: a call without a key is refused.
    srv = start_server("--tenants", str(out / "tenants.yaml"), label="k8s-tenants")
    with pytest.raises(grpc.RpcError) as e:
        srv.stub().DescribeDevice(pb.DescribeDeviceRequest(), timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value


@pytest.mark.parametrize("old,new,says", [
    # an indirect dependency left to float: the image build would take its newest version
    ('    .package(url: "https://github.com/apple/swift-collections.git", exact: "1.6.0"),\n', "",
     ["swift-collections 1.6.0 is in the resolved graph but not pinned with exact:"]),
    # a range instead of a pin
    ('swift-log.git", exact: "1.16.2"', 'swift-log.git", from: "1.16.2"', ["swift-log: pin it with exact: (found from)"]),
    # a pin out of step with what CI resolved
    ('Yams.git", exact: "6.2.2"', 'Yams.git", exact: "6.2.1"', ["yams is pinned at 6.2.1 but resolves to 6.2.2"]),
    # a pin for a package nothing needs any more
    ('    .package(url: "https://github.com/grpc/grpc-swift-2.git", exact: "2.4.3"),\n',
     '    .package(url: "https://github.com/grpc/grpc-swift-2.git", exact: "2.4.3"),\n'
     '    .package(url: "https://github.com/apple/swift-markdown.git", exact: "0.4.0"),\n',
     ["swift-markdown 0.4.0 is pinned but not in the resolved graph"]),
])
def test_package_swift_pins_out_of_step_fail(tree, old, new, says):
    edit(tree / "Package.swift", old, new)
    expect_failure(tree, "pins", "Package.swift", *says)
