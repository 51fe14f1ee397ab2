//! Job logs on disk, so that `loractl logs` works for any job after a coordinator restart (or
//! on the standby that took over, which shares the artifact volume). One file per job,
//! `<dir>/<job>.log`, a line per log line (`at`, attempt, rank, stream, text; tabs and
//! newlines in the text escaped). A file that grows past its cap becomes `<job>.log.1`
//! (replacing the one before), so a job keeps between one and two caps of its latest lines.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use loractl_proto::domain::{JobId, LogLine, LogStream};

/// The logs of every job, in one folder.
pub struct LogFiles {
    dir: PathBuf,
    cap_bytes: u64,
    open: HashMap<JobId, (File, u64)>,
    /// A write failed once: said once, then the logs stay in memory only.
    warned: bool,
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out
}

fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

fn encode(line: &LogLine) -> String {
    let stream = match line.stream {
        LogStream::Stdout => "out",
        LogStream::Stderr => "err",
    };
    format!(
        "{}\t{}\t{}\t{stream}\t{}\n",
        line.at,
        line.attempt,
        line.rank,
        escape(&line.text)
    )
}

fn decode(job: &JobId, text: &str) -> Option<LogLine> {
    let mut fields = text.splitn(5, '\t');
    let at = fields.next()?.parse().ok()?;
    let attempt = fields.next()?.parse().ok()?;
    let rank = fields.next()?.parse().ok()?;
    let stream = match fields.next()? {
        "err" => LogStream::Stderr,
        _ => LogStream::Stdout,
    };
    Some(LogLine {
        job_id: job.clone(),
        attempt,
        rank,
        stream,
        text: unescape(fields.next()?),
        at,
    })
}

impl LogFiles {
    /// Logs in `dir` (created on the first line), each job's file rotated past `cap_bytes`.
    pub fn new(dir: impl Into<PathBuf>, cap_bytes: u64) -> Self {
        Self {
            dir: dir.into(),
            cap_bytes: cap_bytes.max(1024),
            open: HashMap::new(),
            warned: false,
        }
    }

    fn path(&self, job: &JobId) -> PathBuf {
        self.dir.join(format!("{job}.log"))
    }

    fn rotated(path: &Path) -> PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(".1");
        PathBuf::from(name)
    }

    /// Appends `line` to its job's file.
    pub fn append(&mut self, line: &LogLine) {
        if let Err(e) = self.try_append(line) {
            if !self.warned {
                self.warned = true;
                tracing::warn!(dir = %self.dir.display(), error = %e, "job logs cannot be written to disk; they are kept in memory only, until a restart");
            }
        }
    }

    fn try_append(&mut self, line: &LogLine) -> std::io::Result<()> {
        let path = self.path(&line.job_id);
        if !self.open.contains_key(&line.job_id) {
            std::fs::create_dir_all(&self.dir)?;
            let file = OpenOptions::new().create(true).append(true).open(&path)?;
            let size = file.metadata()?.len();
            self.open.insert(line.job_id.clone(), (file, size));
        }
        let record = encode(line);
        let cap = self.cap_bytes;
        let Some((file, size)) = self.open.get_mut(&line.job_id) else {
            return Ok(());
        };
        if *size > 0 && *size + record.len() as u64 > cap {
            std::fs::rename(&path, Self::rotated(&path))?;
            *file = OpenOptions::new().create(true).append(true).open(&path)?;
            *size = 0;
        }
        file.write_all(record.as_bytes())?;
        *size += record.len() as u64;
        Ok(())
    }

    /// Closes `job`'s file (it ended); its lines stay readable.
    pub fn close(&mut self, job: &JobId) {
        self.open.remove(job);
    }

    /// The last `max` lines of `job` on disk, oldest first.
    pub fn read(&self, job: &JobId, max: usize) -> Vec<LogLine> {
        let path = self.path(job);
        let mut lines = std::collections::VecDeque::new();
        for file in [Self::rotated(&path), path] {
            let Ok(file) = File::open(&file) else {
                continue;
            };
            for text in BufReader::new(file).lines().map_while(Result::ok) {
                if let Some(line) = decode(job, &text) {
                    if lines.len() == max {
                        lines.pop_front();
                    }
                    lines.push_back(line);
                }
            }
        }
        lines.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(job: &JobId, i: usize, text: &str) -> LogLine {
        LogLine {
            job_id: job.clone(),
            attempt: 1,
            rank: 2,
            stream: if i.is_multiple_of(2) {
                LogStream::Stdout
            } else {
                LogStream::Stderr
            },
            text: text.to_owned(),
            at: 1_700_000_000_000 + i as i64,
        }
    }

    #[test]
    fn lines_round_trip_and_survive_a_new_instance() {
        let dir = tempfile::tempdir().unwrap();
        let job = JobId::new("j3");
        let odd = "tab\there, back\\slash, new\nline";
        let mut files = LogFiles::new(dir.path().join("logs"), 1 << 20);
        files.append(&line(&job, 0, "epoch 1/2"));
        files.append(&line(&job, 1, odd));
        drop(files);
        let files = LogFiles::new(dir.path().join("logs"), 1 << 20);
        assert_eq!(
            files.read(&job, 10),
            vec![line(&job, 0, "epoch 1/2"), line(&job, 1, odd)]
        );
        assert_eq!(files.read(&job, 1), vec![line(&job, 1, odd)]);
        assert!(files.read(&JobId::new("j4"), 10).is_empty());
    }

    #[test]
    fn a_long_log_keeps_its_latest_lines_within_two_caps() {
        let dir = tempfile::tempdir().unwrap();
        let job = JobId::new("j1");
        let mut files = LogFiles::new(dir.path(), 4096);
        for i in 0..1000 {
            files.append(&line(&job, i, &format!("line {i}")));
        }
        let on_disk: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(on_disk <= 2 * 4096, "{on_disk} bytes");
        let kept = files.read(&job, usize::MAX);
        assert!(kept.len() > 50, "{}", kept.len());
        assert_eq!(kept.last().map(|l| l.text.as_str()), Some("line 999"));
        let first: usize = kept[0].text["line ".len()..].parse().unwrap();
        assert_eq!(kept.len(), 1000 - first, "contiguous up to the last line");
    }
}
