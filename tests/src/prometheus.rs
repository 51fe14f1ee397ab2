//! A real Prometheus on loopback (Debian's `prometheus`, installed by `scripts/env.sh` as etcd
//! is), scraping the given `/metrics` ports every second with the alert rules of `deploy/`, and
//! queried through its HTTP API.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::process::{free_port, poll, Proc, DEADLINE};

/// A Prometheus server killed when dropped.
pub struct Prometheus {
    proc: Proc,
    port: u16,
}

/// Percent-encodes `text` for a query string.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Prometheus {
    /// Starts `prometheus` (or `LORACTL_PROMETHEUS`) in `dir`, scraping `targets`
    /// (`(job, port)` on 127.0.0.1) with `rules`; `None` with `LORACTL_SKIP_PROMETHEUS=1`. A
    /// missing binary fails with how to install it.
    pub fn start(dir: &Path, targets: &[(&str, u16)], rules: &Path) -> Option<Self> {
        if std::env::var("LORACTL_SKIP_PROMETHEUS").as_deref() == Ok("1") {
            eprintln!("LORACTL_SKIP_PROMETHEUS=1: skipping the Prometheus test");
            return None;
        }
        let binary =
            std::env::var("LORACTL_PROMETHEUS").unwrap_or_else(|_| "prometheus".to_owned());
        std::fs::create_dir_all(dir).expect("a folder for Prometheus");
        let jobs: String = targets
            .iter()
            .map(|(job, port)| {
                format!(
                    "  - job_name: {job}\n    static_configs:\n      - targets: [\"127.0.0.1:{port}\"]\n"
                )
            })
            .collect();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
                 scrape_configs:\n{jobs}",
                serde_json::to_string(&rules.display().to_string()).unwrap_or_default()
            ),
        )
        .expect("writing prometheus.yml");
        let port = free_port();
        let mut command = Command::new(&binary);
        command
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn");
        let mut proc = Proc::spawn("prometheus", command, dir.join("prometheus.log"))
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start `{binary}` ({e:#}): install Prometheus (`apt-get install -y \
                     prometheus`) or point LORACTL_PROMETHEUS at it; LORACTL_SKIP_PROMETHEUS=1 \
                     skips this test"
                )
            });
        poll("Prometheus to be ready", DEADLINE, || {
            assert!(
                proc.exited().is_none(),
                "prometheus exited:\n{}",
                proc.log_tail()
            );
            get(port, "/-/ready")
                .filter(|(code, _)| *code == 200)
                .map(|_| ())
        });
        Some(Self { proc, port })
    }

    /// `/api/v1/query_range` of `query` over the last `window`, one point a second: the
    /// `data.result` array, or the error Prometheus gave.
    pub fn query_range(&self, query: &str, window: Duration) -> Result<Vec<Value>, String> {
        let end = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let path = format!(
            "/api/v1/query_range?query={}&start={:.3}&end={end:.3}&step=1",
            encode(query),
            end - window.as_secs_f64()
        );
        self.api(&path)
    }

    /// `/api/v1/query` of `query` now.
    pub fn query(&self, query: &str) -> Result<Vec<Value>, String> {
        self.api(&format!("/api/v1/query?query={}", encode(query)))
    }

    fn api(&self, path: &str) -> Result<Vec<Value>, String> {
        let (_, body) = get(self.port, path).ok_or("Prometheus did not answer")?;
        let answer: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if answer["status"] != "success" {
            return Err(body);
        }
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Names of the alert rules Prometheus loaded, with their health.
    pub fn rules(&self) -> Vec<(String, String)> {
        let Some((_, body)) = get(self.port, "/api/v1/rules") else {
            return Vec::new();
        };
        let answer: Value = serde_json::from_str(&body).unwrap_or_default();
        answer["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .map(|r| {
                (
                    r["name"].as_str().unwrap_or("").to_owned(),
                    r["health"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }

    pub fn log_tail(&self) -> String {
        self.proc.log_tail()
    }
}

/// A plain HTTP/1.1 GET on 127.0.0.1:`port`: status code and body.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Some((code, body))
}

/// The body of a `Transfer-Encoding: chunked` response.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_encoded_and_chunks_joined() {
        assert_eq!(encode("a{b=\"c\"}[1m]"), "a%7Bb%3D%22c%22%7D%5B1m%5D");
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
    }
}
