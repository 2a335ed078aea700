"""Where the Kubernetes API is and how to authenticate: the in-cluster ServiceAccount or a kubeconfig."""

from __future__ import annotations

import os
from typing import Any

from exporter.core import files

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
IN_CLUSTER_TOKEN = f"{SA_DIR}/token"
IN_CLUSTER_CA = f"{SA_DIR}/ca.crt"


def in_cluster_available() -> bool:
    """True inside a pod: the API server's env vars and the ServiceAccount token are there."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST") and os.environ.get("KUBERNETES_SERVICE_PORT")
                and os.path.isfile(IN_CLUSTER_TOKEN))


def load_configuration(kubeconfig: str | None, in_cluster: bool) -> Any:
    """A `kubernetes.client.Configuration` from a kubeconfig file or the in-cluster ServiceAccount.

    Raises ValueError with one line if the configuration cannot be loaded.
    """
    from kubernetes import client, config
    from kubernetes.config.incluster_config import InClusterConfigLoader

    cfg = client.Configuration()
    if not in_cluster:  # a FIFO in KUBECONFIG would block the start with no output
        for path in filter(None, (kubeconfig or os.environ.get("KUBECONFIG") or "").split(os.pathsep)):
            why = files.not_regular(path)
            if why:
                raise ValueError(f"cannot load Kubernetes configuration from kubeconfig {path}: {why}")
    try:
        if in_cluster:
            # The projected token rotates: the loader re-reads it before it expires.
            InClusterConfigLoader(token_filename=IN_CLUSTER_TOKEN, cert_filename=IN_CLUSTER_CA,
                                  try_refresh_token=True).load_and_set(cfg)
        else:
            # KUBECONFIG may list several files (path-separated): the loader merges them.
            config.load_kube_config(config_file=kubeconfig or os.environ.get("KUBECONFIG"),
                                    client_configuration=cfg, persist_config=False)
    except Exception as e:  # the loaders raise ConfigException, OSError, yaml errors, TypeError...
        source = kubeconfig or os.environ.get("KUBECONFIG")
        where = "in-cluster service account" if in_cluster else f"kubeconfig {source}"
        msg = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"cannot load Kubernetes configuration from {where}: {msg}") from None
    # Failures are ours to retry (with backoff and a metric), not urllib3's silent immediate retries.
    cfg.retries = False
    # Long idle watches must survive (or fail fast behind) NAT and load balancers.
    cfg.keep_alive = True
    return cfg
