"""The Ray Serve application on a local Ray instance, deployed from ``deploy/ray/serve.yaml``.

The one place that starts it for the tests and the benchmarks. The config file is read, given
fixed replica counts (autoscaling makes counts depend on timing) and a small CPU share, and
applied the way ``serve run deploy/ray/serve.yaml`` applies it: Serve's schema validates it, the
controller builds ``service.rayserve.app:build_app`` with its ``args``.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import yaml

from bench.live_server import REPO, free_port

SERVE_CONFIG = REPO / "deploy" / "ray" / "serve.yaml"
APP = "segment"
READY_TIMEOUT_S = 240.0


def load_serve_config(path: Path = SERVE_CONFIG) -> dict[str, Any]:
    """The Serve config file as a dict."""
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    return config


def local_config(
    models: list[str],
    *,
    ingress_replicas: int = 2,
    model_replicas: int = 2,
    args: Mapping[str, Any] | None = None,
    ingress: Mapping[str, Any] | None = None,
    model: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    port: int | None = None,
) -> dict[str, Any]:
    """``deploy/ray/serve.yaml`` for a small local run: only ``models``, fixed replica counts,
    a tenth of a CPU per replica and no GPU (Ray only counts these; the processes share the
    machine's cores), loopback on ``port``. ``args``/``ingress``/``model``/``env`` override
    the application's args, the ingress's and each model deployment's options, and env vars."""
    config = copy.deepcopy(load_serve_config())
    config["http_options"].update(host="127.0.0.1", port=port or free_port())
    (app,) = config["applications"]
    app["args"] = {**app["args"], "models": models, **(args or {})}
    app["runtime_env"]["env_vars"].update(env or {})
    by_name = {d["name"]: d for d in app["deployments"]}
    deployments = [by_name["SegmentIngress"]]
    for name in models:
        deployments.append(by_name.get(f"model-{name}", {"name": f"model-{name}"}))
    for d in deployments:
        is_ingress = d["name"] == "SegmentIngress"
        d["autoscaling_config"] = fixed_replicas(ingress_replicas if is_ingress else model_replicas)
        d["ray_actor_options"] = {"num_cpus": 0.1, "num_gpus": 0}
        d.update((ingress if is_ingress else model) or {})
    app["deployments"] = deployments
    return config


def fixed_replicas(count: int) -> dict[str, int]:
    """An autoscaling range of one value: ``count`` replicas, always.

    Rather than ``num_replicas``: Serve hashes whether a deployment has an autoscaling config
    into the application's code version, so switching one deployment between the two forms
    (the autoscaling test does, and back) would restart every replica of the application;
    changing the range only updates the deployment in place.
    """
    return {"min_replicas": count, "max_replicas": count, "initial_replicas": count}


def replica_count(deployment: Mapping[str, Any]) -> int | None:
    """The replicas a deployment's options fix, or None where the autoscaler decides."""
    scaling = deployment.get("autoscaling_config")
    if scaling is None:
        return cast(int | None, deployment.get("num_replicas"))
    low, high = scaling.get("min_replicas"), scaling.get("max_replicas")
    return cast(int, low) if low == high else None


@dataclass
class ServeApp:
    """A running Serve application: its HTTP address and the config it was deployed with."""

    url: str
    config: dict[str, Any]

    def redeploy(
        self,
        config: dict[str, Any],
        ready_timeout: float = READY_TIMEOUT_S,
        expect_ready: int = 200,
    ) -> None:
        """Apply another config to the running instance (as ``serve deploy`` does) and wait
        until the application is running it and ``/readyz`` answers ``expect_ready``."""
        from ray.serve.context import _get_global_client
        from ray.serve.schema import ServeDeploySchema

        client = _get_global_client()
        assert client is not None, "Serve is not running"
        client.deploy_apps(ServeDeploySchema.model_validate(config))
        self.config = config
        time.sleep(1.0)  # the controller takes the new config up
        deadline = time.monotonic() + ready_timeout
        # Until the replicas are those of this config: old ones answer meanwhile.
        wanted = {d["name"]: replica_count(d) for d in config["applications"][0]["deployments"]}
        while not self._settled(wanted):
            if time.monotonic() > deadline:
                raise AssertionError(f"the new config did not settle in {ready_timeout:.0f} s")
            time.sleep(0.5)
        _wait_ready(self.url, ready_timeout, expect_ready)

    def _settled(self, wanted: dict[str, int | None]) -> bool:
        """Every deployment HEALTHY with only RUNNING replicas, as many as ``wanted``."""
        from ray import serve

        app = serve.status().applications.get(APP)
        if app is None or app.status != "RUNNING":
            return False
        for name, count in wanted.items():
            status = app.deployments.get(name)
            if status is None or status.status != "HEALTHY":
                return False
            states = dict(status.replica_states)
            running = sum(n for state, n in states.items() if state == "RUNNING")
            if sum(states.values()) != running or (count is not None and running != count):
                return False
        return True

    def run_application(self, app: Any, ready_timeout: float = READY_TIMEOUT_S) -> None:
        """Deploy an application built in Python (``serve.run``) in place of the current one."""
        from ray import serve

        serve.run(app, name=APP, route_prefix="/", blocking=False)
        _wait_ready(self.url, ready_timeout)

    def wait_replicas(self, deployment: str, count: int, timeout: float = 120.0) -> None:
        """Wait until ``deployment`` has exactly ``count`` RUNNING replicas."""
        deadline = time.monotonic() + timeout
        while self.running_replicas(deployment) != count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{deployment} never reached {count} running replicas")
            time.sleep(0.5)

    def replica_actors(self, deployment: str) -> list[str]:
        """Names of the Ray actors running ``deployment``'s replicas."""
        import ray

        return sorted(
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{APP}#{deployment}#")
        )

    def running_replicas(self, deployment: str) -> int:
        """Replicas Serve reports RUNNING for ``deployment``."""
        from ray import serve

        status = serve.status().applications[APP].deployments[deployment]
        return sum(n for state, n in status.replica_states.items() if state == "RUNNING")


def _wait_ready(url: str, timeout: float, expect: int = 200) -> None:
    """Until the application is RUNNING and its ``/readyz`` answers ``expect``, not "loading"
    (after a redeploy, replicas of the previous config may answer for a while)."""
    from ray import serve

    deadline = time.monotonic() + timeout
    while True:
        app = serve.status().applications.get(APP)
        if app is not None and app.status == "DEPLOY_FAILED":
            raise AssertionError(f"the Serve application failed to deploy: {app.message}")
        if app is not None and app.status == "RUNNING":
            try:
                r = httpx.get(f"{url}/readyz", timeout=5)
                if r.status_code == expect and r.json().get("status") != "loading":
                    return
            except httpx.TransportError:
                pass
        if time.monotonic() > deadline:
            raise AssertionError(f"Serve app not ready after {timeout:.0f} s: {app}")
        time.sleep(0.5)


# Seconds Serve's controller gives a new HTTP proxy to answer its first ready check (Ray's
# default: 5). On 2 busy cores a new worker can take longer than that just to import Serve; the
# controller then kills the proxy before it ran, and serve.start fails with ActorDiedError
# (seen in CI, beside the other test workers). Read by the controller, so set before Ray starts.
PROXY_READY_TIMEOUT_S = "60"


def start_ray(num_cpus: int) -> None:
    """Ray on this machine with ``num_cpus`` logical CPUs, in Serve's namespace; its processes
    inherit this one's environment, ``PROXY_READY_TIMEOUT_S`` included (unless set already)."""
    import ray

    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", PROXY_READY_TIMEOUT_S)
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        namespace="serve",
        logging_level=logging.WARNING,
        log_to_driver=False,
    )


def shutdown_serve(timeout: float = 120.0) -> None:
    """Shut Serve down and wait until its controller and proxies are gone: serve.shutdown()
    stops waiting after 30 s, and a Serve started while the old controller still shuts down
    has its new proxy killed by that controller."""
    import ray
    from ray import serve

    serve.shutdown()
    deadline = time.monotonic() + timeout
    while any(
        a["name"].startswith("SERVE_") for a in ray.util.list_named_actors(all_namespaces=True)
    ):
        if time.monotonic() > deadline:
            raise RuntimeError(f"Serve still running {timeout:g} s after its shutdown")
        time.sleep(0.2)


@contextmanager
def local_serve(
    config: dict[str, Any], *, num_cpus: int = 4, ready_timeout: float = READY_TIMEOUT_S
) -> Iterator[ServeApp]:
    """Deploy ``config`` (validated by Ray's ``ServeDeploySchema``) as ``serve run`` does, wait
    for ``/readyz`` 200, and shut Serve down afterwards. On the Ray this process already runs
    (a test session's, started once by :func:`start_ray`) if there is one; otherwise Ray is
    started here with ``num_cpus`` logical CPUs and shut down at the end."""
    import ray
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    own_ray = not ray.is_initialized()
    if own_ray:
        start_ray(num_cpus)
    start = functools.partial(
        serve_start,
        http_options=schema.http_options.model_dump(),
        proxy_location=schema.proxy_location,
    )
    try:
        try:
            client = start()
        except TimeoutError:
            # serve_start waits 60 s for the proxy (fixed in Ray); on a loaded machine it may
            # still be starting: connect to the controller it made, and wait for /readyz below.
            client = start()
        client.deploy_apps(schema, _blocking=False)
        url = f"http://127.0.0.1:{config['http_options']['port']}"
        _wait_ready(url, ready_timeout)
        yield ServeApp(url, config)
    finally:
        try:
            shutdown_serve()
        finally:
            if own_ray:
                ray.shutdown()
