//! Keeps `deploy/` honest about the worker: the example `worker.toml` of the systemd setup and
//! the one embedded in the Kubernetes ConfigMap parse with the worker's loader and validate
//! (also with their commented TLS lines restored), agree with the unit and the DaemonSet
//! (token path, folders, stop grace shorter than the stop timeout), and the worker flags used
//! there are accepted by the real binary's parser.

use std::path::Path;

use loractl_tests::deploy::{deploy_dir, read, yaml_block};

use loractl_spec::Gpus;
use loractl_worker::config::WorkerConfig;
use loractl_worker::Error;

fn parse(text: &str, origin: &str) -> WorkerConfig {
    let config = WorkerConfig::from_toml_str(text, origin).unwrap_or_else(|e| panic!("{e}"));
    config
        .validate()
        .unwrap_or_else(|e| panic!("{origin} does not validate: {e}"));
    config
}

/// The text with its commented `# tls_... = ...` lines restored.
fn with_tls_lines(text: &str) -> String {
    text.lines()
        .map(|l| {
            let t = l.trim_start();
            match t.strip_prefix("# tls_") {
                Some(rest) => format!("tls_{rest}"),
                None => l.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `Key=value` settings of a unit (first one).
fn unit_value<'a>(unit: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key}=");
    unit.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {key}= in the unit"))
}

fn parse_with_binary(args: &[String]) -> Result<String, String> {
    loractl_tests::process::help_with(env!("CARGO_BIN_EXE_loractl-worker"), args)
}

fn check_flags(origin: &str, args: &[String]) {
    let help = parse_with_binary(args)
        .unwrap_or_else(|e| panic!("{origin}: the worker refuses {args:?}:\n{e}"));
    for arg in args.iter().filter(|a| a.starts_with("--")) {
        let name = arg.split('=').next().unwrap();
        assert!(help.contains(name), "{origin}: {name} is not in --help");
    }
}

#[test]
fn systemd_worker_toml_parses_validates_and_matches_the_unit() {
    let dir = deploy_dir().join("systemd");
    let text = read(dir.join("worker.toml"));
    let unit = read(dir.join("loractl-worker.service"));
    let config = parse(&text, "systemd/worker.toml");

    assert!(config.coordinator.starts_with("https://"));
    assert_eq!(config.gpu_selection(), Gpus::All);
    assert_eq!(
        config.rank_command,
        ["/usr/local/bin/loractl".to_owned(), "rank".to_owned()]
    );
    assert!(!config.model_dirs.is_empty() && !config.data_dirs.is_empty());
    assert_eq!(config.labels["zone"], "rack-1");

    // The token file is the credential the unit loads.
    let (name, source) = unit_value(&unit, "LoadCredential")
        .split_once(':')
        .expect("LoadCredential=NAME:PATH");
    assert!(source.starts_with("/etc/loractl/"));
    assert_eq!(
        config.token_file.as_deref(),
        Some(Path::new(&format!(
            "/run/credentials/loractl-worker.service/{name}"
        )))
    );
    // Folders the unit creates for its user, with ProtectSystem=strict everything else is
    // read-only.
    let state = unit_value(&unit, "StateDirectory");
    assert!(state
        .split_whitespace()
        .any(|d| config.work_dir == Path::new("/var/lib").join(d)));
    let cache = unit_value(&unit, "CacheDirectory");
    assert_eq!(config.cache_dir, Path::new("/var/cache").join(cache));
    assert_eq!(unit_value(&unit, "ProtectSystem"), "strict");
    // The worker drains on SIGTERM: the ranks' grace fits in the stop timeout with room for
    // uploads.
    assert_eq!(unit_value(&unit, "KillMode"), "mixed");
    let timeout: u64 = unit_value(&unit, "TimeoutStopSec").parse().unwrap();
    assert!(
        config.stop_grace_secs >= 60 && timeout >= config.stop_grace_secs + 60,
        "stop_grace_secs {} vs TimeoutStopSec {timeout}",
        config.stop_grace_secs
    );
    assert_eq!(unit_value(&unit, "Restart"), "on-failure");
    assert_eq!(unit_value(&unit, "User"), "loractl");

    // The commented mutual-TLS lines are a valid config as well.
    let tls = parse(&with_tls_lines(&text), "systemd/worker.toml (TLS)");
    assert!(tls.tls_cert.is_some() && tls.tls_key.is_some() && tls.tls_domain.is_some());

    // The unit's flags.
    let exec = unit_value(&unit, "ExecStart");
    let mut words = exec.split_whitespace().map(str::to_owned);
    assert_eq!(words.next().unwrap(), "/usr/local/bin/loractl-worker");
    let args: Vec<String> = words.collect();
    assert_eq!(args, ["--config", "/etc/loractl/worker.toml"]);
    check_flags("loractl-worker.service", &args);
}

/// The block scalar `worker.toml: |` of the ConfigMap, de-indented.
fn configmap_worker_toml(yaml: &str) -> String {
    let (_, body) = yaml_block(yaml, "worker.toml: |", false);
    let indent = body
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .expect("a non-empty worker.toml");
    body.iter()
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Values of `key: value` lines (trimmed, first occurrence order).
fn yaml_values<'a>(yaml: &'a str, key: &str) -> Vec<&'a str> {
    let prefix = format!("{key}: ");
    yaml.lines()
        .filter_map(|l| l.trim().strip_prefix(&prefix))
        .map(|v| v.trim().trim_matches('"'))
        .collect()
}

#[test]
fn kubernetes_configmap_worker_toml_parses_validates_and_matches_the_daemonset() {
    let dir = deploy_dir().join("kubernetes");
    let text = configmap_worker_toml(&read(dir.join("worker-config.yaml")));
    let config = parse(&text, "worker-config.yaml");
    let daemonset = read(dir.join("worker-daemonset.yaml"));

    assert_eq!(
        config.coordinator,
        "http://loractl-coordinator.loractl.svc:7070"
    );
    // With the device plugin the container sees only its own GPUs.
    assert_eq!(config.gpu_selection(), Gpus::All);
    assert!(daemonset.contains("nvidia.com/gpu: "));
    assert!(daemonset.contains("nodeSelector:"));

    // Every path the config names is mounted into the pod.
    let mounts = yaml_values(&daemonset, "mountPath");
    let mounted = |path: &Path| mounts.iter().any(|m| path.starts_with(m));
    let token = config.token_file.clone().expect("token_file");
    assert!(
        mounted(&token),
        "token_file {} not mounted",
        token.display()
    );
    assert!(mounted(&config.work_dir) && mounted(&config.cache_dir));
    for dir in config.model_dirs.iter().chain(&config.data_dirs) {
        assert!(mounted(dir), "{} not mounted", dir.display());
    }
    assert!(mounts.contains(&"/etc/loractl/worker.toml"));
    assert!(daemonset.contains("secretName: loractl-token"));
    assert_eq!(token.file_name().unwrap(), "token", "the Secret's key");

    // The pod's grace covers the ranks' grace plus the checkpoint uploads.
    let grace: u64 = yaml_values(&daemonset, "terminationGracePeriodSeconds")[0]
        .parse()
        .unwrap();
    assert!(
        config.stop_grace_secs >= 60 && grace >= config.stop_grace_secs + 60,
        "stop_grace_secs {} vs terminationGracePeriodSeconds {grace}",
        config.stop_grace_secs
    );

    // The commented TLS lines make a valid config once the address is https://.
    let tls = with_tls_lines(&text).replace("http://", "https://");
    let tls = parse(&tls, "worker-config.yaml (TLS)");
    assert!(tls.tls_ca.is_some() && tls.tls_cert.is_some());

    // The DaemonSet's flags ($(NODE_NAME) is expanded by Kubernetes).
    let args: Vec<String> = daemonset
        .lines()
        .skip_while(|l| l.trim() != "args:")
        .skip(1)
        .map_while(|l| l.trim().strip_prefix("- "))
        .map(|a| a.replace("$(NODE_NAME)", "gpu-node-1"))
        .collect();
    assert_eq!(args[0], "--config=/etc/loractl/worker.toml");
    assert!(args.iter().any(|a| a.starts_with("--name=")));
    check_flags("worker-daemonset.yaml", &args);
}

#[test]
fn the_checks_refuse_what_the_worker_refuses() {
    // A misspelt key in a deployed file is caught by the loader ...
    let err = WorkerConfig::from_toml_str("gpu = \"0,2\"", "x").unwrap_err();
    assert!(err.to_string().contains("unknown field `gpu`"), "{err}");
    // ... TLS files with http:// by validation ...
    let config = WorkerConfig::from_toml_str("tls_ca = \"/ca.crt\"", "x").unwrap();
    assert!(matches!(config.validate(), Err(Error::InvalidConfig(_))));
    // ... and an unknown flag by the binary.
    let err = parse_with_binary(&["--gpu=0".to_owned()]).unwrap_err();
    assert!(err.contains("--gpu"), "{err}");
    assert!(parse_with_binary(&["--gpus=0,2".to_owned()]).is_ok());
}
