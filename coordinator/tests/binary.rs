//! The `loractl-coordinator` binary: it refuses a token that is no secret (empty, the shipped
//! `change-me`) and a listener other machines can reach without a token, unless `--insecure`
//! says so; SIGTERM and SIGINT shut it down gracefully.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use loractl_tests::process::Lines;

fn coordinator(dir: &std::path::Path, args: &[&str], token: Option<&str>) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_loractl-coordinator"));
    command
        .arg(format!("--store=redb:{}", dir.join("s.redb").display()))
        .arg(format!("--artifacts={}", dir.join("a").display()))
        .arg("--metrics-listen=127.0.0.1:0")
        .args(args)
        .env("NO_COLOR", "1");
    match token {
        Some(token) => command.env("LORACTL_TOKEN", token),
        None => command.env_remove("LORACTL_TOKEN"),
    };
    command
}

fn refused(args: &[&str], token: Option<&str>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out: Output = coordinator(dir.path(), args, token).output().unwrap();
    assert!(!out.status.success(), "{args:?} {token:?} was accepted");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn empty_and_placeholder_tokens_are_refused() {
    let err = refused(&["--listen=127.0.0.1:0"], Some(""));
    assert!(
        err.contains("token is empty") && err.contains("LORACTL_TOKEN"),
        "{err}"
    );
    let err = refused(&["--listen=127.0.0.1:0"], Some("change-me"));
    assert!(err.contains("placeholder `change-me`"), "{err}");
}

#[test]
fn a_reachable_listener_needs_a_token_or_insecure() {
    let err = refused(&["--listen=0.0.0.0:0"], None);
    assert!(
        err.contains("reachable from other machines") && err.contains("--insecure"),
        "{err}"
    );
    // With --insecure it serves.
    let dir = tempfile::tempdir().unwrap();
    let mut child = coordinator(dir.path(), &["--listen=0.0.0.0:0", "--insecure"], None)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = Lines::of(&mut child);
    let serving = lines.wait_for("coordinator serving", Duration::from_secs(30));
    let _ = child.kill();
    let _ = child.wait();
    let seen = lines.finish();
    assert!(serving, "--insecure did not serve: {seen:#?}");
}

/// systemd and Kubernetes stop a service with SIGTERM (the coordinator unit sends SIGINT):
/// both must end in a graceful shutdown, exit status 0, not death by the signal.
#[test]
fn sigterm_and_sigint_shut_the_coordinator_down_gracefully() {
    for signal in ["TERM", "INT"] {
        let dir = tempfile::tempdir().unwrap();
        let mut child = coordinator(dir.path(), &["--listen=127.0.0.1:0"], None)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start loractl-coordinator");
        let mut lines = Lines::of(&mut child);
        if !lines.wait_for("coordinator serving", Duration::from_secs(30)) {
            let _ = child.kill();
            panic!("the coordinator did not start serving: {:#?}", lines.seen);
        }
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("SIG{signal}: the coordinator did not exit within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let seen = lines.finish();
        assert!(
            status.success(),
            "SIG{signal}: exit {status:?}, expected a graceful exit 0; output: {seen:#?}"
        );
        assert!(
            seen.iter().any(|l| l.contains("shutting down")),
            "SIG{signal}: {seen:#?}"
        );
    }
}
