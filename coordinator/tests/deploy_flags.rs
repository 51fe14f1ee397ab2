//! Keeps `deploy/` honest about the coordinator's command line: every argument list in the
//! systemd unit (with each `LORACTL_STORE` / `LORACTL_EXTRA_ARGS` of `coordinator.env`,
//! commented examples included) and in the Kubernetes manifests (commented `--tls-*` args
//! included) is run through the real binary's clap parser, followed by `--help`: clap parses
//! every argument before it (unknown flag, bad number: an error), then prints the help and
//! exits 0 without starting a server. The rules clap checks only after parsing (flags that
//! go together, heartbeat timeout longer than the interval) are checked here.

use loractl_tests::deploy::{deploy_dir, read, yaml_block};

fn parse_with_binary(args: &[String]) -> Result<String, String> {
    loractl_tests::process::help_with(env!("CARGO_BIN_EXE_loractl-coordinator"), args)
}

/// The value of `--name`, given as `--name value` or `--name=value`.
fn flag_value<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let eq = format!("{name}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if a == name {
            args.get(i + 1).map(String::as_str)
        } else {
            a.strip_prefix(&eq)
        }
    })
}

/// Parses `args` with the binary and checks what clap leaves to `main`.
fn check(origin: &str, args: &[String]) {
    let help = parse_with_binary(args)
        .unwrap_or_else(|e| panic!("{origin}: the coordinator refuses {args:?}:\n{e}"));
    let mut flags = 0;
    for arg in args.iter().filter(|a| a.starts_with("--")) {
        let name = arg.split('=').next().unwrap();
        assert!(help.contains(name), "{origin}: {name} is not in --help");
        flags += 1;
    }
    assert!(flags >= 3, "{origin}: only {flags} flags in {args:?}");
    let store = flag_value(args, "--store").unwrap_or_else(|| panic!("{origin}: no --store"));
    assert!(
        store.starts_with("redb:/") || store.starts_with("etcd:http"),
        "{origin}: --store {store} is neither an absolute redb path nor etcd URLs"
    );
    let listen = flag_value(args, "--listen").unwrap_or_else(|| panic!("{origin}: no --listen"));
    assert!(
        listen.starts_with("0.0.0.0:"),
        "{origin}: --listen {listen} is not reachable from other machines"
    );
    let artifacts = flag_value(args, "--artifacts").expect("--artifacts");
    assert!(
        artifacts.starts_with('/'),
        "{origin}: relative --artifacts {artifacts}"
    );
    let has = |name: &str| flag_value(args, name).is_some();
    assert_eq!(
        has("--tls-cert"),
        has("--tls-key"),
        "{origin}: --tls-cert and --tls-key go together"
    );
    if has("--tls-client-ca") {
        assert!(has("--tls-cert"), "{origin}: --tls-client-ca without TLS");
    }
    let secs = |name: &str, default: u64| {
        flag_value(args, name).map_or(default, |v| v.parse::<u64>().unwrap())
    };
    assert!(
        secs("--heartbeat-timeout-secs", 30) > secs("--heartbeat-interval-secs", 5),
        "{origin}: heartbeat timeout not longer than the interval"
    );
    assert!(
        !args.iter().any(|a| a.starts_with("--token")),
        "{origin}: the token belongs in LORACTL_TOKEN, not on the command line"
    );
}

/// `KEY=value` lines of an environment file, commented (`#KEY=...`) or not.
fn env_values(text: &str, key: &str) -> Vec<String> {
    let prefix = format!("{key}=");
    text.lines()
        .map(|l| l.trim().trim_start_matches('#').trim())
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(str::to_owned)
        .collect()
}

/// The unit's ExecStart, continuation lines joined.
fn exec_start(unit: &str) -> String {
    let mut lines = unit.lines();
    let mut command = String::new();
    while let Some(line) = lines.next() {
        if let Some(rest) = line.strip_prefix("ExecStart=") {
            let mut line = rest;
            loop {
                match line.trim_end().strip_suffix('\\') {
                    Some(head) => {
                        command.push_str(head);
                        command.push(' ');
                        line = lines.next().expect("continued ExecStart");
                    }
                    None => {
                        command.push_str(line);
                        return command;
                    }
                }
            }
        }
    }
    panic!("no ExecStart");
}

/// systemd's expansion: `${VAR}` is one word, `$VAR` splits into zero or more.
fn expand(command: &str, braced: &[(&str, &str)], split: &[(&str, &str)]) -> Vec<String> {
    let mut out = Vec::new();
    'word: for word in command.split_whitespace() {
        for (var, value) in split {
            if word == format!("${var}") {
                out.extend(value.split_whitespace().map(str::to_owned));
                continue 'word;
            }
        }
        let mut word = word.to_owned();
        for (var, value) in braced {
            word = word.replace(&format!("${{{var}}}"), value);
        }
        assert!(!word.contains('$'), "unexpanded variable in {word}");
        out.push(word);
    }
    out
}

#[test]
fn systemd_unit_and_coordinator_env_flags_are_accepted() {
    let dir = deploy_dir().join("systemd");
    let unit = read(dir.join("loractl-coordinator.service"));
    let env = read(dir.join("coordinator.env"));
    let command = exec_start(&unit);
    let words: Vec<&str> = command.split_whitespace().collect();
    assert_eq!(words[0], "/usr/local/bin/loractl-coordinator");
    let command = words[1..].join(" ");

    let mut stores = env_values(&unit, "Environment=LORACTL_STORE");
    assert_eq!(stores.len(), 1, "the unit sets one default store");
    stores.extend(env_values(&env, "LORACTL_STORE"));
    assert!(stores.iter().any(|s| s.starts_with("etcd:")), "{stores:?}");
    let mut extras = vec![String::new()];
    extras.extend(env_values(&env, "LORACTL_EXTRA_ARGS"));
    assert!(
        extras.iter().any(|e| e.contains("--tls-client-ca")),
        "{extras:?}"
    );
    for store in &stores {
        for extra in &extras {
            let args = expand(
                &command,
                &[("LORACTL_STORE", store)],
                &[("LORACTL_EXTRA_ARGS", extra)],
            );
            check(&format!("systemd ({store}, {extra:?})"), &args);
        }
    }

    // The token comes from the 0600 environment file, and TLS files through LoadCredential
    // land where the TLS example points.
    assert!(unit.contains("EnvironmentFile=/etc/loractl/coordinator.env"));
    assert!(env_values(&env, "LORACTL_TOKEN").len() == 1);
    for cred in ["tls.crt", "tls.key", "client-ca.crt"] {
        assert!(
            unit.contains(&format!("LoadCredential={cred}:")),
            "no LoadCredential for {cred}"
        );
        assert!(
            extras.iter().any(|e| e.contains(&format!(
                "/run/credentials/loractl-coordinator.service/{cred}"
            ))),
            "no TLS example reads the {cred} credential"
        );
    }
    // The coordinator's graceful shutdown answers SIGINT.
    assert!(unit.contains("KillSignal=SIGINT") && unit.contains("KillMode=mixed"));
}

/// The `args:` list of a manifest's container, and the same list with its commented
/// `# - --flag` items restored.
fn manifest_args(text: &str) -> (Vec<String>, Vec<String>) {
    let (_, block) = yaml_block(text, "args:", true);
    let (mut plain, mut all) = (Vec::new(), Vec::new());
    for line in block {
        let trimmed = line.trim();
        let unquote = |s: &str| s.trim().trim_matches('"').to_owned();
        if let Some(item) = trimmed.strip_prefix("- ") {
            plain.push(unquote(item));
            all.push(unquote(item));
        } else if let Some(item) = trimmed.strip_prefix("# - --") {
            all.push(format!("--{}", unquote(item)));
        }
    }
    (plain, all)
}

#[test]
fn kubernetes_coordinator_args_are_accepted() {
    let dir = deploy_dir().join("kubernetes");
    let mut checked = 0;
    for file in ["coordinator.yaml", "etcd/coordinator.yaml"] {
        let text = read(dir.join(file));
        assert!(text.contains("command: [\"/usr/local/bin/loractl-coordinator\"]"));
        let (plain, all) = manifest_args(&text);
        check(file, &plain);
        if all != plain {
            check(&format!("{file} (commented args)"), &all);
            checked += 1;
        }
        checked += 1;
        // The token reaches the coordinator from the Secret.
        assert!(text.contains("name: LORACTL_TOKEN") && text.contains("name: loractl-token"));
        // State on a volume mounted where --store and --artifacts point.
        let artifacts = flag_value(&plain, "--artifacts").unwrap();
        assert!(
            text.lines()
                .filter_map(|l| l.trim().strip_prefix("mountPath: "))
                .any(|m| artifacts.starts_with(m)),
            "{file}: --artifacts {artifacts} is not on a mounted volume"
        );
    }
    assert_eq!(checked, 3, "redb, redb with TLS, etcd");

    // One replica with redb; several with etcd.
    let redb = read(dir.join("coordinator.yaml"));
    assert!(redb.contains("replicas: 1") && redb.contains("--store=redb:"));
    let etcd = read(dir.join("etcd/coordinator.yaml"));
    assert!(etcd.contains("replicas: 3") && etcd.contains("--store=etcd:"));
}

#[test]
fn the_check_refuses_what_the_coordinator_refuses() {
    let ok =
        |args: &[&str]| parse_with_binary(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    assert!(ok(&["--listen", "0.0.0.0:7070"]).is_ok());
    let err = ok(&["--listen", "0.0.0.0:7070", "--no-such-flag", "1"]).unwrap_err();
    assert!(err.contains("--no-such-flag"), "{err}");
    let err = ok(&["--heartbeat-timeout-secs", "soon"]).unwrap_err();
    assert!(err.contains("soon"), "{err}");
}
