//! Reading the files of `deploy/` (systemd units, Kubernetes manifests) in the tests that keep
//! them in step with the binaries.

use std::path::{Path, PathBuf};

/// The repository's `deploy/` folder.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The text of `rel` under `deploy/`.
pub fn read(rel: impl AsRef<Path>) -> String {
    let path = deploy_dir().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The lines of the YAML block under the line that reads `key` (e.g. `args:`): those more
/// indented than it, and blank lines. With `comments`, `#` lines at any indent belong to it
/// too (commented-out list items). Panics naming `key` when no line reads so.
pub fn yaml_block<'a>(text: &'a str, key: &str, comments: bool) -> (usize, Vec<&'a str>) {
    let indent = |l: &str| l.len() - l.trim_start().len();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim() == key)
        .unwrap_or_else(|| panic!("no `{key}` line"));
    let key_indent = indent(lines[start]);
    let block = lines[start + 1..]
        .iter()
        .copied()
        .take_while(|l| {
            let t = l.trim();
            t.is_empty() || indent(l) > key_indent || (comments && t.starts_with('#'))
        })
        .collect();
    (key_indent, block)
}
