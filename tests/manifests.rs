//! The deployment files say what weir does: probes on the endpoints weir
//! serves, a grace period longer than weir's shutdown, secrets by reference,
//! environment overrides that weir accepts, selectors that match, an
//! autoscaler on the group and topics weir consumes. The Kubernetes checks
//! run on what kustomize renders (`kubectl kustomize`): the base alone, as
//! applied on a bare cluster, and the example overlay with every component;
//! both pass `kubernetes-validate --strict` (installed by tests/run.sh).

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

fn load(path: &str) -> Vec<Yaml> {
    let text = std::fs::read_to_string(common::project_root().join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{path} is not YAML: {e}"))
}

/// Runs `command`, which must succeed; returns what it printed.
fn run_ok(what: &str, command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("{what} cannot run (tests/run.sh installs it): {err}"));
    assert!(
        output.status.success(),
        "{what}:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

/// `kubectl kustomize <dir>`: the YAML kustomize renders (kustomize is
/// built into kubectl). `dir` is relative to deploy/kubernetes.
fn render(dir: &str) -> String {
    let path = common::project_root().join("deploy/kubernetes").join(dir);
    run_ok(
        &format!("kubectl kustomize {dir}"),
        Command::new("kubectl").arg("kustomize").arg(&path),
    )
}

/// Rendered documents by `Kind/name`; generated names lose their hash
/// suffix (`ConfigMap/weir-env`), and keep it under `name`.
fn documents(rendered: &str) -> HashMap<String, Yaml> {
    let mut docs = HashMap::new();
    for doc in YamlLoader::load_from_str(rendered).expect("rendered YAML") {
        let kind = doc["kind"].as_str().expect("kind").to_string();
        let name = doc["metadata"]["name"].as_str().expect("name").to_string();
        let base = match name.rsplit_once('-') {
            Some((stem, hash)) if kind == "ConfigMap" && hash.len() == 10 => stem.to_string(),
            _ => name,
        };
        docs.insert(format!("{kind}/{base}"), doc);
    }
    docs
}

fn kubernetes() -> HashMap<String, Yaml> {
    documents(&render("overlays/example"))
}

/// A YAML value as text with its mappings' keys sorted (kustomize sorts
/// them), for comparing documents by content.
fn canonical(value: &Yaml) -> String {
    match value {
        Yaml::Hash(hash) => {
            let mut entries: Vec<String> = hash
                .iter()
                .map(|(k, v)| format!("{}: {}", canonical(k), canonical(v)))
                .collect();
            entries.sort();
            format!("{{{}}}", entries.join(", "))
        }
        Yaml::Array(items) => format!(
            "[{}]",
            items.iter().map(canonical).collect::<Vec<_>>().join(", ")
        ),
        other => format!("{other:?}"),
    }
}

/// Python tools tests/run.sh installs (kubernetes-validate, yamllint).
fn pytool(name: &str) -> PathBuf {
    let home = std::env::var("HOME").expect("HOME");
    let tool = PathBuf::from(home)
        .join(".cache/weir/pytools/bin")
        .join(name);
    assert!(
        tool.exists(),
        "{} is missing: tests/run.sh installs it",
        tool.display()
    );
    tool
}

fn shipped_config(
    env: &[(String, String)],
) -> Result<weir::config::Config, weir::config::ConfigError> {
    let text =
        std::fs::read_to_string(common::project_root().join("config/weir.toml")).expect("config");
    weir::config::Config::from_toml(&text, env)
}

#[test]
fn the_deployment_matches_what_weir_serves_and_expects() {
    let docs = kubernetes();
    let deployment = &docs["Deployment/weir"];
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let config = shipped_config(&[]).expect("shipped config");

    // Probes on the endpoints weir serves, on the port it listens on.
    assert_eq!(
        container["ports"][0]["containerPort"].as_i64(),
        Some(config.http.listen.port() as i64)
    );
    assert_eq!(
        container["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert_eq!(
        container["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert!(
        container["resources"]["limits"]["memory"]
            .as_str()
            .is_some(),
        "a memory limit"
    );

    // The pod gets longer to stop than weir takes to drain.
    let configmap = &docs["ConfigMap/weir-env"];
    let grace_ms: u64 = configmap["data"]["WEIR_PIPELINE__SHUTDOWN_GRACE_MS"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(config.pipeline.shutdown_grace_ms);
    let termination = pod["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("grace period") as u64;
    assert!(
        termination * 1000 > grace_ms + 5_000,
        "terminationGracePeriodSeconds {termination}s vs shutdown grace {grace_ms}ms"
    );

    // Secrets by reference only; every override is one weir accepts.
    let mut env: Vec<(String, String)> = configmap["data"]
        .as_hash()
        .expect("configmap data")
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().expect("key").to_string(),
                v.as_str().expect("value").to_string(),
            )
        })
        .collect();
    for var in container["env"].as_vec().expect("env") {
        let name = var["name"].as_str().expect("env name");
        if name == "WEIR_CONFIG" {
            continue; // a path, checked below
        }
        assert!(
            var["value"].is_badvalue(),
            "{name} must come from a secret, not a literal"
        );
        assert!(
            var["valueFrom"]["secretKeyRef"]["name"].as_str().is_some(),
            "{name} from a secret"
        );
        env.push((name.to_string(), "secret".to_string()));
    }
    assert!(env.iter().any(|(k, _)| k == "WEIR_DATABASE_URL"));
    let config = shipped_config(&env)
        .unwrap_or_else(|err| panic!("the manifests' environment is refused: {err}"));
    assert_eq!(config.log.format, weir::config::LogFormat::Json);

    // Selectors line up.
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (what, selector) in [
        ("Deployment", &deployment["spec"]["selector"]["matchLabels"]),
        (
            "PodDisruptionBudget",
            &docs["PodDisruptionBudget/weir"]["spec"]["selector"]["matchLabels"],
        ),
        ("Service", &docs["Service/weir"]["spec"]["selector"]),
    ] {
        for (key, value) in selector
            .as_hash()
            .unwrap_or_else(|| panic!("{what} selector"))
        {
            assert_eq!(
                &labels[key.as_str().expect("label")],
                value,
                "{what} selects the pods"
            );
        }
    }

    // The autoscaler watches weir's group and every topic it reads.
    let scaled = &docs["ScaledObject/weir"];
    assert_eq!(
        scaled["spec"]["scaleTargetRef"]["name"].as_str(),
        Some("weir")
    );
    let group = env
        .iter()
        .find(|(k, _)| k == "WEIR_KAFKA__GROUP_ID")
        .map(|(_, v)| v.clone())
        .unwrap_or(config.kafka.group_id.clone());
    let mut watched = Vec::new();
    for trigger in scaled["spec"]["triggers"].as_vec().expect("triggers") {
        assert_eq!(
            trigger["metadata"]["consumerGroup"].as_str(),
            Some(group.as_str())
        );
        watched.push(
            trigger["metadata"]["topic"]
                .as_str()
                .expect("topic")
                .to_string(),
        );
    }
    let mut topics: Vec<String> = config
        .tables
        .iter()
        .flat_map(|t| t.sources.iter().flat_map(|s| s.topics.clone()))
        .collect();
    topics.sort();
    topics.dedup();
    watched.sort();
    assert_eq!(
        watched, topics,
        "the autoscaler watches every topic weir reads"
    );
}

#[test]
fn the_compose_stack_uses_apache_kafka_and_a_valid_weir_environment() {
    let compose = &load("deploy/compose.yaml")[0];
    let services = &compose["services"];
    assert!(
        services["kafka"]["image"]
            .as_str()
            .expect("kafka image")
            .starts_with("apache/kafka:")
    );
    assert!(
        services["postgres"]["image"]
            .as_str()
            .expect("postgres image")
            .starts_with("postgres:15")
    );
    let env: Vec<(String, String)> = services["weir"]["environment"]
        .as_hash()
        .expect("weir environment")
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().expect("key").to_string(),
                v.as_str().expect("value").to_string(),
            )
        })
        .collect();
    let config =
        shipped_config(&env).unwrap_or_else(|err| panic!("compose environment refused: {err}"));
    assert_eq!(config.kafka.brokers, "kafka:9092");
    assert!(config.database_url.is_some());

    // The images: weir's without the load generator, which has its own.
    assert_eq!(services["weir"]["build"]["target"].as_str(), Some("weir"));
    assert_eq!(
        services["loadtest"]["build"]["target"].as_str(),
        Some("loadtest")
    );
    let dockerfile = std::fs::read_to_string(common::project_root().join("deploy/Dockerfile"))
        .expect("Dockerfile");
    let weir_stage = dockerfile
        .split("FROM runtime AS weir")
        .nth(1)
        .expect("a weir stage");
    assert!(
        !weir_stage.contains("weir-loadtest"),
        "weir's image holds no load generator"
    );
    // The load generator records its runs where it may write (UID 10001
    // owns its working directory, and the volume mounted there).
    let workdir = "/var/lib/weir-loadtest";
    assert!(dockerfile.contains(&format!("WORKDIR {workdir}")));
    assert!(dockerfile.contains(&format!("chown -R 10001 {workdir}")));
    let mounts: Vec<&str> = services["loadtest"]["volumes"]
        .as_vec()
        .expect("loadtest volumes")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert!(
        mounts
            .iter()
            .any(|m| m.ends_with(&format!(":{workdir}/target"))),
        "the default --out (target/loadtest/last) lands on a volume: {mounts:?}"
    );

    // Prometheus scrapes weir with its rules; Grafana shows the dashboard.
    let deploy = common::project_root().join("deploy");
    for service in ["prometheus", "grafana"] {
        for mount in services[service]["volumes"]
            .as_vec()
            .unwrap_or_else(|| panic!("{service} volumes"))
        {
            let source = mount
                .as_str()
                .expect("mount")
                .split(':')
                .next()
                .expect("source");
            assert!(
                deploy.join(source).exists(),
                "{service} mounts {source}, which exists"
            );
        }
    }
    let prometheus = deploy.join("prometheus/prometheus.yml");
    run_ok(
        "promtool check config",
        Command::new("promtool")
            .args(["check", "config"])
            .arg(&prometheus),
    );
    let scrape = &load("deploy/prometheus/prometheus.yml")[0]["scrape_configs"][0];
    assert_eq!(
        scrape["job_name"].as_str(),
        Some("weir"),
        "the rules expect job=\"weir\""
    );
    assert_eq!(
        scrape["static_configs"][0]["targets"][0].as_str(),
        Some("weir:9187")
    );
    let datasource = &load("deploy/grafana/provisioning/datasources/prometheus.yml")[0];
    assert_eq!(
        datasource["datasources"][0]["url"].as_str(),
        Some("http://prometheus:9090")
    );
}

#[test]
fn rendered_manifests_pass_strict_validation_and_the_base_needs_no_crds() {
    let dir = std::env::temp_dir().join(common::unique("weir-manifests"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // The base alone, the base with each component alone, and with both.
    let mut renders = vec![
        ("base".to_string(), render("base")),
        ("example".to_string(), render("overlays/example")),
    ];
    for component in ["keda", "prometheus-operator"] {
        // kustomize takes relative paths only: the overlay sits at
        // target/<unique>/with-<component> in the project.
        let unique = common::unique("manifests");
        let overlay = common::project_root()
            .join("target")
            .join(&unique)
            .join(format!("with-{component}"));
        std::fs::create_dir_all(&overlay).expect("overlay dir");
        std::fs::write(
            overlay.join("kustomization.yaml"),
            format!(
                "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
                 resources: [../../../deploy/kubernetes/base]\n\
                 components: [../../../deploy/kubernetes/components/{component}]\n"
            ),
        )
        .expect("overlay");
        let rendered = run_ok(
            &format!("kubectl kustomize (base with {component})"),
            Command::new("kubectl").arg("kustomize").arg(&overlay),
        );
        renders.push((format!("with-{component}"), rendered));
        let _ = std::fs::remove_dir_all(common::project_root().join("target").join(&unique));
    }
    for (name, rendered) in renders {
        let overlay = name.as_str();
        let file = dir.join(format!("{name}.yaml"));
        std::fs::write(&file, &rendered).expect("write rendered manifests");
        run_ok(
            &format!("kubernetes-validate --strict {overlay}"),
            Command::new(pytool("kubernetes-validate"))
                .args(["--strict", "--quiet"])
                .arg(&file),
        );
        let docs = documents(&rendered);
        if overlay == "with-keda" {
            assert!(docs.contains_key("ScaledObject/weir"));
            assert!(docs["Deployment/weir"]["spec"]["replicas"].is_badvalue());
        }
        if overlay == "with-prometheus-operator" {
            assert!(docs.contains_key("ServiceMonitor/weir"));
            assert!(docs.contains_key("PrometheusRule/weir"));
        }
        if overlay == "base" {
            // A bare cluster: only built-in API groups.
            for (key, doc) in documents(&rendered) {
                let api = doc["apiVersion"].as_str().expect("apiVersion");
                assert!(
                    ["v1", "apps/v1", "policy/v1", "networking.k8s.io/v1"].contains(&api),
                    "{key} ({api}) needs something a bare cluster lacks: make it a component"
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pods_run_the_mounted_config_migrate_first_and_hold_least_privilege() {
    let docs = documents(&render("base"));
    // The mounted mapping is the shipped one (an overlay replaces it).
    let shipped = std::fs::read_to_string(common::project_root().join("config/weir.toml"))
        .expect("config/weir.toml");
    let base =
        std::fs::read_to_string(common::project_root().join("deploy/kubernetes/base/weir.toml"))
            .expect("base/weir.toml");
    assert_eq!(
        shipped, base,
        "deploy/kubernetes/base/weir.toml must be config/weir.toml"
    );
    let configmap = &docs["ConfigMap/weir-config"];
    assert_eq!(
        configmap["data"]["weir.toml"].as_str(),
        Some(shipped.as_str())
    );
    let generated = configmap["metadata"]["name"].as_str().expect("name");
    assert!(
        generated.len() > "weir-config-".len(),
        "the ConfigMap's name carries its content hash, so a change rolls the pods"
    );

    let pod = &docs["Deployment/weir"]["spec"]["template"]["spec"];
    let volume = pod["volumes"]
        .as_vec()
        .expect("volumes")
        .iter()
        .find(|v| v["configMap"]["name"].as_str() == Some(generated))
        .expect("the generated ConfigMap is mounted");
    let volume_name = volume["name"].as_str().expect("volume name");
    let migrate = &pod["initContainers"][0];
    let weir = &pod["containers"][0];
    assert_eq!(migrate["args"][0].as_str(), Some("migrate"));
    assert_eq!(
        migrate["image"], weir["image"],
        "the migration runs the pods' own image"
    );
    for container in [migrate, weir] {
        let name = container["name"].as_str().expect("container name");
        let config_path = container["env"]
            .as_vec()
            .expect("env")
            .iter()
            .find(|v| v["name"].as_str() == Some("WEIR_CONFIG"))
            .and_then(|v| v["value"].as_str())
            .unwrap_or_else(|| panic!("{name}: WEIR_CONFIG"));
        let mount = container["volumeMounts"]
            .as_vec()
            .expect("mounts")
            .iter()
            .find(|m| m["name"].as_str() == Some(volume_name))
            .unwrap_or_else(|| panic!("{name} mounts the config"));
        let dir = mount["mountPath"].as_str().expect("mountPath");
        assert_eq!(config_path, format!("{dir}/weir.toml"), "{name}");
        assert_eq!(container["env"], weir["env"], "{name}: the same settings");
        assert_eq!(
            container["envFrom"], weir["envFrom"],
            "{name}: the same settings"
        );
        let security = &container["securityContext"];
        assert_eq!(
            security["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "{name}"
        );
        assert_eq!(
            security["readOnlyRootFilesystem"].as_bool(),
            Some(true),
            "{name}"
        );
        assert_eq!(
            security["capabilities"]["drop"][0].as_str(),
            Some("ALL"),
            "{name}"
        );
    }
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false));
    assert_eq!(pod["serviceAccountName"].as_str(), Some("weir"));
    assert_eq!(
        docs["ServiceAccount/weir"]["automountServiceAccountToken"].as_bool(),
        Some(false)
    );
    // Node drains are never blocked by pods that are unready anyway.
    assert_eq!(
        docs["PodDisruptionBudget/weir"]["spec"]["unhealthyPodEvictionPolicy"].as_str(),
        Some("AlwaysAllow")
    );
    // Egress to Kafka, PostgreSQL and DNS only.
    let policy = &docs["NetworkPolicy/weir"]["spec"];
    let types: Vec<&str> = policy["policyTypes"]
        .as_vec()
        .expect("policyTypes")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert!(types.contains(&"Egress"));
    let mut ports: Vec<i64> = policy["egress"]
        .as_vec()
        .expect("egress")
        .iter()
        .flat_map(|rule| rule["ports"].as_vec().cloned().unwrap_or_default())
        .filter_map(|port| port["port"].as_i64())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports, [53, 5432, 9092, 9093]);
    // TLS verified against the mounted CA bundle, for both.
    let env = &docs["ConfigMap/weir-env"]["data"];
    let ca = "/etc/weir/ca/ca.crt";
    assert_eq!(env["WEIR_POSTGRES__TLS_CA_FILE"].as_str(), Some(ca));
    assert_eq!(
        env["WEIR_KAFKA__PROPERTIES__SSL_CA_LOCATION"].as_str(),
        Some(ca)
    );
    assert!(
        weir["volumeMounts"]
            .as_vec()
            .expect("mounts")
            .iter()
            .any(|m| m["mountPath"].as_str() == Some("/etc/weir/ca")),
        "the CA bundle is mounted"
    );
}

#[test]
fn keda_owns_scaling_and_one_pod_holding_every_partition_fits_its_limit() {
    let docs = kubernetes();
    let deployment = &docs["Deployment/weir"];
    assert!(
        deployment["spec"]["replicas"].is_badvalue(),
        "with KEDA, the Deployment leaves the replica count to it"
    );
    assert!(
        documents(&render("base"))["Deployment/weir"]["spec"]["replicas"]
            .as_i64()
            .is_some(),
        "without KEDA, a fixed count"
    );
    let scaled = &docs["ScaledObject/weir"]["spec"];
    let max_pods = scaled["maxReplicaCount"].as_i64().expect("maxReplicaCount");
    assert!(
        scaled["fallback"]["replicas"].as_i64().is_some(),
        "a fallback"
    );
    assert!(scaled["fallback"]["failureThreshold"].as_i64().is_some());

    // maxReplicaCount is the widest topic's partition count; in a rollout
    // one pod may hold every partition of every topic weir reads.
    let config = shipped_config(&[]).expect("shipped config");
    let mut topics: Vec<&String> = config
        .tables
        .iter()
        .flat_map(|t| t.sources.iter().flat_map(|s| s.topics.iter()))
        .collect();
    topics.sort();
    topics.dedup();
    let partitions = topics.len() as i64 * max_pods;
    let prefetch_kib: i64 = config.kafka.properties["queued.max.messages.kbytes"]
        .to_string()
        .trim_matches('"')
        .parse()
        .expect("queued.max.messages.kbytes");
    let mib = 1024 * 1024;
    let needed_mib =
        config.pipeline.max_in_flight_bytes as i64 / mib + prefetch_kib / 1024 * partitions + 190;
    let limit =
        deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
            .as_str()
            .expect("memory limit");
    let limit_mib: i64 = limit
        .strip_suffix("Mi")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("memory limit in Mi: {limit}"));
    println!(
        "{partitions} partitions in one pod need {needed_mib} MiB; the limit is {limit_mib} MiB"
    );
    assert!(
        limit_mib >= needed_mib,
        "one pod holding {partitions} partitions needs {needed_mib} MiB, over its {limit}"
    );
}

#[test]
fn the_monitoring_component_carries_the_alert_rules_and_selects_the_service() {
    let docs = kubernetes();
    let alerts = &load("deploy/prometheus/alerts.yml")[0];
    assert!(
        canonical(&docs["PrometheusRule/weir"]["spec"]["groups"]) == canonical(&alerts["groups"]),
        "components/prometheus-operator/prometheusrule.yaml is alerts.yml (regenerate it, see its header)"
    );
    let monitor = &docs["ServiceMonitor/weir"]["spec"];
    let service = &docs["Service/weir"];
    for (key, value) in monitor["selector"]["matchLabels"]
        .as_hash()
        .expect("ServiceMonitor selector")
    {
        assert_eq!(
            &service["metadata"]["labels"][key.as_str().expect("label")],
            value
        );
    }
    assert_eq!(
        monitor["endpoints"][0]["port"], service["spec"]["ports"][0]["name"],
        "the ServiceMonitor scrapes the service's port"
    );
    // The rules expect job="weir": the operator names the job after the
    // Service.
    assert_eq!(service["metadata"]["name"].as_str(), Some("weir"));
    let scaled = &docs["ScaledObject/weir"]["spec"];
    for trigger in scaled["triggers"].as_vec().expect("triggers") {
        assert_eq!(trigger["type"].as_str(), Some("kafka"));
        assert!(trigger["metadata"]["lagThreshold"].as_str().is_some());
    }
}
