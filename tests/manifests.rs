//! The deployment files say what weir does: probes on the endpoints weir
//! serves, a grace period longer than weir's shutdown, secrets by reference,
//! environment overrides that weir accepts, selectors that match, an
//! autoscaler on the group and topics weir consumes.

mod common;

use std::collections::HashMap;

use yaml_rust2::{Yaml, YamlLoader};

fn load(path: &str) -> Vec<Yaml> {
    let text = std::fs::read_to_string(common::project_root().join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{path} is not YAML: {e}"))
}

fn kubernetes() -> HashMap<String, Yaml> {
    let mut docs = HashMap::new();
    let dir = common::project_root().join("deploy/kubernetes");
    for entry in std::fs::read_dir(&dir).expect("deploy/kubernetes") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let relative = format!(
            "deploy/kubernetes/{}",
            path.file_name().expect("name").to_string_lossy()
        );
        for doc in load(&relative) {
            for field in ["apiVersion", "kind"] {
                assert!(doc[field].as_str().is_some(), "{relative}: missing {field}");
            }
            if doc["kind"].as_str() == Some("Kustomization") {
                continue;
            }
            let name = doc["metadata"]["name"]
                .as_str()
                .unwrap_or_else(|| panic!("{relative}: metadata.name"));
            docs.insert(
                format!("{}/{name}", doc["kind"].as_str().expect("kind")),
                doc,
            );
        }
    }
    docs
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
}
