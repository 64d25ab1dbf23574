"""Writes deploy/kubernetes/components/prometheus-operator/prometheusrule.yaml
from deploy/prometheus/alerts.yml (the same groups, as a PrometheusRule).
Run after changing alerts.yml; tests/manifests.rs checks that they agree.

    python3 deploy/prometheus/prometheusrule.py
"""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
HEADER = """\
# deploy/prometheus/alerts.yml as a PrometheusRule: the same groups
# (tests/manifests.rs checks it). Generated: after changing alerts.yml, run
#   python3 deploy/prometheus/prometheusrule.py
"""

groups = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())["groups"]
rule = {
    "apiVersion": "monitoring.coreos.com/v1",
    "kind": "PrometheusRule",
    "metadata": {"name": "weir"},
    "spec": {"groups": groups},
}
target = ROOT / "deploy/kubernetes/components/prometheus-operator/prometheusrule.yaml"
target.write_text(HEADER + yaml.safe_dump(rule, sort_keys=False, width=100))
