//! A confined run reads nothing outside its allowed folders: a caption, image, prompt file or
//! latent cache linked out of the dataset is refused naming the file (also when the link is
//! swapped in after the scan), and the linked file's words never reach an output. Unconfined
//! (local) runs follow links as kohya does.
#![cfg(unix)]

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use loractl_trainer::confine::AllowedRoots;
use loractl_trainer::dataset::{Dataset, DatasetConfig};
use loractl_trainer::run::{self, RunOptions};
use loractl_trainer::Error;
use rand::SeedableRng;

mod support;
use support::TempDir;

const SECRET: &str = "hunter2-topsecret-token";

/// `dir/train/5_shapes/` with four images and captions, and `dir/secret/token.txt` beside it.
fn dataset(t: &TempDir) -> (PathBuf, PathBuf) {
    let train = loractl_trainer::demo::write_dataset(t.path(), 64, 4).expect("dataset");
    let secret_dir = t.join("secret");
    std::fs::create_dir_all(&secret_dir).expect("secret dir");
    let secret = secret_dir.join("token.txt");
    std::fs::write(&secret, SECRET).expect("secret");
    (train, secret)
}

fn cfg(train: &Path, roots: AllowedRoots) -> DatasetConfig {
    DatasetConfig {
        resolution: (64, 64),
        allowed_roots: roots,
        ..DatasetConfig::new(train)
    }
}

fn config_error(result: loractl_trainer::Result<impl std::fmt::Debug>) -> String {
    match result {
        Err(Error::Config(msg)) => msg,
        other => panic!("expected a configuration error, got {other:?}"),
    }
}

#[test]
fn a_caption_linked_out_of_the_dataset_is_refused_when_confined() {
    let t = TempDir::new("caption-link");
    let (train, secret) = dataset(&t);
    let caption = train.join("5_shapes/001.txt");
    std::fs::remove_file(&caption).expect("remove caption");
    symlink(&secret, &caption).expect("link");

    let msg = config_error(Dataset::open(cfg(&train, AllowedRoots::only([&train]))));
    assert!(msg.contains("001.txt"), "{msg}");
    assert!(!msg.contains(SECRET), "{msg}");

    // A local run follows the link, as kohya does.
    let ds = Dataset::open(cfg(&train, AllowedRoots::any())).expect("unconfined");
    assert!(ds.images().iter().any(|i| i.caption == SECRET));
}

#[test]
fn a_linked_image_or_folder_leading_out_is_refused_when_confined() {
    let t = TempDir::new("image-link");
    let (train, _) = dataset(&t);
    let outside = t.join("elsewhere");
    std::fs::create_dir_all(&outside).expect("dir");
    std::fs::rename(train.join("5_shapes/002.png"), outside.join("x.png")).expect("move");
    symlink(outside.join("x.png"), train.join("5_shapes/002.png")).expect("link");
    let msg = config_error(Dataset::open(cfg(&train, AllowedRoots::only([&train]))));
    assert!(msg.contains("002.png"), "{msg}");

    // A whole `N_name` folder linked from elsewhere.
    let t = TempDir::new("folder-link");
    let (train, _) = dataset(&t);
    std::fs::rename(train.join("5_shapes"), t.join("shapes")).expect("move");
    symlink(t.join("shapes"), train.join("5_shapes")).expect("link");
    let msg = config_error(Dataset::open(cfg(&train, AllowedRoots::only([&train]))));
    assert!(msg.contains("5_shapes"), "{msg}");
    // Links that stay inside the roots are fine.
    Dataset::open(cfg(&train, AllowedRoots::only([t.path()]))).expect("inside the roots");
}

/// The check is made on the file actually opened: an image replaced by a link after the scan
/// (the worker's and the dataset's checks both passed) is refused when it is read, and the
/// run stops instead of skipping it.
#[test]
fn an_image_swapped_for_a_link_after_the_scan_is_refused_at_open() {
    let t = TempDir::new("swap");
    let (train, _) = dataset(&t);
    let outside = t.join("elsewhere");
    std::fs::create_dir_all(&outside).expect("dir");
    let ds = Dataset::open(cfg(&train, AllowedRoots::only([&train]))).expect("clean dataset");
    let index = ds
        .images()
        .iter()
        .position(|i| i.path.ends_with("003.png"))
        .expect("image 003");
    let image = ds.images()[index].path.clone();
    std::fs::rename(&image, outside.join("x.png")).expect("move");
    symlink(outside.join("x.png"), &image).expect("link");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let msg = config_error(ds.load_fitted(index, false, &mut rng));
    assert!(msg.contains("003.png") && msg.contains("x.png"), "{msg}");
}

#[test]
fn a_latent_cache_linked_out_of_the_dataset_is_refused() {
    let t = TempDir::new("cache-link");
    let (train, _) = dataset(&t);
    let outside = t.join("cache-elsewhere");
    std::fs::create_dir_all(&outside).expect("dir");
    symlink(&outside, train.join(".latent_cache")).expect("link");
    let ds = Dataset::open(DatasetConfig {
        cache_latents: true,
        cache_latents_to_disk: true,
        ..cfg(&train, AllowedRoots::only([&train]))
    })
    .expect("dataset");
    let msg = config_error(ds.latent_cache("vae").map(|_| ()));
    assert!(msg.contains(".latent_cache"), "{msg}");
}

#[test]
fn a_prompt_file_linked_out_is_refused_when_confined() {
    let t = TempDir::new("prompts");
    let (train, secret) = dataset(&t);
    let prompts = train.join("prompts.txt");
    symlink(&secret, &prompts).expect("link");
    let msg = config_error(loractl_trainer::sample::load_prompts_within(
        &prompts,
        &AllowedRoots::only([&train]),
    ));
    assert!(msg.contains("prompts.txt"), "{msg}");
}

/// A whole run: refused as a bad configuration before training, naming the file, and nothing
/// the run wrote holds the secret.
#[test]
fn a_confined_run_with_a_linked_caption_fails_as_bad_config_and_leaks_nothing() {
    let t = TempDir::new("run");
    let (train, secret) = dataset(&t);
    let caption = train.join("5_shapes/000.txt");
    std::fs::remove_file(&caption).expect("remove caption");
    symlink(&secret, &caption).expect("link");
    let model = loractl_trainer::demo::bundled_tiny_model();
    let text = loractl_trainer::demo::job_toml(&model, &train, 64, 2);
    let spec = loractl_spec::JobSpec::from_toml_str(&text, "job.toml")
        .expect("spec")
        .resolved()
        .expect("resolved");
    let ro = RunOptions {
        allowed_roots: AllowedRoots::only([&train]),
        ..RunOptions::default()
    };
    let result = run::run(&spec, t.path(), &ro, &mut |_| {});
    let msg = config_error(result.map(|_| ()));
    assert!(msg.contains("000.txt"), "{msg}");
    assert!(!msg.contains(SECRET), "{msg}");
    for entry in walk(t.path()) {
        if entry.starts_with(t.join("secret")) || entry.is_symlink() {
            continue;
        }
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
            "{} holds the secret",
            entry.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_symlink() {
            continue;
        }
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
