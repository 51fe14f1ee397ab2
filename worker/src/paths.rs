//! Confines a job to the folders the worker allows. Every input path of the spec is resolved
//! against the worker's roots (`model_dirs` for checkpoints and weights, `data_dirs` for
//! datasets and prompt files): a relative path is looked up under each root in turn, an
//! absolute one must lie inside a root, and `..` or symbolic links cannot lead out (paths are
//! compared after canonicalisation). Outputs go to the rank's own output folder. The rank gets
//! the spec with these resolved absolute paths, so it never interprets a path itself.

use std::path::{Path, PathBuf};

use loractl_spec::JobSpec;

use crate::error::{Error, Result};

/// Which roots a spec path is resolved against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Model,
    Data,
}

fn canonical_roots(roots: &[PathBuf]) -> Vec<PathBuf> {
    roots.iter().filter_map(|r| r.canonicalize().ok()).collect()
}

/// The canonical path of `path` if it exists inside one of `roots` (already canonical).
fn inside(path: &Path, roots: &[PathBuf]) -> Option<PathBuf> {
    let canonical = path.canonicalize().ok()?;
    roots
        .iter()
        .any(|root| canonical.starts_with(root))
        .then_some(canonical)
}

fn resolve_one(
    key: &str,
    path: &Path,
    kind: Kind,
    model: &[PathBuf],
    data: &[PathBuf],
) -> Result<PathBuf> {
    let (roots, setting) = match kind {
        Kind::Model => (model, "model_dirs"),
        Kind::Data => (data, "data_dirs"),
    };
    let listed = || {
        if roots.is_empty() {
            "none configured".to_owned()
        } else {
            roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let found = if path.is_absolute() {
        inside(path, roots)
    } else {
        roots
            .iter()
            .find_map(|root| inside(&root.join(path), std::slice::from_ref(root)))
    };
    found.ok_or_else(|| Error::PathNotAllowed {
        key: key.to_owned(),
        path: path.to_owned(),
        problem: format!(
            "not found inside the worker's {setting} ({}): put it there, or add its folder to `{setting}` in the worker config",
            listed()
        ),
    })
}

/// Rewrites every path of `spec` to an allowed absolute path, and its outputs to `output_dir`.
pub fn confine(
    spec: &mut JobSpec,
    model_dirs: &[PathBuf],
    data_dirs: &[PathBuf],
    output_dir: &Path,
) -> Result<()> {
    let model = canonical_roots(model_dirs);
    let data = canonical_roots(data_dirs);
    let resolve = |key: &str, path: &Path, kind| resolve_one(key, path, kind, &model, &data);

    spec.model.pretrained_model_name_or_path = resolve(
        "model.pretrained_model_name_or_path",
        &spec.model.pretrained_model_name_or_path,
        Kind::Model,
    )?;
    if let Some(vae) = &spec.model.vae {
        spec.model.vae = Some(resolve("model.vae", vae, Kind::Model)?);
    }
    if let Some(weights) = &spec.network.network_weights {
        spec.network.network_weights =
            Some(resolve("network.network_weights", weights, Kind::Model)?);
    }
    spec.dataset.train_data_dir = resolve(
        "dataset.train_data_dir",
        &spec.dataset.train_data_dir,
        Kind::Data,
    )?;
    if let Some(reg) = &spec.dataset.reg_data_dir {
        spec.dataset.reg_data_dir = Some(resolve("dataset.reg_data_dir", reg, Kind::Data)?);
    }
    if let Some(prompts) = &spec.sample.sample_prompts {
        spec.sample.sample_prompts = Some(resolve("sample.sample_prompts", prompts, Kind::Data)?);
    }
    if spec.output.resume.is_some() {
        // A cluster job resumes from the checkpoint the coordinator hands over.
        return Err(Error::PathNotAllowed {
            key: "output.resume".to_owned(),
            path: spec.output.resume.clone().unwrap_or_default(),
            problem: "not used on a cluster: a retried job resumes from its latest uploaded checkpoint (LORACTL_RESUME)".to_owned(),
        });
    }
    spec.output.output_dir = output_dir.to_owned();
    if spec.logging.logging_dir.is_some() {
        spec.logging.logging_dir = Some(output_dir.join("logs"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_text() -> String {
        loractl_tests::spec::job_spec(
            "zenny",
            "sd15.safetensors",
            "[logging]\nlogging_dir = \"/var/log/anywhere\"\n",
        )
    }

    struct Roots {
        _dir: tempfile::TempDir,
        models: PathBuf,
        data: PathBuf,
        out: PathBuf,
        secret: PathBuf,
    }

    fn roots() -> Roots {
        let dir = tempfile::tempdir().unwrap();
        let models = dir.path().join("models");
        let data = dir.path().join("data");
        let out = dir.path().join("out");
        let secret = dir.path().join("secret");
        for d in [&models, &data, &out, &secret] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(models.join("sd15.safetensors"), b"x").unwrap();
        std::fs::create_dir_all(data.join("train/30_zenny")).unwrap();
        std::fs::write(secret.join("key"), b"s").unwrap();
        Roots {
            _dir: dir,
            models,
            data,
            out,
            secret,
        }
    }

    fn spec(text: &str) -> JobSpec {
        JobSpec::from_toml_str(text, "test").unwrap()
    }

    #[test]
    fn relative_paths_resolve_inside_the_roots_and_outputs_move() {
        let r = roots();
        let mut s = spec(&spec_text());
        confine(
            &mut s,
            std::slice::from_ref(&r.models),
            std::slice::from_ref(&r.data),
            &r.out,
        )
        .unwrap();
        assert_eq!(
            s.model.pretrained_model_name_or_path,
            r.models.canonicalize().unwrap().join("sd15.safetensors")
        );
        assert_eq!(
            s.dataset.train_data_dir,
            r.data.canonicalize().unwrap().join("train")
        );
        assert_eq!(s.output.output_dir, r.out);
        assert_eq!(s.logging.logging_dir, Some(r.out.join("logs")));
        // The rewritten spec still parses and validates.
        let text = s.to_toml_string().unwrap();
        spec(&text).validate().unwrap();
    }

    #[test]
    fn paths_cannot_escape() {
        let r = roots();
        let escapes = [
            spec_text().replace(
                "train_data_dir = \"train\"",
                "train_data_dir = \"../secret\"",
            ),
            spec_text().replace(
                "train_data_dir = \"train\"",
                &format!("train_data_dir = \"{}\"", r.secret.display()),
            ),
            spec_text().replace(
                "pretrained_model_name_or_path = \"sd15.safetensors\"",
                "pretrained_model_name_or_path = \"../secret/key\"",
            ),
        ];
        for text in escapes {
            let mut s = spec(&text);
            let err = confine(
                &mut s,
                std::slice::from_ref(&r.models),
                std::slice::from_ref(&r.data),
                &r.out,
            )
            .unwrap_err();
            assert!(matches!(err, Error::PathNotAllowed { .. }), "{err}");
        }
        // A symbolic link inside a root that points outside it does not help.
        std::os::unix::fs::symlink(&r.secret, r.data.join("link")).unwrap();
        let mut s =
            spec(&spec_text().replace("train_data_dir = \"train\"", "train_data_dir = \"link\""));
        let err = confine(
            &mut s,
            std::slice::from_ref(&r.models),
            std::slice::from_ref(&r.data),
            &r.out,
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("dataset.train_data_dir") && text.contains("data_dirs"),
            "{text}"
        );
    }

    #[test]
    fn without_roots_nothing_is_readable() {
        let r = roots();
        let mut s = spec(&spec_text());
        let err = confine(&mut s, &[], &[], &r.out).unwrap_err();
        assert!(err.to_string().contains("none configured"), "{err}");
    }
}
