"""Where the Kubernetes API is and how to authenticate: the in-cluster ServiceAccount or a kubeconfig.

In a pod: `exporter.kubernetes.incluster` (standard library only). With a kubeconfig: the `kubernetes`
package, imported only then (it costs about 23 MB of RSS).
"""

from __future__ import annotations

import os
from typing import Any

from exporter.core import files

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def in_cluster_available(sa_dir: str | None = None) -> bool:
    """True inside a pod: the API server's env vars and the ServiceAccount token are there."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST") and os.environ.get("KUBERNETES_SERVICE_PORT")
                and os.path.isfile(os.path.join(sa_dir or SA_DIR, "token")))


def load_configuration(kubeconfig: str | None, in_cluster: bool, sa_dir: str | None = None,
                       address: tuple[str, int] | None = None) -> Any:
    """An `InClusterConfig` (in a pod) or a `kubernetes.client.Configuration` (from a kubeconfig file).

    Raises ValueError with one line if the configuration cannot be loaded.
    """
    if in_cluster:
        from exporter.kubernetes.incluster import InClusterConfig

        try:
            return InClusterConfig.load(sa_dir or SA_DIR, address)
        except ValueError as e:
            raise ValueError(f"cannot load Kubernetes configuration from the in-cluster service account: {e}") \
                from None
    from kubernetes import client, config

    cfg = client.Configuration()
    if not in_cluster:  # a FIFO in KUBECONFIG would block the start with no output
        for path in filter(None, (kubeconfig or os.environ.get("KUBECONFIG") or "").split(os.pathsep)):
            why = files.not_regular(path)
            if why:
                raise ValueError(f"cannot load Kubernetes configuration from kubeconfig {path}: {why}")
    try:
        # KUBECONFIG may list several files (path-separated): the loader merges them.
        config.load_kube_config(config_file=kubeconfig or os.environ.get("KUBECONFIG"),
                                client_configuration=cfg, persist_config=False)
    except Exception as e:  # the loaders raise ConfigException, OSError, yaml errors, TypeError...
        source = kubeconfig or os.environ.get("KUBECONFIG")
        where = f"kubeconfig {source}"
        msg = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"cannot load Kubernetes configuration from {where}: {msg}") from None
    # Failures are ours to retry (with backoff and a metric), not urllib3's silent immediate retries.
    cfg.retries = False
    # Long idle watches must survive (or fail fast behind) NAT and load balancers.
    cfg.keep_alive = True
    return cfg
