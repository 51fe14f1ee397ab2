//! The `loractl-coordinator` binary refuses a token that is no secret (empty, the shipped
//! `change-me`) and a listener other machines can reach without a token, unless `--insecure`
//! says so.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn coordinator(dir: &std::path::Path, args: &[&str], token: Option<&str>) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_loractl-coordinator"));
    command
        .arg(format!("--store=redb:{}", dir.join("s.redb").display()))
        .arg(format!("--artifacts={}", dir.join("a").display()))
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
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    let serving = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.contains("coordinator serving") => break true,
            Ok(line) => seen.push(line),
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    assert!(serving, "--insecure did not serve: {seen:#?}");
}
